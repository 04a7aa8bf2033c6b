"""What makes a checkpoint usable: meta.json schema, required files and checksums, its health mark,
its fit to the model being trained, and what changed in the config since it was written.

Every problem is one line naming the file, key or tensor and what to do; nothing here raises
anything but CheckpointError (or returns a reason), whatever the checkpoint directory holds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from diffold.hashing import file_sha256

META = "meta.json"
STATE = "train_state.json"
EMA_FILE = "ema.safetensors"
REQUIRED = (EMA_FILE, STATE)  # + at least one model weights file (name depends on the Accelerate backend)
MAX_META_BYTES = 64 * 1024**2  # a meta.json is a few KB; anything this big is not one


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


def read_meta(path: Path) -> Optional[dict]:
    """meta.json as a dict, or None (missing, unreadable, not JSON, not a mapping)."""
    f = Path(path) / META
    try:
        if f.stat().st_size > MAX_META_BYTES:
            return None
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def meta_problem(meta: dict) -> str:
    """Why a parsed meta.json cannot describe a checkpoint ('' if it can)."""
    for key in ("step", "epoch"):
        if not _count(meta.get(key)):
            return f"meta.json key '{key}' must be a non-negative integer, got {meta.get(key)!r}"
    ts = meta.get("timestamp", 0.0)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return f"meta.json key 'timestamp' must be a number, got {ts!r}"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "meta.json key 'files' must list the checkpoint's files with their checksums"
    for rel, digest in files.items():
        if not isinstance(rel, str) or not isinstance(digest, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"meta.json 'files' entry {rel!r} is not a file inside the checkpoint"
    missing = [r for r in REQUIRED if r not in files]
    if not any(str(r).startswith(("model", "pytorch_model")) for r in files):
        missing.append("model weights")
    if missing:
        return f"meta.json lists no {', '.join(missing)}"
    health = meta.get("health", {})
    if not isinstance(health, dict) or not isinstance(health.get("healthy", True), bool):
        return "meta.json key 'health' must be {'healthy': true|false, 'reason': ...}"
    return ""


def verify(path: Path) -> tuple[bool, str]:
    """(valid, reason). Valid = meta.json well-formed and every listed file present with its checksum."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return False, "no readable meta.json (interrupted write?)"
    problem = meta_problem(meta)
    if problem:
        return False, problem
    for rel, digest in meta["files"].items():
        f = path / rel
        if not f.is_file():
            return False, f"missing file {rel}"
        try:
            if file_sha256(f) != digest:
                return False, f"checksum mismatch in {rel} (corrupted)"
        except OSError as e:
            return False, f"cannot read {rel} ({e.strerror or e})"
    return True, "ok"


def health_of(meta: dict) -> tuple[bool, str]:
    """(healthy, reason) from the checkpoint's health mark; checkpoints of earlier versions have none: healthy."""
    mark = meta.get("health") or {}
    return bool(mark.get("healthy", True)), str(mark.get("reason", "ok"))


def shape_problem(path: Path, expected: dict[str, tuple[int, ...]]) -> str:
    """'' if the checkpoint's EMA weights have exactly the expected names and shapes, else one line."""
    from safetensors import SafetensorError, safe_open

    f = Path(path) / EMA_FILE
    try:
        with safe_open(str(f), framework="pt") as st:
            found = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        return (f"refused to load {f.name}: not a valid safetensors file ({' '.join(str(e).split())[:120]}); "
                "it may hold pickled code")
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and found[k] != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        return (f"{f.name}: tensor {k} has shape {list(found[k])}, this model needs {list(expected[k])} "
                f"({len(wrong)} tensor(s) differ): the checkpoint is from another model size")
    if missing or extra:
        return (f"{f.name}: {len(missing)} tensor(s) missing (e.g. {missing[:1]}) and {len(extra)} unexpected "
                f"(e.g. {extra[:1]}): the checkpoint is from another model architecture")
    return ""


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted key: value}."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# changing these between checkpoint and resume is expected (the resume command, test hooks)
_VOLATILE = ("logging.", "health.inject_faults", "data.cache_dir")


def config_changes(old: Any, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs between a checkpoint's config and this run's."""
    if not isinstance(old, dict):
        return []
    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(_VOLATILE))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys]


def architecture_changes(old: Any, new: dict) -> list[str]:
    """The config changes that alter the network's tensors (model.* shapes, atoms, task)."""
    shape_keys = ("task", "data.atoms", "model.size", "model.d_model", "model.num_layers", "model.num_heads",
                  "model.d_pair", "model.ff_mult", "model.head", "model.feature_dim", "model.use_moe",
                  "model.num_experts", "model.max_relpos")
    return [c for c in config_changes(old, new) if c.split(":", 1)[0] in shape_keys]
