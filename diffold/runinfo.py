"""Read a training run directory (docs/run_directory.md) without importing torch, from the END of its files.

Memory and time are bounded whatever the size of the run: metrics.jsonl is read backwards, at most
SCAN_BUDGET bytes (every line of the last PARSE_BUDGET bytes is parsed; further back only start,
val and end events); health.jsonl at most HEALTH_BUDGET bytes; every other file has a size cap.
Every unusable file or line becomes one note in RunData.notes, never an exception or a hang.
Interpreting what was read (state, health, baselines) is diffold.runstatus.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffold.tailread import (
    MAX_LINE,
    BackwardLines,
    Unreadable,
    flat,
    open_regular,
    parse_record,
    read_capped,
)

SCAN_BUDGET = 64 << 20     # bytes of metrics.jsonl read from its end, at most
PARSE_BUDGET = 4 << 20     # ... of which every line is parsed (further back: start/val/end lines only)
HEALTH_BUDGET = 4 << 20    # bytes of health.jsonl read from its end
HEAD_BYTES = 256 << 10     # start of metrics.jsonl read for the first start event when the scan ends early
TRAIN_WINDOW = 21          # train events since the last start kept (log interval, steps/s)
MAX_MARKS = 100            # start/end events kept (all are counted)
HEALTH_KEPT = 50           # newest health events kept
MAX_CHECKPOINTS = 100      # checkpoint folders listed (newest steps kept)
DOC_LIMITS = {"config.yaml": 1 << 20, "heartbeat.json": 1 << 20, "data_report.json": 16 << 20, "meta.json": 4 << 20}
_WANTED = (b'"start"', b'"val"', b'"end"')
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RunDirError(ValueError):
    """A directory that cannot be read as a run; the message is one line that says what to do."""


@dataclass
class RunData:
    """What was read from one run directory (raw records, not yet summarised)."""

    path: Path
    config: dict
    metrics: list[dict]             # the records kept from metrics.jsonl, in file order (see _scan_metrics)
    health: list[dict]              # the newest health events, in file order
    heartbeat: dict | None
    data_report: dict | None
    checkpoints: list[dict]
    log_tail: list[str]
    last_activity: float            # newest mtime of the files the trainer writes
    notes: list[str]
    health_counts: dict[str, int] = field(default_factory=lambda: {"warning": 0, "critical": 0})
    start_count: int = 0            # start events seen in the part of metrics.jsonl read
    complete: dict[str, bool] = field(default_factory=lambda: {"metrics": True, "health": True})

    def events(self, kind: str, since_start: bool = False) -> list[dict]:
        """Kept metrics records of one event kind; since_start keeps those after the last (re)start."""
        starts = [i for i, r in enumerate(self.metrics) if r.get("event") == "start"] if since_start else []
        return [r for r in self.metrics[max(starts, default=0):] if r.get("event") == kind]


def num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        return float(x) if math.isfinite(x) else None
    except OverflowError:  # an int with hundreds of digits
        return None


def to_int(x: Any) -> int | None:
    v = num(x)
    return int(v) if v is not None else None


def section(doc: Any, name: str) -> dict:
    """doc[name] if both are mappings, else {} (a hostile config.yaml may hold `training: [1]`)."""
    value = doc.get(name) if isinstance(doc, dict) else None
    return value if isinstance(value, dict) else {}


def fmt_duration(seconds: float | None) -> str:
    """Human duration: 45s, 12m05s, 3h05m, 2d04h."""
    s = int(max(seconds, 0)) if seconds is not None else None
    return ("?" if s is None else f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600
            else f"{s // 3600}h{s % 3600 // 60:02d}m" if s < 86400 else f"{s // 86400}d{s % 86400 // 3600:02d}h")


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


# --------------------------------------------------------------------------- JSON lines, from the end
class _Bad:
    """Malformed lines met while reading backwards: a count and the earliest 5 (found last)."""

    def __init__(self) -> None:
        self.count, self.first = 0, deque(maxlen=5)

    def add(self, index_from_end: int) -> None:
        self.count += 1
        self.first.append(index_from_end)


def _line_notes(name: str, bad: _Bad, truncated: bool, lines: BackwardLines) -> list[str]:
    notes = [f"ignored 1 truncated line at the end of {name}"] if truncated else []
    if bad.count:
        plural = "s" * (bad.count > 1)
        if lines.complete:  # the whole file was read: line numbers are exact
            nums = sorted(lines.total - i + 1 for i in bad.first)
            shown = ", ".join(map(str, nums)) + (", ..." if bad.count > 5 else "")
            notes.append(f"skipped {bad.count} malformed line{plural} in {name} (line {shown})")
        else:
            notes.append(f"skipped {bad.count} malformed line{plural} in the last {_mb(lines.read)} of {name}")
    if lines.overlong:
        notes.append(f"skipped {lines.overlong} line(s) longer than {_mb(MAX_LINE)} in {name}")
    return notes


def _scan_metrics(path: Path, notes: list[str]) -> tuple[list[dict], int, bool]:
    """From the end of metrics.jsonl keep: the newest record, the newest val, the newest MAX_MARKS
    start/end marks, and the newest TRAIN_WINDOW train events after the last start.
    Returns (records in file order, start events seen, complete)."""
    try:
        f = open_regular(path)
    except Unreadable as e:
        if str(e) != "missing":
            notes.append(f"{path.name} not read ({e})")
        return [], 0, True
    kept: list[tuple[float, dict]] = []
    bad, truncated, trains, have_val, started, marks, starts = _Bad(), False, 0, False, False, 0, 0
    with f:
        lines = BackwardLines(f, SCAN_BUDGET)
        for idx, raw, terminated in lines:
            parse_all = lines.read <= PARSE_BUDGET and not (have_val and (started or trains >= TRAIN_WINDOW))
            if not parse_all:
                lines.want = (b'"start"',) if have_val else _WANTED  # further back only these are needed
                if not any(w in raw for w in lines.want):
                    continue
            if not raw.strip():
                continue
            rec = parse_record(raw)
            event = rec.get("event") if rec is not None else None
            if not isinstance(event, str):
                if not terminated:  # no newline after it: the writer was killed (or is) mid-line
                    truncated = True
                elif parse_all:
                    bad.add(idx)
                continue
            keep = not kept  # the newest record: the run's position
            if event == "train" and not started and trains < TRAIN_WINDOW:
                keep, trains = True, trains + 1
            elif event == "val" and not have_val:
                keep = have_val = True
            elif event in ("start", "end"):
                keep, started, marks = marks < MAX_MARKS, started or event == "start", marks + 1
                starts += event == "start"
            if keep:
                kept.append((idx, {"event": event, **flat(rec)}))
        complete = lines.complete
        if not complete and not started:  # a long run started before the scanned part: its first start event
            f.seek(0)
            head = f.read(HEAD_BYTES).split(b"\n")[:-1]
            first = next((r for r in map(parse_record, head) if r and r.get("event") == "start"), None)
            if first is not None:
                kept.append((math.inf, {"event": "start", **flat(first)}))
                starts += 1
        notes += _line_notes(path.name, bad, truncated, lines)
    return [rec for _, rec in sorted(kept, key=lambda t: -t[0])], starts, complete


def _scan_health(path: Path, notes: list[str]) -> tuple[list[dict], dict[str, int], bool]:
    """Newest HEALTH_KEPT events and the warning/critical counts of the part read (all of it if complete)."""
    counts = {"warning": 0, "critical": 0}
    try:
        f = open_regular(path)
    except Unreadable as e:
        if str(e) != "missing":
            notes.append(f"{path.name} not read ({e})")
        return [], counts, True
    events, bad, truncated = [], _Bad(), False
    with f:
        lines = BackwardLines(f, HEALTH_BUDGET)
        for idx, raw, terminated in lines:
            if not raw.strip():
                continue
            rec = parse_record(raw)
            if rec is None:
                if terminated:
                    bad.add(idx)
                else:
                    truncated = True
                continue
            if isinstance(status := rec.get("status"), str) and status in counts:
                counts[status] += 1
            if len(events) < HEALTH_KEPT:
                events.append(flat(rec))
        notes += _line_notes(path.name, bad, truncated, lines)
    return events[::-1], counts, lines.complete


# --------------------------------------------------------------------------- small documents
def read_doc(path: Path, notes: list[str]) -> dict | None:
    """A JSON or YAML mapping of bounded size, or None (missing); anything unusable is a note."""
    limit = DOC_LIMITS.get(path.name, 1 << 20)
    try:
        text = read_capped(path, limit).decode("utf-8")
        doc = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)  # noqa: S506 (safe loader)
    except Unreadable as e:
        if str(e) == "missing":
            return None
        why = str(e)
    except (ValueError, yaml.YAMLError, RecursionError) as e:  # ValueError covers JSON and UTF-8 errors
        why = type(e).__name__
    else:
        if isinstance(doc, dict):
            return doc
        why = f"not a mapping but {type(doc).__name__}"
    notes.append(f"{path.name} unreadable ({why}); ignored")
    return None


def list_checkpoints(ckpt_dir: Path, notes: list[str]) -> list[dict]:
    """Checkpoint dirs with step/epoch/time from meta.json; a *.tmp or meta-less dir is INCOMPLETE."""
    try:
        entries = list(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []
    except OSError as e:
        notes.append(f"checkpoints/ not listed ({e.strerror or e})")
        return []
    order = {"latest": 0, "best": 1, "epoch": 2, "step": 3}

    def key(p: Path) -> tuple:
        head, _, tail = p.name.partition("_")
        return order.get(head if tail else p.name, 4), int(tail) if tail.isdigit() else -1, p.name
    entries = sorted((e for e in entries if e.is_dir() or e.is_symlink()), key=key)
    if len(entries) > MAX_CHECKPOINTS:  # keep latest/best and the newest of the rest
        special = [e for e in entries if e.name in ("latest", "best")]
        rest = [e for e in entries if e.name not in ("latest", "best")]
        notes.append(f"{len(rest) - MAX_CHECKPOINTS} older checkpoint folders not listed")
        entries = special + rest[-MAX_CHECKPOINTS:]
    out = []
    for entry in entries:
        info: dict[str, Any] = {"name": entry.name, "valid": False, "step": None, "epoch": None, "time": None,
                                "target": os.readlink(entry) if entry.is_symlink() else None, "note": ""}
        tmp = entry.name.endswith(".tmp")
        meta_notes: list[str] = []
        meta = read_doc(entry / "meta.json", meta_notes) if entry.is_dir() and not tmp else None
        if not entry.is_dir():
            info["note"] = "INCOMPLETE (dangling link)"
        elif tmp:
            info["note"] = "INCOMPLETE (.tmp: being written, or the writer died)"
        elif meta is None:
            info["note"] = f"INCOMPLETE ({'meta.json unreadable' if meta_notes else 'no meta.json'})"
        else:
            t = num(meta.get("timestamp"))
            info.update(valid=True, step=to_int(meta.get("step")), epoch=to_int(meta.get("epoch")),
                        time=t if t is not None else _mtime(entry / "meta.json"))
        out.append(info)
    return out


def _log_tail(log_dir: Path, notes: list[str], n: int = 20) -> list[str]:
    """Last n non-empty lines of the newest logs/*.log (names carry a sortable timestamp)."""
    logs = sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []
    if not logs:
        return []
    try:
        with open_regular(logs[-1]) as f:  # only the end: logs of long runs are large
            f.seek(max(os.fstat(f.fileno()).st_size - 16384, 0))
            text = f.read(16384).decode("utf-8", errors="replace")
    except (Unreadable, OSError) as e:
        notes.append(f"logs/{logs[-1].name} not read ({e})")
        return []
    return [ln.rstrip()[:1000] for ln in text.splitlines() if ln.strip()][-n:]


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def load_run(path: str | os.PathLike) -> RunData:
    """Read a run directory (bounded); RunDirError if it is missing or not a run."""
    root = Path(path)
    if not root.exists():
        raise RunDirError(f"run directory not found: {root} (pass the --output_dir that train_full.py wrote to)")
    if not root.is_dir() or not any(os.path.lexists(root / n) for n in ("config.yaml", "metrics.jsonl", "heartbeat.json")):
        raise RunDirError(f"{root} is not a run directory (no config.yaml, metrics.jsonl or heartbeat.json); "
                          "pass the directory train_full.py wrote, e.g. outputs/<run_name>")
    notes: list[str] = []
    metrics, starts, metrics_complete = _scan_metrics(root / "metrics.jsonl", notes)
    health, counts, health_complete = _scan_health(root / "health.jsonl", notes)
    config = read_doc(root / "config.yaml", notes) or {}
    heartbeat = read_doc(root / "heartbeat.json", notes)
    data_report = read_doc(root / "data_report.json", notes)
    logs = sorted((root / "logs").glob("*.log")) if (root / "logs").is_dir() else []
    watched = [root / n for n in ("config.yaml", "metrics.jsonl", "health.jsonl", "heartbeat.json")] + logs[-1:]
    activity = max(map(_mtime, watched), default=0.0)
    return RunData(root, config, metrics, health, heartbeat, data_report, list_checkpoints(root / "checkpoints", notes),
                   _log_tail(root / "logs", notes), activity, notes, counts, starts,
                   {"metrics": metrics_complete, "health": health_complete})
