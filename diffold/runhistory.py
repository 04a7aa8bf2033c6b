"""The whole history of a run for plotting, streamed with bounded memory (torch- and matplotlib-free).

metrics.jsonl is read forward once; every numeric series keeps at most CAP points: when full, adjacent
points are merged pairwise (mean step, mean value, min, max, count), so a spike survives as the
max of its bucket however long the run. Memory is O(series x CAP) whatever the file size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffold.runinfo import num
from diffold.tailread import Unreadable, forward_lines, open_regular, parse_record

CAP = 8192            # points kept per series (a plot draws at most plots.MAX_POINTS of them)
MAX_SERIES = 256      # distinct keys followed per event kind (a hostile file could invent millions)
MAX_EVENTS = 4096     # health event steps kept per status (every k-th beyond)
BATCH = 10_000        # records parsed between two (vectorised) decimation passes


class Decimator:
    """Bucketed (step, value) series of bounded length, all buckets `width` raw points wide (the last may be
    narrower): per bucket the step sum, value sum, min, max and count."""

    def __init__(self, cap: int = CAP):
        self.cap, self.width = cap, 1
        self.buckets = np.zeros((0, 5))                           # [K, 5] sx, sy, lo, hi, n
        self.pending = np.zeros((0, 2))                           # [P < width, 2] raw points not in a bucket yet

    def extend(self, xs: np.ndarray, ys: np.ndarray) -> None:
        pts = np.concatenate([self.pending, np.stack([xs, ys], 1)])  # [P + N, 2]
        full = len(pts) // self.width * self.width
        if full:
            x, y = (pts[:full, i].reshape(-1, self.width) for i in (0, 1))  # [K, width]
            new = np.stack([x.sum(1), y.sum(1), y.min(1), y.max(1), np.full(len(x), self.width, float)], 1)
            self.buckets = np.concatenate([self.buckets, new])
        self.pending = pts[full:]
        while len(self.buckets) >= self.cap:  # full: merge neighbours, double the bucket width
            b = self.buckets[: len(self.buckets) // 2 * 2].reshape(-1, 2, 5)
            merged = np.stack([b[:, :, 0].sum(1), b[:, :, 1].sum(1), b[:, :, 2].min(1), b[:, :, 3].max(1),
                               b[:, :, 4].sum(1)], 1)
            self.buckets = np.concatenate([merged, self.buckets[len(b) * 2:]])
            self.width *= 2

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean step, mean value, min, max, count) per bucket, the unfinished last bucket included."""
        b = self.buckets
        if len(self.pending):
            p = self.pending
            b = np.concatenate([b, [[p[:, 0].sum(), p[:, 1].sum(), p[:, 1].min(), p[:, 1].max(), len(p)]]])
        n = np.maximum(b[:, 4], 1)
        return b[:, 0] / n, b[:, 1] / n, b[:, 2], b[:, 3], b[:, 4]


@dataclass
class History:
    """Decimated series per (event kind, key), health event steps per status, counts."""

    series: dict[tuple[str, str], Decimator] = field(default_factory=dict)
    events: dict[str, list[float]] = field(default_factory=lambda: {"warning": [], "critical": []})
    counts: dict[str, int] = field(default_factory=dict)
    event_totals: dict[str, int] = field(default_factory=lambda: {"warning": 0, "critical": 0})
    run_name: str | None = None

    def keys(self, kind: str) -> list[str]:
        return [k for e, k in self.series if e == kind]

    def get(self, kind: str, key: str) -> tuple[np.ndarray, ...]:
        d = self.series.get((kind, key))
        return d.arrays() if d else tuple(np.zeros(0) for _ in range(5))


class _Batch:
    """Raw points per (kind, key) collected in lists, handed to the Decimators every BATCH records."""

    def __init__(self, h: History):
        self.h, self.points, self.records = h, {}, 0

    def add(self, rec: dict) -> None:
        kind, step = rec.get("event"), num(rec.get("step"))
        if not isinstance(kind, str):
            return
        self.h.counts[kind] = self.h.counts.get(kind, 0) + 1
        if kind == "start" and isinstance(rec.get("run_name"), str):
            self.h.run_name = rec["run_name"][:200]
        if step is None or kind not in ("train", "val"):
            return
        points = self.points
        for key, value in rec.items():
            if type(value) is not float and type(value) is not int:  # bool, str, nested: not a point
                continue
            pts = points.get((kind, key))
            if pts is None:
                if (kind, key) not in self.h.series and sum(e == kind for e, _ in self.h.series) >= MAX_SERIES:
                    continue
                pts = points[(kind, key)] = ([], [])
                self.h.series.setdefault((kind, key), Decimator())
            pts[0].append(step)
            pts[1].append(value)
        self.records += 1
        if self.records >= BATCH:
            self.flush()

    def flush(self) -> None:
        for sk, (xs, ys) in self.points.items():
            try:
                y = np.asarray(ys, float)
            except OverflowError:  # an int with hundreds of digits
                y = np.asarray([num(v) if num(v) is not None else np.nan for v in ys], float)
            keep = np.isfinite(y)
            self.h.series[sk].extend(np.asarray(xs, float)[keep], y[keep])
        self.points, self.records = {}, 0


def load_history(run_dir: Path) -> History:
    """Stream metrics.jsonl and health.jsonl of a run (unreadable files: an empty history for them)."""
    h = History()
    batch = _Batch(h)
    for name in ("metrics.jsonl", "health.jsonl"):
        try:
            f = open_regular(Path(run_dir) / name)
        except Unreadable:
            continue  # status has already said why, as a note
        with f:
            for raw in forward_lines(f):
                rec = parse_record(raw) if raw.strip() else None
                if rec is None:
                    continue
                if name == "metrics.jsonl":
                    batch.add(rec)
                elif (isinstance(status := rec.get("status"), str) and status in h.events
                      and (step := num(rec.get("step"))) is not None):
                    h.event_totals[status] += 1
                    steps = h.events[status]
                    steps.append(step)
                    if len(steps) > MAX_EVENTS:  # keep every other one: still spread over the whole run
                        h.events[status] = steps[::2]
        batch.flush()
    return h
