"""Which checkpoint a run continues from: the plan (decided before any data is read) and the load
(auto: an unusable checkpoint is skipped with a warning and the next one tried), and what changed
since it was written (said once)."""
from __future__ import annotations

import logging
from pathlib import Path

from diffold.checkpoint import CheckpointError, CheckpointManager
from diffold.checkpoint_check import config_changes
from diffold.config import Config
from diffold.startup import Decisions, Start
from diffold.state import TrainState

log = logging.getLogger("diffold.train")


def resume_plan(ckpts: CheckpointManager, resume: str | None, decisions: Decisions) -> list[Path]:
    """Checkpoints to try, decided before data is loaded: an explicit one must exist and verify."""
    if resume is None:
        if ckpts.candidates():
            raise CheckpointError(f"{ckpts.dir.parent} already holds checkpoints: pass --resume auto to continue it, "
                                  "or a new --output_dir")
        return []
    if resume == "auto":
        order = ckpts.auto_order()
        if not order:
            decisions.note(f"--resume auto: no checkpoint in {ckpts.dir}: starting fresh")
        return order
    return [ckpts.resolve(resume)]


def resume_state(start: Start, cfg: Config, ema, monitor, policy, resume: str | None,
                 batches_per_epoch: int) -> tuple[TrainState, Path | None]:
    """Load the first usable checkpoint of the plan (auto: later ones replace an unusable one, each
    skipped with a warning); say what differs from it. Fresh TrainState when there is nothing to resume."""
    acc = start.acc
    state = TrainState(num_processes=acc.num_processes)
    if not start.resume_from:
        return state, None

    def accept(loaded: TrainState) -> None:  # its health/recovery state must load too
        try:
            if loaded.health:
                monitor.load_state_dict(loaded.health)
            if loaded.recovery:
                policy.load_state_dict(loaded.recovery)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"train_state.json holds no valid health state ({type(e).__name__}: {e})") from None

    loaded = start.ckpts.load_first(start.resume_from, ema, strict=resume != "auto", accept=accept)
    if loaded is None:
        raise CheckpointError(f"none of the {len(start.resume_from)} checkpoint(s) in {start.ckpts.dir} can be loaded "
                              "(see the warnings above): fix or remove them, or start a new --output_dir")
    path, state, meta = loaded
    changes = config_changes(meta.get("config"), cfg.to_dict())
    if changes:
        start.decisions.warn(f"resuming {path.name} with {len(changes)} setting(s) changed since it was written: "
                             + "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else ""))
    old_bs = ((meta.get("config") or {}).get("training") or {}).get("batch_size") or cfg.training.batch_size
    if (state.num_processes, old_bs) != (acc.num_processes, cfg.training.batch_size):
        start.decisions.warn(f"checkpoint was written by {state.num_processes} processes x batch {old_bs}, now "
                             f"{acc.num_processes} x {cfg.training.batch_size}: weights and optimizer restored, data "
                             "order of the resumed epoch differs")
        # position by chains consumed (moving 2 -> 1 process often doubles batch_size); never past the epoch
        done = state.batch_in_epoch * state.num_processes * old_bs // (acc.num_processes * cfg.training.batch_size)
        k = cfg.training.gradient_accumulation_steps
        state.batch_in_epoch = min(done, batches_per_epoch) // k * k
        state.num_processes = acc.num_processes
    log.info("resumed from %s (step %d, epoch %d, batch %d)", path, state.global_step, state.epoch, state.batch_in_epoch)
    return state, path
