"""Denoiser cost on CPU: parameters and forward+backward (EDM loss) time per residue by size and length.

    python benchmarks/model.py [--sizes tiny small base] [--lengths 64 128 256] [--batch 2] [--threads 1]
    python benchmarks/model.py --memory [--sizes small] [--lengths 256 512 768] [--batch 1]

--memory: peak memory of ONE training step (EDM loss forward + backward) with and without the
`memory` preset's model settings (activation checkpointing + pair features built 64 rows at a time),
each in a fresh subprocess: on CPU the peak resident set size during the step minus the resident
size just before it; on a GPU torch.cuda.max_memory_allocated minus the allocation before the step.

Times are medians of `--repeats` steps after one warm-up step, on whatever CPU this is (shared
2-core VMs drift 5-10%: compare sizes/lengths, not machines). A configuration whose estimated
step time exceeds --budget seconds is skipped and reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


MEMORY_PRESET = ["model.activation_checkpointing=true", "model.pair_chunk_size=64"]  # the model part of --preset memory


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MB. Not ru_maxrss: after a fork
    + exec it still holds the parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS


def one_step_peak(size: str, length: int, batch: int, preset: bool, device: str) -> dict:
    """Peak memory (MB) of one loss forward + backward, above what was allocated before it."""
    cfg = load_config(None, overrides=[f"model.size={size}", *(MEMORY_PRESET if preset else [])], env={})
    task = get_task("rna")
    torch.manual_seed(0)
    model, diffusion = build_model(cfg, 1).train().to(device), build_diffusion(cfg, task)
    b = make_batch(batch, length, task.vocab_size).to(device)
    diffusion.loss(model, make_batch(1, 16, task.vocab_size).to(device)).total.mean().backward()  # warm-up: kernels, pools
    model.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the step's peak
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = status_mb("VmRSS")
    t0 = time.perf_counter()
    diffusion.loss(model, b).total.mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        peak = status_mb("VmHWM") - before
    return {"peak_mb": peak, "seconds": time.perf_counter() - t0}


def memory_table(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {device}, batch {args.batch}: peak MB of one training step (loss fwd+bwd) "
          f"above the memory before it; 'memory' = {' '.join(MEMORY_PRESET)}")
    print(f"{'size':<6} {'L':>5} {'default MB':>11} {'memory MB':>10} {'ratio':>6} {'time ratio':>11}")
    for size in args.sizes:
        for length in sorted(args.lengths):
            res = {}
            for preset in (False, True):
                r = subprocess.run([sys.executable, __file__, "--one", size, str(length), str(args.batch), str(int(preset))],
                                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                if r.returncode != 0:
                    res = None
                    print(f"{size:<6} {length:>5}   failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                    break
                res[preset] = json.loads(r.stdout.strip().splitlines()[-1])
            if res:
                d, m = res[False], res[True]
                print(f"{size:<6} {length:>5} {d['peak_mb']:>11.0f} {m['peak_mb']:>10.0f} {m['peak_mb'] / d['peak_mb']:>6.2f} "
                      f"{m['seconds'] / d['seconds']:>11.2f}", flush=True)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--one":  # a subprocess of --memory
        size, length, batch, preset = sys.argv[2], *map(int, sys.argv[3:])
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(one_step_peak(size, length, batch, bool(preset), "cuda" if torch.cuda.is_available() else "cpu")))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=30.0, help="skip a configuration estimated slower (s/step)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core VM, 2 threads can be 10x slower")
    parser.add_argument("--memory", action="store_true", help="peak memory of one step, with and without the memory preset")
    args = parser.parse_args()
    if args.memory:
        return memory_table(args)
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
