"""Health monitoring and automatic recovery end to end: the real train_full.py, 1 process, tiny data.

Injected faults (health.inject_faults) count steps from 0 (the step being processed); everything
written to metrics.jsonl / health.jsonl / checkpoints counts optimizer steps done, so `nan_loss@4`
shows up as step 5. Four launches shared by the tests (module-scoped fixtures):
  tracked  W&B (offline) + TensorBoard, skip / grad explosion / stagnation, stopped at max_steps=9,
           then resumed to the end (12 steps) into the same W&B run id
  rollback OOM at step 4, NaN at steps 7-9 -> 2 skips, rollback to step 8 with LR x0.5, finishes
  give_up  persistent NaN with health.max_rollbacks=1 -> exit 3 and a final report
"""
from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import ENV, ROOT, write_helices

pytestmark = pytest.mark.slow
STEPS = 12          # 12 train chains, batch 2 -> 6 steps per epoch, 2 epochs
CONFIG_KEY = re.compile(r"\b(?:training|health|data|model|checkpoint|validation|diffusion)(?:\.[a-z_]+)+")


# ---------------------------------------------------------------------------------------------- helpers
def tiny_args(data: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/smoke.yaml"), "--output_dir", str(out), f"data.train_path={data}",
            "data.val_path=null", "data.val_fraction=0.15", f"data.cache_dir={cache}", "data.max_length=32",
            "training.batch_size=2", "training.num_epochs=2", "training.log_every=1",
            "checkpoint.save_every_steps=2", "validation.num_samples=1", "validation.sampling_steps=3",
            "logging.log_with=[]", *extra]


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_full.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def health_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "health.jsonl").read_text().splitlines()]


def train_by_step(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run, "train")}


def latest_checkpoint(run: Path) -> Path:
    return (run / "checkpoints" / "latest").resolve()


def configured_lr(run: Path) -> float:
    from diffold.config import load_config

    return load_config(str(run / "config.yaml"), env={}).training.optimizer.lr


