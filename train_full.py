#!/usr/bin/env python
"""Train a diffold structure-diffusion model.

    accelerate launch --config_file accelerate_configs/cpu.yaml train_full.py --config configs/smoke.yaml
    python train_full.py --config c.yaml [--preset P] [--task rna|protein] [--output_dir D]
                         [--resume auto|latest|best|PATH] [key=value ...]
"""
from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import time
from datetime import timedelta
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs, PartialState
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    parse_flag_from_env,
    set_seed,
)

import diffold
from diffold.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    export_inference_bundle,
    write_json_atomic,
)
from diffold.config import Config, ConfigError, load_config, save_config
from diffold.data import DataError, build_datasets, build_loader
from diffold.diffusion import build_diffusion
from diffold.ema import EMA
from diffold.faults import FaultInjector
from diffold.health import HealthMonitor, RecoveryPolicy, sync_flags
from diffold.loop import LossStats, Stepper
from diffold.memory import memory_stats
from diffold.model import build_model, count_parameters
from diffold.optim import build_optimizer, build_scheduler
from diffold.state import TrainState, improved
from diffold.tasks import get_task
from diffold.tracking import RunLog, setup_logging, wandb_mode
from diffold.validation import validate

log = logging.getLogger("diffold.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/smoke.yaml)")
    p.add_argument("--preset", help="balanced | performance | safety | memory | debug")
    p.add_argument("--task", choices=["rna", "protein"], help="overrides task: in the config")
    p.add_argument("--output_dir", help="run directory (default: logging.output_dir/<run_name>)")
    p.add_argument("--resume", help="auto | latest | best | PATH (auto: newest valid checkpoint, else fresh)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.optimizer.lr=3e-4")
    return p.parse_intermixed_args(argv)  # overrides may come before or after options


def resume_command(run_dir: Path, num_processes: int, device_type: str = "cuda") -> str:
    launch = "python"
    if num_processes > 1 and device_type == "cpu":
        launch = f"ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_ddp.yaml --num_processes {num_processes}"
    elif num_processes > 1:
        launch = f"accelerate launch --num_processes {num_processes}"
    return f"{launch} train_full.py --config {run_dir}/config.yaml --output_dir {run_dir} --resume auto"


def resolve_run_dir(cfg: Config, output_dir: str | None, stem: str) -> Path:
    """Same directory on every rank: the main process picks the timestamped name and broadcasts it."""
    if output_dir:
        return Path(output_dir)
    name = [cfg.logging.run_name or f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}"]
    broadcast_object_list(name)
    return Path(cfg.logging.output_dir) / name[0]


