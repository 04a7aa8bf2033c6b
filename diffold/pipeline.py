"""Inputs -> featurized, cached rows -> which rows train and which validate (no torch Dataset here).

prepare_tables(cfg) is shared by training (diffold.data.build_datasets) and the preprocessing CLI
(python -m diffold.prepare): the same cache, the same report, the same split.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from diffold.clustering import ClusterSettings, cluster_labels, cluster_size_weights, split_by_clusters
from diffold.featurize import FeatureSpec, skip_row
from diffold.report import DataReport, SplitReport
from diffold.sanity import GeometryLimits
from diffold.shards import FileHasher, ShardIndex, assemble, file_keys, plan
from diffold.sources import TEST_NAMES, TRAIN_NAMES, VAL_NAMES, DataError, collect, group_by_file
from diffold.tasks import Task, get_task
from diffold.workers import Job, Progress, run_jobs, work

logger = logging.getLogger(__name__)

POOL_MIN_FILES = 64  # fewer new files (and data.num_proc=1) are parsed in-process: no worker start-up, no timeout


@dataclass
class Tables:
    """Rows (indices into memory-mapped tables) of each split, the report, and optional per-row weight factors."""

    train_table: Dataset
    train_rows: list[int]
    val_table: Dataset
    val_rows: list[int]
    report: DataReport
    task: Task
    weight_scale: dict[int, float] | None = None  # train row -> 1/cluster-size factor (data.cluster_weights)


def feature_spec(cfg, task: Task) -> FeatureSpec:
    return FeatureSpec(task.name, task.kind, task.alphabet, tuple(task.resolve_atoms(cfg.data.atoms)),
                       cfg.data.min_length, GeometryLimits.from_config(cfg.data))


def cache_root(cfg) -> Path:
    return Path(cfg.data.cache_dir or ".cache/diffold")


# --------------------------------------------------------------------------- featurization through the cache
def featurize_cached(items: list[dict], spec: FeatureSpec, cache_dir: Path, num_proc: int, timeout_s: float,
                     label: str = "") -> tuple[Dataset, list[int], dict]:
    """(table, row numbers in item order, stats): cached shards reused, the rest featurized and cached."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the directory should be, a read-only mount
        raise DataError(f"cannot create data.cache_dir {cache_dir} ({e.strerror or e}): "
                        "set data.cache_dir to a writable directory") from None
    t0 = time.perf_counter()
    hasher = FileHasher(cache_dir)
    keys = file_keys(items, spec, hasher, threads=num_proc)
    hasher.save()
    index = ShardIndex.load(cache_dir)
    index.remove_stale_tmp()
    groups = plan(keys, index)
    pending = sum(len(g) for g in groups)
    stats = {"files": len(items), "reused": len(items) - pending, "featurized": pending, "files_hashed": hasher.hashed,
             "workers": 0, "skipped_transient": 0, "worker_cpu_s": 0.0}
    transient: dict[int, list[dict]] = {}
    if pending:
        jobs = [Job([{**items[i], "key": keys[i], "i": i} for i in g], str(index.tmp_path())) for g in groups]
        pool = pending >= POOL_MIN_FILES or (num_proc > 1 and len(jobs) > 1)
        stats["workers"] = min(num_proc, len(jobs)) if pool else 0
        how = (f"{stats['workers']} worker process(es), per-file timeout {timeout_s:g} s" if pool
               else "in this process (fewer than 64 new files)")
        logger.info("data %s: featurizing %d of %d files (%d reused from %s) in %d shards, %s",
                    label, pending, len(items), len(items) - pending, cache_dir, len(jobs), how)
        if pending == len(items) and index.where:  # a prepared cache that matches nothing: say why it may be
            logger.warning("data %s: none of the %d files is in the cache at %s, which holds %d featurized files: "
                           "were those made with other settings (task, data.atoms, data.min_length, the "
                           "absurd-geometry limits) or another diffold version?", label, len(items), cache_dir,
                           len(index.where))
        progress = Progress(pending, max(1, stats["workers"]))

        def publish(job: Job) -> None:
            index.publish(Path(job.out), job.result["files"])
            stats["worker_cpu_s"] += job.result["cpu_s"]

        if pool:
            run_jobs(jobs, spec.to_dict(), stats["workers"], timeout_s, progress, on_done=publish)
        else:
            for job in jobs:
                job.result = work(spec.to_dict(), {"items": job.items, "out": job.out, "skip": {}},
                                  lambda m: progress.add() if m["event"] == "file" else None)
                publish(job)
        stats["seconds"] = round(progress.finish(), 3)
        for job in jobs:
            for k, reason in job.skip.items():
                transient[job.items[k]["i"]] = [skip_row(job.items[k]["display"], reason)]
        stats["skipped_transient"] = len(transient)
    else:
        logger.info("data %s: all %d files reused from the featurized cache in %s (nothing parsed)",
                    label, len(items), cache_dir)
    table, order = assemble(keys, index, transient)
    stats["total_s"] = round(time.perf_counter() - t0, 3)
    return table, order, stats


