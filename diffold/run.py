"""One training run's state and the actions around its steps: health-marked checkpoints, exports,
validation + best, rollback, interval logging, and how the run ends (status, reason, exit code).

The loop itself stays in train_full.py, readable as a recipe; everything it does besides the
step goes through a `Run`, so no function passes a dozen loose objects around.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import diffold
from diffold.atomic import CheckpointWriteError
from diffold.checkpoint import CheckpointManager, export_inference_bundle
from diffold.checkpoint import before_onset as onset_targets
from diffold.memory import memory_stats
from diffold.recovery import RecoveryPolicy
from diffold.signals import EXIT_INTERRUPTED
from diffold.state import TrainState, improved

log = logging.getLogger("diffold.train")

# end status -> exit code (README "When a run goes wrong")
EXIT_CODES = {"finished": 0, "early_stopped": 0, "max_steps": 0, "finished_unhealthy": 4, "gave_up": 3,
              "failed": 3, "interrupted": EXIT_INTERRUPTED}


@dataclass
class Run:
    """Everything one run holds; `train_full.train` builds it paragraph by paragraph."""

    acc: Any
    cfg: Any
    run_dir: Path
    ckpts: CheckpointManager
    runlog: Any
    state: TrainState
    ema: Any
    model: Any
    optimizer: Any
    scheduler: Any
    monitor: Any
    policy: RecoveryPolicy
    stepper: Any
    faults: Any
    task: Any
    atoms: tuple[str, ...]
    diffusion: Any
    val_dl: Any = None
    val_ds: Any = None
    weights_ok: bool = True         # the last update left finite, non-exploded weights
    interval: list = field(default_factory=list)
    progress: Any = None
    last_memory: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ health
    def health_mark(self) -> tuple[bool, str]:
        """(healthy, reason) of the state held now: what a checkpoint written now is marked with."""
        ok = self.weights_ok and self.stepper.optimizer_state_finite()
        healthy, why = self.policy.health_mark(self.state.global_step, ok, self.cfg.health.window)
        diverged = self.monitor.level_suspect() if healthy else None
        return (False, diverged) if diverged else (healthy, why)

    # ------------------------------------------------------------------ checkpoints
    def save(self, name: str) -> bool:
        """Checkpoint; a failed write (e.g. disk full) is reported and training goes on: the next save retries."""
        st, cfg = self.state, self.cfg
        self.runlog.heartbeat(st.global_step, st.epoch, "checkpoint")
        st.health, st.recovery = self.monitor.state_dict(), self.policy.state_dict()
        meta = {"step": st.global_step, "epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch,
                "num_processes": self.acc.num_processes, "config": cfg.to_dict(), "metrics": st.last_val,
                "wandb_run_id": st.wandb_run_id,  # documented in docs/run_directory.md
                "versions": {"torch": torch.__version__, "diffold": diffold.__version__,
                             "accelerate": sys.modules["accelerate"].__version__}}
        try:
            self.ckpts.save(name, st, self.ema, meta, healthy=self.health_mark())
        except CheckpointWriteError as e:  # training state in memory is intact; older checkpoints are valid
            self.write_failed(e, f"checkpoint {name} not saved; training continues and the next save retries")
            return False
        return True

    def write_failed(self, err: CheckpointWriteError, consequence: str) -> None:
        order = self.ckpts.auto_order()
        self.runlog.health_event({"time": time.time(), "step": self.state.global_step, "status": "critical",
                                  "check": "checkpoint_write", "message": f"{err}; {consequence}",
                                  "suggestion": f"free disk space; newest valid checkpoint: {order[0] if order else 'none'}",
                                  "action": "none"})

    def export(self, dest: Path) -> None:
        """Inference bundle of the EMA weights (main process); a failed write is reported, not fatal."""
        if self.acc.is_main_process:
            cfg = self.cfg.to_dict()
            try:
                export_inference_bundle(self.ema, cfg["model"], self.cfg.task, dest,
                                        {"atoms": list(self.atoms), "diffusion": cfg["diffusion"]})
            except CheckpointWriteError as e:
                self.write_failed(e, "inference bundle not exported")

    # ------------------------------------------------------------------ validation
    def validate(self) -> Optional[str]:
        """Validate with EMA weights; save best (only from a healthy state); 'early_stopped' when patience runs out."""
        from diffold.validation import validate

        if self.val_dl is None:
            return None
        st, cfg = self.state, self.cfg
        self.runlog.heartbeat(st.global_step, st.epoch, "validate")
        metrics = validate(self.acc, self.ema.module, self.diffusion, self.val_dl, self.val_ds, cfg, self.task,
                           self.atoms, self.run_dir, st.global_step)
        self.faults.kill_now(st.global_step, self.acc.process_index, kind="kill_in_val")  # samples written, best not
        samples = self.run_dir / "samples" / f"step_{st.global_step:09d}"  # written by validate()
        self.runlog.log_structures(st.global_step, sorted(samples.glob("*.pdb")))
        st.last_val = metrics
        best_key, mode = cfg.validation.best_metric, cfg.validation.best_mode
        value = metrics.get(best_key)
        es = cfg.training.early_stopping
        es_value = metrics.get(es.metric or best_key)
        if es_value is not None and math.isfinite(es_value) and improved(es_value, st.es_best, es.mode or mode, es.min_delta):
            st.es_best, st.bad_validations = es_value, 0
        else:
            st.bad_validations += 1
        healthy, why = self.health_mark()
        if value is not None and math.isfinite(value) and improved(value, st.best_value, mode):
            if healthy:
                st.best_value, st.best_step = value, st.global_step
                if self.save("best") and cfg.checkpoint.export_best:
                    self.export(self.ckpts.dir / "best" / "export")
            else:
                log.warning("validation improved %s but the state is not healthy (%s): best not updated", best_key, why)
        self.runlog.log("val", st.global_step, st.epoch, {**metrics, "best_metric": best_key,
                                                          "best_value": st.best_value, "best_step": st.best_step})
        log.info("validation step %d: %s", st.global_step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if es.enabled and st.bad_validations >= es.patience:
            return "early_stopped"
        return None

    # ------------------------------------------------------------------ recovery
    def rollback(self, before_onset: bool = False) -> str:
        """Restore the newest HEALTHY checkpoint's weights/optimizer/schedule with the LR backed off; keep the
        data position and step count (the batches that diverged are not replayed). 'gave_up' if there is none.

        before_onset (a confirmed spike or the loss level showed the divergence, not a skipped update or an
        exploded weight, which are caught at the update that did it): the loss needs up to ONSET_MARGIN (loss_level.py) steps
        to show it, so a checkpoint written that recently may already hold diverging weights: take the newest
        healthy one from before that, else the oldest healthy one (the step-0 checkpoint of a fresh run)."""
        found = self.ckpts.candidates(healthy_only=True)  # newest first
        healthy = [p for _, p in found]
        if before_onset:
            healthy = onset_targets([(meta["step"], p) for meta, p in found], self.state.global_step)
        loaded = self.ckpts.load_first(healthy, self.ema, strict=False)
        if loaded is None:
            log.error("rollback needed but no healthy checkpoint can be loaded: lower checkpoint.save_every_steps")
            return "gave_up"
        path, restored, _ = loaded
        st = self.state
        abandoned = self.ckpts.abandon(restored.global_step, st.global_step,
                                       f"abandoned: the rollback at step {st.global_step} to step {restored.global_step} "
                                       "discarded the weights it holds")
        if abandoned:
            log.warning("checkpoints from the discarded branch marked unhealthy (no rollback/resume target): %s",
                        ", ".join(abandoned))
        keep = {k: getattr(st, k) for k in ("global_step", "epoch", "batch_in_epoch", "samples_seen", "loss_history")}
        for name, value in vars(restored).items():
            setattr(st, name, keep.get(name, value))
        st.lr_scale = self.policy.lr_scale
        set_lr_scale(self.scheduler, self.optimizer, self.cfg.training.optimizer.lr * st.lr_scale)
        if restored.health:
            self.monitor.restore_statistics(restored.health)  # the statistics the divergence polluted
        self.monitor.reset_spikes()
        self.stepper.forget_weights()
        self.weights_ok = True
        self.runlog.health_event({"time": time.time(), "step": st.global_step, "status": "critical", "check": "rollback",
                                  "message": f"rolled back to {path.name} (healthy, step {restored.global_step}); "
                                             f"LR scale now {st.lr_scale:g}",
                                  "suggestion": "if this repeats, lower training.optimizer.lr or use --preset safety",
                                  "action": "rollback"})
        return "running"

    # ------------------------------------------------------------------ the end
    def finish(self, status: str, signal_name: str | None) -> tuple[str, str]:
        """Final checkpoint and export, and the verdict: (end status, reason). A run that 'finished' holds
        finite weights and a healthy last window, else it is 'finished_unhealthy' and nothing is exported."""
        st, runlog = self.state, self.runlog
        if status == "gave_up":
            log.error(self.policy.final_report().replace("{resume_command}", runlog.resume_command))
            return status, f"health.max_rollbacks={self.cfg.health.max_rollbacks} exhausted (see health.jsonl)"
        healthy, why = self.health_mark()
        if not self.save(f"step_{st.global_step:09d}"):  # the final state is lost: say so, point at what is left
            order = self.ckpts.auto_order()
            log.error("final checkpoint not written (see above); free disk space, then resume from the newest valid "
                      "checkpoint (%s): %s", order[0] if order else "none: starts fresh", runlog.resume_command)
            return "failed", "final checkpoint could not be written"
        if status == "interrupted":
            return status, f"{signal_name}: checkpoint step_{st.global_step:09d} written; resume with --resume auto"
        if not healthy:
            good = self.ckpts.candidates(healthy_only=True)
            log.error("training ended but its final state is not healthy (%s): nothing exported; newest healthy checkpoint: "
                      "%s", why, good[0][1] if good else "none")
            return "finished_unhealthy", why
        self.export(self.run_dir / "export")
        return status, "final weights finite, last window healthy"

    # ------------------------------------------------------------------ logging
    def memory(self) -> dict:
        """Memory is sampled at the log interval only; the health check reuses that sample in between."""
        if not self.last_memory:
            self.last_memory = memory_stats(self.acc.device)
        return self.last_memory

    def log_interval(self, stats) -> None:
        """Means (and maxima where a spike matters) over the log interval to metrics.jsonl / trackers / heartbeat."""
        interval, st = self.interval, self.state
        if not interval:
            return
        n = len(interval)
        finite = [r for r, *_ in interval if math.isfinite(r.loss)]
        loss = sum(r.loss for r in finite) / len(finite) if finite else float("nan")
        terms = {f"loss/{k}": sum(r.terms.get(k, 0.0) for r in finite) / max(len(finite), 1) for k in interval[-1][0].terms}
        self.last_memory = mem = memory_stats(self.acc.device)
        grad_max = max((r.grad_norm for r, *_ in interval if math.isfinite(r.grad_norm)), default=math.nan)
        status = max(x[2].status_code for x in interval)
        scalars = {
            "loss/total": loss, **terms, "lr": interval[-1][1],
            "grad_norm": sum(r.grad_norm for r, *_ in interval) / n, "grad_norm_max": grad_max,
            "time/step_s": sum(x[3] for x in interval) / n,
            "time/data_share": sum(x[4] for x in interval) / max(sum(x[3] for x in interval), 1e-9),
            "mem/device_gb": mem.get("device_gb"), "mem/host_gb": mem.get("host_gb"),
            "health/status": status, "health/status_last": interval[-1][2].status_code,
            "health/loss_zscore": self.monitor.loss_zscore, "health/grad_norm_preclip": grad_max,
            "health/skipped_steps": self.policy.skipped_steps, "health/rollbacks": self.policy.rollbacks,
            "health/oom_retries": self.policy.oom_retries, **stats.flush(train_s=sum(x[3] for x in interval)),
        }
        st.loss_history.append([st.global_step, loss])
        self.runlog.log("train", st.global_step, st.epoch, scalars)
        self.runlog.heartbeat(st.global_step, st.epoch, "train")
        hits = sum(x[2].status_code == status for x in interval)
        word = "healthy" if status == 0 else f"{('healthy', 'warning', 'critical')[status]} in {hits} of the last {n} step(s)"
        log.info("step %d | train loss - total: %.4f, %s | lr %.3g | grad %.3g | %s",
                 st.global_step, loss, ", ".join(f"{k[5:]}: {v:.4f}" for k, v in terms.items()),
                 scalars["lr"], scalars["grad_norm"], word)
        if self.progress is not None:
            self.progress.update(st.global_step - self.progress.n)
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['lr']:.2e}")
        self.interval = []


def set_lr_scale(scheduler, optimizer, base_lr: float) -> None:
    """Rescale the schedule's base LR (rollback back-off) keeping its position."""
    sched = scheduler.scheduler
    sched.base_lrs = [base_lr for _ in sched.base_lrs]
    for group, lam in zip(optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def progress_bar(acc, cfg, total: int, initial: int):
    if not (cfg.logging.progress_bar and acc.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
