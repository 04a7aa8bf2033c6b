"""RunLog sinks: a failing disk loses records (counted, warned) but never stops training."""
from __future__ import annotations

import errno
import json
import logging
from types import SimpleNamespace

import pytest

import diffold.tracking as tracking
from diffold.tracking import RunLog


def runlog(tmp_path, main=True):
    acc = SimpleNamespace(is_main_process=main, trackers=[])
    return RunLog(tmp_path, acc, total_steps=10, resume_command="python train_full.py --resume auto")


def test_records_reach_metrics_jsonl_and_heartbeat(tmp_path):
    rl = runlog(tmp_path)
    rl.log("train", 3, 0, {"train/loss": 0.5})
    rl.heartbeat(3, 0, "train")
    (rec,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rec["event"] == "train" and rec["step"] == 3 and rec["train/loss"] == 0.5
    assert json.loads((tmp_path / "heartbeat.json").read_text())["step"] == 3
    assert rl.dropped_writes == 0


def test_non_main_process_writes_nothing(tmp_path):
    rl = runlog(tmp_path, main=False)
    rl.log("train", 1, 0, {"train/loss": 1.0})
    rl.heartbeat(1, 0, "train")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_loses_records_with_a_counted_warning_and_recovers(tmp_path, monkeypatch, caplog):
    rl = runlog(tmp_path)
    real_open, full = open, {"on": True}

    def enospc_open(path, *a, **k):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(tracking, "open", enospc_open, raising=False)
    monkeypatch.setattr("diffold.atomic.open", enospc_open, raising=False)
    with caplog.at_level(logging.WARNING, logger=tracking.log.name):
        for step in range(1, 151):
            rl.log("train", step, 0, {"train/loss": 1.0})
        rl.health_event({"step": 150, "check": "loss_spike", "status": "warning", "message": "m", "suggestion": "s"})
        rl.heartbeat(150, 0, "train")
    assert rl.dropped_writes == 152
    lost = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert len(lost) == 2, lost  # the first loss and the 100th, not one line per step
    assert "No space left" in lost[0] and "training continues" in lost[0] and str(tmp_path) in lost[0]

    full["on"] = False  # the user freed space: the next record lands
    rl.log("train", 151, 0, {"train/loss": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 151


def test_errors_other_than_oserror_still_raise(tmp_path):
    rl = runlog(tmp_path)
    with pytest.raises(TypeError):
        rl.log("train", 1, 0, {"train/loss": object()})


def test_throughput_counts_training_time_not_validation():
    """samples_per_s divides by the time spent in steps: a slow validation in the interval must not
    make the run look slower than it is."""
    import time

    import torch

    from diffold.diffusion import LossOutput
    from diffold.loop import LossStats

    stats = LossStats([(0.0, 1.0), (1.0, float("inf"))], torch.device("cpu"))
    stats.begin_step()
    stats.add(LossOutput(torch.ones(8), {}, torch.tensor([0.5] * 4 + [2.0] * 4)), torch.tensor(1.0))
    time.sleep(0.2)  # "validation" inside the interval
    out = stats.flush(train_s=0.5)
    assert out["samples_per_s"] == pytest.approx(16.0)
    assert out["loss_bin/0-1"] == pytest.approx(1.0) and out["loss_bin/1-inf"] == pytest.approx(1.0)
    stats.add(LossOutput(torch.ones(4), {}, torch.full((4,), 0.5)), torch.tensor(1.0))
    time.sleep(0.05)
    assert stats.flush()["samples_per_s"] <= 4 / 0.05  # no train_s: wall time since the last flush


def test_logged_components_sum_to_the_weighted_total():
    """With chain weights (manifest `weight`), components must reduce like the total does, otherwise
    `loss/diffusion` > `loss/total` with no other term, as users saw in the status table."""
    import torch

    from diffold.diffusion import LossOutput, weighted_mean
    from diffold.loop import LossStats

    diffusion, structure = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 0.0, 1.0])
    weights = torch.tensor([1.0, 0.25, 0.25])
    out = LossOutput(diffusion + structure, {"diffusion": diffusion, "structure": structure}, torch.ones(3))
    stats = LossStats([(0.0, float("inf"))], torch.device("cpu"))
    stats.begin_step()
    stats.add(out, weighted_mean(out.total, weights), weights)
    loss, terms, _ = stats.end_step(torch.tensor(1.0))
    assert terms["diffusion"] + terms["structure"] == pytest.approx(loss)
    assert terms["diffusion"] == pytest.approx((1.0 + 0.5 + 1.0) / 1.5)
