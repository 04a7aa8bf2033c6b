"""Health marks on checkpoints: only healthy checkpoints are rollback targets, `--resume auto` prefers
them, rotation never deletes the newest healthy one, and a checkpoint of non-finite weights is
written (nothing is lost) but marked unhealthy."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from diffold.checkpoint import CheckpointManager
from diffold.ema import EMA
from diffold.state import TrainState


@pytest.fixture()
def setup(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    ema = EMA(acc.unwrap_model(model), 0.9)
    yield acc, model, ema, CheckpointManager(tmp_path / "run", acc, keep_last_n=2)
    acc.free_memory()


def save(mgr, ema, step: int, healthy: bool, reason: str = "ok"):
    return mgr.save(f"step_{step:09d}", TrainState(global_step=step), ema, {"step": step, "epoch": 0},
                    healthy=(healthy, reason))


def test_unhealthy_checkpoints_are_written_marked_and_skipped_as_targets(setup):
    acc, model, ema, mgr = setup
    save(mgr, ema, 1, True)
    with torch.no_grad():
        acc.unwrap_model(model).weight.fill_(float("nan"))  # non-finite weights: written, not lost
    path = save(mgr, ema, 2, False, "weights or optimizer state not finite / exploded")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["health"] == {"healthy": False, "reason": "weights or optimizer state not finite / exploded"}
    assert [p.name for _, p in mgr.candidates(healthy_only=True)] == ["step_000000001"]
    assert [p.name for p in mgr.auto_order()] == ["step_000000001", "step_000000002"]  # healthy first
    assert mgr.resolve("auto").name == "step_000000001"


def test_rotation_keeps_the_newest_healthy_checkpoint(setup):
    _, _, ema, mgr = setup
    save(mgr, ema, 1, True)
    for step in (2, 3, 4):
        save(mgr, ema, step, False, "unresolved critical health event")
    kept = sorted(p.name for p in mgr.dir.glob("step_*"))
    assert kept == ["step_000000001", "step_000000003", "step_000000004"]  # keep_last_n=2 + newest healthy
    save(mgr, ema, 5, True)
    save(mgr, ema, 6, True)
    # + rollback targets from before a divergence the loss may not show yet (ONSET_MARGIN=18 steps): the healthy
    # ones of the last 18 steps, and the newest healthy one before them (none is 18 steps older than 6: the oldest)
    assert sorted(p.name for p in mgr.dir.glob("step_*")) == ["step_000000001", "step_000000005", "step_000000006"]
    for step in (12, 16, 20, 21, 22):
        save(mgr, ema, step, step < 21, "ok" if step < 21 else "unresolved critical health event")
    # 22 - 18 = 4: healthy 5..20 are recent, 1 the target before them; unhealthy 21/22 as the last 2
    assert sorted(int(p.name[5:]) for p in mgr.dir.glob("step_*")) == [1, 5, 6, 12, 16, 20, 21, 22]
    for step in (30, 40):
        save(mgr, ema, step, True)
    # 40 - 18 = 22: recent healthy 30, 40; the newest healthy before them is 20; 1-16 go
    assert sorted(int(p.name[5:]) for p in mgr.dir.glob("step_*")) == [20, 30, 40]


def test_no_checkpoint_directory_until_the_first_save(setup):
    _, _, ema, mgr = setup
    assert mgr.candidates() == [] and not mgr.dir.exists()  # a failed start leaves no empty checkpoints/
    save(mgr, ema, 0, True)
    assert mgr.dir.is_dir()
