"""Helpers shared by the tests that launch real training runs: environment, tiny synthetic data,
and the bit-for-bit comparison of final training states."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# Fixed BLAS threading: MKL's dynamic threading changes reduction order under load, and bit-identical
# CPU resume needs the same arithmetic in every run (README, "Exact resume").
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


def write_helices(d: Path, n: int = 14, seed: int = 0) -> Path:
    """n small noisy helical RNA chains (fast to train on; exact-resume tests need speed, not realism)."""
    from diffold.structure import chain_from_coords, write_structure

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        L = int(rng.integers(14, 40))
        t = np.linspace(0, 3 * np.pi, L)
        xyz = np.stack([9 * np.cos(t), 9 * np.sin(t), 2.8 * t], -1)[:, None] + rng.normal(0, 0.3, (L, 1, 3))
        seq = "".join(rng.choice(list("ACGU"), L))
        write_structure(d / f"h{i}.pdb", [chain_from_coords(f"h{i}", "rna", seq, xyz.astype(np.float32), ("C4'",))])
    return d


def final_state(run: Path) -> dict:
    """Model, EMA and flattened optimizer state of the run's `latest` checkpoint."""
    ckpt = (run / "checkpoints" / "latest").resolve()
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return {"model": load_file(str(ckpt / "model.safetensors")), "ema": load_file(str(ckpt / "ema.safetensors")),
            "opt": {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}, "name": ckpt.name}


def assert_bit_identical(a: Path, b: Path) -> None:
    """Model, EMA and optimizer state of the newest step checkpoint are equal bit for bit."""
    sa, sb = final_state(a), final_state(b)
    assert sa["name"] == sb["name"]
    for part in ("model", "ema", "opt"):
        assert sa[part].keys() == sb[part].keys()
        diff = [k for k in sa[part] if not torch.equal(sa[part][k], sb[part][k])]
        assert not diff, f"{part} differs between {a.name} and {b.name}: {diff[:5]}"


@contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging: no input may make a reader or parser hang."""
    def boom(*_):
        raise TimeoutError(f"took more than {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
