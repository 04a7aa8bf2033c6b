#!/usr/bin/env python
"""Checkpoint save cost and its checksum part: old (re-read every file, one after another) vs new
(EMA and train state hashed from memory while written; Accelerate's files re-read in parallel threads).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_cost.py [--size base] [--reps 3] [--dir /tmp/ckpt_cost]

Prints medians over reps (absolute seconds on this machine, and the old/new ratio of the checksum part,
both measured on the same freshly written checkpoint in each rep).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelerate import Accelerator  # noqa: E402

from diffold.checkpoint import EMA_FILE, STATE, CheckpointManager  # noqa: E402
from diffold.config import load_config  # noqa: E402
from diffold.ema import EMA  # noqa: E402
from diffold.hashing import file_sha256, tree_sha256  # noqa: E402
from diffold.model import build_model, count_parameters  # noqa: E402
from diffold.state import TrainState  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default="/tmp/ckpt_cost")
    args = p.parse_args()
    cfg = load_config(None, overrides=[f"model.size={args.size}"], env={})
    acc = Accelerator(cpu=True)
    model = build_model(cfg, num_atoms=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for q in model.parameters():  # allocate Adam state like a real run
        q.grad = torch.zeros_like(q)
    opt.step()
    model, opt = acc.prepare(model, opt)
    ema = EMA(acc.unwrap_model(model), 0.999)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    mgr = CheckpointManager(root, acc, keep_last_n=1)
    save, old, new = [], [], []
    for i in range(args.reps):
        t0 = time.perf_counter()
        path = mgr.save(f"step_{i:09d}", TrainState(global_step=i), ema, {"step": i, "epoch": 0})
        save.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        {str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
        old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tree_sha256(path, {EMA_FILE: "known", STATE: "known"})
        new.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    m = statistics.median
    print(f"{args.size}: {count_parameters(acc.unwrap_model(model)):,} params, checkpoint {size:.2f} GB, {args.reps} reps")
    print(f"  save (new, checksums included): {m(save):.2f} s")
    print(f"  checksum part: old {m(old):.2f} s (re-read all, sequential) vs new {m(new):.2f} s "
          f"(EMA/state from memory, the rest in threads): old/new {m(old) / max(m(new), 1e-9):.2f}x")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
