"""Test-only fault injection (health.inject_faults): faults that no real run can be made to produce
on demand (an OOM on a CPU, a kill inside a checkpoint write, a full disk). Real faults (a diverging
LR, absurd data, signals) are tested as they are; the response lives in diffold/recovery.py.
An empty injection spec costs nothing.

Injection spec: comma-separated items `kind@step` or `kind@start-end` (inclusive), optionally `:rankN`,
e.g. "nan_loss@5,nan_loss@10-12,oom@7:rank1,grad_explode@20,stagnate@30-90,slow@40,kill@55".
Steps count COMPLETED optimizer steps. A step fault `kind@k` (nan_loss ... kill) hits the step that
starts after k completed steps, which metrics.jsonl and health.jsonl record as step k+1; the save and
validation faults (kill_in_save, kill_in_val, enospc_in_save) hit the checkpoint / validation taken
at global_step k, recorded as step k.
Intended effects (the training loop applies them):
  nan_loss      replace the loss by NaN before backward
  nan_grad      fill the gradients with NaN before clipping
  loss_spike    multiply the loss by 1e3
  grad_explode  multiply the gradients by 1e6 before clipping
  stagnate      report a constant loss to the health monitor
  slow          sleep before the step (a slow batch)
  oom           raise an out-of-memory error in the forward pass (`consume`: once per step and rank)
  kill          kill the process abruptly (`kill_now`), as a crash mid-run would; the loop calls it
                after the first micro-batch's backward, i.e. in the middle of gradient accumulation
  kill_in_save  kill the process inside a checkpoint write (after the state files, before meta.json)
  kill_in_val   kill the process during validation (after the metrics, before `best` is saved)
  enospc_in_save  raise OSError(ENOSPC) inside a checkpoint write (a full disk; before meta.json)
A resumed run that replays a `kill` step dies again: resume with health.inject_faults="".
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

# ---------------------------------------------------------------------- test-only injection
FAULT_KINDS = ("nan_loss", "nan_grad", "loss_spike", "grad_explode", "stagnate", "slow", "oom", "kill", "kill_in_save",
               "kill_in_val", "enospc_in_save")
_ITEM = re.compile(r"^(?P<kind>[a-z_]+)@(?P<start>\d+)(?:-(?P<end>\d+))?(?::rank(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    """One injected fault: `kind` on optimizer steps start..end (inclusive), on one rank or all."""

    kind: str
    start: int
    end: int
    rank: int | None = None

    def covers(self, step: int, rank: int) -> bool:
        return self.start <= step <= self.end and (self.rank is None or self.rank == rank)


class FaultInjector:
    """Answers 'is fault `kind` active at (step, rank)?' for a parsed spec."""

    def __init__(self, faults: list[Fault] | tuple[Fault, ...] = ()) -> None:
        self.faults = tuple(faults)
        self._by_kind: dict[str, tuple[Fault, ...]] = {}
        for f in self.faults:
            self._by_kind[f.kind] = self._by_kind.get(f.kind, ()) + (f,)
        self._consumed: set[tuple[str, int, int]] = set()

    @classmethod
    def from_spec(cls, spec: str | None) -> FaultInjector:
        """Parse a spec string; ValueError (one line naming the bad item) if malformed."""
        faults = []
        for raw in (spec or "").split(","):
            item = raw.strip()
            if not item:
                continue
            m = _ITEM.match(item)
            if m is None:
                raise ValueError(
                    f"health.inject_faults: bad item '{item}'; expected kind@step, kind@start-end "
                    f"or kind@step:rankN (e.g. nan_loss@5, oom@7:rank1)"
                )
            kind, start = m["kind"], int(m["start"])
            end = int(m["end"]) if m["end"] is not None else start
            if kind not in FAULT_KINDS:
                raise ValueError(
                    f"health.inject_faults: unknown fault kind '{kind}' in '{item}'; "
                    f"choose from {', '.join(FAULT_KINDS)}"
                )
            if end < start:
                raise ValueError(f"health.inject_faults: range end < start in '{item}'; write {kind}@{end}-{start}")
            faults.append(Fault(kind, start, end, int(m["rank"]) if m["rank"] is not None else None))
        return cls(faults)

    @property
    def enabled(self) -> bool:
        return bool(self.faults)

    def active(self, kind: str, step: int, rank: int = 0) -> bool:
        """True if a fault of `kind` covers this optimizer step on this rank."""
        faults = self._by_kind.get(kind)
        if not faults:  # the common case: no spec, or no fault of this kind
            return False
        return any(f.covers(step, rank) for f in faults)

    def consume(self, kind: str, step: int, rank: int = 0) -> bool:
        """Like `active`, but True only once per (kind, step, rank): a retried step does not fail again."""
        if not self.active(kind, step, rank) or (kind, step, rank) in self._consumed:
            return False
        self._consumed.add((kind, step, rank))
        return True

    def kill_now(self, step: int, rank: int = 0, kind: str = "kill") -> None:
        """SIGKILL this process for a `kill` fault: no cleanup, no final checkpoint, like a real crash."""
        if self.active(kind, step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
