"""Atomic file writes (tmp + rename, fsync) and the one-line message of a failed write."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from diffold.checkpoint_check import CheckpointError


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. disk full); the partial write is removed, older ones are intact."""


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # a full disk: OSError (json), RuntimeError (torch.save), safetensors


def write_failure(target: Path, err: BaseException | None) -> CheckpointWriteError:
    """One-line error for a failed write: says whether the disk is full and what to do."""
    detail = " ".join(str(err).split())[:200] if err is not None else "failed on another process"
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = None
    full = (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in detail
            or (free is not None and free < 64 * 1024**2))
    if full:
        return CheckpointWriteError(f"could not write {target}: disk full ({detail}); free space on {target.parent} "
                                    "or lower checkpoint.keep_last_n")
    return CheckpointWriteError(f"could not write {target} ({type(err).__name__}: {detail})")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, durable: bool = True) -> None:
    """tmp + rename: readers never see half a file. durable=False skips fsync (advisory files)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=float)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
