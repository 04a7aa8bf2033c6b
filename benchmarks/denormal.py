#!/usr/bin/env python
"""CPU step time: the RBF fixed at the source vs before, and denormals flushed vs not; paired blocks in ONE process.

    OMP_NUM_THREADS=1 python benchmarks/denormal.py [--size tiny] [--length 48] [--batch 4] [--blocks 12] [--steps 5]

Each block runs the same `--steps` EDM loss forward+backward passes (fixed batch, fixed noise seed, no
optimizer step, so every block computes the same thing) in one of three arms, in rotating order:
"before" (the former RBF, exp evaluated deep in its tails, no flush), "fixed" (diffold.model.rbf, no
flush) and "fixed+flush" (what train_full runs on CPU). Prints the median ratios fixed/before and
fixed+flush/fixed with bootstrap 95% intervals, the share of subnormal values in the RBF features of
both RBFs, and the loss of every arm (must agree to float noise).
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
from diffold.model import NUM_RBF, RBF_MAX, build_model  # noqa: E402
from diffold.model import rbf as FIXED  # noqa: E402
from diffold.tasks import get_task  # noqa: E402


def rbf_before(d: torch.Tensor, num: int = NUM_RBF, d_max: float = RBF_MAX) -> torch.Tensor:
    """The RBF as it was before the fix (benchmark baseline)."""
    centres = torch.linspace(0.0, d_max, num, device=d.device, dtype=d.dtype)
    width = d_max / (num - 1)
    return torch.exp(-(((d[..., None] - centres) / width) ** 2))


ARMS = {"before": (rbf_before, False), "fixed": (None, False), "fixed+flush": (None, True)}


def block(diffusion, model, batch, steps: int, arm: str) -> tuple[float, float]:
    import diffold.model as m

    fn, flush = ARMS[arm]
    m.rbf = fn or FIXED
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


def subnormal_share(model, batch, diffusion, original) -> float:
    """Share of subnormal float32 values among all RBF outputs of one forward pass."""
    import diffold.model as m

    seen = []

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
        m.rbf = FIXED
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
    share = {name: subnormal_share(model, batch, diffusion, fn) for name, fn in (("before", rbf_before), ("fixed", FIXED))}
    for arm in ARMS:  # warm-up
        block(diffusion, model, batch, 1, arm)
    times, losses = {arm: [] for arm in ARMS}, {arm: 0.0 for arm in ARMS}
    names = list(ARMS)
    for i in range(a.blocks):
        for arm in names[i % 3:] + names[:i % 3]:  # rotate the order
            t, losses[arm] = block(diffusion, model, batch, a.steps, arm)
            times[arm].append(t)
    torch.set_flush_denormal(False)
    rng = np.random.default_rng(0)

    def ratio(num: str, den: str) -> str:
        r = [x / y for x, y in zip(times[num], times[den])]
        meds = [np.median(rng.choice(r, len(r))) for _ in range(2000)]
        return f"{statistics.median(r):.3f} (95% CI {np.percentile(meds, 2.5):.3f}-{np.percentile(meds, 97.5):.3f})"

    print(f"{a.size} L={a.length} batch {a.batch}, {a.blocks} rotating blocks of {a.steps} steps: subnormal share of RBF "
          f"outputs before {share['before']:.2%}, fixed {share['fixed']:.2%}; step time fixed / before {ratio('fixed', 'before')}; "
          f"fixed+flush / fixed {ratio('fixed+flush', 'fixed')}; loss " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
