"""File names derived from input (chain ids, chain names, manifest fields) stay inside their folder.

Every path a run writes whose name comes from user data goes through `safe_filename` (one path
component, no separators, no leading dot, bounded length) and, where it matters, `inside`.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

MAX_NAME = 96  # characters of the readable part; + '-' + 10 hex digits when changed or cut
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def safe_filename(name: str, suffix: str = "") -> str:
    """One path component for `name` (+ suffix): safe characters kept, anything else '_'.

    A name that had to be changed or shortened gets a short hash of the original, so two different
    ids never map to the same file ('a/b' and 'a_b' differ).
    """
    text = str(name)
    clean = _UNSAFE.sub("_", text).lstrip(".") or "_"
    if clean != text or len(clean) > MAX_NAME:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        clean = f"{clean[:MAX_NAME]}-{digest}"
    return clean + suffix


def inside(root: Path, path: Path) -> bool:
    """True if `path` (resolved) lies within `root` (resolved)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True
