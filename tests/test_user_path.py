"""The user's path through the real CLIs: every decision the suite takes is said once (log and start
event), a start that fails leaves its trace (report, log line, end event) and nothing half-made, and
a resume request that cannot be honoured fails before any data is read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import ENV, ROOT, write_helices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_helices(tmp_path_factory.mktemp("up_data")), tmp_path_factory.mktemp("up_cache")


def argv(data, out: Path, *extra: str) -> list[str]:
    train, cache = data
    return ["--config", str(ROOT / "configs/smoke.yaml"), "--output_dir", str(out), f"data.train_path={train}",
            "data.val_path=null", f"data.cache_dir={cache}", "data.max_length=32", "training.batch_size=2",
            "training.max_steps=2", "validation.num_samples=1", "validation.sampling_steps=2", "logging.log_with=[]",
            *extra]


def run(args: list[str], env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = launcher or [sys.executable, str(ROOT / "train_full.py")]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300)


def events(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


def test_resume_auto_without_checkpoint_says_it_starts_fresh(data, tmp_path):
    out = tmp_path / "typo_in_output_dir"
    r = run([*argv(data, out), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    said = f"--resume auto: no checkpoint in {out / 'checkpoints'}: starting fresh"
    assert r.stderr.count(said) == 1
    (start,) = events(out, "start")
    assert said in start["decisions"]


def test_fp16_on_cpu_and_thread_choice_are_said(data, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = run(argv(data, out, "training.mixed_precision=fp16"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (start,) = events(out, "start")
    assert start["precision"] == "fp32" and start["device"] == "cpu"
    assert any("fp16 is not available on cpu: training in fp32" in d for d in start["decisions"])
    threads = [d for d in start["decisions"] if "torch thread(s) per process" in d]
    assert len(threads) == 1 and f"{start['threads']} torch thread(s)" in threads[0] and "load" in threads[0]
    assert f"cpu, fp32, 1 process(es) x {start['threads']} thread(s)" in r.stderr  # the start line


def test_gpu_accelerate_config_on_a_cpu_machine_is_a_warning(data, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_configs/single_gpu.yaml"), str(ROOT / "train_full.py")]
    r = run(argv(data, out), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    (start,) = events(out, "start")
    assert any("no GPU is available: training on the CPU" in d for d in start["decisions"]), start["decisions"]
    assert any("accelerate config asks mixed_precision=bf16, diffold's training.mixed_precision=no wins" in d
               for d in start["decisions"])


@pytest.mark.parametrize("inputs,words", [("empty", "no structure files found"),
                                          ("proteins_only", "no usable rna chain")])
def test_failed_start_leaves_report_log_and_end_event(tmp_path, inputs, words):
    data = tmp_path / inputs
    data.mkdir()
    if inputs == "proteins_only":  # real files, none usable for the RNA task
        for f in sorted((ROOT / "data/examples/protein").iterdir())[:2]:
            (data / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    r = run(["--config", str(ROOT / "configs/smoke.yaml"), "--output_dir", str(out), f"data.train_path={data}",
             "data.val_path=null", f"data.cache_dir={tmp_path / 'cache'}", "logging.log_with=[]"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last, last
    report = json.loads((out / "data_report.json").read_text())  # written, whatever the line points at
    assert report["train"]["chains_used"] == 0
    (end,) = events(out, "end")
    assert end["status"] == "failed" and end["exit_code"] == 2 and words in end["reason"]
    assert json.loads((out / "heartbeat.json").read_text())["status"] == "failed"
    log = next((out / "logs").glob("training_*.log")).read_text()
    assert "run did not start (failed)" in log
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("spec", ["latest", "best", "/nonexistent/step_000000001"])
def test_explicit_resume_with_nothing_to_resume_fails_before_reading_data(data, tmp_path, spec):
    out = tmp_path / "run"
    t0 = time.time()
    r = run([*argv(data, out), "--resume", spec])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "featurizing" not in r.stderr and "data:" not in r.stderr  # no data was read
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --resume {spec}: no checkpoint at")
    assert time.time() - t0 < 60


def test_metrics_cli_names_a_molecule_mismatch(tmp_path):
    rna = ROOT / "data/examples/rna"
    protein = ROOT / "data/examples/protein"
    a = sorted(rna.iterdir())[0]
    b = sorted(protein.iterdir())[0]
    r = subprocess.run([sys.executable, "-m", "diffold.metrics", str(a), str(b)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is rna but" in r.stderr and "is protein" in r.stderr and "same molecule" in r.stderr


def test_no_thread_oversubscription_by_default():
    """The thread rule itself: free cores (cores minus load) / local processes, at least 1."""
    from diffold.startup import Decisions, choose_threads

    env = dict(os.environ)
    os.environ.pop("OMP_NUM_THREADS", None)
    os.environ["LOCAL_WORLD_SIZE"] = "64"
    try:
        import torch

        before = torch.get_num_threads()
        assert choose_threads(Decisions()) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(before)
    finally:
        os.environ.clear()
        os.environ.update(env)
