"""Resource faults: unwritable output/cache directories, a full disk during checkpoint writes, W&B unavailable.

Policy for a failed checkpoint write (what a user wants at 3 a.m.): the run goes on. The partial write is
removed (space given back), older checkpoints stay valid, a critical health event (W&B alert) says
"disk full" and names the newest valid checkpoint, and the next save retries. Only if the FINAL save
fails does the run exit non-zero (3), with the resume command; nothing is ever half-written.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffold.checkpoint import verify
from diffold.data import DataError, build_datasets


def assert_one_line_error(r, *words: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for w in words:
        assert w in last, last


@pytest.mark.slow
def test_output_dir_below_a_regular_file_is_one_line_error(runs, tmp_path):
    """Tests run as root, which ignores permission bits: a regular file where a directory must be is the
    portable way to make a path unwritable."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = runs.run([*runs.args(), "--output_dir", str(blocker / "run")])
    assert_one_line_error(r, f"cannot write the run directory {blocker / 'run'}", "choose a writable --output_dir")
    assert blocker.read_text() == "not a directory"


def test_cache_dir_below_a_regular_file_is_data_error(helpers, tmp_path):
    from diffold.config import load_config

    data = helpers.write_helices(tmp_path / "d", n=4)
    (tmp_path / "f").write_text("x")
    cfg = load_config(None, overrides=[f"data.train_path={data}", "data.val_path=null",
                                       f"data.cache_dir={tmp_path / 'f' / 'cache'}"], env={})
    with pytest.raises(DataError, match="cannot create data.cache_dir .* set data.cache_dir to a writable directory"):
        build_datasets(cfg)


def checkpoint_events(run: Path, helpers) -> list[dict]:
    return [e for e in helpers.events(run, "health.jsonl") if e["check"] == "checkpoint_write"]


@pytest.mark.slow
def test_disk_full_during_saves_and_wandb_unavailable_keep_training_intact(runs, reference, helpers, tmp_path):
    """Saves at steps 4-6 hit ENOSPC (injected inside the write, after the state files); W&B is online
    without an API key. The run warns, continues, later saves succeed, and it ends bit-identical to the
    reference run: the training state was never touched."""
    run = tmp_path / "run"
    env = {k: v for k, v in helpers.ENV.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="online", HOME=str(tmp_path))  # no key, no ~/.netrc
    args = [a for a in runs.args() if not a.startswith("logging.log_with")]
    r = runs.run([*args, "--output_dir", str(run), "logging.log_with=[wandb]",
                  "health.inject_faults=enospc_in_save@4-6"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "trackers unavailable" in r.stderr and "metrics still go to metrics.jsonl" in r.stderr
    failed = checkpoint_events(run, helpers)
    assert {e["step"] for e in failed} == {4, 6}  # the saves in steps 4-6 (step 6: periodic, epoch end, best?)
    for e in failed:
        assert e["status"] == "critical" and "disk full" in e["message"] and "training continues" in e["message"]
        newest = Path(e["suggestion"].rsplit("newest valid checkpoint: ", 1)[1])
        assert newest.parent == run / "checkpoints" and (newest.name == "best" or int(newest.name[5:]) < e["step"])
    assert "disk full" in r.stderr
    ckpts = run / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith((".tmp", ".old"))]  # partial writes removed
    assert all(verify(d)[0] for d in ckpts.iterdir() if d.is_dir())
    train_steps = [e["step"] for e in helpers.events(run) if e["event"] == "train"]
    assert train_steps == list(range(1, 13))  # metrics.jsonl intact
    assert helpers.events(run)[-1]["status"] == "finished"
    helpers.assert_bit_identical(reference, run)


@pytest.mark.slow
@pytest.mark.reliability_full
def test_final_save_on_a_full_disk_exits_3_then_resume_completes(runs, reference, helpers, tmp_path):
    run = tmp_path / "run"
    r = runs.run([*runs.args(), "--output_dir", str(run), "health.inject_faults=enospc_in_save@12"])
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "final checkpoint not written" in r.stderr and "--resume auto" in r.stderr
    ckpts = run / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.endswith((".tmp", ".old"))]
    pick = helpers.auto_pick(run)
    assert pick.name == "step_000000010" and verify(pick)[0]
    assert helpers.events(run)[-1]["status"] == "failed"
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto", "health.inject_faults="])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {pick} " in r.stderr
    helpers.assert_bit_identical(reference, run)


