"""Real-residue fraction of padded batches (real residues / (B x L_max), summed over an epoch):
length-bucketed BucketBatchSampler vs random batching, on data/examples, both tasks.

    python benchmarks/padding.py [--max_length 128] [--epochs 5] [--cache_dir DIR]
"""
from __future__ import annotations

import argparse
import logging
import tempfile

import numpy as np

from diffold.config import load_config
from diffold.data import build_datasets
from diffold.sampler import BucketBatchSampler


def fill(lengths: np.ndarray, batches: list[list[int]]) -> float:
    """Real residues / padded slots over all batches."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / padded


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max_length", type=int, default=None, help="default: DataConfig.max_length")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cache_dir", default=None, help="default: a temporary directory")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="diffold_padding_")
    print(f"{'task':8} {'max_len':>7} {'chains':>6} {'setting':28} {'bucketed':>9} {'random':>7}")
    for task in ("rna", "protein"):
        over = [f"task={task}", f"data.cache_dir={cache}"]
        if args.max_length:
            over.append(f"data.max_length={args.max_length}")
        cfg = load_config(None, overrides=over, env={})
        train, _, _ = build_datasets(cfg)
        lengths = np.asarray(train.lengths)
        for bs, world, accum in ((4, 1, 1), (8, 1, 1), (4, 2, 2)):
            bucketed, rand = [], []
            for epoch in range(args.epochs):
                samplers = [BucketBatchSampler(lengths, bs, seed=cfg.training.seed, num_replicas=world, rank=r,
                                               bucket_size=cfg.data.bucket_size, batches_multiple_of=accum)
                            for r in range(world)]
                for s in samplers:
                    s.set_epoch(epoch)
                bucketed.append(fill(lengths, [b for s in samplers for b in s]))
                rand.append(fill(lengths, random_batches(len(lengths), bs, seed=epoch)))
            setting = f"batch {bs}, {world} rank(s), accum {accum}"
            print(f"{task:8} {cfg.data.max_length:7d} {len(lengths):6d} {setting:28} "
                  f"{np.mean(bucketed):9.3f} {np.mean(rand):7.3f}")


if __name__ == "__main__":
    main()
