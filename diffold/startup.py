"""Start-up decisions a run takes for the user, each said once: threads, device, precision,
process group, run directory. `Decisions` collects them for the log and the start event.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, broadcast_object_list

from diffold.config import Config

log = logging.getLogger("diffold.train")


@dataclass
class Decisions:
    """What the suite chose for the user: logged once at start (warnings for requests it could not honour)."""

    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def emit(self, main_process: bool = True) -> None:
        """Log every decision once: on the main process only."""
        if not main_process:
            return
        for text in self.notes:
            log.info("decision: %s", text)
        for text in self.warnings:
            log.warning("decision: %s", text)

    def to_list(self) -> list[str]:
        return [*self.warnings, *self.notes]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def choose_threads(decisions: Decisions) -> int:
    """torch CPU threads per process: the user's OMP_NUM_THREADS, else free cores / local processes.

    Oversubscribed CPUs are the trap: 2 threads per process on a busy 2-core machine ran 8-9x slower
    than 1. Free cores = cores minus the 1-minute load average of other work, at least 1.
    """
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        decisions.note(f"{n} torch thread(s) per process (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
        return n
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = max(1.0, cores - busy)
    n = max(1, int(free // local))
    torch.set_num_threads(n)
    decisions.note(f"{n} torch thread(s) per process: {cores} cores, load {busy:.1f}, {local} process(es) on this "
                   "machine (set OMP_NUM_THREADS to choose; fixed threads are needed for bit-exact resume)")
    return n


def resolve_run_dir(cfg: Config, output_dir: str | None, stem: str) -> Path:
    """Same directory on every rank: the main process picks the timestamped name and broadcasts it."""
    if output_dir:
        return Path(output_dir)
    name = [cfg.logging.run_name or f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}"]
    broadcast_object_list(name)
    return Path(cfg.logging.output_dir) / name[0]


def make_accelerator(cfg: Config, run_dir: Path, log_with: list[str], decisions: Decisions) -> Accelerator:
    """The Accelerator; says which device and precision are really used and why."""
    asked = cfg.training.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != asked:
        decisions.warn(f"the accelerate config asks mixed_precision={launcher}, diffold's training.mixed_precision="
                       f"{asked} wins (set training.mixed_precision in the diffold config to change it)")
    acc = Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=asked,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # we step it once per real optimizer step (accelerate #2773)
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s)),
            DistributedDataParallelKwargs(find_unused_parameters=cfg.distributed.find_unused_parameters),
        ],
    )
    if acc.device.type == "cpu" and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("false", "0"):
        decisions.warn("the accelerate config does not ask for the CPU (use_cpu: false) but no GPU is available: "
                       "training on the CPU")
    if acc.device.type == "cpu" and torch.set_flush_denormal(True):
        decisions.note("CPU: denormal floats are flushed to zero (torch.set_flush_denormal; subnormal values from "
                       "Gaussian tails made CPU steps ~1.5x slower)")
    if asked == "fp16" and not acc.native_amp:
        decisions.warn(f"training.mixed_precision=fp16 is not available on {acc.device.type}: training in fp32 "
                       "(use bf16, or no)")
    return acc


def precision_used(acc: Accelerator) -> str:
    """The arithmetic actually used: bf16 / fp16 autocast, or fp32."""
    return acc.mixed_precision if acc.mixed_precision != "no" and acc.native_amp else "fp32"


@dataclass
class Start:
    """What start-up established before any data is read."""

    acc: Accelerator
    run_dir: Path
    ckpts: Any
    resume_from: list[Path]   # checkpoints to try, in order (empty: fresh start)
    runlog: Any
    decisions: Decisions
