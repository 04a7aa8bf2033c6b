"""Pre-emption with REAL signals: SIGTERM / SIGUSR1 (what SLURM sends before a kill) and SIGINT (Ctrl-C).

The run finishes the step it is in, writes a checkpoint at that step, logs the resume command and
exits with 75 on every rank together; `--resume auto` then continues bit-identically to a run that
was never interrupted. A second, different signal exits at once. Signals during start-up stop it
with one line, never a traceback.

The steps are slowed down with the `slow` fault (a sleep, no arithmetic) so the signal lands mid-run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import ENV, ROOT, assert_bit_identical, write_helices

pytestmark = pytest.mark.slow
SLOW = "health.inject_faults=slow@2-40"  # 0.5 s per step from the 3rd on: time to send a signal mid-run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_helices(tmp_path_factory.mktemp("sig_data")), tmp_path_factory.mktemp("sig_cache")


def argv(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    train, cache = data
    return ["--config", str(ROOT / "configs/smoke.yaml"), "--output_dir", str(out), f"data.train_path={train}",
            "data.val_path=null", "data.val_fraction=0.15", f"data.cache_dir={cache}", "data.max_length=32",
            "training.batch_size=2", "training.num_epochs=2", "training.log_every=1",
            "checkpoint.save_every_steps=5", "validation.num_samples=1", "validation.sampling_steps=3",
            "distributed.timeout_s=60", "logging.log_with=[]", *extra]


def command(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, str(ROOT / "train_full.py")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
            str(ROOT / "accelerate_configs/cpu_ddp.yaml"), "--num_processes", str(procs), str(ROOT / "train_full.py")]


def env(procs: int) -> dict:
    return {**ENV, "ACCELERATE_USE_CPU": "true"} if procs > 1 else ENV


def records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if rec.get("event") == kind:
            out.append(rec)
    return out


def start_and_signal(procs: int, args: list[str], run: Path, sigs: list[signal.Signals], at_step: int = 4):
    """Start a run, wait until it logged `at_step`, send the signals; returns (process, seconds to exit)."""
    p = subprocess.Popen([*command(procs), *args], cwd=ROOT, env=env(procs), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not any(r["step"] >= at_step for r in records(run, "train")):
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline, "run never reached the step"
        time.sleep(0.1)
    t0 = time.time()
    for s in sigs:
        p.send_signal(s)
    out, _ = p.communicate(timeout=120)
    p.log = out
    return p, time.time() - t0


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs (1 and 2 processes) to compare the resumed ones with."""
    runs = {}
    for procs in (1, 2):
        out = tmp_path_factory.mktemp(f"ref{procs}") / "run"
        r = subprocess.run([*command(procs), *argv(data, out)], cwd=ROOT, env=env(procs), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[procs] = out
    return runs


@pytest.mark.parametrize("procs,sig", [(1, signal.SIGTERM), (1, signal.SIGUSR1), (1, signal.SIGINT),
                                       (2, signal.SIGTERM)])
def test_signal_checkpoints_and_resume_is_bit_identical(data, reference, tmp_path, procs, sig):
    run = tmp_path / "run"
    p, took = start_and_signal(procs, argv(data, run, SLOW), run, [sig])
    assert "Traceback" not in p.log, p.log[-3000:]
    (end,) = records(run, "end")
    assert end["status"] == "interrupted" and end["exit_code"] == 75 and sig.name in end["reason"], end
    if procs == 1:
        assert p.returncode == 75
    assert took < 30, f"took {took:.1f} s to stop"
    latest = (run / "checkpoints" / "latest").resolve()
    assert json.loads((latest / "meta.json").read_text())["step"] == end["step"]  # a checkpoint AT the signal
    assert "--resume auto" in p.log and "interrupted" in p.log
    heartbeat = json.loads((run / "heartbeat.json").read_text())
    assert heartbeat["status"] == "interrupted"  # the monitor does not report a crash
    r = subprocess.run([*command(procs), *argv(data, run, "health.inject_faults="), "--resume", "auto"], cwd=ROOT,
                       env=env(procs), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_bit_identical(reference[procs], run)


def test_a_second_different_signal_exits_at_once(data, tmp_path):
    run = tmp_path / "run"
    p, took = start_and_signal(1, argv(data, run, "health.inject_faults=slow@2-40"), run,
                               [signal.SIGTERM, signal.SIGUSR1])
    # CPython runs pending handlers in signal-number order: either one may count as the second
    assert p.returncode in (128 + signal.SIGUSR1, 128 + signal.SIGTERM) and took < 10, p.log[-2000:]
    assert "exiting at once" in p.log and "Traceback" not in p.log
    assert not records(run, "end")  # no checkpoint, no end event: like a kill; the last checkpoint is valid


def test_ctrl_c_during_start_up_is_one_line(data, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([*command(1), *argv(data, run)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    time.sleep(3.0)  # importing torch / reading the config / building the data
    os.kill(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert p.returncode in (75, 130, 0), out[-2000:]  # 0: it was already done (a very fast machine)