# --------------------------------------------------------------------------- rows of each split
def usable_rows(table: Dataset, order: list[int], rep: SplitReport, taken: set[str] | None = None) -> list[int]:
    """Row numbers (in item order) of usable chains; skip rows and duplicate ids are counted into the report."""
    meta = table.select(order).select_columns(["id", "source", "chain", "kind", "skip_reason"]).to_dict() \
        if order else {"id": []}
    seen = set() if taken is None else taken
    rows = []
    for r, cid, src, chain, kind, reason in zip(order, *meta.values(), strict=True) if order else ():
        if kind:
            rep.by_kind[kind] += 1
        if reason:
            rep.skip(src, chain or None, reason)
        elif cid in seen:
            rep.skip(src, chain or None, f"duplicate id: '{cid}' (kept the first)")
        else:
            seen.add(cid)
            rows.append(r)
    return rows


def _held_out(split: str, role: str) -> str:
    """Skip reason of a manifest row whose split column does not let this source (role) use it."""
    if split in TEST_NAMES:
        return f"held-out split: split='{split}' rows are never trained or validated on"
    if split in VAL_NAMES | TRAIN_NAMES:
        other = "data.val_path gives the validation set" if role == "train" else "this is data.val_path"
        return f"held-out split: split='{split}' row in the {role} source ({other})"
    return f"unknown split: '{split}' (use train, val or test)"


def by_split_column(table: Dataset, rows: list[int], rep: SplitReport, allowed: set[str], role: str) -> list[int]:
    """Rows whose split column is empty or in `allowed`; the others are counted as skipped."""
    meta = table.select(rows).select_columns(["split", "source", "chain"]).to_dict() if rows else {}
    keep = []
    for r, s, src, ch in zip(rows, *meta.values(), strict=True) if rows else ():
        if not s or s in allowed:
            keep.append(r)
        else:
            rep.skip(src, ch or None, _held_out(s, role))
    return keep


def _clusters(cfg, task: Task, sequences: list[str], report: DataReport) -> list[int]:
    d = cfg.data
    settings = ClusterSettings(d.cluster_method, d.cluster_identity, d.cluster_coverage, task.kind,
                               len(task.alphabet) - 1, d.num_proc)
    labels, report.clustering = cluster_labels(sequences, settings, cache_root(cfg))
    return labels


def split_rows(table: Dataset, rows: list[int], cfg, task: Task, report: DataReport) -> tuple[list[int], list[int]]:
    """One source -> (train rows, val rows): by the manifest's split column, else by sequence cluster."""
    rows = by_split_column(table, rows, report.train, TRAIN_NAMES | VAL_NAMES, "train")  # test rows never used
    meta = table.select(rows).select_columns(["sequence", "split"]).to_dict() if rows else {}
    splits = meta.get("split", [])
    if any(s in VAL_NAMES for s in splits):
        report.split_method = "manifest split column"
        return ([r for r, s in zip(rows, splits, strict=True) if s not in VAL_NAMES],
                [r for r, s in zip(rows, splits, strict=True) if s in VAL_NAMES])
    d, seqs = cfg.data, meta.get("sequence", [])
    labels = _clusters(cfg, task, seqs, report)
    report.split_method = (f"sequence clusters ({report.clustering['tool']}, identity >= {d.cluster_identity}, "
                           f"coverage >= {d.cluster_coverage}, val_fraction {d.val_fraction})")
    flags = split_by_clusters(seqs, labels, d.val_fraction)
    return [r for r, f in zip(rows, flags, strict=True) if not f], [r for r, f in zip(rows, flags, strict=True) if f]


