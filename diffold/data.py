"""Cached featurized rows -> cropped examples -> padded Batches -> loaders.

build_datasets(cfg) -> (train, val | None, DataReport); build_loader(dataset, cfg, train=...) -> loader.
Featurization, the cache and the split live in diffold/pipeline.py (shared with `python -m diffold.prepare`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from diffold.batch import Batch
from diffold.paths import safe_filename
from diffold.pipeline import prepare_tables
from diffold.plm import precompute_features
from diffold.report import DataReport, SplitReport
from diffold.sampler import BucketBatchSampler
from diffold.sources import DataError

__all__ = ["DataError", "StructureDataset", "build_datasets", "build_loader", "collate", "load_features"]
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- dataset
class StructureDataset(torch.utils.data.Dataset):
    """Usable chains of one split: random crops for training, centre crops for validation."""

    def __init__(self, table: Dataset, rows: list[int], *, max_length: int, train: bool, seed: int = 0,
                 feature_dir: str | None = None) -> None:
        meta = table.select(rows).select_columns(["id", "length", "weight"]).to_dict() if rows else \
            {"id": [], "length": [], "weight": []}
        self._table = table.with_format("numpy", columns=["tokens", "coords", "atom_mask", "residue_index"])
        self._rows = np.asarray(rows, dtype=np.int64)
        self.ids: list[str] = meta["id"]
        self.full_lengths: list[int] = meta["length"]
        self.weights: list[float] = meta["weight"]
        self.max_length, self.train, self.seed, self.epoch = max_length, train, seed, 0
        self.feature_dir = Path(feature_dir) if feature_dir else None
        self.lengths: list[int] = [min(n, max_length) for n in self.full_lengths]  # cropped lengths

    def set_epoch(self, epoch: int) -> None:
        """Crops depend on (seed, epoch, index); call before iterating each epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def crop_start(self, i: int, observed: np.ndarray) -> int:
        """First residue of the crop window of item i; observed is [L] bool."""
        n, w = len(observed), self.max_length
        if n <= w:
            return 0
        counts = np.convolve(observed.astype(np.int64), np.ones(w, dtype=np.int64), "valid")  # [n - w + 1]
        valid = np.flatnonzero(counts >= max(1, (counts.max() + 1) // 2))  # windows with real atoms in them
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])  # not the global RNG: resumable
            return int(valid[rng.integers(len(valid))])
        return int(valid[np.argmin(np.abs(valid - (n - w) // 2))])  # deterministic centre window

    def __getitem__(self, i: int) -> dict:
        row = self._table[int(self._rows[i])]
        n = self.full_lengths[i]
        mask = row["atom_mask"].reshape(n, -1)               # [L, A]
        coords = row["coords"].reshape(n, mask.shape[1], 3)  # [L, A, 3]
        s = self.crop_start(i, mask.any(axis=1))
        sl = slice(s, s + self.max_length)
        mask, coords = mask[sl], coords[sl]
        centre = coords[mask].mean(axis=0)                   # [3], over present atoms only
        coords = np.where(mask[..., None], coords - centre, 0.0).astype(np.float32)
        item = {"id": self.ids[i], "tokens": torch.as_tensor(row["tokens"][sl], dtype=torch.long),
                "coords": torch.from_numpy(coords), "atom_mask": torch.from_numpy(mask.copy()),
                "residue_index": torch.as_tensor(row["residue_index"][sl], dtype=torch.long),
                "weight": float(self.weights[i])}
        if self.feature_dir is not None:
            item["features"] = load_features(self.feature_dir, self.ids[i])[sl]  # [l, F]
        return item


def load_features(feature_dir: Path, chain_id: str) -> torch.Tensor:
    """[L, F] float features of one chain from <feature_dir>/<id>.pt (tensors only: weights_only)."""
    return torch.load(feature_dir / safe_filename(chain_id, ".pt"), map_location="cpu", weights_only=True).float()


def _feature_problem(feature_dir: Path, chain_id: str, length: int) -> str:
    path = feature_dir / safe_filename(chain_id, ".pt")
    if not path.is_file():
        return f"no feature file: {path}"
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:  # corrupt/unsafe files
        return f"bad feature file: {path} ({type(e).__name__})"
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != length or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return f"bad feature file: {path} (need a float [L={length}, F] tensor, got {shape})"
    if not torch.isfinite(x).all():
        return f"bad feature file: {path} (non-finite values)"
    return ""


def collate(items: list[dict], pad_multiple: int = 0) -> Batch:
    """Pad a list of examples to the longest (rounded up to a multiple of pad_multiple: few distinct shapes
    for torch.compile): pad rows are zero with residue_mask False."""
    b, l_max, a = len(items), max(len(it["tokens"]) for it in items), items[0]["coords"].shape[1]
    if pad_multiple > 0:
        l_max = -(-l_max // pad_multiple) * pad_multiple
    tokens = torch.zeros(b, l_max, dtype=torch.long)              # [B, L]
    coords = torch.zeros(b, l_max, a, 3)                          # [B, L, A, 3]
    atom_mask = torch.zeros(b, l_max, a, dtype=torch.bool)        # [B, L, A]
    residue_mask = torch.zeros(b, l_max, dtype=torch.bool)        # [B, L]
    residue_index = torch.zeros(b, l_max, dtype=torch.long)       # [B, L]
    has_features = "features" in items[0]
    features = torch.zeros(b, l_max, items[0]["features"].shape[1]) if has_features else None  # [B, L, F]
    for j, it in enumerate(items):
        n = len(it["tokens"])
        tokens[j, :n], coords[j, :n], atom_mask[j, :n] = it["tokens"], it["coords"], it["atom_mask"]
        residue_mask[j, :n], residue_index[j, :n] = True, it["residue_index"]
        if features is not None:
            features[j, :n] = it["features"]
    weights = torch.tensor([it["weight"] for it in items], dtype=torch.float32)  # [B]
    return Batch([it["id"] for it in items], tokens, coords, atom_mask, residue_mask, residue_index, weights,
                 features)


class StructureLoader(DataLoader):
    """DataLoader whose batch_sampler is a BucketBatchSampler; set_epoch/skip reach sampler and crops."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def skip(self, k: int) -> None:
        self.batch_sampler.skip(k)


def build_loader(dataset: StructureDataset, cfg, *, train: bool, num_replicas: int = 1, rank: int = 0,
                 batches_multiple_of: int = 1, pad_multiple: int = 0) -> StructureLoader:
    """Bucketed (train: shuffled per epoch; val: length-sorted) loader of padded Batches for one rank."""
    sampler = BucketBatchSampler(
        dataset.lengths, cfg.training.batch_size, max_tokens=cfg.data.max_tokens, shuffle=train,
        seed=cfg.training.seed, num_replicas=num_replicas, rank=rank, bucket_size=cfg.data.bucket_size,
        batches_multiple_of=batches_multiple_of)
    # workers are re-created each epoch (not persistent) so they see the dataset's current epoch
    # own generator: creating an iterator draws a base seed, which must not consume the global RNG
    # (exact resume restores the global RNG at the checkpoint, mid-epoch, after the iterator existed)
    generator = torch.Generator().manual_seed(cfg.training.seed)
    return StructureLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_multiple=pad_multiple), num_workers=cfg.data.num_workers,
                           generator=generator)


# --------------------------------------------------------------------------- entry point
def _finish(table: Dataset, rows: list[int], rep: SplitReport, cfg, train: bool,
            weight_scale: dict[int, float] | None = None) -> StructureDataset:
    """Drop chains without usable features (if any are configured), fill the report, build the dataset."""
    meta = table.select(rows).select_columns(["id", "length", "source", "chain"]).to_dict() if rows else {}
    keep = []
    for r, cid, n, src, ch in zip(rows, *meta.values(), strict=True):
        problem = _feature_problem(Path(cfg.data.feature_dir), cid, n) if cfg.data.feature_dir else ""
        if problem:
            rep.skip(src, ch or None, problem)
        else:
            keep.append(r)
    ds = StructureDataset(table, keep, max_length=cfg.data.max_length, train=train, seed=cfg.training.seed,
                          feature_dir=cfg.data.feature_dir)
    if weight_scale is not None:  # data.cluster_weights: 1 / cluster size, mean 1
        ds.weights = [w * weight_scale[r] for w, r in zip(ds.weights, keep, strict=True)]
    rep.chains_used, rep.ids = len(ds), list(ds.ids)
    rep.cropped = sum(n > cfg.data.max_length for n in ds.full_lengths)
    if not train and rows and not rep.files_seen:  # val carved out of the train source
        rep.files_seen = len(set(table.select(keep).select_columns(["source"]).to_dict()["source"]))
    return ds


def build_datasets(cfg, *, main_process_first: Callable = contextlib.nullcontext
                   ) -> tuple[StructureDataset, StructureDataset | None, DataReport]:
    """Featurize (or reuse the cache of) the configured inputs; DataError if train has no usable chain."""
    t = prepare_tables(cfg, main_process_first=main_process_first)
    report, task = t.report, t.task
    if cfg.model.structure_encoder.plm_path:  # PLM features of every usable chain, before _finish checks them
        chains = [pair for tab, rows in ((t.train_table, t.train_rows), (t.val_table, t.val_rows)) if rows
                  for pair in zip(*tab.select(rows).select_columns(["id", "sequence"]).to_dict().values(), strict=True)]
        report.preprocessing["plm_features"] = precompute_features(cfg, chains).to_dict()
    train = _finish(t.train_table, t.train_rows, report.train, cfg, train=True, weight_scale=t.weight_scale)
    val = _finish(t.val_table, t.val_rows, report.val, cfg, train=False)
    for name, path, ds, rep in (("train", cfg.data.train_path, train, report.train),
                                ("val", cfg.data.val_path, val, report.val)):
        if len(ds) == 0 and (name == "train" or path):
            err = DataError(f"data.{name}_path={path}: no usable {task.name} chain "
                            f"(top skip reasons: {rep.top_reasons()}); see data_report.json")
            err.report = report  # the loop can still write data_report.json
            raise err
    if len(val) == 0:
        logger.warning("no validation chains: %d chain(s) in too few sequence clusters to split", len(train))
    logger.info("data: %d train / %d val chains (%s); skipped %d / %d", len(train), len(val),
                report.split_method, sum(report.train.skipped.values()), sum(report.val.skipped.values()))
    return train, (val if len(val) else None), report
