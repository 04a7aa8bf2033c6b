"""Read and summarise a training run directory (docs/run_directory.md) without importing torch."""
from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STALL_FLOOR_S = 600.0   # a running heartbeat older than max(10 log intervals, this) is stale
ENDED = ("finished", "early_stopped", "gave_up", "crashed")
HEALTH_NAMES = {0: "healthy", 1: "warning", 2: "critical"}
# end-event / heartbeat status -> monitor state ("max_steps" is a normal finish)
_END_STATES = {"finished": "finished", "max_steps": "finished", "early_stopped": "early_stopped",
               "gave_up": "gave_up", "failed": "crashed"}
NO_METRICS = "no metrics yet — training has not logged its first step"


class RunDirError(ValueError):
    """A directory that cannot be read as a run; the message is one line that says what to do."""


@dataclass
class RunData:
    """Everything read from one run directory (raw records, not yet summarised)."""

    path: Path
    config: dict
    metrics: list[dict]
    health: list[dict]
    heartbeat: dict | None
    data_report: dict | None
    checkpoints: list[dict]
    log_tail: list[str]
    last_activity: float            # newest mtime of the files the trainer writes
    notes: list[str]

    def events(self, kind: str, since_start: bool = False) -> list[dict]:
        """Metrics records of one event kind; since_start keeps those after the last (re)start."""
        starts = [i for i, r in enumerate(self.metrics) if r.get("event") == "start"] if since_start else []
        return [r for r in self.metrics[max(starts, default=0):] if r.get("event") == kind]


def num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    v = num(x)
    return int(v) if v is not None else None


def fmt_duration(seconds: float | None) -> str:
    """Human duration: 45s, 12m05s, 3h05m, 2d04h."""
    s = int(max(seconds, 0)) if seconds is not None else None
    return ("?" if s is None else f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600
            else f"{s // 3600}h{s % 3600 // 60:02d}m" if s < 86400 else f"{s // 86400}d{s % 86400 // 3600:02d}h")


# --------------------------------------------------------------------------- reading
def read_jsonl(path: Path, required: str | None = None) -> tuple[list[dict], list[str]]:
    """Parse a JSON-lines file into dict records plus notes about the lines it had to skip."""
    lines = path.read_bytes().split(b"\n") if path.is_file() else []
    records, bad, truncated = [], [], False
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both subclass it
            rec = None
        if isinstance(rec, dict) and (required is None or isinstance(rec.get(required), str)):
            records.append(rec)
        elif i == len(lines):  # no newline after it: the writer was killed (or is) mid-line
            truncated = True
        else:
            bad.append(i)
    notes = []
    if truncated:
        notes.append(f"ignored 1 truncated line at the end of {path.name}")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        notes.append(f"skipped {len(bad)} malformed line{'s' * (len(bad) > 1)} in {path.name} (line {shown})")
    return records, notes


def _read_doc(path: Path, notes: list[str]) -> dict | None:
    """A JSON or YAML mapping, or None (missing); unreadable files become a note, not a crash."""
    if not path.is_file():
        return None
    loader = json.loads if path.suffix == ".json" else yaml.safe_load
    try:
        doc = loader(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError covers JSON and UTF-8 errors
        doc = e
    if not isinstance(doc, dict):
        why = type(doc).__name__ if isinstance(doc, Exception) else "not a mapping"
        notes.append(f"{path.name} unreadable ({why}); ignored")
    return doc if isinstance(doc, dict) else None


def list_checkpoints(ckpt_dir: Path) -> list[dict]:
    """Checkpoint dirs with step/epoch/time from meta.json; a *.tmp or meta-less dir is INCOMPLETE."""
    out = []
    for entry in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        if not entry.is_dir() and not entry.is_symlink():
            continue  # stray files; nested dirs (best/export) are not listed either
        info: dict[str, Any] = {"name": entry.name, "valid": False, "step": None, "epoch": None, "time": None,
                                "target": os.readlink(entry) if entry.is_symlink() else None, "note": ""}
        tmp = entry.name.endswith(".tmp")
        meta = _read_doc(entry / "meta.json", []) if entry.is_dir() and not tmp else None
        if not entry.is_dir():
            info["note"] = "INCOMPLETE (dangling link)"
        elif tmp:
            info["note"] = "INCOMPLETE (.tmp: being written, or the writer died)"
        elif meta is None:
            info["note"] = f"INCOMPLETE ({'meta.json unreadable' if (entry / 'meta.json').exists() else 'no meta.json'})"
        else:
            info.update(valid=True, step=_int(meta.get("step")), epoch=_int(meta.get("epoch")),
                        time=num(meta.get("timestamp")) or (entry / "meta.json").stat().st_mtime)
        out.append(info)
    # latest, best, epoch_N by N, step_N by N, then anything else
    parts = [(c, *c["name"].partition("_")) for c in out]
    return [c for c, *_ in sorted(parts, key=lambda t: ({"latest": 0, "best": 1, "epoch": 2, "step": 3}.get(t[1], 4),
                                                        int(t[3]) if t[3].isdigit() else -1, t[0]["name"]))]


def _log_tail(log_dir: Path, n: int = 20) -> list[str]:
    """Last n non-empty lines of the newest logs/*.log (names carry a sortable timestamp)."""
    logs = sorted(log_dir.glob("*.log"))
    if not logs:
        return []
    with logs[-1].open("rb") as f:  # only the end: logs of long runs are large
        f.seek(max(logs[-1].stat().st_size - 16384, 0))
        text = f.read().decode("utf-8", errors="replace")
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-n:]


