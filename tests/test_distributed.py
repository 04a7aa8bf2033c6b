"""train_full.py on 2 real CPU processes (DDP over gloo): rank agreement, 1-vs-2-process equivalence,
exact kill/resume, cross-rank health decisions, single-writer run directory, process-count change.

Every 2-process launch costs ~15-25 s here, so runs are module fixtures shared between tests.
Validation: a 1-chain val set (fewer chains than processes: not sharded) in most runs, 2 chains
(sharded) in the fault run.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from synthetic import ENV as BASE_ENV
from synthetic import ROOT, assert_bit_identical

# Launched as a user launches: the shipped cpu_ddp.yaml (use_cpu: true), WITHOUT ACCELERATE_USE_CPU
ENV = {k: v for k, v in BASE_ENV.items() if k != "ACCELERATE_USE_CPU"}
TIMEOUT = 300  # a cross-rank disagreement shows up as a hang: the subprocess timeout turns it into a failure


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """16 small helical RNA train chains (8 batches of 2 / 16 of 1: no partial batch); val sets of 1 and 2."""
    from diffold.structure import chain_from_coords, write_structure

    root = tmp_path_factory.mktemp("ddp_data")
    rng = np.random.default_rng(0)

    def helix(path: Path, name: str, length: int) -> None:
        t = np.linspace(0, 3 * np.pi, length)
        xyz = np.stack([9 * np.cos(t), 9 * np.sin(t), 2.8 * t], -1)[:, None] + rng.normal(0, 0.3, (length, 1, 3))
        seq = "".join(rng.choice(list("ACGU"), length))
        write_structure(path / f"{name}.pdb", [chain_from_coords(name, "rna", seq, xyz.astype(np.float32), ("C4'",))])

    for sub in ("train", "val", "val2"):
        (root / sub).mkdir()
    for i in range(16):
        helix(root / "train", f"h{i}", int(rng.integers(14, 40)))
    helix(root / "val", "v0", 20)
    helix(root / "val2", "w0", 20)
    helix(root / "val2", "w1", 26)
    return SimpleNamespace(train=root / "train", val=root / "val", val2=root / "val2", cache=root / "cache", out=root)


def args(d: SimpleNamespace, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/smoke.yaml"), f"data.train_path={d.train}", f"data.val_path={d.val}",
            f"data.cache_dir={d.cache}", "data.max_length=32", "training.batch_size=1", "training.num_epochs=2",
            "training.log_every=1", "checkpoint.save_every_steps=2", "validation.num_samples=1",
            "validation.sampling_steps=3", "distributed.timeout_s=60", "logging.log_with=[tensorboard]", *extra]


def launch(procs: int, argv: list[str]) -> subprocess.CompletedProcess:
    """train_full.py on `procs` processes (accelerate launch + cpu_ddp.yaml for 2, plain python for 1)."""
    if procs == 1:
        cmd = [sys.executable, str(ROOT / "train_full.py")]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs/cpu_ddp.yaml"), "--num_processes", str(procs), str(ROOT / "train_full.py")]
    r = subprocess.run([*cmd, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    r.log = r.stdout + r.stderr
    return r


def events(run: Path, kind: str | None = None) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["event"] == kind]


def end_event(run: Path) -> dict:
    """The last attempt's end event. An attempt whose peer was killed may have ended with its own `failed`
    event (exit code 5) if rank 0 saw the dead peer before torchrun's agent stopped it."""
    *earlier, end = events(run, "end")
    assert all(e["status"] == "failed" and e["exit_code"] == 5 for e in earlier), earlier
    return end


# ---------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def ddp_run(data) -> tuple[Path, subprocess.CompletedProcess]:
    """Reference: 2 processes x batch 1, W&B (offline) + TensorBoard."""
    run = data.out / "ddp"
    r = launch(2, [*args(data, "logging.log_with=[wandb,tensorboard]"), "--output_dir", str(run)])
    assert r.returncode == 0, r.log[-4000:]
    return run, r


@pytest.fixture(scope="module")
def single_run(data) -> tuple[Path, subprocess.CompletedProcess]:
    """Same effective batch on 1 process: 1 x batch 2."""
    run = data.out / "single"
    r = launch(1, [*args(data, "training.batch_size=2"), "--output_dir", str(run)])
    assert r.returncode == 0, r.log[-4000:]
    return run, r


