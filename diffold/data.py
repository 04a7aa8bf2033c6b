"""Structure files -> featurized Arrow cache (HF datasets) -> cropped examples -> padded Batches.

build_datasets(cfg) -> (train, val | None, DataReport); build_loader(dataset, cfg, train=...) -> loader.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import pickle
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_from_disk
from torch.utils.data import DataLoader

from diffold import structure
from diffold.batch import Batch
from diffold.hashing import file_sha256
from diffold.paths import safe_filename
from diffold.plm import precompute_features
from diffold.predicted import StructurePredictor
from diffold.sampler import BucketBatchSampler
from diffold.sanity import GeometryLimits
from diffold.sources import (
    FEATURES,
    TEST_NAMES,
    TRAIN_NAMES,
    VAL_NAMES,
    DataError,
    DataReport,
    SplitReport,
    cluster_split,
    collect,
    featurize_file,
    group_by_file,
)
from diffold.tasks import Task, get_task

logger = logging.getLogger(__name__)

FEATURIZE_VERSION = 2  # bump when the featurized rows change: invalidates every cache


# --------------------------------------------------------------------------- featurization
def _featurize_batch(batch: dict, task_name: str, atoms: list, min_length: int, limits: dict) -> dict:
    """datasets .map(batched=True) adapter: a batch of files -> any number of chain/skip rows."""
    out: dict[str, list] = {k: [] for k in FEATURES}
    for path, display, entries in zip(batch["path"], batch["display"], batch["entries"], strict=True):
        for row in featurize_file(path, display, json.loads(entries), get_task(task_name), tuple(atoms), min_length,
                                  GeometryLimits(**limits)):
            for k in FEATURES:
                out[k].append(row[k])
    return out


def _fingerprint(items: list[dict], task: Task, atoms: tuple, min_length: int, limits: GeometryLimits) -> str:
    """sha256 over file contents, manifest rows and featurization settings (parser source included)."""
    h = hashlib.sha256()
    parser_src = inspect.getsource(structure).encode()
    cfg = {"task": task.name, "atoms": list(atoms), "min_length": min_length, "version": FEATURIZE_VERSION,
           "parser": hashlib.sha256(parser_src).hexdigest(), "limits": asdict(limits)}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it["display"], file_sha256(it["path"]),
                             [{k: v for k, v in e.items() if k != "path"} for e in it["entries"]]]).encode())
    return h.hexdigest()


def featurize_cached(items: list[dict], key: str, cache_dir: Path, num_proc: int, fn_kwargs: dict,
                     main_process_first: Callable = contextlib.nullcontext) -> tuple[Dataset, bool]:
    """Featurized rows from cache_dir/<key>, building it once (main process first) atomically."""
    if not items:  # nothing to parse (and datasets cannot reload an empty saved dataset)
        return Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES), False
    final = cache_dir / f"featurized-{key[:24]}"
    with main_process_first():
        if final.is_dir():
            return load_from_disk(str(final)), True
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where the directory should be, a read-only mount
            raise DataError(f"cannot create data.cache_dir {cache_dir} ({e.strerror or e}): "
                            "set data.cache_dir to a writable directory") from None
        _remove_stale_tmp(cache_dir)
        work = Dataset.from_list([{**it, "entries": json.dumps(it["entries"])} for it in items])
        ds = work.map(_featurize_batch, batched=True, batch_size=1, remove_columns=work.column_names,
                      features=FEATURES, fn_kwargs=fn_kwargs, desc="featurizing structures",
                      num_proc=min(num_proc, len(items)) if num_proc > 1 else None)
        tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        ds.save_to_disk(str(tmp))
        try:
            os.rename(tmp, final)  # atomic: a killed run leaves only a .tmp-* dir, never a half cache
        except OSError:  # another process published the same key first
            shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(final)), False


def _remove_stale_tmp(cache_dir: Path, max_age_s: float = 86400.0) -> None:
    for p in cache_dir.glob(".tmp-featurized-*"):
        if time.time() - p.stat().st_mtime > max_age_s:
            shutil.rmtree(p, ignore_errors=True)


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


def collate(items: list[dict]) -> Batch:
    """Pad a list of examples to the longest: pad rows are zero with residue_mask False."""
    b, l_max, a = len(items), max(len(it["tokens"]) for it in items), items[0]["coords"].shape[1]
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
                 batches_multiple_of: int = 1) -> StructureLoader:
    """Bucketed (train: shuffled per epoch; val: length-sorted) loader of padded Batches for one rank."""
    sampler = BucketBatchSampler(
        dataset.lengths, cfg.training.batch_size, max_tokens=cfg.data.max_tokens, shuffle=train,
        seed=cfg.training.seed, num_replicas=num_replicas, rank=rank, bucket_size=cfg.data.bucket_size,
        batches_multiple_of=batches_multiple_of)
    # workers are re-created each epoch (not persistent) so they see the dataset's current epoch
    # own generator: creating an iterator draws a base seed, which must not consume the global RNG
    # (exact resume restores the global RNG at the checkpoint, mid-epoch, after the iterator existed)
    generator = torch.Generator().manual_seed(cfg.training.seed)
    return StructureLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                           generator=generator)


# --------------------------------------------------------------------------- entry point
def _usable_rows(table: Dataset, rep: SplitReport, taken: set[str] | None = None) -> list[int]:
    """Indices of usable rows; skip rows and duplicate ids are counted into the report."""
    meta = table.select_columns(["id", "source", "chain", "kind", "skip_reason"]).to_dict()
    seen = set() if taken is None else taken
    rows = []
    for i, (cid, src, chain, kind, reason) in enumerate(zip(*meta.values(), strict=True)):
        if kind:
            rep.by_kind[kind] += 1
        if reason:
            rep.skip(src, chain or None, reason)
        elif cid in seen:
            rep.skip(src, chain or None, f"duplicate id: '{cid}' (kept the first)")
        else:
            seen.add(cid)
            rows.append(i)
    return rows


def _held_out(split: str, role: str) -> str:
    """Skip reason of a manifest row whose split column does not let this source (role) use it."""
    if split in TEST_NAMES:
        return f"held-out split: split='{split}' rows are never trained or validated on"
    if split in VAL_NAMES | TRAIN_NAMES:
        other = "data.val_path gives the validation set" if role == "train" else "this is data.val_path"
        return f"held-out split: split='{split}' row in the {role} source ({other})"
    return f"unknown split: '{split}' (use train, val or test)"


def _by_split_column(table: Dataset, rows: list[int], rep: SplitReport, allowed: set[str], role: str) -> list[int]:
    """Rows whose split column is empty or in `allowed`; the others are counted as skipped."""
    meta = table.select(rows).select_columns(["split", "source", "chain"]).to_dict() if rows else {}
    keep = []
    for r, s, src, ch in zip(rows, *meta.values(), strict=True) if rows else ():
        if not s or s in allowed:
            keep.append(r)
        else:
            rep.skip(src, ch or None, _held_out(s, role))
    return keep


def _split(table: Dataset, rows: list[int], cfg, task: Task, report: DataReport) -> tuple[list[int], list[int]]:
    """One source -> (train rows, val rows): by the manifest's split column, else by sequence cluster."""
    rows = _by_split_column(table, rows, report.train, TRAIN_NAMES | VAL_NAMES, "train")  # test rows never used
    meta = table.select(rows).select_columns(["sequence", "split"]).to_dict() if rows else {}
    splits = meta.get("split", [])
    if any(s in VAL_NAMES for s in splits):
        report.split_method = "manifest split column"
        return ([r for r, s in zip(rows, splits, strict=True) if s not in VAL_NAMES],
                [r for r, s in zip(rows, splits, strict=True) if s in VAL_NAMES])
    d = cfg.data
    report.split_method = (f"sequence clusters (k-mer identity >= {d.cluster_identity}, "
                           f"val_fraction {d.val_fraction})")
    flags = cluster_split(meta.get("sequence", []), d.cluster_identity, d.val_fraction, len(task.alphabet) - 1)
    return [r for r, f in zip(rows, flags, strict=True) if not f], [r for r, f in zip(rows, flags, strict=True) if f]


