"""What a run directory says: state (alive, finished, failed, ...), health, progress, baselines (torch-free).

Works on what diffold.runinfo read from the end of the files; `summarize` is the `status --json` payload.
"""
from __future__ import annotations

import itertools
import os
import shlex
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from diffold.runbaseline import compare
from diffold.runinfo import RunData, fmt_duration, num, section, to_int
from diffold.tailread import flat

STALL_FLOOR_S = 600.0   # a running heartbeat older than max(10 log intervals, this) is stale
# end statuses of train_full.py (end event / heartbeat) and its exit codes; each is also a monitor state
END_STATES = ("finished", "early_stopped", "max_steps", "finished_unhealthy", "gave_up", "failed", "interrupted")
OK_ENDS = ("finished", "early_stopped", "max_steps")
ENDED = (*END_STATES, "crashed")
HEALTH_NAMES = {0: "healthy", 1: "warning", 2: "critical"}
NO_METRICS = "no metrics yet — training has not logged its first step"
ENDED_EARLY = "the run ended before its first logged training step"


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) and x else None


# --------------------------------------------------------------------------- liveness
def pid_alive(pid: int) -> bool | None:
    """True if a process with this pid exists on this host and is not a zombie; None if not checkable."""
    if not 0 < pid < 2 ** 31:  # 0 / -1 would address process groups, not a process
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")  # absent without procfs (macOS): then kill(0) is all we know
    try:
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def log_interval(run: RunData) -> float | None:
    """Typical seconds between train log events since the last (re)start (median of recent gaps)."""
    times = [t for t in (num(r.get("time")) for r in run.events("train", since_start=True)[-21:]) if t is not None]
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(gaps) if gaps else None


def _end_reason(end: dict) -> str:
    status, reason, code = end.get("status"), _str(end.get("reason")), to_int(end.get("exit_code"))
    why = f"end event: {reason or _str(status) or 'no reason given'}"
    if not (isinstance(status, str) and status in END_STATES):
        why += f" (unknown end status {str(status)[:40]!r})"
    return why + (f" (exit code {code})" if code is not None else "")


def run_state(run: RunData, now: float) -> tuple[str, str]:
    """(state, why): alive / stalled / crashed, or one of END_STATES."""
    hb = run.heartbeat or {}
    marks = [r for r in run.metrics if r.get("event") in ("start", "end")]
    last_start_t = num(marks[-1].get("time")) if marks and marks[-1]["event"] == "start" else None
    if marks and (end := marks[-1])["event"] == "end":  # also a failed start-up: an end event, maybe no start
        status = end.get("status")
        return (status if isinstance(status, str) and status in END_STATES else "failed"), _end_reason(end)
    hb_time, hb_status = num(hb.get("time")), _str(hb.get("status"))
    if hb_status in END_STATES and (last_start_t is None or (hb_time or 0) >= last_start_t):
        why = f"heartbeat status '{hb_status}'" + (
            f"; last log line: {run.log_tail[-1]}" if hb_status == "failed" and run.log_tail else "")
        return hb_status, why
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
    pid, host, phase = to_int(hb.get("pid")), _str(hb.get("host")), _str(hb.get("phase")) or "?"
    alive = pid_alive(pid) if pid is not None and host == socket.gethostname() else None
    if alive is False:
        return "crashed", f"process {pid} on {host} is gone (last heartbeat {fmt_duration(age)} ago)"
    if age <= threshold:
        return "alive", f"heartbeat {fmt_duration(age)} ago (phase {phase})"
    if traceback and not alive:
        return "crashed", f"heartbeat {fmt_duration(age)} old and the log ends with a traceback"
    if alive:
        return "stalled", (f"process {pid} is alive but its heartbeat is {fmt_duration(age)} old "
                           f"(> {fmt_duration(threshold)}); phase {phase}")
    return "stalled", (f"heartbeat {fmt_duration(age)} old (> {fmt_duration(threshold)}); pid {pid} runs on "
                       f"{host}, cannot check it from here")


