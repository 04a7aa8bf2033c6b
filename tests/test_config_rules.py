"""Every config key has a validated range or rule; bad values are one ConfigError line through every path.

The cases are generated from the schema and from diffold.config_rules.RULES: a key added without a
rule, or a numeric key without a range, fails here. Each bad value is tried as a CLI override, as a
DIFFOLD_* environment variable and inside a YAML file (the three ways a value reaches a run).
"""
from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from diffold.config import ConfigError, all_keys, config_from_dict, key_types, load_config
from diffold.config_rules import RULES, VAL_METRICS, Check, Choice, Each, Range, Typed

ROOT = Path(__file__).resolve().parents[1]


def base_type(tp):
    """The annotation without Optional."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def load_via(path_kind: str, key: str, text: str, tmp_path: Path, extra: tuple[str, ...] = ()):
    """load_config with `key` set to the YAML scalar `text` by an override, the environment, or a file."""
    if path_kind == "override":
        return load_config(overrides=[f"{key}={text}", *extra], env={})
    if path_kind == "env":
        return load_config(overrides=list(extra), env={"DIFFOLD_" + key.upper().replace(".", "__"): text})
    f = tmp_path / "c.yaml"
    parts = key.split(".")
    f.write_text("".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parts[:-1]))
                 + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}\n", encoding="utf-8")
    return load_config(f, overrides=list(extra), env={})


def source_of(path_kind: str, key: str) -> str:
    return {"override": f"override '{key}=", "env": "environment DIFFOLD_", "yaml": "c.yaml line"}[path_kind]


def yaml_text(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n").strip()


PATHS = ("override", "env", "yaml")


# --------------------------------------------------------------------------- the table covers the schema
def test_every_key_has_exactly_one_rule():
    assert sorted(set(all_keys()) - set(RULES)) == [], "keys without a rule: add one line to config_rules.RULES"
    assert sorted(set(RULES) - set(all_keys())) == [], "rules for keys the schema does not have"


@pytest.mark.parametrize("key", all_keys())
def test_rule_kind_fits_the_key_type(key):
    tp, rule = base_type(key_types()[key]), RULES[key]
    if tp in (int, float):
        assert isinstance(rule, Range), f"{key}: numeric keys need a Range"
    elif typing.get_origin(tp) is list:
        assert isinstance(rule, Each), f"{key}: list keys need an Each rule"
    elif tp is str:
        assert isinstance(rule, (Check, Choice)), f"{key}: text keys need a Check"
    else:  # bool and Literal: the type check is the rule
        assert tp is bool or typing.get_origin(tp) is typing.Literal, (key, tp)
        assert isinstance(rule, Typed)
    assert rule.describe()


def test_defaults_and_shipped_configs_pass_their_rules():
    load_config(env={})
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(f, env={})


# --------------------------------------------------------------------------- generated: out of range
RANGE_CASES = [(key, bad) for key in all_keys() if isinstance(RULES[key], Range)
               for bad in RULES[key].bad_values(base_type(key_types()[key]) is int)]


@pytest.mark.parametrize("path_kind", PATHS)
@pytest.mark.parametrize("key, bad", RANGE_CASES, ids=[f"{k}={v:g}" for k, v in RANGE_CASES])
def test_out_of_range_value_is_one_line_naming_key_value_source_and_range(key, bad, path_kind, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_via(path_kind, key, yaml_text(bad), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{key}="), msg
    assert source_of(path_kind, key) in msg and "allowed:" in msg and RULES[key].describe() in msg


GOOD_CASES = [(key, good) for key in all_keys() if isinstance(RULES[key], Range)
              for good in RULES[key].good_values(base_type(key_types()[key]) is int)]


@pytest.mark.parametrize("key, good", GOOD_CASES, ids=[f"{k}={v:g}" for k, v in GOOD_CASES])
def test_range_ends_are_accepted(key, good):
    try:
        cfg = load_config(overrides=[f"{key}={yaml_text(good)}"], env={})
    except ConfigError as e:  # only a relation to another key may still object (e.g. sigma_min vs sigma_max)
        assert "is out of range" not in str(e) and " must be " in str(e), str(e)
        return
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == pytest.approx(good)


# --------------------------------------------------------------------------- the issue's catalogue
ISSUE_CASES = [  # (overrides, key named first, words that must appear)
    (["checkpoint.save_every_steps=0"], "checkpoint.save_every_steps", ">= 1" if False else "1 <= value"),
    (["training.validate_every=0"], "training.validate_every", "1 <= value"),
    (["training.optimizer.betas=[2,3]"], "training.optimizer.betas", "entry 2.0"),
    (["training.optimizer.betas=[0.9]"], "training.optimizer.betas", "exactly 2 entries"),
    (["training.optimizer.eps=-1"], "training.optimizer.eps", "0 < value"),
    (["model.dropout=1.5"], "model.dropout", "value < 1"),
    (["model.d_model=30", "model.num_heads=7"], "model.d_model=30 must be divisible by model.num_heads=7", ""),
    (["model.d_model=30"], "model.d_model=30 must be divisible by model.num_heads=4", "model.size='tiny'"),
    (["model.size=custom", "model.d_model=64"], "model.size=custom needs model.num_layers", ""),
    (["diffusion.sigma_data=0"], "diffusion.sigma_data", "0 < value"),
    (["checkpoint.keep_last_n=0"], "checkpoint.keep_last_n", "1 <= value"),
    (["checkpoint.keep_last_n=-1"], "checkpoint.keep_last_n", "1 <= value"),
    (["training.batch_size=0"], "training.batch_size", "1 <= value"),
    (["data.batch_size=0"], "data.batch_size", "1 <= value"),
    (["model.d_model=0"], "model.d_model", "1 <= value"),
    (["checkpoint.save_every_steps=-5"], "checkpoint.save_every_steps", ""),
    (["training.max_steps=-1"], "training.max_steps", ""),
    (["training.max_steps=0"], "training.max_steps", "null = no limit"),
    (["training.max_steps=1.0e+30"], "training.max_steps", "<= 1000000000000"),
    (["training.scheduler.warmup=-0.1"], "training.scheduler.warmup", ""),
    (["training.optimizer.weight_decay=-0.01"], "training.optimizer.weight_decay", ""),
    (["validation.num_samples=-2"], "validation.num_samples", ""),
    (["distributed.timeout_s=-1"], "distributed.timeout_s", "seconds"),
    (["diffusion.sigma_min=200"], "diffusion.sigma_min must be < diffusion.sigma_max", "sigma_max=160.0 (default)"),
    (["validation.sampling_steps=0"], "validation.sampling_steps", ""),
    (["diffusion.num_sampling_steps=0"], "diffusion.num_sampling_steps", ""),
    (["training.batch_size=1.0e+30"], "training.batch_size", "<= 65536"),
    (["training.seed=-1"], "training.seed", "4294967295"),
    (["training.scheduler.min_lr=1e-2"], "training.scheduler.min_lr must be <= training.optimizer.lr", ""),
    (["logging.run_name=../../etc"], "logging.run_name", "one folder name"),
    (["logging.log_with=[wandb,wandb]"], "logging.log_with", "twice"),
    (["validation.best_metric=val/lddt"], "validation.best_metric=val/lddt is better when higher", "best_mode=max"),
    (["validation.best_metric=val/lddt", "validation.best_mode=max", "training.early_stopping.mode=min"],
     "training.early_stopping.metric=val/lddt", "early_stopping.mode=max"),
    (["validation.best_metric=val/los"], "validation.best_metric", "not a validation metric"),
    (["validation.best_metric=val/rmsd", "validation.num_samples=0"], "validation.best_metric=val/rmsd needs", ""),
    (["health.grad_norm_min=10", "health.grad_norm_max=1"], "health.grad_norm_min must be <", ""),
    (["training.scheduler.warmup=2.5"], "training.scheduler.warmup", "whole number"),
    (["health.inject_faults=boom@x"], "health.inject_faults", "fault spec"),
]


@pytest.mark.parametrize("overrides, first, words", ISSUE_CASES, ids=[" ".join(c[0]) for c in ISSUE_CASES])
def test_issue_catalogue_is_rejected_in_one_line(overrides, first, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides, env={})
    msg = str(e.value)
    assert msg.startswith(first) and words in msg and "\n" not in msg, msg
    assert "override '" in msg


def test_zero_is_a_value_not_unset():
    """The `x or default` pattern turned 0 into the default; null (None) is the only 'unset'."""
    cfg = load_config(overrides=["training.batch_size=null", "data.batch_size=null"], env={})
    assert cfg.training.batch_size == cfg.data.batch_size == 4
    assert load_config(overrides=["data.batch_size=3"], env={}).training.batch_size == 3
    assert load_config(overrides=["model.feature_dim=0", "checkpoint.save_every_epochs=0"], env={}).model.feature_dim == 0


def test_saved_configs_are_checked_too():
    tree = load_config(env={}).to_dict()
    tree["checkpoint"]["keep_last_n"] = 0
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last_n=0 \(run/config.yaml\)"):
        config_from_dict(tree, "run/config.yaml")


# --------------------------------------------------------------------------- YAML 1.1 booleans and text keys
LITERAL_CASES = [(key, word) for key, tp in key_types().items()
                 if typing.get_origin(base_type(tp)) is typing.Literal for word in typing.get_args(base_type(tp))]


@pytest.mark.parametrize("path_kind", PATHS)
@pytest.mark.parametrize("key, word", LITERAL_CASES, ids=[f"{k}={w}" for k, w in LITERAL_CASES])
def test_every_enum_word_arrives_as_written(key, word, path_kind, tmp_path):
    """mixed_precision=no is 'no', not YAML 1.1's False, whichever way it is given."""
    extra = {("training.early_stopping.mode", "max"): ("training.early_stopping.metric=val/lddt",),
             ("validation.best_mode", "max"): ("validation.best_metric=val/lddt",),
             ("model.size", "custom"): ("model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_pair=8"),
             }.get((key, word), ())
    cfg = load_via(path_kind, key, word, tmp_path, extra)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == word


