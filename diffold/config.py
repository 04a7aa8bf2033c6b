"""Typed, validated, frozen run configuration.

Loading order (later wins): dataclass defaults < YAML file < --preset overlay
< environment (DIFFOLD_<SECTION>__<KEY>=value, DIFFOLD_TASK) < dotted CLI overrides (a.b.c=value).
Every error is a one-line ConfigError naming the key, where it came from and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line that says what to change."""


BOOL_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}  # what YAML 1.1 reads as a bool


# --------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class StructureEncoderConfig:
    use_esmfold: bool = False              # predict missing structures with a LOCAL ESMFold
    esmfold_path: Optional[str] = None     # directory with an EsmForProteinFolding checkpoint
    plm_path: Optional[str] = None         # directory with an EsmModel for per-residue features
    plm_layer: int = -1                    # hidden-state layer used as features


@dataclass(frozen=True)
class ModelConfig:
    size: Literal["tiny", "small", "base", "custom"] = "tiny"
    d_model: Optional[int] = None          # None -> from the size registry
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    d_pair: Optional[int] = None
    ff_mult: int = 4
    dropout: float = 0.0
    max_relpos: int = 32                   # relative-position bins are clipped to +-max_relpos
    head: Literal["equivariant", "af3"] = "equivariant"
    feature_dim: int = 0                   # width of optional precomputed per-residue features
    use_moe: bool = False
    num_experts: int = 4
    top_k: int = 2
    moe_aux_weight: float = 0.01
    activation_checkpointing: bool = False
    pair_chunk_size: Optional[int] = None  # build the [L, L] pair features this many rows at a time (None: all)
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # aot_eager/eager: debug compile issues
    structure_encoder: StructureEncoderConfig = field(default_factory=StructureEncoderConfig)


@dataclass(frozen=True)
class DataConfig:
    train_path: str = "data/examples/train.csv"   # dir, glob, or CSV manifest
    val_path: Optional[str] = "data/examples/val.csv"
    atoms: Optional[str] = None            # None -> task default (RNA C4', protein CA); or a named set
    max_length: int = 128                  # training crop length (residues)
    min_length: int = 10                   # shorter chains are skipped (counted)
    batch_size: Optional[int] = None       # alias of training.batch_size (see README)
    max_tokens: Optional[int] = None       # token budget per batch instead of a fixed count
    num_workers: int = 0
    num_proc: int = 1                      # featurization worker processes (and MMseqs2 threads)
    file_timeout_s: float = 120.0          # a file parsing longer is skipped (counted, not cached, retried next run)
    cache_dir: Optional[str] = None        # None -> <repo>/.cache/diffold
    val_fraction: float = 0.1              # used when only train_path is given
    cluster_identity: float = 0.9          # sequences this similar never straddle the split
    cluster_coverage: float = 0.8          # ... over at least this fraction of the shorter sequence
    cluster_method: Literal["auto", "builtin", "mmseqs"] = "auto"  # auto: MMseqs2 for >= 2000 distinct sequences if installed
    cluster_weights: bool = False          # scale each train chain's weight by 1 / its cluster's size (mean 1)
    use_predicted_structures: bool = False
    predicted_dir: Optional[str] = None    # cache of predicted PDBs; None -> <cache_dir>/predicted
    min_plddt: float = 70.0
    feature_dir: Optional[str] = None      # per-chain precomputed features (<id>.pt)
    pad_multiple: int = 0                  # pad batch lengths to a multiple of this (0: none; 16 when compiling)
    bucket_size: int = 64                  # batches drawn from length buckets of this many chains
    # physically absurd chains are skipped at featurization, counted in data_report.json (diffold/sanity.py)
    max_abs_coordinate: float = 5000.0     # A; |x| at or above this (PDB placeholder 9999.999) skips the chain
    max_consecutive_distance: float = 50.0  # A per step of residue numbering between consecutive observed residues
    min_radius_of_gyration: float = 1.0    # A; a chain whose atoms all lie closer to their centre is collapsed