def _finish(table: Dataset, rows: list[int], rep: SplitReport, cfg, train: bool) -> StructureDataset:
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
    rep.chains_used, rep.ids = len(ds), list(ds.ids)
    rep.cropped = sum(n > cfg.data.max_length for n in ds.full_lengths)
    if not train and rows and not rep.files_seen:  # val carved out of the train source
        rep.files_seen = len(set(table.select(keep).select_columns(["source"]).to_dict()["source"]))
    return ds


def build_datasets(cfg, *, main_process_first: Callable = contextlib.nullcontext
                   ) -> tuple[StructureDataset, StructureDataset | None, DataReport]:
    """Featurize (or reuse the cache of) the configured inputs; DataError if train has no usable chain."""
    task = get_task(cfg.task)
    atoms = task.resolve_atoms(cfg.data.atoms)
    cache_dir = Path(cfg.data.cache_dir or ".cache/diffold")
    report = DataReport()
    predictor = StructurePredictor(cfg) if cfg.data.use_predicted_structures else None  # ESMFold, loaded lazily

    def load(path: str, rep: SplitReport, taken: set[str] | None = None) -> tuple[Dataset, list[int]]:
        missing: list | None = [] if predictor else None  # sequence-only manifest rows, to be predicted
        entries = collect(path, task.kind, rep, missing)
        if missing:
            entries += predictor.entries(missing, rep)  # cached/predicted PDBs; failures skipped and counted
        items = group_by_file(entries)
        rep.files_seen = len(items)
        limits = GeometryLimits.from_config(cfg.data)
        key = _fingerprint(items, task, atoms, cfg.data.min_length, limits)
        kwargs = {"task_name": task.name, "atoms": list(atoms), "min_length": cfg.data.min_length,
                  "limits": asdict(limits)}
        table, report.cache_hit[path] = featurize_cached(items, key, cache_dir, cfg.data.num_proc, kwargs,
                                                         main_process_first)
        return table, _usable_rows(table, rep, taken)

    if not cfg.data.train_path:
        raise DataError("data.train_path is empty: give a directory, glob or CSV manifest of structures")
    train_table, train_rows = load(cfg.data.train_path, report.train)
    if cfg.data.val_path:  # a manifest's split column still holds: no val/test row of it is trained on
        train_rows = _by_split_column(train_table, train_rows, report.train, TRAIN_NAMES, "train")
        train_ids = set(train_table.select(train_rows).select_columns(["id"]).to_dict()["id"]) if train_rows else set()
        val_table, val_rows = load(cfg.data.val_path, report.val, taken=set())
        val_rows = _by_split_column(val_table, val_rows, report.val, VAL_NAMES, "val")
        meta = val_table.select(val_rows).select_columns(["id", "source", "chain"]).to_dict() if val_rows else {}
        for r, cid, src, ch in zip(list(val_rows), *meta.values(), strict=True):
            if cid in train_ids:  # the same chain in both splits would leak
                report.val.skip(src, ch or None, f"id also in the train set: '{cid}'")
                val_rows.remove(r)
    else:
        val_table = train_table
        train_rows, val_rows = _split(train_table, train_rows, cfg, task, report)
    if predictor is not None:
        predictor.close()  # free ESMFold before training
        report.preprocessing["predicted_structures"] = predictor.stats.to_dict()
    if cfg.model.structure_encoder.plm_path:  # PLM features of every usable chain, before _finish checks them
        chains = [pair for t, rows in ((train_table, train_rows), (val_table, val_rows)) if rows
                  for pair in zip(*t.select(rows).select_columns(["id", "sequence"]).to_dict().values(), strict=True)]
        report.preprocessing["plm_features"] = precompute_features(cfg, chains).to_dict()
    train = _finish(train_table, train_rows, report.train, cfg, train=True)
    val = _finish(val_table, val_rows, report.val, cfg, train=False)
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