def test_the_bool_trap_words_are_covered():
    """At least one enum (mixed_precision) has a word YAML 1.1 reads as a boolean: the case above guards it."""
    assert any(isinstance(yaml.safe_load(w), bool) for _, w in LITERAL_CASES)


@pytest.mark.parametrize("path_kind", PATHS)
@pytest.mark.parametrize("word", ["off", "yes", "true"])
def test_bool_words_outside_an_enum_are_rejected_with_the_word(word, path_kind, tmp_path):
    with pytest.raises(ConfigError, match=rf"must be one of \['no', 'bf16', 'fp16'\], got '{word}'"):
        load_via(path_kind, "training.mixed_precision", word, tmp_path)


@pytest.mark.parametrize("path_kind", PATHS)
@pytest.mark.parametrize("text", ["no", "2024", "1e3", "on"])
def test_text_keys_keep_what_was_written(text, path_kind, tmp_path):
    assert load_via(path_kind, "logging.run_name", text, tmp_path).logging.run_name == text


def test_bool_without_its_text_maps_to_the_enum_word():
    """A saved or nested dict has lost the text: False still means 'no' where the enum has 'no'."""
    tree = load_config(env={}).to_dict()
    tree["training"]["mixed_precision"] = False
    assert config_from_dict(tree).training.mixed_precision == "no"
    tree["logging"]["wandb_mode"] = False
    with pytest.raises(ConfigError, match="quote the word"):
        config_from_dict(tree)