@dataclass(frozen=True)
class DiffusionConfig:
    formulation: Literal["edm", "ddpm"] = "edm"
    sigma_data: float = 16.0               # Angstrom; Karras et al. 2022 sigma_data, AF3 value
    p_mean: float = -1.2                   # log-normal training sigmas (EDM Table 1)
    p_std: float = 1.5
    sigma_min: float = 0.002
    sigma_max: float = 160.0
    rho: float = 7.0
    num_sampling_steps: int = 50
    sampling_churn: float = 0.0            # EDM S_churn (Alg. 2) for sigma in [0.03, 3] x sigma_data; 0 = deterministic ODE
    # AF3's step scale eta; > 1 moves each step further toward
    # the denoised estimate (sharper, lower-temperature samples); 1 = the plain EDM ODE
    sampling_step_scale: float = 1.0
    num_timesteps: int = 1000              # DDPM only
    beta_schedule: Literal["cosine", "linear"] = "cosine"
    augment_rotation: bool = True          # random rigid augmentation of the clean structure
    bond_loss_weight: float = 0.0
    smooth_lddt_weight: float = 0.0


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "lion"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass(frozen=True)
class SchedulerConfig:
    name: Literal["warmup_cosine", "warmup_cosine_restarts", "constant"] = "warmup_cosine"
    warmup: float = 0.05                   # < 1: fraction of total steps; >= 1: steps
    min_lr: float = 1e-6
    num_cycles: int = 1                    # restarts schedule only


@dataclass(frozen=True)
class EarlyStoppingConfig:
    enabled: bool = False
    patience: int = 5                      # validations without improvement
    min_delta: float = 0.0
    metric: Optional[str] = None           # None -> validation.best_metric
    mode: Optional[Literal["min", "max"]] = None


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 42
    num_epochs: int = 10
    max_steps: Optional[int] = None        # optimizer steps; stops early when reached
    batch_size: Optional[int] = None       # micro-batch per process; None -> data.batch_size or 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    validate_every: int = 1                # epochs
    validate_every_steps: Optional[int] = None
    log_every: int = 10                    # optimizer steps between metric flushes
    ema_decay: float = 0.999
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass(frozen=True)
class ValidationConfig:
    num_samples: int = 4                   # chains sampled from noise per validation
    sampling_steps: int = 20
    # whole chains are sampled and scored up to this many
    # residues; a longer chain is centre-cropped to it (logged once)
    max_length: int = 512
    best_metric: str = "val/loss"
    best_mode: Literal["min", "max"] = "min"


@dataclass(frozen=True)
class CheckpointConfig:
    save_every_steps: int = 500            # 'latest' cadence (also at each epoch end)
    save_every_epochs: int = 0             # epoch_N snapshots; 0 = off
    keep_last_n: int = 2                   # step checkpoints kept besides best/epoch_N
    export_best: bool = True               # safetensors inference bundle for best


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    window: int = 50                       # running-statistics window (steps)
    loss_cap: float = 1e4                  # absolute loss explosion threshold
    spike_sigma: float = 6.0               # k-sigma spike over the running window
    stagnation_window: int = 200
    stagnation_eps: float = 1e-8
    grad_norm_max: float = 1e3
    grad_norm_min: float = 1e-8
    lr_min: float = 0.0
    lr_max: float = 1e-2
    slow_batch_factor: float = 3.0
    data_wait_share: float = 0.5
    memory_share: float = 0.92
    skip_nonfinite: bool = True
    max_bad_steps: int = 3                 # consecutive bad steps before a rollback
    rollback_on_spike: bool = True         # a confirmed spike / loss held above loss_cap rolls back
    weight_growth_max: float = 2.0         # weight norm growing more than this x in ONE update = exploded
    divergence_factor: float = 10.0        # smoothed loss this many x above its run minimum = diverged (0: off)
    start_factor: float = 3.0              # smoothed loss this many x above the untrained model's = diverged (0: off)
    lr_backoff: float = 0.5
    max_rollbacks: int = 3
    oom_recovery: bool = True
    memory_cleanup: bool = False
    inject_faults: str = ""                # TEST ONLY, e.g. "nan_loss@5,oom@7:rank1"


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "outputs"
    run_name: Optional[str] = None         # None -> <config stem>_<timestamp>
    log_with: list[str] = field(default_factory=lambda: ["tensorboard", "wandb"])
    wandb_project: str = "diffold"
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None  # None -> offline w/o key
    progress_bar: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"