# --------------------------------------------------------------------------- entry point
def prepare_tables(cfg, *, main_process_first: Callable = contextlib.nullcontext) -> Tables:
    """Featurize (or reuse) the configured inputs and split them; DataError for an empty train_path."""
    task = get_task(cfg.task)
    spec = feature_spec(cfg, task)
    report = DataReport()
    predictor = None
    if cfg.data.use_predicted_structures:  # ESMFold, loaded lazily (torch + transformers)
        from diffold.predicted import StructurePredictor
        predictor = StructurePredictor(cfg)

    def load(path: str, rep: SplitReport, taken: set[str] | None = None) -> tuple[Dataset, list[int]]:
        missing: list | None = [] if predictor else None  # sequence-only manifest rows, to be predicted
        entries = collect(path, task.kind, rep, missing)
        if missing:
            entries += predictor.entries(missing, rep)  # cached/predicted PDBs; failures skipped and counted
        items = group_by_file(entries)
        rep.files_seen = len(items)
        if not items and not rep.skipped and not path.lower().endswith((".csv", ".tsv")):  # an empty directory
            err = DataError(f"{path}: no structure files found (.pdb .cif .mmcif .ent, optionally .gz); "
                            "check data.train_path / data.val_path")
            err.report = report  # the caller can still write data_report.json
            raise err
        with main_process_first():  # the main process featurizes; the others then find every shard cached
            table, order, stats = featurize_cached(items, spec, cache_root(cfg), cfg.data.num_proc,
                                                   cfg.data.file_timeout_s, label=path)
        report.cache_hit[path], report.featurization[path] = stats["featurized"] == 0, stats
        return table, usable_rows(table, order, rep, taken)

    if not cfg.data.train_path:
        raise DataError("data.train_path is empty: give a directory, glob or CSV manifest of structures")
    train_table, train_rows = load(cfg.data.train_path, report.train)
    if cfg.data.val_path:  # a manifest's split column still holds: no val/test row of it is trained on
        train_rows = by_split_column(train_table, train_rows, report.train, TRAIN_NAMES, "train")
        train_ids = set(train_table.select(train_rows).select_columns(["id"]).to_dict()["id"]) if train_rows else set()
        val_table, val_rows = load(cfg.data.val_path, report.val, taken=set())
        val_rows = by_split_column(val_table, val_rows, report.val, VAL_NAMES, "val")
        meta = val_table.select(val_rows).select_columns(["id", "source", "chain"]).to_dict() if val_rows else {}
        for r, cid, src, ch in zip(list(val_rows), *meta.values(), strict=True):
            if cid in train_ids:  # the same chain in both splits would leak
                report.val.skip(src, ch or None, f"id also in the train set: '{cid}'")
                val_rows.remove(r)
    else:
        val_table = train_table
        with main_process_first():  # clusters are cached too: one process runs MMseqs2 / the k-mer linkage
            train_rows, val_rows = split_rows(train_table, train_rows, cfg, task, report)
    if predictor is not None:
        predictor.close()  # free ESMFold before training
        report.preprocessing["predicted_structures"] = predictor.stats.to_dict()
    scale = None
    if cfg.data.cluster_weights and train_rows:
        seqs = train_table.select(train_rows).select_columns(["sequence"]).to_dict()["sequence"]
        with main_process_first():
            factors = cluster_size_weights(_clusters(cfg, task, seqs, report))
        scale = dict(zip(train_rows, factors, strict=True))
        report.clustering["weights"] = "1 / cluster size (mean 1) x manifest weight"
    return Tables(train_table, train_rows, val_table, val_rows, report, task, scale)