@pytest.mark.slow
@pytest.mark.reliability_full
def test_wandb_server_unreachable_training_continues(runs, reference, helpers, tmp_path):
    run = tmp_path / "run"
    env = {**helpers.ENV, "WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "HOME": str(tmp_path),
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    args = [a for a in runs.args() if not a.startswith("logging.log_with")]
    r = runs.run([*args, "--output_dir", str(run), "logging.log_with=[wandb]"], env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trackers unavailable" in r.stderr
    assert [e["step"] for e in helpers.events(run) if e["event"] == "train"] == list(range(1, 13))
    helpers.assert_bit_identical(reference, run)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.reliability_full
def test_real_full_disk(runs, reference, helpers, tmp_path):
    """A real ENOSPC: the run directory on an 11 MiB tmpfs (needs root + mount; skipped elsewhere). Room
    for about two checkpoints: later saves fail with the real errors of torch.save / safetensors / json,
    the run finishes its steps and exits 3; after making room, `--resume auto` completes it exactly."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not mount_tmpfs(disk, "11m"):
        pytest.skip("needs root and mount -t tmpfs")
    try:
        run = disk / "run"
        r = runs.run([*runs.args(), "--output_dir", str(run)])
        assert r.returncode in (0, 3), r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        failed = checkpoint_events(run, helpers)
        assert failed and all("disk full" in e["message"] for e in failed)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
        assert helpers.assert_every_valid_checkpoint_loads(run) >= 1
        assert [e["step"] for e in helpers.events(run) if e["event"] == "train"] == list(range(1, 13))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # the user makes room
        if r.returncode == 3:
            r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto"])
            assert r.returncode == 0, r.stderr[-3000:]
        helpers.assert_bit_identical(reference, run)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.reliability_full
def test_disk_full_on_two_processes_every_rank_takes_the_same_path(runs, helpers, tmp_path):
    """The failed write happens on the main process only; all ranks must learn of it in the same
    collectives (else the next collective pairs wrongly and the run hangs: the timeout catches that)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(helpers.ROOT / "accelerate_configs/cpu_ddp.yaml"), "--num_processes", "2",
           str(helpers.ROOT / "train_full.py"), *runs.args(epochs=2), "--output_dir", str(run),
           "training.gradient_accumulation_steps=1", "distributed.timeout_s=60",
           "health.inject_faults=enospc_in_save@2-4"]
    r = subprocess.run(cmd, cwd=helpers.ROOT, env={**helpers.ENV, "ACCELERATE_USE_CPU": "true"},
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert {e["step"] for e in checkpoint_events(run, helpers)} == {2, 3, 4}
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
    end = helpers.events(run)[-1]
    assert end["status"] == "finished" and end["rank_param_checksums_equal"] is True
    assert helpers.assert_every_valid_checkpoint_loads(run) >= 2


@pytest.fixture()
def small_fs(tmp_path):
    """A real 16 MB file system (tmpfs) for full-disk and read-only cases; root ignores permission bits,
    so a read-only MOUNT is the honest way to make a run directory unwritable."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_read_only_run_directory_is_one_line_error(runs, reference, small_fs):
    run = small_fs / "run"
    shutil.copytree(reference / "checkpoints" / "step_000000012", run / "checkpoints" / "step_000000012")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True).returncode == 0
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto"])
    assert_one_line_error(r, f"cannot write the run directory {run}", "Read-only file system")


@pytest.mark.slow
def test_full_disk_at_start_is_one_line_error(runs, small_fs):
    run = small_fs / "run"
    with open(small_fs / "filler", "wb") as f:  # fill it to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    r = runs.run([*runs.args(), "--output_dir", str(run)])
    assert_one_line_error(r, str(run), "free disk space")
