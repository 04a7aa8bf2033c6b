"""Checkpoints: atomic (tmp dir + rename), self-describing (meta.json with checksums), safe to load.

A checkpoint directory is VALID only when its meta.json exists and every file it lists has the
recorded sha256. Layout: checkpoints/step_000000120/, epoch_3/, best/ (+ best/export/), and a
`latest` symlink. Names are never parsed: step/epoch come from meta.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from diffold.state import TrainState

log = logging.getLogger(__name__)
META = "meta.json"
STATE = "train_state.json"
EMA_FILE = "ema.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def read_meta(path: Path) -> Optional[dict]:
    try:
        return json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify(path: Path) -> tuple[bool, str]:
    """(valid, reason). Valid = meta.json present and every listed file matches its checksum."""
    meta = read_meta(path)
    if meta is None:
        return False, "no readable meta.json (interrupted write?)"
    for rel, digest in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return False, f"missing file {rel}"
        if sha256(f) != digest:
            return False, f"checksum mismatch in {rel} (corrupted)"
    return True, "ok"


class CheckpointManager:
    """Save/rotate/resolve checkpoints for one run. All ranks call save(); files are written by main."""

    def __init__(self, run_dir: Path, accelerator, keep_last_n: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.acc = accelerator
        self.keep_last_n = keep_last_n
        self.before_commit = lambda: None  # test hook (fault injection): runs before meta.json is written
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ save
    def save(self, name: str, state: TrainState, ema, meta: dict) -> Path:
        """Write checkpoints/<name>/ atomically; returns its path. Collective: call on every rank."""
        acc = self.acc
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # model, optimizer, scheduler, scaler, RNG per rank
        acc.wait_for_everyone()  # every rank's RNG file is in tmp before main checksums and renames
        if acc.is_main_process:
            save_file(ema.state_dict(), str(tmp / EMA_FILE))
            write_json_atomic(tmp / STATE, state.to_dict())
            self.before_commit()
            files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {**meta, "name": name, "timestamp": time.time(), "files": files}
            write_json_atomic(tmp / META, meta)  # written last: its presence makes the checkpoint valid
            old = self.dir / f"{name}.old"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(self.dir)
            if name.startswith("step_"):
                self._point_latest(name)
                self._rotate()
        acc.wait_for_everyone()
        return final

    def _point_latest(self, name: str) -> None:
        link, tmp = self.dir / "latest", self.dir / "latest.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)

    def _rotate(self) -> None:
        steps = sorted(
            (m["step"], p) for p in self.dir.glob("step_*") if p.is_dir() and (m := read_meta(p)) is not None
        )
        for _, path in steps[: max(0, len(steps) - self.keep_last_n)]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ resolve
    def candidates(self) -> list[tuple[dict, Path]]:
        """Valid checkpoints, newest first (by step, then time). Invalid ones are logged and skipped."""
        found = []
        if not self.dir.is_dir():
            return found
        for p in sorted(self.dir.iterdir()):
            if not p.is_dir() or p.is_symlink() or p.name.endswith((".old",)):
                continue
            ok, reason = verify(p)
            if not ok:
                log.warning("ignoring checkpoint %s: %s", p, reason)
                continue
            found.append((read_meta(p), p))
        return sorted(found, key=lambda mp: (mp[0]["step"], mp[0]["timestamp"]), reverse=True)

    def resolve(self, spec: Optional[str]) -> Optional[Path]:
        """--resume auto|latest|best|PATH -> checkpoint dir (None = fresh start for auto)."""
        if not spec or spec == "none":
            return None
        if spec == "auto":
            found = self.candidates()
            return found[0][1] if found else None
        path = (self.dir / "latest").resolve() if spec == "latest" else self.dir / "best" if spec == "best" else Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"--resume {spec}: no checkpoint at {path}; use --resume auto to pick the newest valid one")
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"--resume {spec}: {path} is not usable ({reason}); use --resume auto")
        return path

    # ------------------------------------------------------------------ load
    def load(self, path: Path, ema) -> tuple[TrainState, dict]:
        """Restore model/optimizer/scheduler/scaler/RNG (Accelerate) + EMA + TrainState. Collective."""
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
        meta = read_meta(path)
        self.acc.load_state(str(path))
        ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(next(ema.module.parameters()).device)))
        state = TrainState.from_dict(json.loads((path / STATE).read_text(encoding="utf-8")))
        return state, meta


def export_inference_bundle(ema, model_config: dict, task: str, out: Path, extra: dict | None = None) -> None:
    """safetensors weights + model config: what `python -m diffold.predict` loads."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(ema.state_dict(), str(tmp / "model.safetensors"))
    write_json_atomic(tmp / "config.json", {"task": task, **model_config, **(extra or {})})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def load_weights_safely(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch file with weights_only=True (refuses pickled code)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError variants for unsafe pickles
        raise CheckpointError(f"{path}: refused to load ({type(e).__name__}): not a plain weights file") from None
