#!/usr/bin/env python
"""Train a diffold structure-diffusion model.

    accelerate launch --config_file accelerate_configs/cpu.yaml train_full.py --config configs/smoke.yaml
    python train_full.py --config c.yaml [--preset P] [--task rna|protein] [--output_dir D]
                         [--resume auto|latest|best|PATH] [key=value ...]

Exit codes: 0 finished healthy; 2 bad input/config/checkpoint (nothing trained); 3 gave up after
health.max_rollbacks, or the final checkpoint could not be written; 4 finished with unhealthy final
weights; 5 a peer process/machine died or timed out; 75 stopped by SIGTERM/SIGUSR1/SIGINT after writing
a checkpoint (resume with --resume auto).
"""
from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch is still importing: a quiet exit, not a traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import argparse  # noqa: E402 (after the handler above: importing torch takes seconds)
import errno
import logging
import math
import time
from itertools import islice
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

import diffold
from diffold import distributed
from diffold.atomic import write_json_atomic
from diffold.checkpoint import CheckpointError, CheckpointManager
from diffold.compiling import GraphWatch, compile_model, pad_multiple
from diffold.config import Config, ConfigError, load_config, save_config
from diffold.data import DataError, build_datasets, build_loader
from diffold.diffusion import build_diffusion
from diffold.ema import EMA
from diffold.faults import FaultInjector
from diffold.health import HealthMonitor
from diffold.loop import LossStats, Stepper
from diffold.model import build_model, count_parameters
from diffold.optim import build_optimizer, build_scheduler
from diffold.recovery import Action, RecoveryPolicy, sync_flags
from diffold.resume import resume_plan, resume_state
from diffold.run import EXIT_CODES, Run, progress_bar, set_lr_scale
from diffold.signals import EXIT_INTERRUPTED, Interrupted, PreemptionGuard
from diffold.startup import (
    Decisions,
    Start,
    choose_threads,
    make_accelerator,
    precision_used,
    resolve_run_dir,
)
from diffold.tasks import get_task
from diffold.tracking import RunLog, setup_logging, wandb_mode

log = logging.getLogger("diffold.train")
STARTUP_ERRORS = (ConfigError, DataError, CheckpointError, Interrupted)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/smoke.yaml)")
    p.add_argument("--preset", help="balanced | performance | safety | memory | debug")
    p.add_argument("--task", choices=["rna", "protein"], help="overrides task: in the config")
    p.add_argument("--output_dir", help="run directory (default: logging.output_dir/<run_name>)")
    p.add_argument("--resume", help="auto | latest | best | PATH (auto: newest healthy checkpoint, else fresh)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.optimizer.lr=3e-4")
    return p.parse_intermixed_args(argv)  # overrides may come before or after options


def resume_command(run_dir: Path, num_processes: int, device_type: str = "cuda") -> str:
    relaunch = distributed.relaunch_command(run_dir)  # the launch as it was made (launch_train.sh, sbatch, accelerate)
    if relaunch:
        return relaunch
    launch = "python"
    if num_processes > 1 and device_type == "cpu":
        launch = f"ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_ddp.yaml --num_processes {num_processes}"
    elif num_processes > 1:
        launch = f"accelerate launch --num_processes {num_processes}"
    return f"{launch} train_full.py --config {run_dir}/config.yaml --output_dir {run_dir} --resume auto"