@dataclass(frozen=True)
class DistributedConfig:
    find_unused_parameters: bool = False
    timeout_s: int = 1800                  # process-group timeout


@dataclass(frozen=True)
class Config:
    task: Literal["rna", "protein"] = "rna"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def effective_batch_size(self, num_processes: int = 1) -> int:
        """Chains per optimizer step = micro-batch x accumulation x processes."""
        return self.training.batch_size * self.training.gradient_accumulation_steps * num_processes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- key helpers
def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. 'training.optimizer.lr'."""
    keys = []
    for f, tp in _fields(cls):
        name = prefix + f.name
        keys.extend(all_keys(tp, name + ".") if _is_section(tp) else [name])
    return keys


@functools.lru_cache(maxsize=None)  # the schema is static; get_type_hints made every load_config ~0.3 s
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not match:  # try the last component alone (e.g. 'lr' -> 'training.optimizer.lr')
        leaf = key.rsplit(".", 1)[-1]
        match = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean '{match[0]}'?)" if match else ""


def set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    """Set a dotted key in a nested dict, rejecting keys the schema does not know."""
    if key not in all_keys():
        if any(k.startswith(key + ".") for k in all_keys()) and isinstance(value, dict):
            for sub, v in value.items():
                set_dotted(tree, f"{key}.{sub}", v, source)
            return
        raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{p}' is a section, not a value")
    node[leaf] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and any(x.startswith(name + ".") for x in all_keys()):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# --------------------------------------------------------------------------- typing
def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert one leaf value against its annotation; ConfigError if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 read no/off/yes/on as a boolean: map it back where the enum has it
            words = [a for a in args if str(a).lower() in BOOL_WORDS[value]]
            if len(words) == 1:
                return words[0]
        if value not in args:
            hint = " (YAML reads no/off/yes/on as booleans: quote the word)" if isinstance(value, bool) else ""
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # PyYAML reads '1e-4' as a string
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an int with hundreds of digits
                pass
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    type_name = getattr(tp, "__name__", str(tp))
    hint = " (YAML read it as a boolean or number: quote it)" if tp is str and isinstance(value, (bool, int, float)) else ""
    raise ConfigError(f"{source}: '{key}' must be {type_name}, got {value!r}{hint}")


def _build(cls: type, tree: dict, sources: dict[str, str], prefix: str = "") -> Any:
    kwargs = {}
    for f, tp in _fields(cls):
        key = prefix + f.name
        if f.name not in tree:
            continue
        value = tree[f.name]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{sources.get(key, 'config')}: '{key}' is a section, got {value!r}")
            kwargs[f.name] = _build(tp, value, sources, key + ".")
        else:
            kwargs[f.name] = _coerce(value, tp, key, sources.get(key, "config"))
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading
@functools.lru_cache(maxsize=None)
def key_types() -> dict[str, Any]:
    """Dotted leaf key -> its annotation."""
    def walk(cls: type, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f, tp in _fields(cls):
            out.update(walk(tp, prefix + f.name + ".") if _is_section(tp) else {prefix + f.name: tp})
        return out
    return walk(Config, "")


def _wants_text(tp: Any) -> bool:
    """A text key (str, or a Literal of strings, possibly Optional)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _as_written(key: str, value: Any, raw: str | None) -> Any:
    """The user's own text for a text key that YAML 1.1 turned into a bool or number (no -> 'no')."""
    if raw is not None and isinstance(value, (bool, int, float)) and _wants_text(key_types().get(key)):
        return raw.strip()
    return value


