"""Checkpoints: atomic (tmp dir + rename), self-describing (meta.json with checksums and a health
mark), safe to load, and chosen with care: `--resume auto` and rollbacks take the newest VALID and
HEALTHY checkpoint and fall back past any that cannot be loaded, each skipped with one warning.

Layout: checkpoints/step_000000120/, epoch_3/, best/ (+ best/export/), and a `latest` symlink.
Names are never parsed: step/epoch come from meta.json (diffold/checkpoint_check.py).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from diffold.atomic import (  # noqa: F401 (write_json_atomic re-exported)
    WRITE_ERRORS,
    CheckpointWriteError,
    fsync_dir,
    write_failure,
    write_json_atomic,
)
from diffold.checkpoint_check import (  # noqa: F401 (META, read_meta, verify: re-exported)
    EMA_FILE,
    META,
    STATE,
    CheckpointError,
    health_of,
    read_meta,
    shape_problem,
    verify,
)
from diffold.hashing import bytes_sha256, tree_sha256
from diffold.loss_level import ONSET_MARGIN
from diffold.recovery import sync_flag
from diffold.state import TrainState

log = logging.getLogger(__name__)


class CheckpointManager:
    """Save/rotate/resolve checkpoints for one run. All ranks call save(); files are written by main."""

    def __init__(self, run_dir: Path, accelerator, keep_last_n: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.acc = accelerator
        self.keep_last_n = keep_last_n
        self.before_commit = lambda: None  # test hook (fault injection): runs before meta.json is written
        self._warned: set[str] = set()     # invalid checkpoints already reported (one warning each)

    def _ensure_dir(self) -> None:
        """checkpoints/ is created by the first save, so a failed start leaves no empty directory."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a directory should be, a read-only mount, permissions
            raise CheckpointError(f"cannot create {self.dir} ({e.strerror or e}): choose a writable --output_dir") from None

    # ------------------------------------------------------------------ save
    def save(self, name: str, state: TrainState, ema, meta: dict, healthy: tuple[bool, str] = (True, "ok")) -> Path:
        """Write checkpoints/<name>/ atomically with its health mark; returns its path. Collective: call on every rank.

        A failed write (disk full, I/O error) on any rank removes the partial tmp dir and raises
        CheckpointWriteError on every rank (after the same collectives); older checkpoints are untouched.
        """
        acc = self.acc
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        acc.wait_for_everyone()
        error: BaseException | None = None
        if acc.is_main_process:
            try:
                self._ensure_dir()
                if tmp.exists():
                    shutil.rmtree(tmp)
            except (CheckpointError, OSError) as e:
                error = e
        if not sync_flag(acc, error is not None):
            try:
                acc.save_state(str(tmp), safe_serialization=True)  # model, optimizer, scheduler, scaler, RNG per rank
            except WRITE_ERRORS as e:  # every rank still takes the collectives below
                error = e
        failed = sync_flag(acc, error is not None)
        acc.wait_for_everyone()  # every rank's RNG file is in tmp before main checksums and renames
        if acc.is_main_process and not failed:
            try:
                known = {EMA_FILE: write_hashed(tmp / EMA_FILE, safetensors_bytes(ema.state_dict())),
                         STATE: write_hashed(tmp / STATE, json.dumps(state.to_dict(), indent=1, default=float).encode())}
                self.before_commit()
                files = tree_sha256(tmp, known)  # Accelerate's files: read back once, in parallel threads
                meta = {**meta, "name": name, "timestamp": time.time(), "files": files,
                        "health": {"healthy": bool(healthy[0]), "reason": healthy[1]}}
                write_json_atomic(tmp / META, meta)  # written last: its presence makes the checkpoint valid
                old = self.dir / f"{name}.old"
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
                fsync_dir(self.dir)
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

    def abandon(self, after_step: int, until_step: int, reason: str) -> list[str]:
        """Mark the checkpoints written after_step < step <= until_step unhealthy (a rollback discarded the branch
        they hold): never again a rollback or --resume auto target. meta.json is rewritten atomically; it is not
        part of the checksums. Main process only; returns the names marked."""
        marked = []
        for meta, path in self._step_metas():
            if after_step < meta["step"] <= until_step and health_of(meta)[0]:
                if self.acc.is_main_process:
                    write_json_atomic(path / META, {**meta, "health": {"healthy": False, "reason": reason}})
                marked.append(path.name)
        return marked

    def _step_metas(self) -> list[tuple[dict, Path]]:
        """(meta, path) of the step checkpoints with a readable meta.json, oldest first (no checksum check)."""
        found = [(m, p) for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old"))
                 and (m := read_meta(p)) is not None and isinstance(m.get("step"), int)]
        return sorted(found, key=lambda mp: (mp[0]["step"], mp[0].get("timestamp", 0)))

    def _rotate(self) -> None:
        """Keep the newest keep_last_n step checkpoints and the rollback targets: every HEALTHY one from the last
        ONSET_MARGIN steps (a divergence can begin up to that many steps before the loss shows it, so these
        become targets as the run moves on) plus the newest healthy one before them, else the oldest healthy one."""
        steps = self._step_metas()
        healthy = [(m["step"], p) for m, p in steps if health_of(m)[0]]
        keep = {p for _, p in steps[len(steps) - max(self.keep_last_n, 1):]}
        if healthy:
            newest = steps[-1][0]["step"]
            keep |= {p for step, p in healthy if step > newest - ONSET_MARGIN}
            keep.add(before_onset(healthy, newest)[0])  # what Run.rollback would pick now
        for _, path in steps:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ resolve
    def candidates(self, healthy_only: bool = False) -> list[tuple[dict, Path]]:
        """Valid checkpoints, newest first (by step, then time). Invalid ones are skipped with one warning each."""
        found = []
        if not self.dir.is_dir():
            return found
        for p in sorted(self.dir.iterdir()):
            if not p.is_dir() or p.is_symlink() or p.name.endswith((".old", ".tmp")):
                continue
            ok, reason = verify(p)
            if not ok:
                if str(p) not in self._warned:
                    self._warned.add(str(p))
                    log.warning("ignoring checkpoint %s: %s", p, reason)
                continue
            meta = read_meta(p)
            if healthy_only and not health_of(meta)[0]:
                continue
            found.append((meta, p))
        return sorted(found, key=lambda mp: (mp[0]["step"], mp[0].get("timestamp", 0)), reverse=True)

    def resolve(self, spec: Optional[str]) -> Optional[Path]:
        """--resume auto|latest|best|PATH -> checkpoint dir (None = fresh start for auto).

        auto: the newest healthy valid checkpoint, else the newest valid one (with a warning)."""
        if not spec or spec == "none":
            return None
        if spec == "auto":
            order = self.auto_order()
            return order[0] if order else None
        path = self.explicit(spec)
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"--resume {spec}: {path} is not usable ({reason}); use --resume auto to take "
                                  "the newest valid checkpoint")
        return path

    def auto_order(self) -> list[Path]:
        """What --resume auto tries, in order: healthy checkpoints newest first, then unhealthy ones."""
        every = self.candidates()
        return [p for m, p in every if health_of(m)[0]] + [p for m, p in every if not health_of(m)[0]]

    def explicit(self, spec: str) -> Path:
        """The directory an explicit --resume latest|best|PATH names; CheckpointError if there is none."""
        link = self.dir / "latest"
        if spec == "latest" and not link.is_symlink() and not link.exists():
            raise CheckpointError(f"--resume latest: no checkpoint at {link}; use --resume auto to pick the newest "
                                  "valid one (or start fresh)")
        try:
            path = link.resolve(strict=True) if spec == "latest" else self.dir / "best" if spec == "best" else Path(spec)
            is_dir = path.is_dir()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            raise CheckpointError(f"--resume {spec}: {self.dir / 'latest'} cannot be followed "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:100]}); use --resume auto") from None
        if not is_dir:
            raise CheckpointError(f"--resume {spec}: no checkpoint at {path}; use --resume auto to pick the newest valid one")
        return path

    # ------------------------------------------------------------------ load
    def load(self, path: Path, ema) -> tuple[TrainState, dict]:
        """Restore model/optimizer/scheduler/scaler/RNG (Accelerate) + EMA + TrainState. Collective.

        Everything that can be checked without touching the live model is checked first (checksums,
        tensor names and shapes, the train state's types), so a mismatching checkpoint changes nothing.
        """
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
        meta = read_meta(path)
        expected = {k: tuple(v.shape) for k, v in ema.module.state_dict().items()}
        problem = shape_problem(path, expected)
        if problem.startswith("refused"):
            raise CheckpointError(f"checkpoint {path}: {problem}: resume from another one")
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}; resume it with its own config "
                                  f"(--config {path.parent.parent / 'config.yaml'}) or start a new --output_dir")
        try:
            state = TrainState.from_dict(json.loads((path / STATE).read_text(encoding="utf-8")))
        except (ValueError, TypeError, RecursionError) as e:
            raise CheckpointError(f"checkpoint {path}: {STATE} is not a valid training state ({_first_line(e)})") from None
        _check_rng_files(path)
        try:  # pickled files are read with weights_only=True (Accelerate's default): code in them is refused
            self.acc.load_state(str(path))
            ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(next(ema.module.parameters()).device)))
        except (pickle.UnpicklingError, SafetensorError) as e:
            raise CheckpointError(f"checkpoint {path}: refused to load ({type(e).__name__}: {_first_line(e)}); "
                                  "it holds more than plain tensors/state (unsafe pickle?): resume from another one") from None
        except (RuntimeError, ValueError, KeyError, IndexError, EOFError, OSError) as e:
            raise CheckpointError(f"checkpoint {path}: does not fit this model/optimizer ({type(e).__name__}: "
                                  f"{_first_line(e)}); resume with its own config or start a new --output_dir") from None
        return state, meta

    def load_first(self, paths: list[Path], ema, strict: bool,
                   accept: Callable[[TrainState], None] = lambda s: None) -> tuple[Path, TrainState, dict] | None:
        """Load the first of `paths` that works on every rank; with strict=False the others are skipped
        with one warning each (ranks agree on every skip: one flag per candidate). `accept` may raise
        CheckpointError to refuse a loaded state (e.g. garbage health state)."""
        for path in paths:
            try:
                state, meta = self.load(path, ema)
                accept(state)
                error = None
            except CheckpointError as e:
                error = e
            if not sync_flag(self.acc, error is not None):
                return path, state, meta
            if strict:
                raise error or CheckpointError(f"checkpoint {path} failed to load on another process")
            log.warning("skipping checkpoint %s: %s", path, error or "failed to load on another process")
        return None

def before_onset(healthy: list[tuple[int, Path]], now: int) -> list[Path]:
    """Rollback targets, best first, for a loss-based divergence decided at step `now`: the healthy checkpoints
    (step, path) at least ONSET_MARGIN steps old, newest first, else the oldest healthy one."""
    ordered = sorted(healthy, key=lambda sp: sp[0], reverse=True)
    return [p for step, p in ordered if step <= now - ONSET_MARGIN] or [p for _, p in ordered[-1:]]


def write_hashed(path: Path, data: bytes) -> str:
    """Write bytes (fsynced) and return their sha256, computed from memory: no read-back."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return bytes_sha256(data)


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
