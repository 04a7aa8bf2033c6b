#!/usr/bin/env python
"""Step-time ratio: train_full's loop machinery vs a bare Accelerate loop, same model and batches.

    python benchmarks/overhead.py [--blocks 16] [--steps 20] [--health off]

Interleaved blocks in ONE process (A B A B ...; see shared benchmarking notes), median ratio of
paired blocks with a bootstrap 95% interval. "full" = Stepper.step (accumulate, pre-clip norm,
host sync, weight/optimizer-state check after the update, cross-rank flag) + HealthMonitor.update +
RecoveryPolicy.decide + the log-interval flush to metrics.jsonl/heartbeat (Run.log_interval);
"bare" = accumulate/backward/clip/step/zero_grad only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelerate import Accelerator  # noqa: E402

from diffold.config import load_config  # noqa: E402
from diffold.data import build_datasets, build_loader  # noqa: E402
from diffold.diffusion import build_diffusion  # noqa: E402
from diffold.ema import EMA  # noqa: E402
from diffold.faults import FaultInjector  # noqa: E402
from diffold.health import HealthMonitor, RecoveryPolicy, sync_flags  # noqa: E402
from diffold.loop import LossStats, Stepper  # noqa: E402
from diffold.model import build_model  # noqa: E402
from diffold.optim import build_optimizer, build_scheduler  # noqa: E402
from diffold.run import Run  # noqa: E402
from diffold.state import TrainState  # noqa: E402
from diffold.tasks import get_task  # noqa: E402
from diffold.tracking import RunLog  # noqa: E402


def bootstrap_ci(ratios: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    meds = [np.median(rng.choice(ratios, len(ratios))) for _ in range(n)]
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--health", choices=["on", "compare"], default="on",
                   help="compare: health monitoring on vs off (what health_overhead.py runs)")
    args = p.parse_args()
    os.chdir(ROOT)
    torch.manual_seed(0)
    cfg = load_config("configs/smoke.yaml", overrides=["training.log_every=10", "logging.log_with=[]"], env={})
    acc = Accelerator(cpu=True)
    task = get_task(cfg.task)
    train_ds, _, _ = build_datasets(cfg)
    batches = [b for _, b in zip(range(args.steps), build_loader(train_ds, cfg, train=True))]
    model = build_model(cfg, num_atoms=1)
    diffusion = build_diffusion(cfg, task)
    ema = EMA(model, cfg.training.ema_decay)
    opt = build_optimizer(model, cfg.training.optimizer)
    sched = build_scheduler(opt, cfg.training.scheduler, 10**6, cfg.training.optimizer.lr)
    model, opt, sched = acc.prepare(model, opt, sched)
    stats = LossStats(diffusion.noise_bins, acc.device)
    stepper = Stepper(acc, model, diffusion, opt, sched, ema, cfg, FaultInjector.from_spec(""), stats)
    monitor, policy = HealthMonitor.from_config(cfg, 10**6), RecoveryPolicy(cfg.health)
    run_dir = Path(tempfile.mkdtemp())
    runlog, state = RunLog(run_dir, acc, 10**6, "n/a"), TrainState()
    run = Run(acc, cfg, run_dir, None, runlog, state, ema, model, opt, sched, monitor, policy, stepper, None, task,
              ("C4'",), diffusion)

    def bare_block() -> float:
        t0 = time.perf_counter()
        for b in batches:
            with acc.accumulate(model):
                loss = diffusion.loss(model, b).total.mean()
                acc.backward(loss)
                acc.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def full_block(health: bool = True) -> float:
        t0 = time.perf_counter()
        for b in batches:
            ts = time.perf_counter()
            stats.add_residues(b)
            res = stepper.step([b], state.global_step)
            state.global_step += 1
            if health:
                report = monitor.update(state.global_step, {"total": res.loss, **res.terms}, res.grad_norm,
                                        sched.get_last_lr()[0], time.perf_counter() - ts, 0.0, {}, res.weights)
                bad, spike, broken, _ = sync_flags(acc, [res.skipped or report.bad_step, report.spike_confirmed,
                                                         report.broken_weights, False])
                policy.decide(bad, spike, report, broken_weights=broken)
                run.interval.append((res, sched.get_last_lr()[0], report, time.perf_counter() - ts, 0.0))
                if state.global_step % cfg.training.log_every == 0:
                    run.log_interval(stats)
        return time.perf_counter() - t0

    if args.health == "compare":  # benchmarks/health_overhead.py: monitoring on vs off
        report("train_full loop, health on / health off", paired(lambda: full_block(False), full_block,
                                                                  args.blocks), args, target=1.01)
    else:
        report("train_full loop / bare Accelerate loop", paired(bare_block, full_block, args.blocks), args, 1.02)


def paired(base, variant, blocks: int) -> tuple[list[float], float]:
    """Interleaved A B / B A blocks; returns per-pair ratios variant/base and the last base time."""
    base(), variant()  # warm-up
    ratios = []
    for i in range(blocks):
        if i % 2 == 0:
            a = base()
            b = variant()
        else:
            b = variant()
            a = base()
        ratios.append(b / a)
    return ratios, a


def report(what: str, result: tuple[list[float], float], args, target: float) -> None:
    ratios, base_time = result
    lo, hi = bootstrap_ci(ratios)
    print(f"{what}: median {statistics.median(ratios):.3f} (95% CI {lo:.3f}-{hi:.3f}) over {len(ratios)} "
          f"paired blocks of {args.steps} steps (~{1000 * base_time / args.steps:.1f} ms/step base); target <= {target}")


if __name__ == "__main__":
    main()
