#!/usr/bin/env python
"""In-process GPU probes for benchmarks/gpu_check.sh (each prints one JSON line).

    python benchmarks/gpu_probe.py crop --config C [--start 256] [--cap 16384] [--step 128] [key=value ...]
        longest crop that trains at batch 1 (forward, backward, AdamW step; bf16 autocast if the config
        says bf16 and a GPU is there), without and with activation checkpointing: doubling from --start
        until out of memory, then bisection to --step residues. A synthetic helix of that length stands in
        for a chain (memory depends on the shapes only).
    python benchmarks/gpu_probe.py compile --config C [--length 256] [--batch 8] [--steps 20] [--blocks 5]
                                           [--backend inductor] [key=value ...]
        torch.compile (as model.compile=true does) vs eager on one fixed-shape batch: compile time, then
        interleaved blocks of --steps training steps (eager, compiled, eager, ...) on the same model;
        the median paired ratio and its range (docs: benchmarking.md).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def synthetic_batch(task, num_atoms: int, length: int, batch: int, device):
    """A batch of `batch` helices of `length` residues, every atom observed."""
    import torch

    from diffold.batch import Batch

    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, length / 3.5, length)
    helix = torch.stack([9 * torch.cos(t), 9 * torch.sin(t), 2.8 * t], -1)  # [L, 3]
    coords = (helix[None, :, None, :] + torch.randn(batch, length, num_atoms, 3, generator=g)).float()
    coords = coords - coords.mean((1, 2), keepdim=True)
    return Batch(ids=[f"helix{i}" for i in range(batch)],
                 tokens=torch.randint(1, task.vocab_size, (batch, length), generator=g),
                 coords=coords, atom_mask=torch.ones(batch, length, num_atoms, dtype=torch.bool),
                 residue_mask=torch.ones(batch, length, dtype=torch.bool),
                 residue_index=torch.arange(length).expand(batch, length).clone(),
                 weights=torch.ones(batch)).to(device)


class Trainer:
    """Model + AdamW + diffusion loss of the config: one training step at a time."""

    def __init__(self, cfg, device):
        import torch

        from diffold.diffusion import build_diffusion
        from diffold.model import build_model
        from diffold.tasks import get_task

        self.task = get_task(cfg.task)
        self.num_atoms = len(self.task.resolve_atoms(cfg.data.atoms))
        torch.manual_seed(cfg.training.seed)
        self.model = build_model(cfg, num_atoms=self.num_atoms).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.training.optimizer.lr)
        self.diffusion, self.device = build_diffusion(cfg, self.task), device
        self.bf16 = cfg.training.mixed_precision == "bf16" and device.type == "cuda"

    def step(self, batch, model=None) -> None:
        import torch

        from diffold.diffusion import weighted_mean

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = weighted_mean(self.diffusion.loss(self.model if model is None else model, batch).total, batch.weights)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trains(cfg, length: int, device) -> tuple[bool, float | None]:
    """(one training step at batch 1 and this length fits, peak memory in GB)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = None
    try:
        trainer = Trainer(cfg, device)
        trainer.step(synthetic_batch(trainer.task, trainer.num_atoms, length, 1, device))
        _sync(device)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    finally:
        del trainer
        gc.collect()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok, peak


def longest_crop(cfg, device, start: int, cap: int, step: int) -> dict:
    fits, peak, fails, probes = None, None, None, []
    length = start
    while length <= cap:  # doubling
        ok, mem = trains(cfg, length, device)
        probes.append([length, ok])
        if not ok:
            fails = length
            break
        fits, peak, length = length, mem, length * 2
    if fits is not None and fails is not None:  # bisection
        while fails - fits > step:
            mid = (fits + fails) // 2 // step * step or fits + step
            ok, mem = trains(cfg, mid, device)
            probes.append([mid, ok])
            fits, peak, fails = (mid, mem, fails) if ok else (fits, peak, mid)
    return {"longest": fits, "capped": fails is None, "peak_gb": peak, "probes": probes}


def compile_ratio(cfg, device, length: int, batch: int, steps: int, blocks: int, backend: str) -> dict:
    import torch

    trainer = Trainer(cfg, device)
    data = synthetic_batch(trainer.task, trainer.num_atoms, length, batch, device)
    compiled = torch.compile(trainer.model, backend=backend)
    t0 = time.perf_counter()
    trainer.step(data, compiled)  # compilation happens here
    trainer.step(data, compiled)
    _sync(device)
    compile_s = time.perf_counter() - t0
    trainer.step(data)  # eager warm-up

    def block(model) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            trainer.step(data, model)
        _sync(device)
        return (time.perf_counter() - t) / steps

    eager, comp = [], []
    for _ in range(blocks):
        eager.append(block(None))
        comp.append(block(compiled))
    ratios = [c / e for e, c in zip(eager, comp)]
    return {"compile_s": compile_s, "eager_step_ms": 1e3 * statistics.median(eager),
            "compiled_step_ms": 1e3 * statistics.median(comp), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "backend": backend, "shape": [batch, length]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["crop", "compile"])
    p.add_argument("--config", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--start", type=int, default=256)
    p.add_argument("--cap", type=int, default=16384)
    p.add_argument("--step", type=int, default=128)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--backend", default="inductor")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    import torch

    from diffold.config import load_config

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.probe == "crop":
        out = {}
        for ckpt in (False, True):
            cfg = load_config(a.config, overrides=[*a.overrides, f"model.activation_checkpointing={str(ckpt).lower()}"])
            out["checkpointing" if ckpt else "plain"] = longest_crop(cfg, device, a.start, a.cap, a.step)
        out["precision"] = "bf16" if cfg.training.mixed_precision == "bf16" and device.type == "cuda" else "fp32"
    else:
        cfg = load_config(a.config, overrides=a.overrides)
        out = compile_ratio(cfg, device, a.length, a.batch, a.steps, a.blocks, a.backend)
    out["device"] = str(device)
    print(json.dumps(out, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