# --------------------------------------------------------------------------- summary parts
def _best(run: RunData, val: list[dict]) -> dict:
    last = val[-1] if val else {}
    best = {"metric": _str(last.get("best_metric")), "value": num(last.get("best_value")),
            "step": to_int(last.get("best_step"))}
    ck = next((c for c in run.checkpoints if c["name"] == "best" and c["valid"]), None)
    best["checkpoint"] = {"name": "best", "step": ck["step"]} if ck else None
    return best


def _health(run: RunData, train: list[dict], start_step: int | None) -> dict:
    """Health of the last log interval (the steps its train record covers) and the counts since start.

    `health/status` of a train record is the WORST step of its interval; the log line printed at the
    same time names the LAST step's status. Both are said, with the step range, so they cannot be
    read as contradicting each other.
    """
    last = train[-1] if train else {}
    hi = to_int(last.get("step"))
    prev = to_int(train[-2].get("step")) if len(train) > 1 else start_step
    lo = prev + 1 if prev is not None and hi is not None and prev < hi else hi
    code = to_int(last.get("health/status"))
    status = HEALTH_NAMES.get(code, "unknown") if code is not None else ("unknown" if not train else "healthy")
    inside = [e for e in run.health if lo is not None and (s := to_int(e.get("step"))) is not None and lo <= s <= hi]
    latest = to_int(last.get("health/status_last"))  # the last step's own status, where the trainer logs it
    if latest is not None:
        latest_status = HEALTH_NAMES.get(latest)
    else:  # from the events at the last step; none there: not known (repeated warnings are rate-limited)
        at_hi = [e.get("status") for e in inside if to_int(e.get("step")) == hi]
        latest_status = "critical" if "critical" in at_hi else "warning" if "warning" in at_hi else None
    out: dict[str, Any] = {
        "status": status, "interval": [lo, hi] if hi is not None else None, "latest_step_status": latest_status,
        "interval_events": [{k: e.get(k) for k in ("step", "status", "check")} for e in inside[-5:]],
        "warnings": run.health_counts["warning"], "critical": run.health_counts["critical"],
        "counts_complete": run.complete["health"],
        "latest": [{k: e.get(k) for k in ("step", "status", "check", "message", "suggestion", "action")}
                   for e in run.health[-5:]],
    }
    for key, action in (("skipped_steps", "skip"), ("rollbacks", "rollback"), ("oom_retries", "oom_retry")):
        logged = to_int(last.get(f"health/{key}"))
        out[key] = logged if logged is not None else sum(e.get("action") == action for e in run.health)
    out["words"] = health_words(out)
    return out


def health_words(h: dict) -> str:
    """The health line after the status word, e.g. 'in the last log interval (steps 111-120): ...'."""
    if h["interval"] is None:
        return "no training step logged yet"
    lo, hi = h["interval"]
    span = f"steps {lo}-{hi}" if lo is not None and lo < hi else f"step {hi}"
    if h["status"] == "healthy":
        text = f"over the last log interval ({span}): no warning"
    else:
        by_check: dict[str, list[str]] = {}
        for e in h["interval_events"]:
            by_check.setdefault(str(e["check"]), []).append(str(e["step"]))
        seen = ", ".join(f"{c} at step{'s' * (len(st) > 1)} {', '.join(st)}" for c, st in by_check.items())
        text = f"in the last log interval ({span})" + (f": {seen}" if seen else "")
        if h["latest_step_status"]:  # known only where the trainer logs it or an event names that step
            text += f"; the latest step ({hi}) is {h['latest_step_status']}"
    return text


