"""Recovery: what the loop does about a bad step, and whether the current state is healthy.

Detection is diffold/health.py. Here `RecoveryPolicy` turns rank-synchronised findings into
skip / rollback / give-up with counters, and keeps the one fact checkpoints need: is the state
the loop holds now HEALTHY (finite weights, no unresolved critical event in the last window)?
Only healthy checkpoints are rollback targets (diffold/checkpoint.py). `sync_flags` ORs flags over
ranks with one all-reduce so every rank takes the same branch.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from typing import Any, Callable, Mapping, Sequence

from diffold.config import HealthConfig

# Critical checks that say something about the MODEL (a failed checkpoint write or an OOM does not).
MODEL_CHECKS = frozenset({"nonfinite_loss", "nonfinite_grad", "loss_explosion", "loss_spike", "loss_divergence",
                          "nonfinite_weights", "weight_explosion"})


class Action(str, enum.Enum):
    """What the loop does with a step; the values are health.jsonl `action` strings."""

    NONE = "none"
    SKIP = "skip"
    ROLLBACK = "rollback"
    OOM_RETRY = "oom_retry"
    GIVE_UP = "give_up"


class RecoveryPolicy:
    """Turns (rank-synchronised) bad steps, confirmed spikes, broken weights and OOMs into actions.

    - a non-finite loss/gradient: skip the update; after health.max_bad_steps in a row, roll back
    - a confirmed spike or a loss persistently above health.loss_cap (health.rollback_on_spike): roll back
    - weights or optimizer state non-finite / exploded after an update: roll back at once (a skip
      cannot undo an update that was already applied)
    - health.max_rollbacks exhausted: give up (exit 3, final report, resume command)
    """

    def __init__(self, cfg_health: HealthConfig) -> None:
        self.cfg = cfg_health
        self.skipped_steps = self.rollbacks = self.oom_retries = self.consecutive_bad = 0
        self.gave_up = False
        self.unresolved_step: int | None = None  # newest critical model event left as action "none"
        self.recent: deque[dict[str, Any]] = deque(maxlen=5)  # last critical health.jsonl events

    @property
    def lr_scale(self) -> float:
        """Factor on the configured LR after the rollbacks so far (lr_backoff ** rollbacks)."""
        return self.cfg.lr_backoff ** self.rollbacks

    def decide(self, bad_step: bool, spike_confirmed: bool, report: Any = None, broken_weights: bool = False) -> Action:
        """Action for this step; an optional HealthReport gets it on its critical events (kept for the summary)."""
        c = self.cfg
        self.consecutive_bad = self.consecutive_bad + 1 if (bad_step or broken_weights) else 0
        action = Action.NONE
        if (broken_weights or (bad_step and self.consecutive_bad >= c.max_bad_steps)
                or (spike_confirmed and c.rollback_on_spike)):
            if self.rollbacks >= c.max_rollbacks:
                action, self.gave_up = Action.GIVE_UP, True
            else:
                action, self.consecutive_bad = Action.ROLLBACK, 0
                self.rollbacks += 1
                self.unresolved_step = None  # the state those events described is gone
        elif bad_step and c.skip_nonfinite:
            action = Action.SKIP
            self.skipped_steps += 1
        if report is not None:
            report.annotate(action)
            critical = [e for e in report.events if e.status == "critical"]
            self.recent.extend(e.to_dict() for e in critical)
            if action == Action.NONE and any(e.check in MODEL_CHECKS for e in critical):
                self.unresolved_step = max(e.step for e in critical)
        return action

    def health_mark(self, step: int, weights_ok: bool, window: int) -> tuple[bool, str]:
        """(healthy, reason) of the state after `step`: what a checkpoint written now is marked with."""
        if not weights_ok:
            return False, "weights or optimizer state not finite / exploded"
        if self.unresolved_step is not None and step - self.unresolved_step < window:
            return False, (f"unresolved critical health event at step {self.unresolved_step} "
                           f"(within the last health.window={window} steps)")
        return True, "ok"

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
                  f"Resume from the last healthy checkpoint with the changed settings: {resume_command}"]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "oom_retries": self.oom_retries,
                "consecutive_bad": self.consecutive_bad, "gave_up": self.gave_up,
                "unresolved_step": self.unresolved_step, "recent": list(self.recent)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped_steps, self.rollbacks = int(state["skipped_steps"]), int(state["rollbacks"])
        self.oom_retries, self.consecutive_bad = int(state["oom_retries"]), int(state["consecutive_bad"])
        self.gave_up = bool(state["gave_up"])
        unresolved = state.get("unresolved_step")  # absent in checkpoints of earlier versions
        self.unresolved_step = int(unresolved) if unresolved is not None else None
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
