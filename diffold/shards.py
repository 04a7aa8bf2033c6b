"""Featurized rows cached as content-addressed Arrow shards: per-file reuse, resume after a crash, cheap additions.

Layout under data.cache_dir:
  shards/<id>.arrow   rows of a group of files (Arrow IPC stream with featurize.SCHEMA), memory-mapped
  shards/<id>.json    its index [[file key, rows], ...] in row order; written last, so it marks a complete shard
  filehash.json       stat cache: path -> [size, mtime_ns, sha256, recorded_ns], so a warm start hashes nothing
A file's key is sha256 of the featurization settings (FeatureSpec, the parser's and featurizer's source),
the file's content hash and how the input names it (display path, manifest rows). A killed run keeps
every shard it finished; the next run featurizes only files whose key no shard holds.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Features
from datasets.arrow_reader import ArrowReader
from datasets.table import InMemoryTable, concat_tables

from diffold import featurize, sanity, structure
from diffold.featurize import SCHEMA, FeatureSpec, rows_to_table
from diffold.hashing import file_sha256

logger = logging.getLogger(__name__)

VERSION = 3                          # bump when the featurized rows change: invalidates every cache
FEATURES = Features.from_arrow_schema(SCHEMA)
RACY_NS = 2_000_000_000              # a file modified this close to its hashing is re-hashed next time


def settings_key(spec: FeatureSpec) -> str:
    """sha256 of the spec, VERSION and the source of every module that shapes a row."""
    src = "".join(inspect.getsource(m) for m in (structure, sanity, featurize))
    return hashlib.sha256(json.dumps([VERSION, spec.to_dict(), hashlib.sha256(src.encode()).hexdigest()],
                                     sort_keys=True).encode()).hexdigest()


class FileHasher:
    """Content sha256 of files, remembered by (size, mtime) the way git's index does (racy entries re-hashed)."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "filehash.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (ValueError, OSError):  # a damaged stat cache only costs re-hashing
            self.known = {}
        self.changed, self.hashed = False, 0

    def _fresh(self, path: str) -> os.stat_result | None:
        """The file's stat if its remembered hash cannot be trusted (new, changed, or hashed too soon after a write)."""
        st = os.stat(path)
        old = self.known.get(path)
        ok = old and old[0] == st.st_size and old[1] == st.st_mtime_ns and st.st_mtime_ns < old[3] - RACY_NS
        return None if ok else st

    def hash_all(self, paths: list[str], threads: int = 1) -> list[str]:
        """sha256 of every path; unknown files are hashed by `threads` threads (hashlib releases the GIL)."""
        todo = {p: st for p in dict.fromkeys(paths) if (st := self._fresh(p)) is not None}
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for p, digest in zip(todo, pool.map(file_sha256, todo), strict=True):
                st = todo[p]
                self.known[p] = [st.st_size, st.st_mtime_ns, digest, time.time_ns()]
        self.changed, self.hashed = self.changed or bool(todo), self.hashed + len(todo)
        return [self.known[p][2] for p in paths]

    def save(self) -> None:
        if self.changed:
            write_atomic(self.path, json.dumps(self.known, separators=(",", ":")).encode())


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def file_keys(items: list[dict], spec: FeatureSpec, hasher: FileHasher, threads: int = 1) -> list[str]:
    """One key per work item (file + the manifest rows that read it)."""
    base = settings_key(spec)
    keys = []
    for it, digest in zip(items, hasher.hash_all([it["path"] for it in items], threads), strict=True):
        entries = [{k: v for k, v in e.items() if k != "path"} for e in it["entries"]]
        keys.append(hashlib.sha256(json.dumps([base, digest, it["display"], entries], sort_keys=True).encode()).hexdigest())
    return keys


@dataclass
class ShardIndex:
    """Which complete shard holds the rows of which file key."""

    root: Path
    where: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # key -> (shard id, first row, rows)

    @classmethod
    def load(cls, cache_dir: Path) -> ShardIndex:
        idx = cls(cache_dir / "shards")
        for meta in sorted(idx.root.glob("*.json")) if idx.root.is_dir() else []:
            if not (idx.root / f"{meta.stem}.arrow").is_file():
                continue
            try:
                files = json.loads(meta.read_text())["files"]
            except (ValueError, OSError, KeyError, TypeError):  # a damaged index: its files are parsed again
                logger.warning("data cache: unreadable shard index %s (its files will be featurized again)", meta)
                continue
            start = 0
            for key, n in files:
                idx.where.setdefault(key, (meta.stem, start, n))
                start += n
        return idx

    def publish(self, tmp_arrow: Path, files: list[list]) -> str:
        """Move a finished shard into place under its content id; returns the id."""
        sid = hashlib.sha256("".join(k for k, _ in files).encode()).hexdigest()[:32]
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_arrow, self.root / f"{sid}.arrow")
        write_atomic(self.root / f"{sid}.json", json.dumps({"version": VERSION, "files": files}).encode())
        start = 0
        for key, n in files:
            self.where[key] = (sid, start, n)
            start += n
        return sid

    def tmp_path(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}.arrow"

    def remove_stale_tmp(self, max_age_s: float = 86400.0) -> None:
        for p in self.root.glob(".tmp-*") if self.root.is_dir() else []:
            if time.time() - p.stat().st_mtime > max_age_s:
                p.unlink(missing_ok=True)


def shard_size(n_items: int) -> int:
    """Files per shard: ~128 shards per collection, 16..512 files each (a function of the collection only,
    so an interrupted run and an uninterrupted one cut the same shards)."""
    return min(512, max(16, math.ceil(n_items / 128)))


def plan(keys: list[str], index: ShardIndex) -> list[list[int]]:
    """Item indices still to featurize, cut into shards (consecutive in item order)."""
    pending = [i for i, k in enumerate(keys) if k not in index.where]
    size = shard_size(len(keys))
    return [pending[i : i + size] for i in range(0, len(pending), size)]


def assemble(keys: list[str], index: ShardIndex, transient: dict[int, list[dict]]) -> tuple[Dataset, list[int]]:
    """Memory-mapped rows of every item, and their row numbers in item order (items without a shard:
    `transient` rows, e.g. a parser timeout, which are never cached)."""
    shard_ids = sorted({index.where[k][0] for k in keys if k in index.where})
    # one Dataset over the concatenated memory-mapped tables: a Dataset per shard costs a dill fingerprint and
    # a features deep copy each (~2 ms a shard, a tenth of the main process's CPU at 1,000 files)
    base, parts, offset = {}, [], 0
    for sid in shard_ids:
        part = ArrowReader.read_table(str(index.root / f"{sid}.arrow"), in_memory=False)
        base[sid], offset = offset, offset + len(part)
        parts.append(part)
    extra = [r for i in sorted(transient) for r in transient[i]]
    if extra or not parts:
        parts.append(InMemoryTable(pa.Table.from_batches(rows_to_table(extra).to_batches(), schema=SCHEMA)))
    table = Dataset(concat_tables(parts) if len(parts) > 1 else parts[0])
    order, extra_at = [], offset
    for i, k in enumerate(keys):
        if i in transient:
            order += range(extra_at, extra_at + len(transient[i]))
            extra_at += len(transient[i])
        else:
            sid, start, n = index.where[k]
            order += range(base[sid] + start, base[sid] + start + n)
    return table, order