@pytest.fixture(scope="module")
def killed_run(data) -> SimpleNamespace:
    """2 processes, rank 1 SIGKILLed mid-epoch at step 5 (latest checkpoint: step 4); a copy is kept for
    the 1-process resume test, the original is resumed on 2 processes."""
    run = data.out / "killed"
    r = launch(2, [*args(data, "health.inject_faults=kill@5:rank1"), "--output_dir", str(run)])
    assert r.returncode != 0 and "SIGKILL" in r.log, r.log[-4000:]
    copy = data.out / "killed_copy"
    shutil.copytree(run, copy, symlinks=True)
    resumed = launch(2, [*args(data, "health.inject_faults="), "--output_dir", str(run), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.log[-4000:]
    return SimpleNamespace(run=run, copy=copy, resumed=resumed)


@pytest.fixture(scope="module")
def fault_run(data) -> tuple[Path, subprocess.CompletedProcess]:
    """Batch 2 (8 steps): NaN loss on rank 1 at step 4, OOM on rank 1 at step 5, validation (2 chains,
    sharded) every 3 steps with early stopping that cannot be satisfied (min_delta huge) -> stops at the
    2nd validation (step 6)."""
    run = data.out / "faults"
    r = launch(2, [*args(data, f"data.val_path={data.val2}", "training.batch_size=2", "training.validate_every_steps=3",
                         "training.early_stopping.enabled=true", "training.early_stopping.patience=1",
                         "training.early_stopping.min_delta=1e9", "validation.best_metric=val/loss",
                         "health.inject_faults=nan_loss@3:rank1,oom@4:rank1"), "--output_dir", str(run)])
    assert r.returncode == 0, r.log[-4000:]
    return run, r


# ---------------------------------------------------------------------------- tests
def test_rank_checksum_detects_divergence(caplog):
    """The end-of-run safety check itself: equal ranks pass, one differing parameter fails and logs."""
    from diffold.distributed import ranks_agree

    model = torch.nn.Linear(3, 2)

    def fake_acc(delta: float):  # gather of rank 0's sums and a rank 1 that differs by delta in one tensor
        def gather(t):
            other = t.clone()
            other[0, -1] += delta
            return torch.cat([t, other])
        return SimpleNamespace(num_processes=2, gather=gather, distributed_type=DistributedType.MULTI_CPU)

    assert ranks_agree(fake_acc(0.0), model, model)
    with caplog.at_level(logging.ERROR):
        assert not ranks_agree(fake_acc(1e-12), model)
    assert "parameters differ between ranks in 1 of 2 tensors" in caplog.text


@pytest.mark.slow
def test_two_processes_really_run_and_ranks_agree(ddp_run, killed_run, fault_run):
    run, r = ddp_run
    assert "effective batch 2 = 1 x 1 accum x 2 proc" in r.log
    # rank 1 is a process of its own (its warnings carry its rank); 1 val chain for 2 ranks is handled
    # said once, by the main process (not once per rank)
    assert r.log.count("validation set has 1 chain(s) for 2 processes: not sharded") == 1
    assert "[rank 0] WARNING diffold.train: decision: validation set has 1 chain(s) for 2 processes" in r.log
    start, = events(run, "start")
    assert start["num_processes"] == 2
    for path in (run, killed_run.run, fault_run[0]):
        assert end_event(path)["rank_param_checksums_equal"] is True, path


@pytest.mark.slow
def test_same_schedule_and_similar_loss_as_one_process(ddp_run, single_run):
    (d, _), (s, _) = ddp_run, single_run
    assert events(d, "start")[0]["total_steps"] == events(s, "start")[0]["total_steps"] == 16
    assert end_event(d)["step"] == end_event(s)["step"] == 16
    lr_d = [(e["step"], e["lr"]) for e in events(d, "train")]
    lr_s = [(e["step"], e["lr"]) for e in events(s, "train")]
    assert lr_d == lr_s and len(lr_d) == 16  # exactly equal: one scheduler step per optimizer step
    # The losses cannot be equal. Each step sees the same two chains (the sampler pairs them alike), but
    # each rank draws its own noise levels, noise and rotations (device-specific seed) where 1 process
    # draws one set for both chains, and DDP sums the gradients in another order. Per-step losses
    # spread by ~0.25 (the noise level dominates), so the 16-step mean of either run has a standard
    # error of ~0.06 (~10 %): 30 % flags a systematic difference (a diverging or non-learning
    # rank), not noise. Both runs are deterministic, so this does not flake between runs.
    mean = lambda run: np.mean([e["loss/total"] for e in events(run, "train")])  # noqa: E731
    assert abs(mean(d) - mean(s)) <= 0.3 * mean(s), (mean(d), mean(s))
    # val/loss uses the same chain and the same noise seed in both runs (the 1-chain val set is not
    # sharded), so only the EMA weights differ: a tight bound catches weights drifting apart
    val = lambda run: events(run, "val")[-1]["val/loss"]  # noqa: E731
    assert abs(val(d) - val(s)) <= 0.02 * val(s), (val(d), val(s))


@pytest.mark.slow
def test_kill_and_resume_on_two_processes_is_bit_identical(ddp_run, killed_run):
    assert "resumed from" in killed_run.resumed.log and "step_000000004" in killed_run.resumed.log
    assert_bit_identical(ddp_run[0], killed_run.run)  # model, EMA, (main process's) optimizer state
    ckpt = (killed_run.run / "checkpoints" / "latest").resolve()
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


@pytest.mark.slow
def test_health_decisions_are_taken_by_all_ranks(fault_run):
    run, r = fault_run
    train = {e["step"]: e for e in events(run, "train")}
    # NaN loss on rank 1 only -> step skipped on every rank (else the weights would differ), once
    assert train[3]["health/skipped_steps"] == 0 and train[4]["health/skipped_steps"] == 1
    assert max(e["health/skipped_steps"] for e in train.values()) == 1
    # OOM on rank 1 only -> both ranks halve the micro-batch and retry the same step together
    assert "[rank 1] WARNING diffold.loop: out of memory" in r.log
    assert "[rank 0] WARNING diffold.loop: out of memory" in r.log and "micro-batch halved" in r.log
    health = [json.loads(line) for line in (run / "health.jsonl").read_text().splitlines()]
    assert [(h["step"], h["action"]) for h in health if h["check"] == "oom"] == [(5, "oom_retry")]
    assert train[5]["health/oom_retries"] == 1
    state = json.loads(((run / "checkpoints" / "latest").resolve() / "train_state.json").read_text())
    assert state["accumulation_multiplier"] == 2  # accumulation doubled ...
    assert state["samples_seen"] == 6 * 4  # ... effective batch unchanged: 2 x 2 proc per step
    # early stopping decided on every rank at the same validation (a rank that went on would hang the
    # end-of-run collectives until the 60 s process-group timeout, and the run would fail)
    end = end_event(run)
    assert end["status"] == "early_stopped" and end["step"] == 6
    assert [e["step"] for e in events(run, "val")] == [3, 6]
    assert "not sharded" not in r.log  # 2 val chains: one per rank


@pytest.mark.slow
def test_one_writer_one_wandb_run_no_duplicates(ddp_run):
    run, _ = ddp_run
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert len(list((run / "logs").glob("training_*.log"))) == 1
    # keep_last_n=2, plus the healthy rollback targets of the last 18 steps (ONSET_MARGIN): every one here
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["best", "latest"] + [f"step_{s:09d}" for s in range(0, 17, 2)]
    assert [e["step"] for e in events(run, "train")] == list(range(1, 17))  # each step logged once
    assert [e["event"] for e in events(run)].count("start") == 1 and len(events(run, "end")) == 1
    assert len(events(run, "val")) == 2  # one per epoch
    tb = list(run.rglob("events.out.tfevents.*"))  # scalars + hparams sub-run: written by ONE process (pid in name)
    assert tb and len({p.name.split(".")[-2] for p in tb}) == 1, tb


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(data, killed_run):
    run = killed_run.copy
    # 1 process x batch 2 keeps the effective batch: same schedule length, resumed where the chains ran out
    r = launch(1, [*args(data, "training.batch_size=2", "health.inject_faults="), "--output_dir", str(run),
                   "--resume", "auto"])
    assert r.returncode == 0, r.log[-4000:]
    assert "data order of the resumed epoch differs" in r.log
    assert "resumed from" in r.log and "(step 4, epoch 0, batch 4)" in r.log
    end = end_event(run)
    assert end["status"] == "finished" and end["step"] == 16 and end["rank_param_checksums_equal"] is True


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only launch without ACCELERATE_USE_CPU")
def test_launch_without_cpu_flag_forms_one_group(data, tmp_path):
    """torchrun x2 on a CPU machine without ACCELERATE_USE_CPU used to give 2 independent trainings (then a
    refusal); now the 2 processes form one gloo group, and the log says why."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train_full.py"), *args(data, "training.max_steps=2"), "--output_dir", str(tmp_path / "run")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING diffold.distributed: no GPU on this machine: the 2 launched processes form a gloo group on the CPU" in r.stderr
    assert events(tmp_path / "run", "start")[0]["num_processes"] == 2
    assert len(events(tmp_path / "run", "end")) == 1
