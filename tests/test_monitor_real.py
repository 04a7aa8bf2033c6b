"""monitor_training.py on run directories produced by the real train_full.py: finished with health
events, and killed mid-run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import ENV, ROOT, run_train, synth_data, tiny_args  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def monitor(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "monitor_training.py"), "--output_dir", str(run), *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):  # noqa: F811
    out, cache = tmp_path_factory.mktemp("mon"), tmp_path_factory.mktemp("moncache")
    args = tiny_args(synth_data, cache, "logging.log_with=[]")
    events = run_train([*args, "--output_dir", str(out / "events"), "health.inject_faults=grad_explode@5,nan_loss@8"])
    assert events.returncode == 0, events.stderr[-2000:]
    killed = run_train([*args, "--output_dir", str(out / "killed"), "health.inject_faults=kill@7"])
    assert killed.returncode == -9
    return out / "events", out / "killed"


def test_status_of_finished_run_with_health_events(runs):
    r = monitor(runs[0], "--mode", "status", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["state"] == "finished" and s["step"] == s["total_steps"] == 12
    assert {"val/loss", "val/rmsd", "val/tm", "val/gdt_ts", "val/lddt"} <= set(s["val"])
    assert s["best"]["checkpoint"]["name"] == "best"
    assert s["health"]["skipped_steps"] == 1
    checks = {e["check"] for e in s["health"]["latest"]}
    assert "nonfinite_loss" in checks and "grad_explosion" in checks
    assert all(e["suggestion"] for e in s["health"]["latest"])
    assert s["resume_command"].endswith("--resume auto")
    valid = {c["name"] for c in s["checkpoints"] if c["valid"]}
    assert {"latest", "best"} <= valid
    assert s["data"]["splits"]["train"]["chains_used"] >= 10


def test_status_of_killed_run_says_crashed_and_how_to_resume(runs):
    r = monitor(runs[1], "--mode", "status")
    assert r.returncode == 0, r.stderr
    assert "CRASHED" in r.stdout and "is gone" in r.stdout
    s = json.loads(monitor(runs[1], "--mode", "status", "--json").stdout)
    assert s["state"] == "crashed" and s["step"] < s["total_steps"]
    assert s["resume_command"].endswith(f"--output_dir {runs[1]} --resume auto")
    latest = next(c for c in s["checkpoints"] if c["name"] == "latest")
    assert latest["valid"] and latest["step"] == 6


def test_plot_of_real_run_is_a_png(runs, tmp_path):
    out = tmp_path / "curves.png"
    r = monitor(runs[0], "--mode", "plot", "--save_plot", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_status_of_a_real_failed_start_says_failed_with_the_reason(tmp_path):
    """No usable chain: train_full.py exits 2 at start-up; the monitor must say FAILED and why, not ALIVE/HEALTHY."""
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train_full.py"), "--config", str(ROOT / "configs/smoke.yaml"),
                        f"data.train_path={empty}", "data.val_path=null", f"data.cache_dir={tmp_path / 'cache'}",
                        "logging.log_with=[]", "--output_dir", str(run)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    s = json.loads(monitor(run, "--mode", "status", "--json").stdout)
    assert s["state"] == "failed" and "exit code 2" in s["state_reason"]
    assert s["health"]["status"] == "unknown"
    text = monitor(run, "--mode", "status").stdout
    assert "FAILED" in text and "ALIVE" not in text and "HEALTHY" not in text
