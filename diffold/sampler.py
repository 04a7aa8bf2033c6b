"""Length-bucketed, seedable, DDP-aware batch sampler that owns its own sharding and resume position.

Contract (accelerate-notes.md, Checkpoint/resume): batches are a pure function of
(lengths, seed, epoch, settings); `set_epoch` at the top of every epoch and `skip(k)` for the
resumed epoch reproduce an interrupted epoch exactly. Every index appears exactly once per epoch
across all ranks, and every rank gets the same number of batches, a multiple of
`batches_multiple_of` (the accumulation steps), so no partial accumulation group exists.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar lengths drawn from random buckets; rank `rank` of `num_replicas` gets its share."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        bucket_size: int = 64,
        batches_multiple_of: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if bucket_size < 1 or batches_multiple_of < 1:
            raise ValueError("bucket_size and batches_multiple_of must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucket_size = bucket_size
        self.batches_multiple_of = batches_multiple_of
        self.epoch = 0
        self.start_batch = 0  # first batch of the next iteration (resume); reset once consumed
        group = num_replicas * batches_multiple_of
        if len(self.lengths) < group:
            raise ValueError(
                f"{len(self.lengths)} chains cannot give each of {num_replicas} processes a multiple of "
                f"{batches_multiple_of} batches; add data, or lower gradient_accumulation_steps / processes"
            )
        self._cache: tuple[int, list[list[int]]] | None = None

    # ------------------------------------------------------------------ public
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def skip(self, k: int) -> None:
        """Resume: the next iteration starts at batch k of the current epoch (this rank's count)."""
        if not 0 <= k <= len(self):
            raise ValueError(f"cannot skip {k} batches: this rank has {len(self)} per epoch")
        self.start_batch = int(k)

    def __len__(self) -> int:
        return len(self.rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0  # the skip applies to one iteration only
        yield from self.rank_batches()[start:]

    def rank_batches(self, rank: int | None = None) -> list[list[int]]:
        """This epoch's batches for `rank` (default: own rank), in iteration order."""
        batches = self.epoch_batches()
        r = self.rank if rank is None else rank
        return batches[r :: self.num_replicas]

    def epoch_batches(self) -> list[list[int]]:
        """All ranks' batches of the current epoch, interleaved: step s of rank r is [s * R + r]."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._build(self.epoch))
        return self._cache[1]

    # ------------------------------------------------------------------ construction
    def _build(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        # Shuffle, then sort within mega-buckets: similar lengths share a batch (little padding),
        # yet batch composition still changes every epoch.
        order = rng.permutation(n) if rng is not None else np.arange(n)
        chunk = n if rng is None else self.bucket_size * self.batch_size
        batches: list[list[int]] = []
        for lo in range(0, n, chunk):
            part = order[lo : lo + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(self._cut(part))
        batches = self._equalize(batches)
        return self._interleave(batches, rng)

    def _cut(self, idx: np.ndarray) -> list[list[int]]:
        """Cut length-sorted indices into batches by count, or by padded tokens (max length x count)."""
        if self.max_tokens is None:
            return [idx[i : i + self.batch_size].tolist() for i in range(0, len(idx), self.batch_size)]
        out: list[list[int]] = []
        cur: list[int] = []
        for i in idx.tolist():
            longest = max(int(self.lengths[i]), int(self.lengths[cur[-1]]) if cur else 0)
            if cur and longest * (len(cur) + 1) > self.max_tokens:
                out.append(cur)
                cur = []
            cur.append(i)  # an item over budget on its own still gets a batch: never dropped
        if cur:
            out.append(cur)
        return out

    def _equalize(self, batches: list[list[int]]) -> list[list[int]]:
        """Make the batch count a multiple of replicas x multiple, splitting batches (never dropping)."""
        group = self.num_replicas * self.batches_multiple_of
        n_items = len(self.lengths)
        target = -(-len(batches) // group) * group
        if target > n_items:  # only possible when batches hold ~1 item: merge down instead
            target = (len(batches) // group) * group
            logger.warning(
                "%d chains in %d batches cannot be split into a multiple of %d; merging %d small batches",
                n_items, len(batches), group, len(batches) - target,
            )
            while len(batches) > target:
                batches.sort(key=len)  # stable: deterministic
                batches = [batches[0] + batches[1]] + batches[2:]
            return batches
        while len(batches) < target:
            # split the batch with most items (ties: the first) into two halves; lengths stay sorted
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            b = batches.pop(j)
            half = len(b) // 2
            batches[j:j] = [b[:half], b[half:]]
        return batches

    def _interleave(self, batches: list[list[int]], rng: np.random.Generator | None) -> list[list[int]]:
        """Group R batches of similar padded length per step (ranks wait less), shuffle the steps."""
        r = self.num_replicas
        batches = sorted(batches, key=lambda b: int(self.lengths[b].max()))  # stable: deterministic
        steps = [batches[i : i + r] for i in range(0, len(batches), r)]
        if rng is not None:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        return [b for step in steps for b in step]