def schedule(run: Path, total_steps: int) -> list[float]:
    """LR after n scheduler steps (n = 0..total) for the run's own config (the uninterrupted schedule)."""
    from diffold.config import load_config
    from diffold.optim import build_scheduler

    cfg = load_config(str(run / "config.yaml"), env={})
    lr = cfg.training.optimizer.lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, cfg.training.scheduler, total_steps, lr)
    out = [sched.get_last_lr()[0]]
    for _ in range(total_steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def optimizer_steps(ckpt: Path) -> float:
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    return float(next(iter(state.values()))["step"])


def wandb_records(path: Path) -> list:
    """Decode a W&B transaction log (run-<id>.wandb): LevelDB-log framing of wandb_internal Record protos.

    wandb 0.31 has no public reader (the writer is wandb-core): 7-byte file header ':W&B' + magic +
    version, then 32 KiB blocks of chunks [crc32c:4][length:2][type:1][data]; type 1 = full record,
    2/3/4 = first/middle/last piece; a block tail shorter than a chunk header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            parts = chunk
        elif kind in (3, 4):
            parts += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def wandb_history(recs: list) -> list[dict]:
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def of_type(recs: list, kind: str) -> list:
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]


def numeric_keys(run: Path) -> set[str]:
    """Scalar keys of train/val events in metrics.jsonl, under the grouped tag every tracker must receive
    them as (train/lr, val/best_step, speed/samples_per_s, ...: no ungrouped tag)."""
    from diffold.tracking import tracker_key

    keys = set()
    for r in records(run, "train") + records(run, "val"):
        keys |= {tracker_key(r["event"], k) for k, v in r.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step", "epoch")}
    assert all("/" in k for k in keys)
    return keys


def assert_keys_exist(text: str) -> None:
    """Every dotted config key a suggestion names is a real key of the config schema."""
    from diffold.config import Config

    tree = Config().to_dict()
    keys = CONFIG_KEY.findall(text)
    assert keys, f"suggestion names no config key: {text}"
    for key in keys:
        node = tree
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"suggestion names unknown key {key}: {text}"
            node = node[part]


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    """14 small noisy helical RNA chains (12 train / 2 val after the cluster split) + a shared cache dir."""
    return write_helices(tmp_path_factory.mktemp("synth")), tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tracked(synth, tmp_path_factory) -> dict:
    """W&B + TensorBoard run with a skip, a grad explosion and stagnation; stopped at 9, resumed to 12."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    common = ["logging.log_with=[wandb,tensorboard]", "training.scheduler.warmup=2", "health.stagnation_window=3"]
    first = run_train([*tiny_args(*synth, run), *common, "training.max_steps=9",
                       "health.inject_faults=nan_loss@4,grad_explode@5,stagnate@6-8"])
    assert first.returncode == 0, first.stderr[-3000:]
    part1 = {"train": train_by_step(run), "start": records(run, "start")[0],
             "state": json.loads((latest_checkpoint(run) / "train_state.json").read_text()),
             "ckpt": latest_checkpoint(run).name, "opt_steps": optimizer_steps(latest_checkpoint(run))}
    second = run_train([*tiny_args(*synth, run), *common, "health.inject_faults=", "--resume", "auto"])
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run": run, "part1": part1, "stderr": first.stderr + second.stderr}


@pytest.fixture(scope="module")
def rollback(synth, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("rollback") / "run"
    r = run_train([*tiny_args(*synth, run), "health.max_bad_steps=3", "health.lr_backoff=0.5",
                   "health.inject_faults=oom@3,nan_loss@6-8"])
    assert r.returncode == 0, r.stderr[-3000:]
    return {"run": run, "stderr": r.stderr}


@pytest.fixture(scope="module")
def give_up(synth, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("give_up") / "run"
    r = run_train([*tiny_args(*synth, run), "health.max_rollbacks=1", "health.inject_faults=nan_loss@2-11"])
    return {"run": run, "proc": r}


# ---------------------------------------------------------------------------------------------- 1. skip
def test_nonfinite_step_is_skipped_and_training_finishes(tracked):
    run, part1 = tracked["run"], tracked["part1"]
    events = [e for e in health_events(run) if e["check"].startswith("nonfinite_")]
    assert events and {e["step"] for e in events} == {5}
    assert all(e["status"] == "critical" and e["action"] == "skip" for e in events)
    train = part1["train"]
    assert [train[s]["health/skipped_steps"] for s in range(1, 10)] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert train[5]["health/status"] == 2 and train[5]["loss/total"] == "nan"
    # The skipped step did not advance the schedule: from step 5 on the LR lags the schedule by one.
    lrs = schedule(run, part1["start"]["total_steps"])
    expected = [lrs[s] if s < 5 else lrs[s - 1] for s in range(1, 10)]
    assert [train[s]["lr"] for s in range(1, 10)] == pytest.approx(expected, rel=1e-6)
    # ... nor the optimizer: Adam's step count = optimizer steps done - skipped.
    assert part1["ckpt"] == "step_000000009" and part1["opt_steps"] == 8
    assert records(run, "end")[-1]["status"] == "finished"
    final = train_by_step(run)
    assert max(final) == STEPS and final[STEPS]["health/skipped_steps"] == 1
    sched = torch.load(latest_checkpoint(run) / "scheduler.bin", weights_only=True)
    assert sched["last_epoch"] == STEPS - 1 == optimizer_steps(latest_checkpoint(run))


# ---------------------------------------------------------------------------------------------- 4. warnings
def test_grad_explosion_and_stagnation_warn_with_config_keys(tracked):
    events = {e["check"]: e for e in health_events(tracked["run"])}
    explosion, stagnation = events["grad_explosion"], events["loss_stagnation"]
    assert explosion["step"] == 6 and explosion["status"] == "warning" and explosion["action"] == "none"
    assert "training.max_grad_norm" in explosion["suggestion"]
    assert stagnation["step"] == 9 and stagnation["status"] == "warning"  # window 3 over steps 7-9
    assert "health.stagnation_eps" in stagnation["suggestion"]
    for e in events.values():
        assert_keys_exist(e["suggestion"])
    assert "[health step 6] grad_explosion" in tracked["stderr"]


# ---------------------------------------------------------------------------------------------- 2. rollback
def test_consecutive_nonfinite_steps_roll_back_with_lr_backoff(rollback):
    run = rollback["run"]
    actions = {(e["step"], e["check"]): e["action"] for e in health_events(run)}
    assert actions[(7, "nonfinite_loss")] == actions[(8, "nonfinite_loss")] == "skip"
    assert actions[(9, "nonfinite_loss")] == "rollback" and actions[(9, "rollback")] == "rollback"
    assert "rolled back to step_000000008" in rollback["stderr"]
    train = train_by_step(run)
    assert sorted(train) == list(range(1, STEPS + 1))
    assert train[STEPS]["health/rollbacks"] == 1 and train[STEPS]["health/skipped_steps"] == 2
    # Steps 7-9 were not applied (step 8's checkpoint holds the schedule at 6); the base LR is halved.
    lrs = schedule(run, STEPS)
    for s in range(10, STEPS + 1):
        assert train[s]["lr"] == pytest.approx(0.5 * lrs[s - 3], rel=1e-6)
    assert train[10]["lr"] < train[6]["lr"]
    ckpt = latest_checkpoint(run)
    sched = torch.load(ckpt / "scheduler.bin", weights_only=True)
    assert sched["last_epoch"] == STEPS - 3 == optimizer_steps(ckpt)
    assert sched["base_lrs"][0] == pytest.approx(0.5 * configured_lr(run))
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["lr_scale"] == 0.5 and state["recovery"]["rollbacks"] == 1
    assert records(run, "end")[-1]["status"] == "finished"


def test_persistent_nonfinite_gives_up_with_a_report(give_up):
    run, proc = give_up["run"], give_up["proc"]
    assert proc.returncode == 3, proc.stderr[-3000:]
    for text in (proc.stderr, next((run / "logs").glob("training_*.log")).read_text()):
        assert "training stopped after 1 rollback(s) (health.max_rollbacks=1)" in text
        assert "What to do:" in text and "raise health.max_rollbacks (now 1)" in text
        assert f"--output_dir {run} --resume auto" in text
    assert json.loads((run / "heartbeat.json").read_text())["status"] == "gave_up"
    end = records(run, "end")[-1]
    assert end["status"] == "gave_up" and end["step"] == 8  # NaN at 3-5 -> rollback, 6-8 -> give up
    assert health_events(run)[-1]["action"] == "give_up"
    assert not (run / "export").exists()  # no final save/export of a diverged model


# ---------------------------------------------------------------------------------------------- 3. OOM
def test_oom_halves_micro_batch_and_keeps_effective_batch(rollback, tracked):
    run = rollback["run"]
    oom = [e for e in health_events(run) if e["check"] == "oom"]
    assert len(oom) == 1 and oom[0]["step"] == 4 and oom[0]["action"] == "oom_retry"
    assert "micro-batch halved, gradient accumulation x2, same batch retried" in rollback["stderr"]
    train = train_by_step(run)
    assert [train[s]["health/oom_retries"] for s in (3, 4, STEPS)] == [0, 1, 1]
    assert math.isfinite(train[4]["loss/total"])
    # The retried step was applied exactly once: the LR at steps 4-6 follows the schedule.
    lrs = schedule(run, STEPS)
    assert [train[s]["lr"] for s in (3, 4, 5, 6)] == pytest.approx(lrs[3:7], rel=1e-6)
    state = json.loads((latest_checkpoint(run) / "train_state.json").read_text())
    reference = json.loads((latest_checkpoint(tracked["run"]) / "train_state.json").read_text())
    assert state["accumulation_multiplier"] == 2
    assert state["samples_seen"] == reference["samples_seen"] == STEPS * 2


# ---------------------------------------------------------------------------------------------- 5. trackers
def test_wandb_offline_run_has_health_scalars_alert_and_structures(tracked):
    run = tracked["run"]
    first = sorted(run.glob("wandb/offline-run-*"))[0]
    recs = wandb_records(next(first.glob("run-*.wandb")))
    rows = wandb_history(recs)
    keys = set().union(*rows)
    for key in ("health/status", "health/grad_norm_preclip", "health/skipped_steps", "health/rollbacks",
                "health/oom_retries", "health/loss_zscore", "train/global_step", "train/lr", "val/loss"):
        assert key in keys, key
    assert any(k.startswith("loss_bin/") for k in keys)
    assert numeric_keys(run) <= keys  # every scalar of metrics.jsonl reached W&B
    at5 = next(r for r in rows if r.get("train/global_step") == 5 and "health/status" in r)
    assert at5["health/status"] == 2 and at5["health/skipped_steps"] == 1
    alerts = of_type(recs, "alert")
    assert [a.title for a in alerts] == ["diffold: nonfinite_loss", "diffold: nonfinite_grad"]
    assert alerts[0].level == "ERROR" and "[health step 5]" in alerts[0].text
    metrics = of_type(recs, "metric")
    assert any(m.glob_name == "*" and m.step_metric == "train/global_step" for m in metrics)
    # Sampled validation structure -> wandb.Molecule (3D panel "val/samples"), file kept with the run.
    mol = next(r for r in rows if r.get("val/samples/_type") == "molecule")
    assert mol["train/global_step"] == 6 and mol["val/samples/count"] == 1
    chain = mol["val/samples/captions"][0].split(" ")[0]
    sample = run / "samples" / "step_000000006" / f"{chain}.pdb"
    assert (first / "files" / mol["val/samples/filenames"][0]).read_text() == sample.read_text()


def test_tensorboard_has_the_same_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tracked["run"]
    acc = EventAccumulator(str(run / "tensorboard" / "diffold"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert numeric_keys(run) <= tags
    assert {"health/status", "health/grad_norm_preclip", "health/skipped_steps"} <= tags
    assert all("/" in t for t in tags) and "train/global_step" not in tags  # every card in a group
    # health events as text next to the scalars: the NaN step's events are readable in TensorBoard
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("health/events")]
    assert texts, acc.Tags()["tensors"]
    from tensorboard.util import tensor_util

    events = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(texts[0])]
    assert any(step == 5 and "nonfinite_loss" in text and "(skip)" in text for step, text in events), events
    assert any(t.startswith("loss_bin/") for t in tags)
    skipped = {e.step: e.value for e in acc.Scalars("health/skipped_steps")}
    assert [skipped[s] for s in range(1, STEPS + 1)] == [0] * 4 + [1] * 8  # both parts, keyed by step


def test_loss_per_noise_bin_reaches_metrics(tracked):
    train = records(tracked["run"], "train")
    bins = [{k: v for k, v in r.items() if k.startswith("loss_bin/")} for r in train]
    assert all(b for b in bins)  # every interval has at least one bin
    labels = set().union(*bins)
    assert len(labels) >= 3 and all(re.fullmatch(r"loss_bin/[0-9.]+-([0-9.]+|inf)", k) for k in labels)
    assert all(math.isfinite(v) and v >= 0 for b in bins for v in b.values() if not isinstance(v, str))


# ---------------------------------------------------------------------------------------------- 6. resume
def test_resume_continues_the_same_wandb_run(tracked):
    run, part1 = tracked["run"], tracked["part1"]
    parts = sorted(run.glob("wandb/offline-run-*"))
    assert len(parts) == 2
    run_id = part1["state"]["wandb_run_id"]
    assert run_id and all(p.name.endswith(f"-{run_id}") for p in parts)
    ckpt = latest_checkpoint(run)
    assert json.loads((ckpt / "train_state.json").read_text())["wandb_run_id"] == run_id
    assert json.loads((ckpt / "meta.json").read_text())["wandb_run_id"] == run_id
    steps = []
    for part in parts:
        recs = wandb_records(part / f"run-{run_id}.wandb")
        assert [r.run_id for r in of_type(recs, "run")] == [run_id]
        assert any(m.glob_name == "*" and m.step_metric == "train/global_step" for m in of_type(recs, "metric"))
        rows = wandb_history(recs)
        # W&B's own counter, not our step: an explicit step would collide here (train, val and
        # structure rows share a global step) and after a resume W&B drops steps <= its last one.
        assert [r["_step"] for r in rows] == list(range(len(rows)))
        steps.append([r["train/global_step"] for r in rows if "loss/total" in r])
    # Charts key on train/global_step: the resumed part carries steps 10..12, nothing lost or repeated.
    assert steps[0] == list(range(1, 10)) and steps[1] == [10, 11, STEPS]
    assert sorted(train_by_step(run)) == steps[0] + steps[1]