def load_run(path: str | os.PathLike) -> RunData:
    """Read every file of a run directory; RunDirError if it is missing or not a run."""
    root = Path(path)
    if not root.exists():
        raise RunDirError(f"run directory not found: {root} (pass the --output_dir that train_full.py wrote to)")
    if not root.is_dir() or not any((root / n).exists() for n in ("config.yaml", "metrics.jsonl", "heartbeat.json")):
        raise RunDirError(f"{root} is not a run directory (no config.yaml, metrics.jsonl or heartbeat.json); "
                          "pass the directory train_full.py wrote, e.g. outputs/<run_name>")
    metrics, notes = read_jsonl(root / "metrics.jsonl", required="event")
    health, health_notes = read_jsonl(root / "health.jsonl")
    notes += health_notes
    config = _read_doc(root / "config.yaml", notes) or {}
    heartbeat = _read_doc(root / "heartbeat.json", notes)
    data_report = _read_doc(root / "data_report.json", notes)
    watched = [root / n for n in ("config.yaml", "metrics.jsonl", "health.jsonl", "heartbeat.json")]
    watched += list((root / "logs").glob("*.log"))
    activity = max((p.stat().st_mtime for p in watched if p.exists()), default=0.0)
    return RunData(root, config, metrics, health, heartbeat, data_report, list_checkpoints(root / "checkpoints"),
                   _log_tail(root / "logs"), activity, notes)


# --------------------------------------------------------------------------- liveness
def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")  # absent without procfs (macOS): then kill(0) is all we know
    return not stat.is_file() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def log_interval(run: RunData) -> float | None:
    """Typical seconds between train log events since the last (re)start (median of recent gaps)."""
    times = [t for t in (num(r.get("time")) for r in run.events("train", since_start=True)[-21:]) if t is not None]
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(gaps) if gaps else None


def run_state(run: RunData, now: float) -> tuple[str, str]:
    """(state, why): alive / finished / early_stopped / gave_up / crashed / stalled."""
    hb = run.heartbeat or {}
    marks = [r for r in run.metrics if r.get("event") in ("start", "end")]
    last_start_t = num(marks[-1].get("time")) if marks and marks[-1]["event"] == "start" else None
    if marks and (end := marks[-1])["event"] == "end":
        return _END_STATES.get(str(end.get("status")), "finished"), f"end event: {end.get('reason') or end.get('status')}"
    hb_time = num(hb.get("time"))
    if hb.get("status") in _END_STATES and (last_start_t is None or (hb_time or 0) >= last_start_t):
        why = f"heartbeat status '{hb['status']}'" + (
            f"; last log line: {run.log_tail[-1]}" if hb["status"] == "failed" and run.log_tail else "")
        return _END_STATES[hb["status"]], why
    interval = log_interval(run)
    threshold = max(10 * interval, STALL_FLOOR_S) if interval else STALL_FLOOR_S
    traceback = any("Traceback (most recent call last)" in ln for ln in run.log_tail)
    if hb_time is None:
        age = now - run.last_activity
        if traceback and age > 60:  # handled errors log tracebacks too; a silent minute after one = gone
            return "crashed", "no heartbeat and the log ends with a traceback"
        if age <= threshold:
            return "alive", f"no heartbeat yet; files updated {fmt_duration(age)} ago"
        return "stalled", f"no heartbeat and no file activity for {fmt_duration(age)}"
    age = now - hb_time
    pid, host = _int(hb.get("pid")), hb.get("host")
    alive = pid_alive(pid) if pid is not None and host == socket.gethostname() else None
    if alive is False:
        return "crashed", f"process {pid} on {host} is gone (last heartbeat {fmt_duration(age)} ago)"
    if age <= threshold:
        return "alive", f"heartbeat {fmt_duration(age)} ago (phase {hb.get('phase', '?')})"
    if traceback and not alive:
        return "crashed", f"heartbeat {fmt_duration(age)} old and the log ends with a traceback"
    if alive:
        return "stalled", (f"process {pid} is alive but its heartbeat is {fmt_duration(age)} old "
                           f"(> {fmt_duration(threshold)}); phase {hb.get('phase', '?')}")
    return "stalled", (f"heartbeat {fmt_duration(age)} old (> {fmt_duration(threshold)}); pid {pid} runs on "
                       f"{host}, cannot check it from here")