def test_environment_names():
    assert load_config(env={"DIFFOLD_TASK": "protein"}).task == "protein"
    with pytest.raises(ConfigError, match="environment DIFFOLD_TRAINING_LR: separate section and key with a double"):
        load_config(env={"DIFFOLD_TRAINING_LR": "1"})
    assert load_config(env={"DIFFOLD_SOMETHING_ELSE": "1", "PATH": "/bin"}) == load_config(env={})


# --------------------------------------------------------------------------- duplicate YAML keys
@pytest.mark.parametrize("text, key, lines", [
    ("training:\n  batch_size: 4\n  log_every: 2\n  batch_size: 8\n", "training.batch_size", (2, 4)),
    ("training:\n  log_every: 2\nmodel:\n  size: tiny\ntraining:\n  num_epochs: 1\n", "training", (1, 5)),
    ("training: {optimizer: {lr: 1.0e-3, lr: 2.0e-3}}\n", "training.optimizer.lr", (1, 1)),
])
def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path, text, key, lines):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    msg = str(e.value)
    assert f"key '{key}' is set twice (line {lines[0]} and line {lines[1]})" in msg and "\n" not in msg


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("training:\n  optimizer: &o {lr: 1.0e-3}\n  scheduler:\n    min_lr: 1.0e-6\n"
                 "model: {size: tiny}\n")
    assert load_config(f, env={}).training.optimizer.lr == pytest.approx(1e-3)


def test_file_errors_name_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# comment\ntraining:\n  optimizer:\n    betas: [0.9, 1.5]\n")
    with pytest.raises(ConfigError, match=rf"betas=\[0.9, 1.5\] \({f} line 4\) has entry 1.5"):
        load_config(f, env={})


# --------------------------------------------------------------------------- registries kept in step
def test_model_size_registry_matches_the_model():
    from diffold import config_rules
    from diffold.model import MODEL_SIZES
    assert config_rules.MODEL_SIZES == MODEL_SIZES


def test_val_metric_directions():
    assert {k: v for k, v in VAL_METRICS.items() if v == "min"}.keys() == {
        "val/loss", "val/rmsd", "val/bond_length_error", "val/rmsd_over_baseline"}
    cfg = load_config(overrides=["validation.best_metric=val/lddt", "validation.best_mode=max"], env={})
    assert cfg.training.early_stopping.mode is None  # inherits max: accepted


# --------------------------------------------------------------------------- through the real CLI
def test_train_full_rejects_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train_full.py", "--config", "configs/smoke.yaml", "--output_dir", str(out),
                        "checkpoint.save_every_steps=0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint.save_every_steps=0"), r.stderr
    assert "allowed: 1 <= value" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_preset_values_are_checked_and_named(monkeypatch):
    from diffold import presets

    monkeypatch.setitem(presets.PRESETS, "broken", {"checkpoint.keep_last_n": 0})
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last_n=0 \(preset broken\) is out of range"):
        load_config(preset="broken", env={})