def train(cfg: Config, output_dir: str | Path | None = None, resume: str | None = None, stem: str = "run") -> dict:
    """The whole run; returns a summary (status, steps, first/last loss, final EMA/model weights)."""
    # ---- accelerator: devices, precision, accumulation, process group --------------------------
    # process group first (ranks agree on run_dir). PartialState ignores ACCELERATE_USE_CPU (only
    # AcceleratorState reads it): without cpu= here, 2 CPU processes would each train alone.
    ps = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(seconds=cfg.distributed.timeout_s))
    if int(os.environ.get("WORLD_SIZE", "1")) != ps.num_processes:
        raise ConfigError(f"launched {os.environ['WORLD_SIZE']} processes but the process group has {ps.num_processes}: "
                          "each would train alone; on CPU set ACCELERATE_USE_CPU=true (accelerate_configs/cpu_ddp.yaml)")
    run_dir = resolve_run_dir(cfg, output_dir, stem)
    log_with = [t for t in cfg.logging.log_with if not (t == "wandb" and wandb_mode(cfg.logging.wandb_mode) == "disabled")]
    acc = Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=cfg.training.mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # we step it once per real optimizer step (accelerate #2773)
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s)),
            DistributedDataParallelKwargs(find_unused_parameters=cfg.distributed.find_unused_parameters),
        ],
    )
    set_seed(cfg.training.seed)
    ckpts = CheckpointManager(run_dir, acc, cfg.checkpoint.keep_last_n)
    if resume is None and ckpts.candidates():
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, or a new --output_dir")
    if acc.is_main_process:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    acc.wait_for_everyone()
    setup_logging(run_dir, acc, cfg.logging.log_level)
    task = get_task(cfg.task)
    atoms = task.resolve_atoms(cfg.data.atoms)
    k = cfg.training.gradient_accumulation_steps

    # ---- data -----------------------------------------------------------------------------------
    train_ds, val_ds, report = build_datasets(cfg, main_process_first=acc.main_process_first)
    if acc.is_main_process:
        write_json_atomic(run_dir / "data_report.json", report.to_dict())
    shard = {"num_replicas": acc.num_processes, "rank": acc.process_index}
    try:
        train_dl = build_loader(train_ds, cfg, train=True, batches_multiple_of=k, **shard)
    except ValueError as e:  # fewer chains than processes x accumulation steps
        raise DataError(f"{cfg.data.train_path}: {e}") from None
    if val_ds is not None and len(val_ds) < acc.num_processes:
        # too few chains to shard: every rank validates all of them with the same seed (identical
        # losses, so the cross-rank mean is unchanged) instead of failing
        log.warning("validation set has %d chain(s) for %d processes: not sharded, every rank validates all",
                    len(val_ds), acc.num_processes)
        shard = {"num_replicas": 1, "rank": 0}
    val_dl = build_loader(val_ds, cfg, train=False, **shard) if val_ds is not None else None
    steps_per_epoch = len(train_dl) // k
    total_steps = cfg.training.num_epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.training.max_steps or total_steps)

    # ---- model + EMA ----------------------------------------------------------------------------
    model = build_model(cfg, num_atoms=len(atoms))
    diffusion = build_diffusion(cfg, task)
    ema = EMA(model, cfg.training.ema_decay)
    ema.module.to(acc.device)
    set_seed(cfg.training.seed, device_specific=True)  # same init everywhere, different noise per rank

    # ---- optimizer + schedule -------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg.training.optimizer)
    scheduler = build_scheduler(optimizer, cfg.training.scheduler, total_steps, cfg.training.optimizer.lr)

    # ---- prepare ----------------------------------------------------------------------------------
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

    # ---- resume -----------------------------------------------------------------------------------
    state = TrainState(num_processes=acc.num_processes)
    path = ckpts.resolve(resume)
    if path is not None:
        state, meta = ckpts.load(path, ema)
        old_bs = meta.get("config", {}).get("training", {}).get("batch_size") or cfg.training.batch_size
        if (state.num_processes, old_bs) != (acc.num_processes, cfg.training.batch_size):
            log.warning("checkpoint was written by %d processes x batch %d, now %d x %d: weights and optimizer restored, "
                        "data order of the resumed epoch differs", state.num_processes, old_bs, acc.num_processes,
                        cfg.training.batch_size)
            # position by chains consumed (moving 2 -> 1 process often doubles batch_size); never past the epoch
            done = state.batch_in_epoch * state.num_processes * old_bs // (acc.num_processes * cfg.training.batch_size)
            state.batch_in_epoch = min(done, len(train_dl)) // k * k
            state.num_processes = acc.num_processes
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, state.global_step, state.epoch, state.batch_in_epoch)
    set_lr_scale(scheduler, optimizer, cfg.training.optimizer.lr * state.lr_scale)

    # ---- health, recovery, tracking ---------------------------------------------------------------
    monitor = HealthMonitor.from_config(cfg, total_steps)
    policy = RecoveryPolicy(cfg.health)
    if state.health:
        monitor.load_state_dict(state.health)
    if state.recovery:
        policy.load_state_dict(state.recovery)
    stats = LossStats(diffusion.noise_bins, acc.device)
    faults = FaultInjector.from_spec(cfg.health.inject_faults)

    def before_commit() -> None:  # test hooks (health.inject_faults): die, or hit a full disk, mid-write
        faults.kill_now(state.global_step, acc.process_index, kind="kill_in_save")
        if faults.active("enospc_in_save", state.global_step, acc.process_index):
            raise OSError(errno.ENOSPC, "No space left on device (injected: health.inject_faults)")

    ckpts.before_commit = before_commit
    stepper = Stepper(acc, model, diffusion, optimizer, scheduler, ema, cfg, faults, stats)
    stepper.set_multiplier(state.accumulation_multiplier)
    runlog = RunLog(run_dir, acc, total_steps, resume_command(run_dir, acc.num_processes, acc.device.type))
    state.wandb_run_id = runlog.init_trackers(cfg, run_dir.name, state.wandb_run_id)
    effective = cfg.effective_batch_size(acc.num_processes)
    log.info("diffold %s | %s task | %d params | %d train / %d val chains | effective batch %d = %d x %d accum x %d proc | %d steps",
             diffold.__version__, cfg.task, count_parameters(acc.unwrap_model(model)), len(train_ds),
             len(val_ds) if val_ds else 0, effective, cfg.training.batch_size, k, acc.num_processes, total_steps)
    runlog.log("start", state.global_step, state.epoch, {
        "run_name": run_dir.name, "total_steps": total_steps, "num_processes": acc.num_processes,
        "effective_batch_size": effective, "resume_command": runlog.resume_command,
        "resumed_from": str(path) if path else None})

    def save(name: str) -> bool:
        """Checkpoint; a failed write (e.g. disk full) is reported and training goes on: the next save retries."""
        runlog.heartbeat(state.global_step, state.epoch, "checkpoint")
        state.health, state.recovery = monitor.state_dict(), policy.state_dict()
        meta = {"step": state.global_step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                "num_processes": acc.num_processes, "config": cfg.to_dict(), "metrics": state.last_val,
                "wandb_run_id": state.wandb_run_id,  # documented in docs/run_directory.md
                "versions": {"torch": torch.__version__, "diffold": diffold.__version__,
                             "accelerate": sys.modules["accelerate"].__version__}}
        try:
            ckpts.save(name, state, ema, meta)
        except CheckpointWriteError as e:  # training state in memory is intact; older checkpoints are valid
            write_failed(e, f"checkpoint {name} not saved; training continues and the next save retries")
            return False
        return True

    def write_failed(err: CheckpointWriteError, consequence: str) -> None:
        newest = ckpts.resolve("auto")
        runlog.health_event({"time": time.time(), "step": state.global_step, "status": "critical",
                             "check": "checkpoint_write", "message": f"{err}; {consequence}",
                             "suggestion": f"free disk space; newest valid checkpoint: {newest or 'none'}",
                             "action": "none"})

    def export(dest: Path) -> None:
        """Inference bundle of the EMA weights (main process); a failed write is reported, not fatal."""
        if acc.is_main_process:
            try:
                export_inference_bundle(ema, cfg.to_dict()["model"], cfg.task, dest,
                                        {"atoms": list(atoms), "diffusion": cfg.to_dict()["diffusion"]})
            except CheckpointWriteError as e:
                write_failed(e, "inference bundle not exported")

    def run_validation() -> str | None:
        """Validate with EMA weights; save best; returns 'early_stopped' when patience runs out."""
        if val_dl is None:
            return None
        runlog.heartbeat(state.global_step, state.epoch, "validate")
        metrics = validate(acc, ema.module, diffusion, val_dl, val_ds, cfg, task, atoms, run_dir, state.global_step)
        faults.kill_now(state.global_step, acc.process_index, kind="kill_in_val")  # test hook: samples written, best not
        samples = run_dir / "samples" / f"step_{state.global_step:09d}"  # written by validate()
        runlog.log_structures(state.global_step, sorted(samples.glob("*.pdb")))
        state.last_val = metrics
        best_key, mode = cfg.validation.best_metric, cfg.validation.best_mode
        value = metrics.get(best_key)
        es = cfg.training.early_stopping
        es_value = metrics.get(es.metric or best_key)
        if es_value is not None and math.isfinite(es_value) and improved(es_value, state.es_best, es.mode or mode, es.min_delta):
            state.es_best, state.bad_validations = es_value, 0
        else:
            state.bad_validations += 1
        if value is not None and math.isfinite(value) and improved(value, state.best_value, mode):
            state.best_value, state.best_step = value, state.global_step
            if save("best") and cfg.checkpoint.export_best:
                export(ckpts.dir / "best" / "export")
        runlog.log("val", state.global_step, state.epoch, {**metrics, "best_metric": best_key,
                                                           "best_value": state.best_value, "best_step": state.best_step})
        log.info("validation step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if es.enabled and state.bad_validations >= es.patience:
            return "early_stopped"
        return None

    # ---- loop -------------------------------------------------------------------------------------
    status, interval, first_loss = "running", [], None
    progress = _progress(acc, cfg, total_steps, state.global_step)
    while status == "running":
        if state.epoch >= cfg.training.num_epochs or state.global_step >= total_steps:
            status = "finished"
            break
        train_ds.set_epoch(state.epoch)
        train_dl.batch_sampler.set_epoch(state.epoch)
        train_dl.batch_sampler.skip(state.batch_in_epoch)  # exact mid-epoch resume
        batches = iter(train_dl)
        while True:
            t0 = time.perf_counter()
            group = [b.to(acc.device) for b in islice(batches, k)]
            if len(group) < k:
                break  # epoch done (the sampler makes batches per rank a multiple of k)
            for b in group:
                stats.add_residues(b)
            t1 = time.perf_counter()
            res = stepper.step(group, state.global_step)
            step_time = time.perf_counter() - t0
            state.batch_in_epoch += k
            state.global_step += 1
            state.samples_seen += sum(len(b) for b in group) * acc.num_processes
            state.accumulation_multiplier = stepper.multiplier
            lr = scheduler.get_last_lr()[0]
            stagnant = faults.active("stagnate", state.global_step - 1, acc.process_index)  # fault steps count from 0
            losses = {"total": 1.0 if stagnant else res.loss}
            report = monitor.update(state.global_step, {**res.terms, **losses}, res.grad_norm, lr,
                                    step_time, t1 - t0, last_memory(acc))
            for _ in range(res.oom_retries):
                policy.on_oom(state.global_step)
                runlog.health_event(policy.recent[-1])  # on_oom records a plain dict
            bad, spike = sync_flags(acc, [res.skipped or report.bad_step, report.spike_confirmed])  # same branch on all ranks
            action = policy.decide(bad, spike, report)
            for ev in report.events:
                runlog.health_event(ev.to_dict())
            if first_loss is None and math.isfinite(res.loss):
                first_loss = res.loss
            interval.append((res, lr, report, step_time, t1 - t0))
            if action == "rollback":
                status = rollback(acc, ckpts, ema, state, scheduler, optimizer, cfg, runlog, policy.lr_scale)
            elif action == "give_up":
                status = "gave_up"
            if state.global_step % cfg.training.log_every == 0 or status != "running":
                flush_interval(runlog, state, stats, interval, monitor, policy, acc, progress)
                interval = []
            if status != "running":
                break
            if cfg.training.validate_every_steps and state.global_step % cfg.training.validate_every_steps == 0:
                status = run_validation() or status
            if state.global_step % cfg.checkpoint.save_every_steps == 0:
                save(f"step_{state.global_step:09d}")
            if status != "running" or state.global_step >= total_steps:
                break
        if status != "running" or state.batch_in_epoch < len(train_dl):
            status = "max_steps" if status == "running" else status
            break  # stopped mid-epoch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if not cfg.training.validate_every_steps and state.epoch % cfg.training.validate_every == 0:
            status = run_validation() or status
        save(f"step_{state.global_step:09d}")
        if cfg.checkpoint.save_every_epochs and state.epoch % cfg.checkpoint.save_every_epochs == 0:
            save(f"epoch_{state.epoch}")

    # ---- finish -----------------------------------------------------------------------------------
    if interval:
        flush_interval(runlog, state, stats, interval, monitor, policy, acc, progress)
    if status != "gave_up":
        if save(f"step_{state.global_step:09d}"):
            export(run_dir / "export")
        else:  # the final state is lost: say so, exit non-zero, point at what is left
            status = "failed"
            log.error("final checkpoint not written (see above); free disk space, then resume from the newest valid "
                      "checkpoint (%s): %s", ckpts.resolve("auto") or "none: starts fresh", runlog.resume_command)
    else:
        log.error(policy.final_report().replace("{resume_command}", runlog.resume_command))
    same = ranks_agree(acc, acc.unwrap_model(model), ema.module)  # collective: every rank calls it
    runlog.log("end", state.global_step, state.epoch, {"status": status, "reason": status,
                                                       "rank_param_checksums_equal": same,
                                                       "lost_log_records": runlog.dropped_writes})
    runlog.heartbeat(state.global_step, state.epoch, "done", status)
    runlog.finish()
    if progress is not None:
        progress.close()
    last = state.loss_history[-1][1] if state.loss_history else None
    log.info("run %s: %s at step %d. Resume/continue: %s", run_dir, status, state.global_step, runlog.resume_command)
    return {"status": status, "run_dir": run_dir, "step": state.global_step, "first_loss": first_loss,
            "last_loss": last, "ema": ema, "diffusion": diffusion, "train_loader": train_dl, "cfg": cfg, "model": acc.unwrap_model(model), "state": state, "accelerator": acc}


_MEMORY: dict = {}


def last_memory(acc) -> dict:
    """Memory is sampled at the log interval only; the health check reuses that sample in between."""
    if not _MEMORY:
        _MEMORY.update(memory_stats(acc.device))
    return _MEMORY


def ranks_agree(acc, *modules: torch.nn.Module) -> bool | None:
    """Safety check: all ranks hold the same weights (float64 sum per tensor, gathered); logs an error if not."""
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None  # parameters may be sharded per rank: their sums are not comparable
    sums = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()])  # [P]
    every = acc.gather(sums[None]).reshape(acc.num_processes, -1)                           # [R, P]
    same = torch.isclose(every, every[:1], rtol=0, atol=0, equal_nan=True).all(0)           # [P]
    if not bool(same.all()):
        log.error("parameters differ between ranks in %d of %d tensors (ranks diverged: DDP not synchronising, "
                  "or a rank took a different branch); do not trust this run's weights", int((~same).sum()), len(same))
    return bool(same.all())


