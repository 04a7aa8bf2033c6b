"""Content hashes: file checksums in checkpoint meta.json and the data-cache key."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_sha256(root: Path, known: dict[str, str] | None = None, workers: int = 8) -> dict[str, str]:
    """{relative path: sha256} of every file under root; files in `known` (hashed while they were
    written) are not read again, the others are hashed in parallel threads (hashlib releases the GIL)."""
    known = dict(known or {})
    todo = [p for p in sorted(Path(root).rglob("*")) if p.is_file() and str(p.relative_to(root)) not in known]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        digests = list(pool.map(file_sha256, todo))
    known.update({str(p.relative_to(root)): d for p, d in zip(todo, digests)})
    return dict(sorted(known.items()))