def _parse_value(text: str) -> Any:
    if text.strip() == "":
        return ""  # 'key=' means the empty string (use key=null for None)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value (e.g. training.optimizer.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    return key, _as_written(key, _parse_value(text), text)


def load_config(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Config:
    """Resolve defaults < YAML < preset < env < overrides into a validated, frozen Config."""
    from diffold.config_yaml import YamlError, read_yaml
    from diffold.presets import PRESETS

    tree: dict = {}
    sources: dict[str, str] = {}

    def apply(key: str, value: Any, source: str) -> None:
        set_dotted(tree, key, value, source)
        for k in all_keys():
            if k == key or k.startswith(key + "."):
                sources[k] = source

    yaml_preset = None
    if path is not None:
        p = Path(path)
        try:
            doc = read_yaml(p)
        except YamlError as e:
            raise ConfigError(str(e)) from None
        yaml_preset = doc.data.pop("preset", None)  # a YAML may name its preset; --preset wins
        for key, value in flatten(doc.data).items():
            line = doc.lines.get(key) or doc.lines.get(key.rsplit(".", 1)[0])
            apply(key, _as_written(key, value, doc.raw.get(key)), f"{p} line {line}" if line else str(p))
    preset = preset or yaml_preset or "balanced"
    if not isinstance(preset, str) or preset not in PRESETS:
        name = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f" (did you mean '{name[0]}'?)" if name else ""
        raise ConfigError(f"unknown preset '{preset}'{hint}; choose from {sorted(PRESETS)}")
    for key, value in PRESETS[preset].items():
        apply(key, value, f"preset {preset}")
    env = os.environ if env is None else env
    sections = {k.split(".")[0] for k in all_keys() if "." in k}
    for name, text in sorted(env.items()):
        key = name[len("DIFFOLD_"):].lower().replace("__", ".")
        if not name.startswith("DIFFOLD_") or ("__" not in name and key not in all_keys()):
            if name.startswith("DIFFOLD_") and key.split("_")[0] in sections:  # DIFFOLD_TRAINING_LR: one '_' short
                raise ConfigError(f"environment {name}: separate section and key with a double underscore, "
                                  f"e.g. DIFFOLD_TRAINING__OPTIMIZER__LR")
            continue
        apply(key, _as_written(key, _parse_value(text), text), f"environment {name}")
    for item in overrides:
        key, value = parse_override(item)
        apply(key, value, f"override '{item}'")
    from diffold.esm import resolve_local_models  # torch-free; reads local model dirs (not for saved configs)

    return resolve_local_models(_finalize(_build(Config, tree, sources), sources))


def _finalize(cfg: Config, sources: dict[str, str]) -> Config:
    """Check every key's range and the relations between keys (diffold.config_rules), then resolve aliases."""
    from diffold.config_rules import find_problem

    problem = find_problem(cfg, all_keys(), lambda k: sources.get(k, "default"))
    if problem:
        raise ConfigError(problem)
    t, d = cfg.training, cfg.data
    bs = next((b for b in (t.batch_size, d.batch_size) if b is not None), 4)  # not `or`: 0 is a value, not unset
    return dataclasses.replace(cfg, training=dataclasses.replace(t, batch_size=bs),
                               data=dataclasses.replace(d, batch_size=bs))


def config_from_dict(tree: dict, source: str = "checkpoint") -> Config:
    """Rebuild a Config from a plain dict (e.g. saved config.yaml); strict like load_config."""
    keys = flatten(tree)
    for key in keys:
        if key not in all_keys():
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
    sources = {k: source for k in keys}
    return _finalize(_build(Config, tree, sources), sources)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