def _data(report: dict | None) -> dict | None:
    """Per split: the report's scalars plus by_kind/skipped counts and a skipped total (no skipped_items)."""
    if not report:
        return None
    splits = {}
    for name, s in itertools.islice(((n, s) for n, s in report.items() if isinstance(s, dict) and "chains_used" in s), 20):
        skipped = flat(section(s, "skipped"))
        splits[str(name)] = flat(s) | {"by_kind": flat(section(s, "by_kind")), "skipped": skipped,
                                       "skipped_total": sum(to_int(n) or 0 for n in skipped.values())}
    return {"split_method": _str(report.get("split_method")), "splits": splits}


def summarize(run: RunData, now: float | None = None) -> dict[str, Any]:
    """The status of a run as one JSON-able dict (the `status --json` payload)."""
    now = time.time() if now is None else now
    hb = run.heartbeat or {}
    starts, train, val = run.events("start"), run.events("train", since_start=True), run.events("val")
    last_start = starts[-1] if starts else {}
    last_train = train[-1] if train else {}
    state, why = run_state(run, now)
    ends = [r for r in run.metrics if r.get("event") in ("start", "end")]
    end = ends[-1] if ends and ends[-1]["event"] == "end" else None
    # position from the newer of heartbeat and last metrics line (not a max: rollbacks go back)
    srcs = sorted((d for d in (hb, run.metrics[-1] if run.metrics else {}) if d), key=lambda d: num(d.get("time")) or 0)
    step, epoch = (next((v for v in (to_int(d.get(k)) for d in reversed(srcs)) if v is not None), None)
                   for k in ("step", "epoch"))
    total = to_int(hb.get("total_steps")) or to_int(last_start.get("total_steps"))
    recent = [(num(r.get("step")), num(r.get("time"))) for r in train[-20:]]
    recent = [(s, t) for s, t in recent if s is not None and t is not None]
    ds, dt = (recent[-1][0] - recent[0][0], recent[-1][1] - recent[0][1]) if len(recent) > 1 else (0, 0)
    rate = ds / dt if ds > 0 and dt > 0 else None  # steps/s over the recent window, for the ETA
    eta = (total - step) / rate if rate and total and step is not None and state in ("alive", "stalled") else None
    run_dir = run.path.resolve()
    resume = _str(hb.get("resume_command")) or _str(last_start.get("resume_command")) or (
        f"accelerate launch train_full.py --config {shlex.quote(str(run_dir / 'config.yaml'))} "
        f"--output_dir {shlex.quote(str(run_dir))} --resume auto")
    hb_info = ({k: flat(hb).get(k) for k in ("status", "phase", "pid", "host")} | {"age_s": now - num(hb["time"])}
               if num(hb.get("time")) is not None else None)
    notes = list(run.notes) + ([] if train or val else [ENDED_EARLY if state in ENDED else NO_METRICS])
    last_val = flat(val[-1]) if val else None
    return {
        "run_name": _str(last_start.get("run_name")) or run_dir.name, "run_dir": str(run_dir),
        "state": state, "state_reason": why, "ok": state in OK_ENDS if state in ENDED else None,
        "end": {k: end.get(k) for k in ("status", "reason", "exit_code")} if end else None,
        "time": now, "heartbeat": hb_info,
        "step": step, "total_steps": total, "progress": step / total if total and step is not None else None,
        "epoch": epoch, "num_epochs": to_int(section(run.config, "training").get("num_epochs")),
        "steps_per_s": rate, "eta_s": eta, "restarts": max(run.start_count - 1, 0),
        "restarts_complete": run.complete["metrics"], "resumed_from": _str(last_start.get("resumed_from")),
        "train": {k: v for k, v in last_train.items() if k != "event"} or None,
        "val": {k: v for k, v in last_val.items() if k != "event"} if last_val else None,
        "baseline": compare(last_val), "best": _best(run, val),
        "health": _health(run, train, to_int(last_start.get("step"))),
        "checkpoints": [c | {"age_s": now - c["time"] if c["time"] else None} for c in run.checkpoints],
        "data": _data(run.data_report), "resume_command": resume,
        "last_log_line": run.log_tail[-1] if run.log_tail else None, "notes": notes,
    }
