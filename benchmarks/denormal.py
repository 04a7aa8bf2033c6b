#!/usr/bin/env python
"""CPU step time with denormal floats flushed to zero vs not: paired blocks in ONE process.

    OMP_NUM_THREADS=1 python benchmarks/denormal.py [--size tiny] [--length 48] [--batch 4] [--blocks 12] [--steps 5]

Each block runs the same `--steps` EDM loss forward+backward passes (fixed batch, fixed noise seed, no
optimizer step, so every block computes the same thing); blocks alternate flush on/off. Prints the median
ratio on/off with a bootstrap 95% interval, the share of subnormal values in the model's RBF features,
and the loss of both variants (the flush must not change it beyond float noise).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model import make_batch  # noqa: E402
from diffold.config import load_config  # noqa: E402
from diffold.diffusion import build_diffusion  # noqa: E402
from diffold.model import build_model  # noqa: E402
from diffold.tasks import get_task  # noqa: E402


def block(diffusion, model, batch, steps: int, flush: bool) -> tuple[float, float]:
    torch.set_flush_denormal(flush)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loss = 0.0
    for _ in range(steps):
        out = diffusion.loss(model, batch).total.mean()
        out.backward()
        loss += float(out.detach())
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss / steps


def subnormal_share(model, batch, diffusion) -> float:
    """Share of subnormal float32 values among all RBF outputs of one forward pass."""
    import diffold.model as m

    seen = []
    original = m.rbf

    def spy(*a, **k):
        out = original(*a, **k)
        seen.append(out.detach())
        return out

    m.rbf = spy
    try:
        torch.set_flush_denormal(False)
        torch.manual_seed(0)
        with torch.no_grad():
            diffusion.loss(model, batch)
    finally:
        m.rbf = original
    tiny = torch.finfo(torch.float32).tiny
    total = sum(x.numel() for x in seen)
    return sum(int(((x != 0) & (x.abs() < tiny)).sum()) for x in seen) / max(total, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--length", type=int, default=48)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    cfg = load_config(None, overrides=[f"model.size={a.size}"], env={})
    task = get_task("rna")
    torch.manual_seed(0)
    model, diffusion = build_model(cfg, num_atoms=1), build_diffusion(cfg, task)
    batch = make_batch(a.batch, a.length, task.vocab_size)
    share = subnormal_share(model, batch, diffusion)
    block(diffusion, model, batch, 1, True), block(diffusion, model, batch, 1, False)  # warm-up
    ratios, losses = [], {True: [], False: []}
    for i in range(a.blocks):
        order = (True, False) if i % 2 == 0 else (False, True)
        t = {}
        for flush in order:
            t[flush], loss = block(diffusion, model, batch, a.steps, flush)
            losses[flush].append(loss)
        ratios.append(t[True] / t[False])
    torch.set_flush_denormal(False)
    rng = np.random.default_rng(0)
    meds = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    print(f"{a.size} L={a.length} batch {a.batch}: subnormal share of RBF outputs {share:.2%}; step time flush on / off: "
          f"median {statistics.median(ratios):.3f} (95% CI {np.percentile(meds, 2.5):.3f}-{np.percentile(meds, 97.5):.3f}) "
          f"over {a.blocks} paired blocks of {a.steps} steps; loss on {losses[True][-1]:.6f} / off {losses[False][-1]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
