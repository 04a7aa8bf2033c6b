"""Config system: presets, strictness, precedence, round trip."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from diffold.config import ConfigError, all_keys, config_from_dict, config_to_yaml, load_config
from diffold.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
NO_ENV: dict = {}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_and_only_names_known_keys(preset):
    cfg = load_config(ROOT / "configs/smoke.yaml", preset=preset, env=NO_ENV)
    for key in PRESETS[preset]:
        assert key in all_keys()
    for key, value in PRESETS[preset].items():  # the preset's values are in the result
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key


def test_shipped_configs_load():
    for name in ["smoke", "test_train", "default"]:
        load_config(ROOT / f"configs/{name}.yaml", env=NO_ENV)


def test_seed_config_has_seed_keys():
    raw = yaml.safe_load((ROOT / "configs/test_train.yaml").read_text())
    cfg = load_config(ROOT / "configs/test_train.yaml", env=NO_ENV)
    assert raw["training"]["optimizer"]["lr"] == "1e-4"  # PyYAML string, coerced below
    assert cfg.training.optimizer.lr == pytest.approx(1e-4)
    assert cfg.model.structure_encoder.use_esmfold is False
    assert cfg.diffusion.num_timesteps == 1000
    assert cfg.training.batch_size == cfg.data.batch_size == 4


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  optimizer:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env=NO_ENV)
    msg = str(e.value)
    assert "training.optimizer.lrr" in msg and str(f) in msg and "training.optimizer.lr" in msg
    assert "\n" not in msg


def test_wrong_type_is_rejected(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  num_epochs: many\n")
    with pytest.raises(ConfigError, match=r"training.num_epochs' must be int, got 'many'"):
        load_config(f, env=NO_ENV)
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(overrides=["training.optimizer.name=sgd"], env=NO_ENV)
    with pytest.raises(ConfigError, match="must be bool"):
        load_config(overrides=["model.use_moe=maybe"], env=NO_ENV)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml", env=NO_ENV)
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(overrides=["training.optimizer.lr"], env=NO_ENV)
    with pytest.raises(ConfigError, match="did you mean 'training.optimizer.lr'"):
        load_config(overrides=["lr=1e-3"], env=NO_ENV)
    with pytest.raises(ConfigError, match="unknown preset 'safty'.*did you mean 'safety'"):
        load_config(preset="safty", env=NO_ENV)


def test_unsafe_yaml_is_rejected(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("training: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, env=NO_ENV)


def test_precedence_defaults_yaml_preset_env_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  max_grad_norm: 2.0\n  optimizer:\n    lr: 0.5\n  log_every: 7\n")
    assert load_config(env=NO_ENV).training.max_grad_norm == 1.0                    # default
    assert load_config(f, env=NO_ENV).training.max_grad_norm == 2.0                  # yaml > default
    assert load_config(f, preset="safety", env=NO_ENV).training.max_grad_norm == 0.5  # preset > yaml
    env = {"DIFFOLD_TRAINING__MAX_GRAD_NORM": "0.25", "DIFFOLD_TRAINING__LOG_EVERY": "3"}
    cfg = load_config(f, preset="safety", env=env)
    assert cfg.training.max_grad_norm == 0.25 and cfg.training.log_every == 3      # env > preset
    cfg = load_config(f, preset="safety", env=env, overrides=["training.max_grad_norm=0.125"])
    assert cfg.training.max_grad_norm == 0.125                                     # override > env
    assert cfg.training.optimizer.lr == 1e-4 and cfg.training.log_every == 3
    with pytest.raises(ConfigError, match="environment DIFFOLD_TRAINING__NOPE"):
        load_config(env={"DIFFOLD_TRAINING__NOPE": "1"})


def test_batch_size_alias_rules():
    assert load_config(overrides=["data.batch_size=6"], env=NO_ENV).training.batch_size == 6
    assert load_config(overrides=["training.batch_size=5"], env=NO_ENV).data.batch_size == 5
    with pytest.raises(ConfigError, match="disagree"):
        load_config(overrides=["data.batch_size=6", "training.batch_size=5"], env=NO_ENV)


def test_effective_batch_size_and_frozen():
    cfg = load_config(overrides=["training.batch_size=3", "training.gradient_accumulation_steps=4"], env=NO_ENV)
    assert cfg.effective_batch_size(num_processes=2) == 24
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.batch_size = 1


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(ROOT / "configs/smoke.yaml", preset="debug", overrides=["model.use_moe=true"], env=NO_ENV)
    again = config_from_dict(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg
    assert config_to_yaml(again) == config_to_yaml(cfg)
