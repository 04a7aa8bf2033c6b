"""Damaged and hostile checkpoints: `--resume auto` skips every unusable one with one warning and takes
the newest usable one; an explicit `--resume latest|best|PATH` naming an unusable one fails with one
`error:` line that names the file, key or tensor; never a traceback, never a partial load.

Each damage is made for real on a copy of the reference run's newest checkpoint (step 12), with the
checksums made valid again wherever that is possible, so only the loader's own checks stand in the way.
The cases are a table: a new kind of damage is one more row.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tamper import edit_json, rechecksum, write_payload

NEWEST, PREVIOUS = "step_000000012", "step_000000010"


def other_size_weights(ckpt: Path) -> None:
    """EMA and model weights of a different model size (d_model 32 instead of 64), checksums valid."""
    from diffold.config import load_config
    from diffold.model import build_model

    model = build_model(load_config(None, overrides=["model.d_model=32", "model.num_heads=4"], env={}), num_atoms=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt / "ema.safetensors"))
    save_file(state, str(ckpt / "model.safetensors"))
    rechecksum(ckpt)


def wrong_shape_tensor(ckpt: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "ema.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.zeros(*[s + 1 for s in state[name].shape])
    save_file(state, str(ckpt / "ema.safetensors"))
    rechecksum(ckpt)


def state_json(value) -> callable:
    def damage(ckpt: Path) -> None:
        edit_json(ckpt / "train_state.json", lambda s: value(s))
        rechecksum(ckpt)
    return damage


def meta(value) -> callable:
    return lambda ckpt: edit_json(ckpt / "meta.json", value)


def delete_weights_and_files_list(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    edit_json(ckpt / "meta.json", lambda m: {**m, "files": {}})


# damage -> words the one-line reason must contain (explicit --resume PATH)
CASES = {
    "meta_empty_object": (meta(lambda m: {}), "'step' must be a non-negative integer"),
    "meta_list": (meta(lambda m: []), "no readable meta.json"),
    "meta_step_text": (meta(lambda m: {**m, "step": "abc"}), "'step' must be a non-negative integer, got 'abc'"),
    "meta_deeply_nested": (meta(lambda m: "[" * 100_000 + "]" * 100_000), "no readable meta.json"),
    "meta_not_utf8": (lambda c: (c / "meta.json").write_bytes(b"\xff\xfe{"), "no readable meta.json"),
    "meta_file_outside": (meta(lambda m: {**m, "files": {**m["files"], "../../x": "0"}}), "not a file inside"),
    "files_empty_weights_deleted": (delete_weights_and_files_list, "'files' must list"),
    "weights_missing": (lambda c: (c / "model.safetensors").unlink(), "missing file model.safetensors"),
    "state_garbage_types": (state_json(lambda s: {**s, "global_step": "x"}), "key 'global_step' must be count"),
    "state_not_object": (state_json(lambda s: [1, 2]), "not a valid training state"),
    "other_model_size": (other_size_weights, "another model size"),
    "wrong_shape_tensor": (wrong_shape_tensor, "has shape"),
    "pickled_code_in_rng": (lambda c: (write_payload(c / "random_states_0.pkl", c.parent / "pwned", "rng"),
                                       rechecksum(c)), "refused to load random_states_0.pkl"),
}


@pytest.fixture()
def damaged(reference, tmp_path, request) -> tuple[Path, Path]:
    """A copy of the reference run whose newest checkpoint got the damage named by the test's case."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    shutil.rmtree(run / "checkpoints" / "best")  # also step 12: the usable one before NEWEST is then PREVIOUS
    CASES[request.param][0](run / "checkpoints" / NEWEST)
    return run, run / "checkpoints" / NEWEST


@pytest.mark.parametrize("damaged", sorted(CASES), indirect=True)
def test_explicit_resume_fails_with_one_line_naming_the_problem(damaged, loader, request):
    from diffold.checkpoint import CheckpointError, CheckpointManager

    run, ckpt = damaged
    acc, ema = loader
    mgr = CheckpointManager(run, acc)
    words = CASES[request.node.callspec.params["damaged"]][1]
    with pytest.raises(CheckpointError) as info:
        path = mgr.resolve(str(ckpt))
        mgr.load_first([path], ema, strict=True)
    msg = str(info.value)
    assert "\n" not in msg and words in msg, msg
    assert not (run / "checkpoints" / "pwned").exists()


@pytest.mark.parametrize("damaged", sorted(CASES), indirect=True)
def test_auto_skips_the_damaged_checkpoint_and_takes_the_previous(damaged, loader, caplog):
    from diffold.checkpoint import CheckpointManager

    run, _ = damaged
    acc, ema = loader
    mgr = CheckpointManager(run, acc)
    loaded = mgr.load_first(mgr.auto_order(), ema, strict=False)
    assert loaded is not None and loaded[0].name == PREVIOUS and loaded[1].global_step == 10
    skipped = [r for r in caplog.records if NEWEST in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in caplog.records]  # one warning line per skipped checkpoint


@pytest.mark.parametrize("loop", ["self", "two_links"])
def test_latest_symlink_loop_is_one_line_and_auto_still_works(reference, tmp_path, loader, loop):
    from diffold.checkpoint import CheckpointError, CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    ck = run / "checkpoints"
    (ck / "latest").unlink()
    if loop == "self":
        os.symlink("latest", ck / "latest")
    else:
        os.symlink("other", ck / "latest")
        os.symlink("latest", ck / "other")
    mgr = CheckpointManager(run, loader[0])
    with pytest.raises(CheckpointError, match="cannot be followed") as info:
        mgr.resolve("latest")
    assert "\n" not in str(info.value)
    assert mgr.resolve("auto").name == NEWEST


def test_cli_auto_falls_back_past_two_damaged_checkpoints_bit_identically(runs, reference, tmp_path, helpers):
    """End to end: the two newest checkpoints are unusable (code in a pickle, a garbage train state);
    `--resume auto` resumes from step 10 and reproduces the uninterrupted run exactly."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    for path in [run / "checkpoints" / "best", *(run / "checkpoints").glob("step_*")]:  # NEWEST and the fakes below only
        if path.name != NEWEST:
            shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(reference / "checkpoints" / PREVIOUS, run / "checkpoints" / "step_000000008")  # a third one
    edit_json(run / "checkpoints" / "step_000000008" / "meta.json", lambda m: {**m, "step": 8})
    rechecksum(run / "checkpoints" / "step_000000008")
    CASES["pickled_code_in_rng"][0](run / "checkpoints" / NEWEST)
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and f"skipping checkpoint {run / 'checkpoints' / NEWEST}" in r.stderr


def test_cli_resume_of_another_model_size_is_one_error_line(runs, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    other_size_weights(run / "checkpoints" / NEWEST)
    r = runs.run([*runs.args(), "--output_dir", str(run), "--resume", str(run / "checkpoints" / NEWEST)])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and "another model size" in last, last
    end = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["status"] == "failed" and "another model size" in end["reason"]


def test_cli_resume_says_what_changed_since_the_checkpoint(runs, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    r = runs.run([*runs.args("training.optimizer.lr=1e-3", epochs=5), "--output_dir", str(run), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "setting(s) changed since it was written" in x)
    assert "training.optimizer.lr: 0.003 -> 0.001" in line and "training.num_epochs: 4 -> 5" in line
    start = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in x][-1]
    assert any("training.optimizer.lr" in d for d in start["decisions"])
