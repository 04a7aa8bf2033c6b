"""Checkpoints: atomic (tmp dir + rename), self-describing (meta.json with checksums), safe to load.

A checkpoint directory is VALID only when its meta.json exists and every file it lists has the
recorded sha256. Layout: checkpoints/step_000000120/, epoch_3/, best/ (+ best/export/), and a
`latest` symlink. Names are never parsed: step/epoch come from meta.json.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffold.faults import sync_flag
from diffold.hashing import file_sha256
from diffold.state import TrainState

log = logging.getLogger(__name__)
META = "meta.json"
STATE = "train_state.json"
EMA_FILE = "ema.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


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
        if file_sha256(f) != digest:
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
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file where a directory should be, a read-only mount, permissions
                raise CheckpointError(f"cannot create {self.dir} ({e.strerror or e}): choose a writable --output_dir") from None

    # ------------------------------------------------------------------ save
    def save(self, name: str, state: TrainState, ema, meta: dict) -> Path:
        """Write checkpoints/<name>/ atomically; returns its path. Collective: call on every rank.

        A failed write (disk full, I/O error) on any rank removes the partial tmp dir and raises
        CheckpointWriteError on every rank (after the same collectives); older checkpoints are untouched.
        """
        acc = self.acc
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        error: BaseException | None = None
        try:
            acc.save_state(str(tmp), safe_serialization=True)  # model, optimizer, scheduler, scaler, RNG per rank
        except WRITE_ERRORS as e:  # every rank still takes the collectives below
            error = e
        failed = sync_flag(acc, error is not None)
        acc.wait_for_everyone()  # every rank's RNG file is in tmp before main checksums and renames
        if acc.is_main_process and not failed:
            try:
                save_file(ema.state_dict(), str(tmp / EMA_FILE))
                write_json_atomic(tmp / STATE, state.to_dict())
                self.before_commit()
                files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
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
            except WRITE_ERRORS as e:
                error = e
        if sync_flag(acc, error is not None):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # give back what the partial write took
            acc.wait_for_everyone()
            raise write_failure(final, error)
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
        _check_rng_files(path)
        try:  # pickled files are read with weights_only=True (Accelerate's default): code in them is refused
            self.acc.load_state(str(path))
            ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(next(ema.module.parameters()).device)))
        except (pickle.UnpicklingError, SafetensorError) as e:
            raise CheckpointError(f"checkpoint {path}: refused to load ({type(e).__name__}: {_first_line(e)}); "
                                  "it holds more than plain tensors/state (unsafe pickle?): resume from another one") from None
        state = TrainState.from_dict(json.loads((path / STATE).read_text(encoding="utf-8")))
        return state, meta


def _first_line(err: BaseException) -> str:
    """The informative line of an error; for torch's weights_only refusal, the line naming the blocked global."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    return next((ln for ln in lines if "GLOBAL" in ln), lines[0])[:200]


def _check_rng_files(path: Path) -> None:
    """Accelerate skips an RNG file it cannot unpickle with only an INFO line (the resume is then silently
    not exact, and an unsafe pickle goes unnoticed): load each one here first, weights_only."""
    from accelerate.utils import load as accelerate_load  # weights_only=True + Accelerate's numpy allow-list

    for f in sorted(path.glob("random_states_*.pkl")):
        try:
            accelerate_load(f, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(f"checkpoint {path}: refused to load {f.name} ({type(e).__name__}: {_first_line(e)}); "
                                  "it holds more than plain RNG state (unsafe pickle?): resume from another one") from None


def export_inference_bundle(ema, model_config: dict, task: str, out: Path, extra: dict | None = None) -> None:
    """safetensors weights + model config: what `python -m diffold.predict` loads."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(ema.state_dict(), str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "config.json", {"task": task, **model_config, **(extra or {})})
    except WRITE_ERRORS as e:  # e.g. disk full: the previous bundle stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(out, e) from None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def load_weights_safely(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch file with weights_only=True (refuses pickled code)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:  # e.g. a pickle renamed to .safetensors
            raise CheckpointError(f"{path}: not a valid safetensors file ({_first_line(e)}); re-export it") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError variants for unsafe pickles
        raise CheckpointError(f"{path}: refused to load ({type(e).__name__}): not a plain weights file") from None
