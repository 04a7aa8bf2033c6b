"""BucketBatchSampler: exact coverage across ranks, equal counts, determinism, resume, padding."""
from __future__ import annotations

import numpy as np
import pytest

from diffold.sampler import BucketBatchSampler


def lengths_of(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(10, 300, size=n).tolist()


def ranks(lengths, world: int, **kw) -> list[BucketBatchSampler]:
    return [BucketBatchSampler(lengths, num_replicas=world, rank=r, **kw) for r in range(world)]


def epoch(samplers, e: int) -> list[list[list[int]]]:
    for s in samplers:
        s.set_epoch(e)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("n,bs,world,mult", [(101, 4, 2, 1), (101, 4, 2, 4), (37, 3, 2, 3), (64, 8, 1, 1),
                                             (10, 1, 4, 1), (9, 4, 3, 3), (250, 7, 4, 2)])
def test_every_index_once_and_equal_counts(n, bs, world, mult):
    lengths = lengths_of(n)
    samplers = ranks(lengths, world, batch_size=bs, batches_multiple_of=mult, seed=3)
    for e in range(3):
        per_rank = epoch(samplers, e)
        flat = [i for batches in per_rank for b in batches for i in b]
        assert sorted(flat) == list(range(n))  # each index exactly once across ranks
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1 and counts.pop() % mult == 0
        assert all(len(s) == len(per_rank[0]) for s in samplers)
        assert all(len(b) >= 1 for batches in per_rank for b in batches)


def test_batch_size_respected_unless_merging_is_forced():
    lengths = lengths_of(103)
    for s in ranks(lengths, 2, batch_size=8, batches_multiple_of=2):
        assert max(len(b) for b in s) <= 8
    # 10 single-item batches cannot become 12 (no index may repeat): two merges down to 8
    merged = ranks(lengths_of(10), 4, batch_size=1)
    sizes = sorted(len(b) for s in merged for b in s)
    assert sizes == [1] * 6 + [2, 2]


def test_too_few_items_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give each of 4 processes a multiple of 2"):
        BucketBatchSampler([5, 6, 7], 2, num_replicas=4, rank=0, batches_multiple_of=2)


def test_same_seed_epoch_identical_and_epochs_differ():
    lengths = lengths_of(200)
    a, b = ranks(lengths, 2, batch_size=4, seed=7), ranks(lengths, 2, batch_size=4, seed=7)
    assert epoch(a, 1) == epoch(b, 1)
    assert epoch(a, 1) != epoch(a, 2)
    assert epoch(a, 1) != epoch(ranks(lengths, 2, batch_size=4, seed=8), 1)
    assert epoch(a, 1) == epoch(a, 1)  # re-iterating an epoch replays it


def test_skip_resumes_exactly():
    lengths = lengths_of(150)
    for s in ranks(lengths, 2, batch_size=4, seed=1, batches_multiple_of=2):
        s.set_epoch(5)
        full = list(s)
        s.set_epoch(5)
        s.skip(7)
        assert list(s) == full[7:]
        assert list(s) == full  # the skip applies to one iteration only
        assert len(s) == len(full)
        fresh = BucketBatchSampler(lengths, 4, seed=1, num_replicas=2, rank=s.rank, batches_multiple_of=2)
        fresh.set_epoch(5)
        fresh.skip(len(full))
        assert list(fresh) == []
    with pytest.raises(ValueError, match="cannot skip"):
        s.skip(len(full) + 1)


def test_bucketing_reduces_padding():
    lengths = np.random.default_rng(0).integers(20, 400, size=2000)
    s = BucketBatchSampler(lengths, 8, seed=0)

    def fill(batches):
        return sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    rng = np.random.default_rng(1)
    random = np.array_split(rng.permutation(len(lengths)), len(lengths) // 8)
    assert fill(list(s)) > 0.97 > fill(random) + 0.2


def test_token_budget():
    lengths = lengths_of(300)
    s = BucketBatchSampler(lengths, 1, max_tokens=1000, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(max(lengths[i] for i in b) * len(b) <= 1000 for b in batches)
    assert max(len(b) for b in batches) > 5  # batch_size is ignored in token mode
    over = BucketBatchSampler([50, 2000, 60], 1, max_tokens=1000)
    assert sorted(map(sorted, over)) == [[0, 2], [1]]  # an oversize chain gets its own batch, not dropped


def test_validation_order_is_deterministic_and_length_sorted():
    lengths = lengths_of(50)
    s = BucketBatchSampler(lengths, 4, shuffle=False, seed=0)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(3)
    assert list(s) == first  # no shuffling: epoch does not matter
    maxes = [max(lengths[i] for i in b) for b in first]
    assert maxes == sorted(maxes)


def test_ranks_step_together_on_similar_lengths():
    lengths = lengths_of(400)
    a, b = ranks(lengths, 2, batch_size=4, seed=0)
    pairs = zip(list(a), list(b), strict=True)
    gaps = [abs(max(lengths[i] for i in x) - max(lengths[i] for i in y)) for x, y in pairs]
    assert np.median(gaps) < 10  # step s of both ranks has similar padded length: little DDP waiting