def set_lr_scale(scheduler, optimizer, base_lr: float) -> None:
    """Rescale the schedule's base LR (rollback back-off) keeping its position."""
    sched = scheduler.scheduler
    sched.base_lrs = [base_lr for _ in sched.base_lrs]
    for group, lam in zip(optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def rollback(acc, ckpts, ema, state, scheduler, optimizer, cfg, runlog, lr_scale: float) -> str:
    """Restore the newest valid checkpoint's weights/optimizer/schedule; keep data position and step count."""
    path = ckpts.resolve("auto")
    if path is None:
        log.error("rollback needed but no checkpoint exists yet: lower checkpoint.save_every_steps")
        return "gave_up"
    keep = {k: getattr(state, k) for k in ("global_step", "epoch", "batch_in_epoch", "samples_seen", "loss_history")}
    restored, _ = ckpts.load(path, ema)
    for name, value in vars(restored).items():
        setattr(state, name, keep.get(name, value))
    state.lr_scale = lr_scale
    set_lr_scale(scheduler, optimizer, cfg.training.optimizer.lr * state.lr_scale)
    runlog.health_event({"time": time.time(), "step": state.global_step, "status": "critical", "check": "rollback",
                         "message": f"rolled back to {path.name}; LR scale now {state.lr_scale:g}",
                         "suggestion": "if this repeats, lower training.optimizer.lr or use --preset safety",
                         "action": "rollback"})
    return "running"


def flush_interval(runlog, state, stats, interval, monitor, policy, acc, progress) -> None:
    """Means over the log interval to metrics.jsonl / trackers / heartbeat / progress bar."""
    n = len(interval)
    finite = [r for r, *_ in interval if math.isfinite(r.loss)]
    loss = sum(r.loss for r in finite) / max(len(finite), 1) if finite else float("nan")
    terms = {f"loss/{k}": sum(r.terms.get(k, 0.0) for r in finite) / max(len(finite), 1) for k in interval[-1][0].terms}
    mem = memory_stats(acc.device)
    _MEMORY.update(mem)
    last_report = interval[-1][2]
    scalars = {
        "loss/total": loss, **terms, "lr": interval[-1][1],
        "grad_norm": sum(r.grad_norm for r, *_ in interval) / n,
        "grad_norm_max": max((r.grad_norm for r, *_ in interval if math.isfinite(r.grad_norm)), default=math.nan),
        "time/step_s": sum(x[3] for x in interval) / n,
        "time/data_share": sum(x[4] for x in interval) / max(sum(x[3] for x in interval), 1e-9),
        "mem/device_gb": mem.get("device_gb"), "mem/host_gb": mem.get("host_gb"),
        "health/status": max(x[2].status_code for x in interval), "health/loss_zscore": monitor.loss_zscore,
        "health/grad_norm_preclip": interval[-1][0].grad_norm,
        "health/skipped_steps": policy.skipped_steps, "health/rollbacks": policy.rollbacks,
        "health/oom_retries": policy.oom_retries, **stats.flush(train_s=sum(x[3] for x in interval)),
    }
    state.loss_history.append([state.global_step, loss])
    runlog.log("train", state.global_step, state.epoch, scalars)
    runlog.heartbeat(state.global_step, state.epoch, "train")
    log.info("step %d | train loss - total: %.4f, %s | lr %.3g | grad %.3g | %s",
             state.global_step, loss, ", ".join(f"{k[5:]}: {v:.4f}" for k, v in terms.items()),
             scalars["lr"], scalars["grad_norm"], last_report.overall_status)
    if progress is not None:
        progress.update(state.global_step - progress.n)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['lr']:.2e}")


def _progress(acc, cfg, total: int, initial: int):
    if not (cfg.logging.progress_bar and acc.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = [*args.overrides, *([f"task={args.task}"] if args.task else [])]
        cfg = load_config(args.config, args.preset, overrides)
        result = train(cfg, args.output_dir, args.resume, stem=Path(args.config).stem)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result["status"] in ("finished", "early_stopped", "max_steps") else 3


if __name__ == "__main__":
    sys.exit(main())