def begin(cfg: Config, output_dir: str | None, resume: str | None, stem: str) -> Start:
    """Process group, accelerator, run directory, logging, and which checkpoint to resume (checked first)."""
    decisions = Decisions()
    choose_threads(decisions)
    ps = distributed.form_process_group(cfg.distributed.timeout_s)  # a launch that did not form: exit 2
    run_dir = resolve_run_dir(cfg, output_dir, stem)
    distributed.claim_run_dir(run_dir, ps)  # run.lock: one job per run directory, before anything is written
    log_with = [t for t in cfg.logging.log_with if not (t == "wandb" and wandb_mode(cfg.logging.wandb_mode) == "disabled")]
    acc = make_accelerator(cfg, run_dir, log_with, decisions)
    if acc.is_main_process:
        try:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only mount, a full disk, a file in the way
            raise CheckpointError(f"cannot write the run directory {run_dir} ({e.strerror or e}): choose a writable "
                                  "--output_dir" + (" or free disk space" if e.errno == errno.ENOSPC else "")) from None
    acc.wait_for_everyone()
    setup_logging(run_dir, acc, cfg.logging.log_level)
    distributed.log_launch()
    ckpts = CheckpointManager(run_dir, acc, cfg.checkpoint.keep_last_n)
    runlog = RunLog(run_dir, acc, 0, resume_command(run_dir, acc.num_processes, acc.device.type))
    start = Start(acc, run_dir, ckpts, [], runlog, decisions)
    try:
        start.resume_from = resume_plan(ckpts, resume, decisions)
        if acc.is_main_process:
            save_config(cfg, run_dir / "config.yaml")
    except OSError as e:
        runlog.failed_start(f"cannot write {run_dir}/config.yaml ({e.strerror or e})")
        raise CheckpointError(f"cannot write {run_dir}/config.yaml ({e.strerror or e}): free disk space or choose a "
                              "writable --output_dir") from None
    except CheckpointError as e:
        runlog.failed_start(str(e))
        raise
    return start


def train(cfg: Config, output_dir: str | Path | None = None, resume: str | None = None, stem: str = "run",
          guard: PreemptionGuard | None = None) -> dict:
    """The whole run; returns a summary (status, exit code, steps, losses, final EMA/model, ...)."""
    guard = guard or PreemptionGuard()
    try:
        start = begin(cfg, str(output_dir) if output_dir else None, resume, stem)
        try:
            return _train(cfg, start, guard, resume)
        except STARTUP_ERRORS as e:  # one `error:` line in main(); the run directory keeps the trace
            interrupted = isinstance(e, Interrupted)
            start.runlog.failed_start(str(e), report=getattr(e, "report", None),
                                      status="interrupted" if interrupted else "failed",
                                      exit_code=EXIT_INTERRUPTED if interrupted else 2)
            raise
    finally:
        distributed.release_run_dir()  # run.lock: this process no longer writes here


