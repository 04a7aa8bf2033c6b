#!/usr/bin/env python
"""Model FLOPs of one training step (forward + backward) from the model's shapes, and a matmul peak.

    python benchmarks/flops.py --config C [--batches 8] [--device cuda|cpu] [key=value ...]

Prints one JSON line: flops_per_step (mean over the first --batches training batches of epoch 0, at
the padded shapes the device computes), flops_min/max, matmul_tflops (bf16 on GPU, fp32 on CPU,
measured here: a square matmul loop) and the method.

Method: torch.utils.flop_counter.FlopCounterMode records the FLOPs of every matrix multiply and
attention kernel (mm, bmm, addmm, convolution, scaled_dot_product_attention; 2 FLOPs per
multiply-add) while the diffusion loss of a real batch runs forward and backward, exactly as the
training step computes it (same model, same crop, same atoms). Elementwise ops, norms, the optimizer
and activation-checkpoint recomputation are not counted (the usual model-FLOPs convention), so
MFU = flops_per_step x steps/s / peak FLOP/s is a lower bound of the hardware utilisation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def step_flops(cfg, device, num_batches: int) -> list[int]:
    """FLOPs of forward + backward of the training loss on each of the first `num_batches` batches."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffold.data import build_datasets, build_loader
    from diffold.diffusion import build_diffusion, weighted_mean
    from diffold.model import build_model
    from diffold.tasks import get_task

    task = get_task(cfg.task)
    train_ds, _, _ = build_datasets(cfg)
    loader = build_loader(train_ds, cfg, train=True)
    train_ds.set_epoch(0)
    loader.batch_sampler.set_epoch(0)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, num_atoms=len(task.resolve_atoms(cfg.data.atoms))).to(device).train()
    diffusion = build_diffusion(cfg, task)
    bf16 = cfg.training.mixed_precision == "bf16" and device.type == "cuda"
    out = []
    for batch in islice(loader, num_batches):
        batch = batch.to(device)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = weighted_mean(diffusion.loss(model, batch).total, batch.weights)
            loss.backward()
        model.zero_grad(set_to_none=True)
        out.append(int(counter.get_total_flops()))
    return out


def matmul_tflops(device, seconds: float = 2.0) -> float:
    """Measured dense matmul throughput (bf16 on GPU, fp32 on CPU) in TFLOP/s."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        iters += 10
        sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    import torch

    from diffold.config import load_config

    # model FLOPs: no activation-checkpoint recomputation
    cfg = load_config(a.config, overrides=[*a.overrides, "model.activation_checkpointing=false"])
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flops = step_flops(cfg, device, a.batches)
    print(json.dumps({"flops_per_step": sum(flops) / len(flops), "flops_min": min(flops), "flops_max": max(flops),
                      "batches": len(flops), "matmul_tflops": matmul_tflops(device), "device": str(device),
                      "method": "torch.utils.flop_counter (matmul + attention, fwd+bwd, real batches)"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
