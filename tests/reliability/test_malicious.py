"""Malicious checkpoints: pickles whose unpickling would run code are refused everywhere we load files.

Each payload would `touch` a marker file; the checksum in meta.json is made valid, so only weights_only
loading stands between the file and code execution. The marker must never appear.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tamper import rechecksum, write_payload


def test_the_payload_is_live(tmp_path):
    """Guard against a test that cannot fail: unsafe loading of these files does run the code."""
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "x.bin", marker, "rng")
    torch.load(tmp_path / "x.bin", weights_only=False)
    assert marker.exists()


def test_load_weights_safely_refuses_pickled_code(tmp_path):
    from diffold.checkpoint import CheckpointError, load_weights_safely

    marker = tmp_path / "pwned"
    write_payload(tmp_path / "w.pt", marker, "weights")
    shutil.copy(tmp_path / "w.pt", tmp_path / "w.safetensors")  # a pickle under a safetensors name
    for name in ("w.pt", "w.safetensors"):
        with pytest.raises(CheckpointError, match="refused to load|not a valid safetensors") as info:
            load_weights_safely(tmp_path / name)
        assert "\n" not in str(info.value)
    assert not marker.exists()


def test_feature_files_with_code_are_reported_not_run(tmp_path):
    from diffold.data import _feature_problem

    marker = tmp_path / "pwned"
    write_payload(tmp_path / "c0_A.pt", marker, "weights")
    assert _feature_problem(tmp_path, "c0_A", 30).startswith("bad feature file: ")
    assert not marker.exists()


# which file gets the payload, and how it is wrapped
TARGETS = [("optimizer.bin", "optimizer"), ("scheduler.bin", "scheduler"), ("random_states_0.pkl", "rng"),
           ("model.safetensors", "weights"), ("ema.safetensors", "weights")]


@pytest.mark.parametrize("target,wrap", TARGETS, ids=[t for t, _ in TARGETS])
def test_checkpoint_load_refuses_pickled_code(reference, loader, tmp_path, target, wrap):
    from diffold.checkpoint import CheckpointError, CheckpointManager, verify

    acc, ema = loader
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints", symlinks=True)
    ckpt = run / "checkpoints" / "step_000000012"
    mgr = CheckpointManager(run, acc)
    state, _ = mgr.load(ckpt, ema)  # the untouched checkpoint loads: the refusal below is about the payload
    assert state.global_step == 12
    marker = tmp_path / "pwned"
    write_payload(ckpt / target, marker, wrap)
    rechecksum(ckpt)
    assert verify(ckpt) == (True, "ok")  # checksums cannot help: only weights_only loading protects
    with pytest.raises(CheckpointError) as info:
        mgr.load(ckpt, ema)
    msg = str(info.value)
    assert "\n" not in msg and "refused to load" in msg and str(ckpt) in msg
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_with_pickled_rng_state(runs, reference, tmp_path):
    """Accelerate skips an RNG file it cannot unpickle with an INFO line; our loader makes it a hard error."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    ckpt = run / "checkpoints" / "step_000000012"
    marker = tmp_path / "pwned"
    write_payload(ckpt / "random_states_0.pkl", marker, "rng")
    rechecksum(ckpt)
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", str(ckpt)])
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {ckpt}: refused to load random_states_0.pkl")
    assert "Traceback" not in r.stderr and not marker.exists()


def predict(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffold.predict", *args], cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.reliability_full
@pytest.mark.parametrize("target", ["optimizer.bin", "scheduler.bin", "model.safetensors"])
def test_resume_refuses_other_pickled_files(runs, reference, tmp_path, target):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    ckpt = run / "checkpoints" / "step_000000012"
    marker = tmp_path / "pwned"
    write_payload(ckpt / target, marker, dict(TARGETS)[target])
    rechecksum(ckpt)
    # an explicit resume of it is refused with one error line, nothing executed
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", str(ckpt)])
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {ckpt}: refused to load")
    assert "Traceback" not in r.stderr and not marker.exists()
    # --resume auto skips it with one warning and resumes from another valid checkpoint (README), nothing executed
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping checkpoint {ckpt}: checkpoint {ckpt}: refused to load" in r.stderr
    assert "resumed from" in r.stderr and f"resumed from {ckpt} " not in r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.mark.slow
@pytest.mark.reliability_full
def test_predict_refuses_pickled_weights(reference, helpers, tmp_path):
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">q\nACGUACGUACGUAC\n")
    marker = tmp_path / "pwned"
    bundle = tmp_path / "bundle"
    shutil.copytree(reference / "export", bundle)
    write_payload(bundle / "model.safetensors", marker, "weights")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference / "checkpoints" / "step_000000012", ckpt)
    write_payload(ckpt / "ema.safetensors", marker, "weights")
    rechecksum(ckpt)
    for source in (bundle, ckpt):
        r = predict(["--checkpoint", str(source), "--input", str(fasta), "--out", str(tmp_path / "out")], helpers.ENV)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "not a valid safetensors" in r.stderr
        assert "Traceback" not in r.stderr and not marker.exists()
    r = predict(["--checkpoint", str(reference / "export"), "--input", str(fasta), "--out", str(tmp_path / "ok"),
                 "--steps", "2"], helpers.ENV)
    assert r.returncode == 0, r.stderr[-2000:]  # the same command on the real bundle works
