"""Time each structure metric on one L-residue pair and compare with the 0.5 s budget.

    python benchmarks/metrics_speed.py [--length 500] [--repeats 7]

The pair is a synthetic chain and a copy with 2 A noise and a 50-degree hinge (the case where the
TM/GDT superposition search has the most work). Metrics run interleaved in one process; each
figure is the median over repeats, after one warm-up round. Shared 2-core machines drift 5-10%,
so read the ratio to the budget, not the third digit.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from diffold import metrics as M

BUDGET_S = 0.5  # all four metrics for a 500-residue pair (project requirement)


def make_pair(length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Persistent random walk with 3.8 A steps, and a noisy copy whose second half is hinged."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(length, 3))
    for i in range(1, length):                                   # persistence -> compact, chain-like
        steps[i] = 0.6 * steps[i - 1] / np.linalg.norm(steps[i - 1]) + 0.8 * steps[i] / np.sqrt(3)
    ref = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)  # [L, 3]
    pred = ref + rng.normal(scale=2.0, size=ref.shape)
    angle, h = np.deg2rad(50.0), length // 2
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    pred[h:] = (pred[h:] - pred[h]) @ rot.T + pred[h]
    return pred, ref


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    pred, ref = make_pair(args.length)
    calls = {
        "rmsd": lambda: M.rmsd(pred, ref),
        "tm_score": lambda: M.tm_score(pred, ref),
        "gdt_ts": lambda: M.gdt_ts(pred, ref),
        "gdt_ha": lambda: M.gdt_ha(pred, ref),
        "lddt": lambda: M.lddt(pred, ref),
        "all_metrics": lambda: M.all_metrics(pred, ref),
        "all_metrics rna": lambda: M.all_metrics(pred, ref, molecule="rna"),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    values = {name: fn() for name, fn in calls.items()}          # warm-up round
    for _ in range(args.repeats):                                # interleaved: drift hits all alike
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"L = {args.length}, median of {args.repeats} interleaved repeats (synthetic chain, 2 A noise + hinge)")
    for name in ("rmsd", "tm_score", "gdt_ts", "gdt_ha", "lddt"):
        print(f"  {name:<16} {1e3 * med[name]:8.1f} ms   value {values[name]:.4f}")
    separate = sum(med[n] for n in ("rmsd", "tm_score", "gdt_ts", "gdt_ha", "lddt"))
    print(f"  {'sum of 5 calls':<16} {1e3 * separate:8.1f} ms   = {separate / BUDGET_S:.2f} x the {BUDGET_S} s budget")
    for name in ("all_metrics", "all_metrics rna"):
        print(f"  {name:<16} {1e3 * med[name]:8.1f} ms   = {med[name] / BUDGET_S:.2f} x budget (one shared TM+GDT search)")


if __name__ == "__main__":
    main()
