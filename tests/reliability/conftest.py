"""Shared machinery of the reliability suite: tiny real training runs, kill/resume helpers, state comparison.

Fast subset (CI, the default `pytest` run): tests without the `reliability_full` marker.
Full set: `pytest -m reliability_full tests/reliability` runs every test in this directory (the hook
below adds the marker to the fast ones too), e.g. before a release.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import ENV, ROOT, assert_bit_identical, final_state, write_helices

HERE = Path(__file__).resolve().parent
# Fixed BLAS threading: bit-identical CPU resume needs the same arithmetic in every run (README, "Exact resume").


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`-m reliability_full` selects the whole suite: fast tests are part of the full set too."""
    if "reliability_full" in (config.option.markexpr or "") and "not reliability_full" not in config.option.markexpr:
        for item in items:
            if HERE in Path(str(item.fspath)).parents:
                item.add_marker(pytest.mark.reliability_full)


# --------------------------------------------------------------------------- data and arguments
class Runs:
    """Launches train_full.py on the tiny helix data set; one instance per session (shared cache)."""

    def __init__(self, data: Path, cache: Path):
        self.data, self.cache = data, cache

    def args(self, *extra: str, epochs: int = 4) -> list[str]:
        """12 optimizer steps (4 epochs x 3; accumulation 2), validation each epoch, a checkpoint every 2 steps."""
        return ["--config", str(ROOT / "configs/smoke.yaml"), f"data.train_path={self.data}", "data.val_path=null",
                "data.val_fraction=0.15", f"data.cache_dir={self.cache}", "data.max_length=32",
                "training.batch_size=2", "training.gradient_accumulation_steps=2", f"training.num_epochs={epochs}",
                "training.log_every=1", "checkpoint.save_every_steps=2", "validation.num_samples=1",
                "validation.sampling_steps=3", "logging.log_with=[]", *extra]

    def run(self, args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "train_full.py"), *args], cwd=ROOT, env=env or ENV,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def popen(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:  # a file, not a pipe: a killed child must never block on a full pipe
            return subprocess.Popen([sys.executable, str(ROOT / "train_full.py"), *args], cwd=ROOT, env=ENV,
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("reliability")
    return Runs(write_helices(root / "helices"), root / "cache")


@pytest.fixture(scope="session")
def reference(runs, tmp_path_factory) -> Path:
    """The uninterrupted 12-step run every interrupted/corrupted/faulted run must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = runs.run([*runs.args(), "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# --------------------------------------------------------------------------- checkpoint inspection
def manager(run: Path):
    """A CheckpointManager for inspection only (no accelerator needed to resolve/verify)."""
    from diffold.checkpoint import CheckpointManager

    return CheckpointManager(run, SimpleNamespace(is_main_process=False))


def auto_pick(run: Path) -> Path | None:
    """What `--resume auto` would load."""
    return manager(run).resolve("auto")


def assert_every_valid_checkpoint_loads(run: Path) -> int:
    """Every checkpoint dir that verify() accepts (so `--resume auto` may pick it) really loads, weights_only.

    Returns how many valid checkpoints there are."""
    from accelerate.utils import load as accelerate_load

    from diffold.checkpoint import META, verify
    from diffold.state import TrainState

    ckpts, valid = run / "checkpoints", 0
    for d in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        if not d.is_dir() or d.is_symlink() or not verify(d)[0]:
            continue
        valid += 1
        meta = json.loads((d / META).read_text())
        for name in meta["files"]:
            f = d / name
            if name.endswith(".safetensors"):
                load_file(str(f))
            elif name.endswith((".bin", ".pkl")):
                accelerate_load(f, map_location="cpu")
        TrainState.from_dict(json.loads((d / "train_state.json").read_text()))
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "ema.safetensors", "train_state.json",
                "random_states_0.pkl"} <= set(meta["files"]), f"{d.name}: incomplete file list {sorted(meta['files'])}"
    return valid


def events(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    """Parsed JSON lines (a truncated last line from a kill is skipped)."""
    out = []
    path = run / name
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def heartbeat(run: Path) -> dict:
    try:
        return json.loads((run / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return {}


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.002) -> bool:
    """Poll cond() until true; False if the process ended (or timeout) first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)
    return False


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """Module-level helpers for the test files (tests do not import conftest directly)."""
    return SimpleNamespace(
        ROOT=ROOT, ENV=ENV, final_state=final_state, assert_bit_identical=assert_bit_identical, manager=manager,
        auto_pick=auto_pick, assert_every_valid_checkpoint_loads=assert_every_valid_checkpoint_loads,
        events=events, heartbeat=heartbeat, kill=kill, wait_for=wait_for, write_helices=write_helices)


@pytest.fixture(scope="module")
def loader(reference):
    """An in-process Accelerator with the reference run's model/optimizer/scheduler prepared, to call
    CheckpointManager.load exactly as train_full.py does (cheaper than a launch per payload)."""
    from accelerate import Accelerator

    from diffold.config import config_from_dict
    from diffold.ema import EMA
    from diffold.model import build_model
    from diffold.optim import build_optimizer, build_scheduler
    from diffold.tasks import get_task

    meta = json.loads((reference / "checkpoints" / "step_000000012" / "meta.json").read_text())
    cfg = config_from_dict(meta["config"])
    acc = Accelerator(step_scheduler_with_optimizer=False)
    model = build_model(cfg, num_atoms=len(get_task(cfg.task).resolve_atoms(cfg.data.atoms)))
    ema = EMA(model, cfg.training.ema_decay)
    optimizer = build_optimizer(model, cfg.training.optimizer)
    scheduler = build_scheduler(optimizer, cfg.training.scheduler, 12, cfg.training.optimizer.lr)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield acc, ema
    acc.free_memory()
    random.setstate(rng[0])  # load_state restored the checkpoint's RNG into this test process
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])