def _train(cfg: Config, start: Start, guard: PreemptionGuard, resume: str | None) -> dict:
    acc, run_dir, ckpts, runlog = start.acc, start.run_dir, start.ckpts, start.runlog
    set_seed(cfg.training.seed)
    task = get_task(cfg.task)
    atoms = task.resolve_atoms(cfg.data.atoms)
    k = cfg.training.gradient_accumulation_steps

    # ---- data -----------------------------------------------------------------------------------
    cache_first = distributed.cache_context(cfg.data.cache_dir, PartialState())  # node-local or shared cache
    train_ds, val_ds, report = build_datasets(cfg, main_process_first=cache_first)
    if acc.is_main_process:
        write_json_atomic(run_dir / "data_report.json", report.to_dict())
    shard = {"num_replicas": acc.num_processes, "rank": acc.process_index}
    pad = pad_multiple(cfg, start.decisions)  # few distinct shapes when compiling
    try:
        train_dl = build_loader(train_ds, cfg, train=True, batches_multiple_of=k, pad_multiple=pad, **shard)
    except ValueError as e:  # fewer chains than processes x accumulation steps
        raise DataError(f"{cfg.data.train_path}: {e}") from None
    if val_ds is not None and len(val_ds) < acc.num_processes:
        # too few chains to shard: every rank validates all of them with the same seed (identical
        # losses, so the cross-rank mean is unchanged) instead of failing
        start.decisions.warn(f"validation set has {len(val_ds)} chain(s) for {acc.num_processes} processes: "
                             "not sharded, every rank validates all")
        shard = {"num_replicas": 1, "rank": 0}
    val_dl = build_loader(val_ds, cfg, train=False, **shard) if val_ds is not None else None
    steps_per_epoch = len(train_dl) // k
    total_steps = min(cfg.training.num_epochs * steps_per_epoch, cfg.training.max_steps or 10**18)
    runlog.total_steps = total_steps

    # ---- model + EMA + diffusion ----------------------------------------------------------------
    model = build_model(cfg, num_atoms=len(atoms))
    diffusion = build_diffusion(cfg, task)
    ema = EMA(model, cfg.training.ema_decay)
    ema.module.to(acc.device)
    set_seed(cfg.training.seed, device_specific=True)  # same init everywhere, different noise per rank

    # ---- optimizer + schedule -------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg.training.optimizer)
    scheduler = build_scheduler(optimizer, cfg.training.scheduler, total_steps, cfg.training.optimizer.lr)

    # ---- prepare ----------------------------------------------------------------------------------
    model = compile_model(model, cfg)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

    # ---- health, recovery, resume -------------------------------------------------------------------
    monitor = HealthMonitor.from_config(cfg, total_steps)
    policy = RecoveryPolicy(cfg.health)
    state, resumed = resume_state(start, cfg, ema, monitor, policy, resume, len(train_dl))
    set_lr_scale(scheduler, optimizer, cfg.training.optimizer.lr * state.lr_scale)
    stats = LossStats(diffusion.noise_bins, acc.device)
    faults = FaultInjector.from_spec(cfg.health.inject_faults)

    def before_commit() -> None:  # test hooks (health.inject_faults): die, or hit a full disk, mid-write
        faults.kill_now(state.global_step, acc.process_index, kind="kill_in_save")
        if faults.active("enospc_in_save", state.global_step, acc.process_index):
            raise OSError(errno.ENOSPC, "No space left on device (injected: health.inject_faults)")

    ckpts.before_commit = before_commit
    stepper = Stepper(acc, model, diffusion, optimizer, scheduler, ema, cfg, faults, stats)
    stepper.set_multiplier(state.accumulation_multiplier)
    run = Run(acc, cfg, run_dir, ckpts, runlog, state, ema, model, optimizer, scheduler, monitor, policy, stepper,
              faults, task, atoms, diffusion, val_dl, val_ds)

    # ---- tracking and the start line ----------------------------------------------------------------
    state.wandb_run_id = runlog.init_trackers(cfg, run_dir.name, state.wandb_run_id)
    effective = cfg.effective_batch_size(acc.num_processes)
    log.info("diffold %s | %s task | %s, %s, %d process(es) x %d thread(s) | %d params | %d train / %d val chains | "
             "effective batch %d = %d x %d accum x %d proc | %d steps", diffold.__version__, cfg.task, acc.device,
             precision_used(acc), acc.num_processes, torch.get_num_threads(), count_parameters(acc.unwrap_model(model)),
             len(train_ds), len(val_ds) if val_ds else 0, effective, cfg.training.batch_size, k, acc.num_processes,
             total_steps)
    start.decisions.emit(acc.is_main_process)
    runlog.log("start", state.global_step, state.epoch, {
        "run_name": run_dir.name, "total_steps": total_steps, "num_processes": acc.num_processes,
        "effective_batch_size": effective, "resume_command": runlog.resume_command,
        "resumed_from": str(resumed) if resumed else None, "device": str(acc.device),
        "precision": precision_used(acc), "threads": torch.get_num_threads(), "decisions": start.decisions.to_list()})
    if resumed is None:
        run.save(f"step_{state.global_step:09d}")  # step 0: a healthy rollback target from the first step on

    # ---- loop -------------------------------------------------------------------------------------
    guard.arm()
    status, first_loss = "running", None
    run.progress = progress_bar(acc, cfg, total_steps, state.global_step)
    graphs = GraphWatch(cfg.model.compile)
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
            compiling = graphs.new_graphs(state.global_step, tuple(group[0].tokens.shape))  # not a slow batch
            report = monitor.update(state.global_step, {**res.terms, "total": 1.0 if stagnant else res.loss},
                                    res.grad_norm, lr, None if compiling else step_time, t1 - t0, run.memory(),
                                    res.weights)
            for _ in range(res.oom_retries):
                policy.on_oom(state.global_step)
                runlog.health_event(policy.recent[-1])  # on_oom records a plain dict
            # one all-reduce: every rank takes the same branch
            bad, spike, broken, stop, level = sync_flags(acc, [res.skipped or report.bad_step, report.spike_confirmed,
                                                               report.broken_weights, guard.requested is not None,
                                                               report.level_diverged])
            run.weights_ok = not broken
            action = policy.decide(bad, spike, report, broken_weights=broken)
            for ev in report.events:
                runlog.health_event(ev.to_dict())
            if first_loss is None and math.isfinite(res.loss):
                first_loss = res.loss
            run.interval.append((res, lr, report, step_time, t1 - t0))
            if action == Action.ROLLBACK:
                status = run.rollback(before_onset=level or spike)  # loss-based: the onset came before the verdict
            elif action == Action.GIVE_UP:
                status = "gave_up"
            if status == "running" and stop:
                status = "interrupted"
            if state.global_step % cfg.training.log_every == 0 or status != "running":
                run.log_interval(stats)
            if status != "running":
                break
            if cfg.training.validate_every_steps and state.global_step % cfg.training.validate_every_steps == 0:
                status = run.validate() or status
            if state.global_step % cfg.checkpoint.save_every_steps == 0:
                run.save(f"step_{state.global_step:09d}")
            if status != "running" or state.global_step >= total_steps:
                break
        if status != "running" or state.batch_in_epoch < len(train_dl):
            status = "max_steps" if status == "running" else status
            break  # stopped mid-epoch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if not cfg.training.validate_every_steps and state.epoch % cfg.training.validate_every == 0:
            status = run.validate() or status
        run.save(f"step_{state.global_step:09d}")
        if cfg.checkpoint.save_every_epochs and state.epoch % cfg.checkpoint.save_every_epochs == 0:
            run.save(f"epoch_{state.epoch}")

    # ---- finish -----------------------------------------------------------------------------------
    run.log_interval(stats)
    status, reason = run.finish(status, guard.requested)
    same = distributed.ranks_agree(acc, acc.unwrap_model(model), ema.module)  # collective: every rank calls it
    runlog.log("end", state.global_step, state.epoch, {"status": status, "reason": reason,
                                                       "exit_code": EXIT_CODES[status],
                                                       "rank_param_checksums_equal": same,
                                                       "compiled_graphs": graphs.total,
                                                       "lost_log_records": runlog.dropped_writes})
    runlog.heartbeat(state.global_step, state.epoch, "done", status)
    if EXIT_CODES[status] != 0:  # the 3 a.m. message: what happened and the command that continues
        runlog.alert(f"diffold: run {run_dir.name} {status}", f"{reason} (step {state.global_step}). "
                     f"Resume: {runlog.resume_command}")
    runlog.finish()
    if run.progress is not None:
        run.progress.close()
    last = state.loss_history[-1][1] if state.loss_history else None
    (log.info if EXIT_CODES[status] == 0 else log.error)(
        "run %s: %s at step %d (%s). Resume/continue: %s", run_dir, status, state.global_step, reason,
        runlog.resume_command)
    return {"status": status, "exit_code": EXIT_CODES[status], "reason": reason, "run_dir": run_dir,
            "step": state.global_step, "first_loss": first_loss, "last_loss": last, "ema": ema, "diffusion": diffusion,
            "train_loader": train_dl, "cfg": cfg, "model": acc.unwrap_model(model), "state": state, "accelerator": acc}


def main(argv=None) -> int:
    args = parse_args(argv)
    guard = PreemptionGuard().install()  # Ctrl-C during start-up: one line, no traceback
    try:
        overrides = [*args.overrides, *([f"task={args.task}"] if args.task else [])]
        cfg = load_config(args.config, args.preset, overrides)
        result = train(cfg, args.output_dir, args.resume, stem=Path(args.config).stem, guard=guard)
    except Interrupted as e:
        print(f"interrupted: {e}; nothing to resume from this attempt", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if distributed.is_peer_failure(e):  # a peer died or stopped answering: one line, exit 5
            return distributed.on_peer_failure(e)
        raise
    return result["exit_code"]


if __name__ == "__main__":
    distributed.exit_process(main())  # skips the interpreter teardown after a multi-process run
