"""Corrupted checkpoint files are caught by their checksums: auto resume warns and uses the previous valid one,
an explicit `--resume PATH` to a corrupted one is a one-line error (exit 2)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest


def truncate(f: Path, rng) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(rng.integers(0, len(data)))])


def flip(f: Path, rng, n: int = 4) -> None:
    data = bytearray(f.read_bytes())
    for pos in rng.integers(0, len(data), n):
        data[pos] ^= 0xFF
    f.write_bytes(bytes(data))


def append(f: Path, rng) -> None:
    f.write_bytes(f.read_bytes() + b"\0" * 16)


# (file, damage, words of the reason verify() gives)
DAMAGE = [
    ("model.safetensors", truncate, "checksum mismatch in model.safetensors"),
    ("model.safetensors", flip, "checksum mismatch in model.safetensors"),
    ("optimizer.bin", flip, "checksum mismatch in optimizer.bin"),
    ("optimizer.bin", truncate, "checksum mismatch in optimizer.bin"),
    ("ema.safetensors", append, "checksum mismatch in ema.safetensors"),
    ("scheduler.bin", flip, "checksum mismatch in scheduler.bin"),
    ("random_states_0.pkl", truncate, "checksum mismatch in random_states_0.pkl"),
    ("train_state.json", lambda f, rng: f.unlink(), "missing file train_state.json"),
    ("meta.json", truncate, "no readable meta.json"),
    ("meta.json", lambda f, rng: f.write_bytes(b"\xff\xfe garbage"), "no readable meta.json"),
]


@pytest.mark.parametrize("name,damage,reason", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGE])
def test_damage_is_detected_and_the_checkpoint_skipped(reference, helpers, tmp_path, caplog, name, damage, reason):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints", symlinks=True)
    newest = helpers.auto_pick(run)
    damage(newest / name, np.random.default_rng(len(name)))
    from diffold.checkpoint import verify

    ok, why = verify(newest)
    assert not ok and reason in why
    with caplog.at_level(logging.WARNING, logger="diffold.checkpoint"):
        pick = helpers.auto_pick(run)
    assert pick is not None and pick != newest and verify(pick)[0]
    assert f"ignoring checkpoint {newest}: {why}" in caplog.text


@pytest.mark.slow
def test_resume_auto_skips_corrupted_checkpoints_and_matches_the_reference(runs, reference, helpers, tmp_path):
    """Newest checkpoint truncated (and `best`, if at least as new, byte-flipped): the run warns, resumes
    from step 10, retrains steps 11-12 and ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    ckpts = run / "checkpoints"
    rng = np.random.default_rng(0)
    truncate(ckpts / "step_000000012" / "model.safetensors", rng)
    damaged = [ckpts / "step_000000012"]
    if json.loads((ckpts / "best" / "meta.json").read_text())["step"] > 10:
        flip(ckpts / "best" / "optimizer.bin", rng)
        damaged.append(ckpts / "best")
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    for d in damaged:
        assert f"ignoring checkpoint {d}: checksum mismatch" in r.stderr
    assert f"resumed from {ckpts / 'step_000000010'} (step 10" in r.stderr
    helpers.assert_bit_identical(reference, run)

    bad = tmp_path / "bad_copy"  # an explicit path to a corrupted checkpoint: one line, exit 2
    shutil.copytree(ckpts / "step_000000012", bad)
    flip(bad / "optimizer.bin", rng)
    r = runs.run([*runs.args(), "--output_dir", str(tmp_path / "other"), "--resume", str(bad)])
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume {bad}: ") and "checksum mismatch in optimizer.bin" in last
    assert "use --resume auto" in last and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.reliability_full
def test_every_checkpoint_corrupted_starts_fresh_with_warnings(runs, reference, helpers, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    dirs = [d for d in (run / "checkpoints").iterdir() if d.is_dir() and not d.is_symlink()]
    for i, d in enumerate(dirs):
        flip(d / "model.safetensors", np.random.default_rng(i))
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("ignoring checkpoint") >= len(dirs) and "resumed from" not in r.stderr
    helpers.assert_bit_identical(reference, run)  # a fresh start is the reference run again


@pytest.mark.slow
@pytest.mark.reliability_full
@pytest.mark.parametrize("spec", ["latest", "best"])
def test_resume_latest_or_best_when_corrupted_is_one_line_error(runs, reference, tmp_path, spec):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    target = (run / "checkpoints" / spec).resolve()
    truncate(target / "ema.safetensors", np.random.default_rng(1))
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", spec])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --resume {spec}: ")
    assert "checksum mismatch in ema.safetensors" in r.stderr
