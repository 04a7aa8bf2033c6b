"""The loss level and the two yardsticks a diverged run is judged by (health.divergence_factor, health.start_factor).

A z-score adapts to a loss that drifts up (its window follows it), and a run that diverges during the
LR warm-up never had a low level to compare with: the level (median of the last LEVEL_WINDOW losses)
is compared with the lowest level the run reached AND with the untrained model's loss (the median of
a fresh run's first START_STEPS steps; EDM's preconditioning puts it near 1). Persisted with the rest
of the health statistics (exact resume); a rollback keeps both yardsticks.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from diffold.running_stats import _Median

LEVEL_WINDOW = 9        # the loss level is the median of this many recent steps
LEVEL_WARMUP = 20       # steps before the level's minimum is trusted
START_STEPS = 3         # the untrained model's loss level: median of a fresh run's first this many steps
# A loss-based rollback (confirmed spike, diverged level) goes back to a checkpoint at least this many steps
# before its decision: the level needs LEVEL_WINDOW steps to rise, and a real excursion can start earlier
# with a few lower losses in between (Lion lr=1 on the smoke config: first loss 16 at step 4, level
# verdict at step 13; a target at step 4 already held the broken weights, val/loss 4.2 vs 0.85).
ONSET_MARGIN = 2 * LEVEL_WINDOW


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class LossLevel:
    """Median-of-recent-losses level with its run minimum and the untrained model's level."""

    def __init__(self, divergence_factor: float, start_factor: float, loss_cap: float) -> None:
        self.divergence_factor, self.start_factor, self.loss_cap = divergence_factor, start_factor, loss_cap
        self.level, self.minimum, self.n = 0.0, math.inf, 0
        self._recent = _Median(LEVEL_WINDOW)
        self._start: list[float] = []  # the first START_STEPS losses of a fresh run

    def update(self, total: float, above_cap: bool) -> bool:
        """Push one finite loss; True when the level is diverged by either yardstick."""
        if len(self._start) < START_STEPS and self.n < START_STEPS:  # only a fresh run's first steps
            self._start.append(min(total, self.loss_cap))
        if not above_cap:
            self._recent.push(total)
            self.level = self._recent.median()  # a lone spike does not move it; a lasting shift does
            self.n += 1
            if self.n >= LEVEL_WARMUP:
                self.minimum = min(self.minimum, self.level)
        return self.above_min() or self.above_start()

    @property
    def start(self) -> Optional[float]:
        """The untrained model's loss level (None until a fresh run's first START_STEPS steps are seen)."""
        return statistics.median(self._start) if len(self._start) == START_STEPS and min(self._start) > 0 else None

    def above_min(self) -> bool:
        f = self.divergence_factor
        return f > 0 and self.n > LEVEL_WARMUP and self.minimum > 0 and self.level > f * self.minimum

    def above_start(self, min_losses: int = LEVEL_WINDOW) -> bool:
        f, start = self.start_factor, self.start
        return f > 0 and start is not None and self.n >= min_losses and self.level > f * start

    def suspect(self) -> bool:
        """Diverged by either yardstick, judged on a partial window too (from START_STEPS + 1 losses on): what a
        checkpoint written now is marked by. A divergence that began a few steps ago already shows here."""
        return self.above_min() or self.above_start(min_losses=START_STEPS + 1)

    def describe(self) -> str:
        """What the diverged level is compared with, for the health event."""
        head = f"loss level (median of {LEVEL_WINDOW} steps) {_fmt(self.level)} is "
        if self.above_min() or self.start is None:
            return (head + f"{self.level / self.minimum:.1f}x the lowest this run reached ({_fmt(self.minimum)}; "
                    f"limit health.divergence_factor={_fmt(self.divergence_factor)})")
        return (head + f"{self.level / self.start:.1f}x the untrained model's ({_fmt(self.start)}, its first "
                f"{START_STEPS} steps; limit health.start_factor={_fmt(self.start_factor)}): training made the model worse")

    def state(self) -> list[Any]:
        return [self.level, self.minimum if math.isfinite(self.minimum) else None, self.n, list(self._recent.values),
                list(self._start)]

    def load(self, level: Optional[list]) -> None:
        """From state(); None (checkpoints of earlier versions) starts empty, and without a start level."""
        self.level, self.minimum, self.n = ((float(level[0]), math.inf if level[1] is None else float(level[1]),
                                             int(level[2])) if level else (0.0, math.inf, 0))
        self._recent.load(level[3] if level else [])
        self._start = [float(v) for v in level[4]] if level and len(level) > 4 else []

    def keep_yardsticks(self, earlier: LossLevel) -> None:
        """After a rollback loaded an older state: the lowest level and the start level stay the run's."""
        self.minimum, self.n = min(earlier.minimum, self.minimum), max(earlier.n, self.n)
        if len(earlier._start) >= len(self._start):
            self._start = list(earlier._start)
