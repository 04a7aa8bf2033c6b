"""Denoiser cost on CPU: parameters and forward+backward (EDM loss) time per residue by size and length.

    python benchmarks/model.py [--sizes tiny small base] [--lengths 64 128 256] [--batch 2] [--threads 1]

Times are medians of `--repeats` steps after one warm-up step, on whatever CPU this is (shared
2-core VMs drift 5-10%: compare sizes/lengths, not machines). A configuration whose estimated
step time exceeds --budget seconds is skipped and reported as such.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diffold, not an installed one

from diffold.batch import Batch
from diffold.config import load_config
from diffold.diffusion import build_diffusion
from diffold.model import build_model, count_parameters
from diffold.tasks import get_task


def make_batch(batch: int, length: int, vocab: int) -> Batch:
    """A random compact chain per row (6 A steps), no padding."""
    steps = torch.randn(batch, length, 3)
    coords = (6.0 * steps / steps.norm(dim=-1, keepdim=True)).cumsum(1)[:, :, None]  # [B, L, 1, 3]
    return Batch(
        ids=[f"b{i}" for i in range(batch)], tokens=torch.randint(1, vocab, (batch, length)), coords=coords,
        atom_mask=torch.ones(batch, length, 1, dtype=torch.bool), residue_mask=torch.ones(batch, length, dtype=torch.bool),
        residue_index=torch.arange(length).repeat(batch, 1), weights=torch.ones(batch),
    )


def step_time(diffusion, model, batch: Batch, repeats: int) -> float:
    """Median seconds of loss forward + backward."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        diffusion.loss(model, batch).total.mean().backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step warms allocator and kernels
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=30.0, help="skip a configuration estimated slower (s/step)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core VM, 2 threads can be 10x slower")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = get_task("rna")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, EDM loss fwd+bwd")
    print(f"{'size':<6} {'params':>12} {'L':>5} {'s/step':>9} {'ms/residue':>11}")
    for size in args.sizes:
        cfg = load_config(None, overrides=[f"model.size={size}"], env={})
        model, diffusion = build_model(cfg, 1).train(), build_diffusion(cfg, task)
        params = count_parameters(model)
        last: tuple[int, float] | None = None
        for length in sorted(args.lengths):
            if last is not None:
                estimate = last[1] * length / last[0]  # lower bound: cost grows at least linearly in L
                if estimate > args.budget:
                    print(f"{size:<6} {params:>12,} {length:>5}   skipped: estimated {estimate:.0f} s/step > --budget {args.budget:.0f} s")
                    continue
            seconds = step_time(diffusion, model, make_batch(args.batch, length, task.vocab_size), args.repeats)
            last = (length, seconds)
            print(f"{size:<6} {params:>12,} {length:>5} {seconds:>9.3f} {1000 * seconds / (args.batch * length):>11.3f}", flush=True)


if __name__ == "__main__":
    main()
