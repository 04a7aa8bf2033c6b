"""Faults: the response to them (recovery policy, cross-rank agreement) and test-only injection.

Detection is diffold/health.py. Here: `RecoveryPolicy` turns rank-synchronised bad steps, confirmed
spikes and OOMs into skip / rollback / give-up with counters; `sync_flags` ORs flags over ranks with
one all-reduce so every rank takes the same branch; `FaultInjector` (health.inject_faults) makes
those faults happen on purpose in tests. An empty injection spec costs nothing.

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

import enum
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from diffold.config import HealthConfig


class Action(str, enum.Enum):
    """What the loop does with a step; the values are health.jsonl `action` strings."""

    NONE = "none"
    SKIP = "skip"
    ROLLBACK = "rollback"
    OOM_RETRY = "oom_retry"
    GIVE_UP = "give_up"


class RecoveryPolicy:
    """Turns (rank-synchronised) bad steps, confirmed spikes and OOMs into skip / rollback / give-up."""

    def __init__(self, cfg_health: HealthConfig) -> None:
        self.cfg = cfg_health
        self.skipped_steps = self.rollbacks = self.oom_retries = self.consecutive_bad = 0
        self.gave_up = False
        self.recent: deque[dict[str, Any]] = deque(maxlen=5)  # last critical health.jsonl events

    @property
    def lr_scale(self) -> float:
        """Factor on the configured LR after the rollbacks so far (lr_backoff ** rollbacks)."""
        return self.cfg.lr_backoff ** self.rollbacks

    def decide(self, bad_step: bool, spike_confirmed: bool, report: Any = None) -> Action:
        """Action for this step; an optional HealthReport gets it on its critical events (kept for the summary)."""
        c = self.cfg
        self.consecutive_bad = self.consecutive_bad + 1 if bad_step else 0
        action = Action.NONE
        if (bad_step and self.consecutive_bad >= c.max_bad_steps) or (spike_confirmed and c.rollback_on_spike):
            if self.rollbacks >= c.max_rollbacks:
                action, self.gave_up = Action.GIVE_UP, True
            else:
                action, self.consecutive_bad = Action.ROLLBACK, 0
                self.rollbacks += 1
        elif bad_step and c.skip_nonfinite:
            action = Action.SKIP
            self.skipped_steps += 1
        if report is not None:
            report.annotate(action)
            self.recent.extend(e.to_dict() for e in report.events if e.status == "critical")
        return action

    def on_oom(self, step: int = -1, clock: Callable[[], float] = time.time) -> bool:
        """Count an OOM; True if recovery (halve micro-batch, double accumulation) is allowed.

        The matching health.jsonl event is `policy.recent[-1]`.
        """
        self.oom_retries += 1
        ok = bool(self.cfg.oom_recovery)
        hint = ("if it recurs: enable model.activation_checkpointing, lower data.max_length or use --preset memory"
                if ok else "set health.oom_recovery=true, or lower training.batch_size or data.max_length")
        self.recent.append({"time": clock(), "step": step, "status": "critical", "check": "oom",
                            "message": f"out of memory (OOM #{self.oom_retries})", "suggestion": hint,
                            "action": (Action.OOM_RETRY if ok else Action.GIVE_UP).value})
        return ok

    def final_report(self, resume_command: str = "{resume_command}") -> str:
        """Multi-line summary for the give-up message: what happened, what to change, how to resume."""
        c = self.cfg
        lines = [f"diffold health: training stopped after {self.rollbacks} rollback(s) "
                 f"(health.max_rollbacks={c.max_rollbacks}), {self.skipped_steps} skipped step(s), "
                 f"{self.oom_retries} OOM retr{'y' if self.oom_retries == 1 else 'ies'}; "
                 f"LR was scaled by {self.lr_scale:.3g}.", "Last critical events:"]
        lines += [f"  step {e['step']} {e['check']} ({e['action']}): {e['message']}" for e in self.recent]
        lines += [] if self.recent else ["  (none recorded)"]
        lines.append("What to do:")
        lines += [f"  - {h}" for h in dict.fromkeys(e["suggestion"] for e in self.recent)]  # de-duplicated
        lines += ["  - use the safety preset (--preset safety: lower LR, tighter clipping, rollback on spikes)",
                  "  - look for corrupt inputs in data_report.json and at the health.jsonl steps above",
                  f"  - allow more attempts: raise health.max_rollbacks (now {c.max_rollbacks}) or "
                  f"health.max_bad_steps (now {c.max_bad_steps})",
                  f"Resume from the last good checkpoint with the changed settings: {resume_command}"]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "oom_retries": self.oom_retries,
                "consecutive_bad": self.consecutive_bad, "gave_up": self.gave_up, "recent": list(self.recent)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped_steps, self.rollbacks = int(state["skipped_steps"]), int(state["rollbacks"])
        self.oom_retries, self.consecutive_bad = int(state["oom_retries"]), int(state["consecutive_bad"])
        self.gave_up = bool(state["gave_up"])
        self.recent = deque((dict(e) for e in state["recent"]), maxlen=self.recent.maxlen)


def sync_flags(accelerator: Any, flags: Sequence[bool]) -> list[bool]:
    """Each flag OR-ed over all ranks with ONE all-reduce (max); no collective with a single process."""
    if getattr(accelerator, "num_processes", 1) <= 1:
        return [bool(f) for f in flags]
    import torch

    local = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=accelerator.device)
    return [v > 0 for v in accelerator.reduce(local, reduction="max").tolist()]


def sync_flag(accelerator: Any, flag: bool) -> bool:
    """True on every rank if any rank raised `flag` (so all ranks take the same branch)."""
    return sync_flags(accelerator, [flag])[0]


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