# --------------------------------------------------------------------------- summary
def _best(run: RunData, val: list[dict]) -> dict:
    last = val[-1] if val else {}
    best = {"metric": last.get("best_metric"), "value": num(last.get("best_value")), "step": _int(last.get("best_step"))}
    ck = next((c for c in run.checkpoints if c["name"] == "best" and c["valid"]), None)
    best["checkpoint"] = {"name": "best", "step": ck["step"]} if ck else None
    return best


def _health(run: RunData, last_train: dict) -> dict:
    events = run.health
    status = _int(last_train.get("health/status"))
    out: dict[str, Any] = {
        "status": HEALTH_NAMES.get(status, "unknown") if status is not None
        else (str(events[-1].get("status")) if events else "healthy"),
        "warnings": sum(e.get("status") == "warning" for e in events),
        "critical": sum(e.get("status") == "critical" for e in events),
        "latest": [{k: e.get(k) for k in ("step", "status", "check", "message", "suggestion", "action")}
                   for e in events[-5:]],
    }
    for key, action in (("skipped_steps", "skip"), ("rollbacks", "rollback"), ("oom_retries", "oom_retry")):
        logged = _int(last_train.get(f"health/{key}"))
        out[key] = logged if logged is not None else sum(e.get("action") == action for e in events)
    return out


def _data(report: dict | None) -> dict | None:
    """Per split: the report minus the (possibly long) skipped_items list, plus a skipped total."""
    splits = {name: {k: v for k, v in s.items() if k != "skipped_items"}
              | {"skipped_total": sum(_int(n) or 0 for n in (s.get("skipped") or {}).values())}
              for name, s in (report or {}).items() if isinstance(s, dict) and "chains_used" in s}
    return {"split_method": report.get("split_method"), "splits": splits} if report else None


def summarize(run: RunData, now: float | None = None) -> dict[str, Any]:
    """The status of a run as one JSON-able dict (the `status --json` payload)."""
    now = time.time() if now is None else now
    hb = run.heartbeat or {}
    starts, train, val = run.events("start"), run.events("train"), run.events("val")
    last_start, last_train = (starts[-1] if starts else {}), (train[-1] if train else {})
    state, why = run_state(run, now)
    # position from the newer of heartbeat and last metrics line (not a max: rollbacks go back)
    srcs = sorted((d for d in (hb, run.metrics[-1] if run.metrics else {}) if d), key=lambda d: num(d.get("time")) or 0)
    step, epoch = (next((v for v in (_int(d.get(k)) for d in reversed(srcs)) if v is not None), None)
                   for k in ("step", "epoch"))
    total = _int(hb.get("total_steps")) or _int(last_start.get("total_steps"))
    recent = [(num(r.get("step")), num(r.get("time"))) for r in run.events("train", since_start=True)[-20:]]
    recent = [(s, t) for s, t in recent if s is not None and t is not None]
    ds, dt = (recent[-1][0] - recent[0][0], recent[-1][1] - recent[0][1]) if len(recent) > 1 else (0, 0)
    rate = ds / dt if ds > 0 and dt > 0 else None  # steps/s over the recent window, for the ETA
    eta = (total - step) / rate if rate and total and step is not None and state in ("alive", "stalled") else None
    run_dir = run.path.resolve()
    resume = hb.get("resume_command") or last_start.get("resume_command") or (
        f"accelerate launch train_full.py --config {shlex.quote(str(run_dir / 'config.yaml'))} "
        f"--output_dir {shlex.quote(str(run_dir))} --resume auto")
    hb_info = ({k: hb.get(k) for k in ("status", "phase", "pid", "host")} | {"age_s": now - num(hb["time"])}
               if num(hb.get("time")) is not None else None)
    notes = list(run.notes) + ([] if train or val else [NO_METRICS])
    return {
        "run_name": last_start.get("run_name") or run.path.resolve().name, "run_dir": str(run_dir),
        "state": state, "state_reason": why, "time": now, "heartbeat": hb_info,
        "step": step, "total_steps": total, "progress": step / total if total and step is not None else None,
        "epoch": epoch, "num_epochs": _int((run.config.get("training") or {}).get("num_epochs")),
        "steps_per_s": rate, "eta_s": eta, "restarts": max(len(starts) - 1, 0),
        "resumed_from": last_start.get("resumed_from"),
        "train": {k: v for k, v in last_train.items() if k != "event"} or None,
        "val": {k: v for k, v in val[-1].items() if k != "event"} if val else None,
        "best": _best(run, val), "health": _health(run, last_train),
        "checkpoints": [c | {"age_s": now - c["time"] if c["time"] else None} for c in run.checkpoints],
        "data": _data(run.data_report), "resume_command": resume,
        "last_log_line": run.log_tail[-1] if run.log_tail else None, "notes": notes,
    }
