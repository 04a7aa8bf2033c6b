"""Launch the real scripts on tiny configs: end to end, exact resume after SIGKILL, kill during a save."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import ENV, ROOT, assert_bit_identical, write_helices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    """14 small helical RNA chains (fast to train on; exact-resume tests need speed, not realism)."""
    return write_helices(tmp_path_factory.mktemp("synth"))


def tiny_args(data: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/smoke.yaml"), f"data.train_path={data}", "data.val_path=null",
            "data.val_fraction=0.15", f"data.cache_dir={cache}", "data.max_length=32", "training.batch_size=2",
            "training.num_epochs=2", "training.log_every=2", "checkpoint.save_every_steps=2",
            "validation.num_samples=1", "validation.sampling_steps=3", "logging.log_with=[tensorboard]", *extra]


def run_train(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_full.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_runs(synth_data, tmp_path_factory):
    """Uninterrupted runs to compare against: accumulation 1 and 2."""
    out, cache = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("cache")
    runs = {}
    for k in (1, 2):
        r = run_train([*tiny_args(synth_data, cache, f"training.gradient_accumulation_steps={k}"), "--output_dir", str(out / f"k{k}")])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[k] = out / f"k{k}"
    return runs, cache


@pytest.mark.parametrize("accum,kill", [(1, "kill@4"), (1, "kill@7"), (2, "kill@3"), (1, "kill_in_save@4")])
def test_sigkill_then_resume_auto_is_bit_identical(reference_runs, synth_data, tmp_path, accum, kill):
    runs, cache = reference_runs
    args = tiny_args(synth_data, cache, f"training.gradient_accumulation_steps={accum}")
    run = tmp_path / "run"
    r = run_train([*args, "--output_dir", str(run), f"health.inject_faults={kill}"])
    assert r.returncode == -9, f"expected SIGKILL, got {r.returncode}: {r.stderr[-2000:]}"
    if kill.startswith("kill_in_save"):
        assert (run / "checkpoints" / "step_000000004.tmp").is_dir()  # the interrupted write is left behind
        assert not (run / "checkpoints" / "step_000000004").exists()
    r = run_train([*args, "--output_dir", str(run), "--resume", "auto", "health.inject_faults="])
    assert r.returncode == 0, r.stderr[-3000:]
    if kill.startswith("kill_in_save"):
        assert "resumed from" in r.stderr and "step_000000002" in r.stderr
    assert_bit_identical(runs[accum], run)


def test_existing_run_dir_is_not_overwritten(reference_runs, synth_data):
    runs, cache = reference_runs
    r = run_train([*tiny_args(synth_data, cache), "--output_dir", str(runs[1])])
    assert r.returncode == 2
    assert "already holds checkpoints: pass --resume auto" in r.stderr


def test_run_directory_contents(reference_runs):
    run = reference_runs[0][1]
    for name in ("config.yaml", "metrics.jsonl", "heartbeat.json", "data_report.json", "checkpoints/latest",
                 "checkpoints/best/meta.json", "checkpoints/best/export/model.safetensors", "export/config.json"):
        assert (run / name).exists(), name
    assert list((run / "logs").glob("training_*.log"))
    assert list((run / "samples").rglob("*.pdb"))
    text = (run / "metrics.jsonl").read_text()
    for key in ('"event": "start"', '"event": "train"', '"event": "val"', '"event": "end"', "loss/diffusion",
                "grad_norm", "health/status", "loss_bin/", "val/lddt", "residues_per_s"):
        assert key in text, key


def test_seed_config_trains_end_to_end(tmp_path):
    r = run_train(["--config", "configs/test_train.yaml", "--output_dir", str(tmp_path / "seed"),
                   f"data.cache_dir={tmp_path / 'cache'}", "training.max_steps=3", "training.num_epochs=1",
                   "validation.num_samples=1", "validation.sampling_steps=2", "logging.log_with=[]"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "effective batch 4 = 4 x 1 accum x 1 proc" in r.stderr


def test_simple_train_checks_itself(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "simple_train.py"), "--output_dir", str(tmp_path / "smoke"),
                        f"data.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("[PASS]") == 3 and "simple_train: OK" in r.stdout


def test_predict_from_exported_bundle(reference_runs, synth_data, tmp_path):
    run = reference_runs[0][1]
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(">hairpin\nGGGAAACUUCGGUUUCCC\n>short\nACGUACGUAC\n")
    base = [sys.executable, "-m", "diffold.predict", "--steps", "3"]
    r = subprocess.run([*base, "--checkpoint", str(run / "checkpoints/best/export"), "--input", str(fasta),
                        "--num_samples", "2", "--out", str(tmp_path / "fa")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from diffold.structure import parse_structure

    chains, _ = parse_structure(tmp_path / "fa" / "hairpin_sample1.pdb")
    assert chains[0].sequence == "GGGAAACUUCGGUUUCCC" and len(list((tmp_path / "fa").glob("*.pdb"))) == 4
    # structures as input: metrics against the reference; a training checkpoint works too
    r = subprocess.run([*base, "--checkpoint", str((run / "checkpoints/latest").resolve()), "--input",
                        str(synth_data / "h0.pdb"), "--out", str(tmp_path / "st")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    scores = json.loads((tmp_path / "st" / "metrics.json").read_text())["h0_A_sample0"]
    assert set(scores) >= {"rmsd", "tm", "gdt_ts", "lddt"} and 0 <= scores["tm"] <= 1
    bad = subprocess.run([*base, "--checkpoint", str(tmp_path), "--input", str(fasta), "--out", str(tmp_path / "x")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither an export bundle" in bad.stderr
