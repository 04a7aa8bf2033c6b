"""Running statistics for the health checks, O(1) per step: a sliding window with mean/variance,
a sliding median, and the weight check the stepper hands the monitor after each update."""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class WeightCheck:
    """The weights after an applied update: all finite (optimizer state included), norm, growth factor."""

    finite: bool
    norm: float
    growth: float  # norm after / norm before the update (1.0 when unknown)


class _Window:
    """Sliding window with O(1) mean/variance: sums shifted by k, re-summed exactly every maxlen pushes."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen, self.values = maxlen, deque(maxlen=maxlen)
        self.k = self.s1 = self.s2 = 0.0
        self.pushes = 0

    def push(self, x: float) -> None:
        vals = self.values
        if not vals:
            self.k = x  # shift by a typical value: E[(x-k)^2] - E[x-k]^2 then does not cancel
        elif len(vals) == self.maxlen:
            old = vals[0] - self.k
            self.s1 -= old
            self.s2 -= old * old
        vals.append(x)
        d = x - self.k
        self.s1 += d
        self.s2 += d * d
        self.pushes += 1
        if self.pushes % self.maxlen == 0:
            self._resum()

    def _resum(self) -> None:
        n = len(self.values)
        self.k = sum(self.values) / n if n else 0.0
        self.s1 = sum(v - self.k for v in self.values)
        self.s2 = sum((v - self.k) ** 2 for v in self.values)

    @property
    def full(self) -> bool:
        return len(self.values) == self.maxlen

    def mean(self) -> float:
        return self.k + self.s1 / len(self.values)

    def var(self) -> float:
        n = len(self.values)
        m1 = self.s1 / n
        return max(self.s2 / n - m1 * m1, 0.0)

    def state(self) -> dict[str, Any]:
        return {"maxlen": self.maxlen, "values": list(self.values), "k": self.k, "s1": self.s1,
                "s2": self.s2, "pushes": self.pushes}

    def load(self, st: Mapping[str, Any]) -> None:
        self.values = deque((float(v) for v in st["values"]), maxlen=self.maxlen)
        self.pushes = int(st["pushes"])
        if st["maxlen"] == self.maxlen:  # exact restore: identical sums -> identical future reports
            self.k, self.s1, self.s2 = float(st["k"]), float(st["s1"]), float(st["s2"])
        else:
            self._resum()


class _Median:
    """Sliding-window median: a deque for order plus a sorted list (bisect) for rank."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen, self.values, self.sorted = maxlen, deque(), []

    def push(self, x: float) -> None:
        if len(self.values) == self.maxlen:
            del self.sorted[bisect.bisect_left(self.sorted, self.values.popleft())]
        self.values.append(x)
        bisect.insort(self.sorted, x)

    def median(self) -> float:
        s, n = self.sorted, len(self.sorted)
        return 0.5 * (s[(n - 1) // 2] + s[n // 2])

    def load(self, values: Sequence[float]) -> None:
        self.values = deque(float(v) for v in list(values)[-self.maxlen:])
        self.sorted = sorted(self.values)
