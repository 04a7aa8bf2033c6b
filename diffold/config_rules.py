"""The allowed range of every config key, and the rules that relate keys: one table, checked at load.

Every leaf key of the schema (diffold.config) has one entry in RULES; a new key without one fails
tests/test_config_rules.py. Adding a key = one line here, e.g. `"data.new_key": Range(1, 64)`.
Torch-free: the registries a rule needs (model sizes, validation metrics) are plain data here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

# torch-free copy of diffold.model.MODEL_SIZES (tests/test_config_rules.py checks the two agree)
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "num_layers": 3, "num_heads": 4, "d_pair": 16},
    "small": {"d_model": 256, "num_layers": 8, "num_heads": 8, "d_pair": 32},
    "base": {"d_model": 640, "num_layers": 13, "num_heads": 10, "d_pair": 64},
}
# validation metrics a run logs and whether lower is better (best_metric / early_stopping.metric)
VAL_METRICS: dict[str, str] = {"val/loss": "min", "val/rmsd": "min", "val/tm": "max", "val/gdt_ts": "max",
                               "val/lddt": "max", "val/bond_length_error": "min",
                               "val/rmsd_over_baseline": "min", "val/tm_over_baseline": "max",
                               "val/gdt_ts_over_baseline": "max", "val/lddt_over_baseline": "max"}
SAMPLED = tuple(k for k in VAL_METRICS if k != "val/loss")  # need validation.num_samples >= 1
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*")  # one path component, no leading dot


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# --------------------------------------------------------------------------- rule kinds
@dataclass(frozen=True)
class Range:
    """A number in [lo, hi] (open ends with lo_open / hi_open); `note` says what the value means."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""
    extra: Callable[[Any], str | None] | None = None   # a further test inside the range (e.g. whole numbers)

    def problem(self, v: Any) -> str | None:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        if not (above and below):
            return f"is out of range; allowed: {self.describe()}"
        return self.extra(v) if self.extra else None

    def describe(self) -> str:
        lo = f"{_fmt(self.lo)} {'<' if self.lo_open else '<='} "
        hi = f" {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return f"{lo}value{hi}" + (f" ({self.note})" if self.note else "")

    def bad_values(self, integer: bool) -> list[float]:
        """Values just outside the range (for generated tests)."""
        step = 1 if integer else max(abs(self.lo) * 0.5, 1e-3)
        lo = self.lo if self.lo_open else self.lo - step
        hi = self.hi if self.hi_open else (self.hi + 1 if integer else self.hi * 2 + 1)
        return [lo, hi]

    def good_values(self, integer: bool) -> list[float]:
        """The closed ends (or a point just inside an open end)."""
        lo = self.lo if not self.lo_open else (self.lo + 1 if integer else self.lo + min(1e-3, (self.hi - self.lo) / 4))
        hi = self.hi if not self.hi_open else (self.hi - 1 if integer else self.hi - min(1e-3, (self.hi - self.lo) / 4))
        return [lo, hi]


@dataclass(frozen=True)
class Each:
    """A list whose entries each satisfy `rule`, optionally of a fixed length, without duplicates."""

    rule: Any
    length: int | None = None
    unique: bool = False

    def problem(self, v: list) -> str | None:
        if self.length is not None and len(v) != self.length:
            return f"must have exactly {self.length} entries, got {len(v)}"
        if self.unique and len(set(v)) != len(v):
            return "lists an entry twice"
        for x in v:
            if (why := self.rule.problem(x)) is not None:
                return f"has entry {x!r} that {why}"
        return None

    def describe(self) -> str:
        return (f"{self.length} " if self.length else "") + f"entries each {self.rule.describe()}"


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def problem(self, v: Any) -> str | None:
        return None if v in self.values else f"is not allowed; allowed: {' or '.join(map(repr, self.values))}"

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class Check:
    """A text rule: `test(value)` returns what is wrong, or None."""

    test: Callable[[Any], str | None]
    note: str

    def problem(self, v: Any) -> str | None:
        return self.test(v)

    def describe(self) -> str:
        return self.note


@dataclass(frozen=True)
class Typed:
    """The annotation is the whole rule (bool, Literal[...]): the type check already enforces it."""

    note: str = ""

    def problem(self, v: Any) -> str | None:
        return None

    def describe(self) -> str:
        return self.note or "as annotated"


def _nonempty(v: str) -> str | None:
    return "must not be empty (use null for none)" if not v.strip() else None


def _safe_name(v: str) -> str | None:
    if _SAFE_NAME.fullmatch(v) and len(v) <= 128:
        return None
    return "must be one folder name (letters, digits, . _ + = -; no '/', no leading dot; <= 128 characters)"


def _atoms(v: str) -> str | None:
    return None if any(a.strip() for a in v.split(",")) else "names no atom; use e.g. \"C4'\" or a named set"


def _metric(v: str) -> str | None:
    return None if v in VAL_METRICS else f"is not a validation metric; allowed: {', '.join(VAL_METRICS)}"


def _faults(v: str) -> str | None:
    from diffold.faults import FaultInjector  # torch-free

    try:
        FaultInjector.from_spec(v)
    except ValueError as e:
        return f"is not a fault spec ({e})"
    return None


def _warmup(v: float) -> str | None:
    if v >= 1 and not float(v).is_integer():
        return "must be a fraction < 1 of the total steps, or a whole number of steps"
    return None


TEXT = Check(_nonempty, "non-empty text")
TYPED = Typed()
BIG = 10 ** 12  # "practically unlimited" step counts
# --------------------------------------------------------------------------- the table
RULES: dict[str, Any] = {
    "task": TYPED,
    "model.size": TYPED,
    "model.d_model": Range(1, 16384, note="null = from model.size"),
    "model.num_layers": Range(1, 512, note="null = from model.size"),
    "model.num_heads": Range(1, 1024, note="null = from model.size"),
    "model.d_pair": Range(1, 4096, note="null = from model.size"),
    "model.ff_mult": Range(1, 64),
    "model.dropout": Range(0, 1, hi_open=True),
    "model.max_relpos": Range(1, 100_000),
    "model.head": TYPED,
    "model.feature_dim": Range(0, 65536, note="0 = no per-residue features"),
    "model.use_moe": TYPED,
    "model.num_experts": Range(1, 1024),
    "model.top_k": Range(1, 1024),
    "model.moe_aux_weight": Range(0, 100),
    "model.pair_chunk_size": Range(1, 1_000_000, note="rows of the pair features built at a time; null = all"),
    "model.activation_checkpointing": TYPED,
    "model.compile": TYPED,
    "model.compile_backend": TYPED,
    "model.structure_encoder.use_esmfold": TYPED,
    "model.structure_encoder.esmfold_path": TEXT,
    "model.structure_encoder.plm_path": TEXT,
    "model.structure_encoder.plm_layer": Range(-1000, 1000, note="-1 = last; checked against the PLM's layers"),
    "data.train_path": TEXT,
    "data.val_path": Check(_nonempty, "non-empty text; null = split from data.train_path"),
    "data.atoms": Check(_atoms, "atom names (\"C4'\", \"P,C4'\") or a named set; null = task default"),
    "data.max_length": Range(4, 100_000, note="residues per training crop"),
    "data.min_length": Range(1, 100_000, note="residues"),
    "data.batch_size": Range(1, 65536, note="chains per micro-batch; alias of training.batch_size"),
    "data.max_tokens": Range(1, 10 ** 9, note="null = fixed batch size"),
    "data.num_workers": Range(0, 256),
    "data.num_proc": Range(1, 1024),
    "data.cache_dir": TEXT,
    "data.val_fraction": Range(0, 0.9, note="0 = no validation split"),
    "data.cluster_identity": Range(0, 1, lo_open=True),
    "data.use_predicted_structures": TYPED,
    "data.predicted_dir": TEXT,
    "data.min_plddt": Range(0, 100),
    "data.feature_dir": TEXT,
    "data.pad_multiple": Range(0, 4096, note="residues; 0 = pad to the longest chain of the batch only"),
    "data.bucket_size": Range(1, 10 ** 6),
    "data.max_abs_coordinate": Range(0, 1e30, lo_open=True, note="Angstrom; |x| at or above = absurd (PDB placeholder 9999.999)"),
    "data.max_consecutive_distance": Range(0, 1e30, lo_open=True, note="Angstrom per numbering step between consecutive residues"),
    "data.min_radius_of_gyration": Range(0, 1e30, note="Angstrom; 0 = off; below = collapsed"),
    "data.file_timeout_s": Range(0, 1e9, lo_open=True, note="seconds per structure file before it is skipped"),
    "data.cluster_coverage": Range(0, 1, lo_open=True, note="MMseqs2 / built-in coverage for sequence clusters"),
    "data.cluster_method": TYPED,
    "data.cluster_weights": TYPED,
    "diffusion.formulation": TYPED,
    "diffusion.sigma_data": Range(0, 1000, lo_open=True, note="Angstrom"),
    "diffusion.p_mean": Range(-10, 10),
    "diffusion.p_std": Range(0, 10, lo_open=True),
    "diffusion.sigma_min": Range(0, 10_000, lo_open=True, note="Angstrom, < diffusion.sigma_max"),
    "diffusion.sigma_max": Range(0, 100_000, lo_open=True, note="Angstrom, > diffusion.sigma_min"),
    "diffusion.rho": Range(0, 100, lo_open=True),
    "diffusion.num_sampling_steps": Range(1, 10_000),
    "diffusion.sampling_churn": Range(0, 1000, note="0 = deterministic"),
    "diffusion.sampling_step_scale": Range(0, 10, lo_open=True, note="AF3's eta; 1 = the plain EDM ODE"),
    "diffusion.num_timesteps": Range(1, 100_000),
    "diffusion.beta_schedule": TYPED,
    "diffusion.augment_rotation": TYPED,
    "diffusion.bond_loss_weight": Range(0, 10_000),
    "diffusion.smooth_lddt_weight": Range(0, 10_000),
    "training.seed": Range(0, 2 ** 32 - 1),
    "training.num_epochs": Range(1, 10 ** 7),
    "training.max_steps": Range(1, BIG, note="optimizer steps; null = no limit"),
    "training.batch_size": Range(1, 65536, note="chains per micro-batch per process; null = data.batch_size or 4"),
    "training.gradient_accumulation_steps": Range(1, 65536),
    "training.max_grad_norm": Range(0, 1e9, note="0 = no clipping"),
    "training.mixed_precision": TYPED,
    "training.validate_every": Range(1, 10 ** 6, note="epochs"),
    "training.validate_every_steps": Range(1, BIG, note="optimizer steps; null = every validate_every epochs"),
    "training.log_every": Range(1, BIG, note="optimizer steps"),
    "training.ema_decay": Range(0, 1, lo_open=True, hi_open=True),
    "training.optimizer.name": TYPED,
    # a diverging LR is a real run, not a config error: the health system recovers or gives up (issue 15)
    "training.optimizer.lr": Range(0, 1e4, lo_open=True),
    "training.optimizer.weight_decay": Range(0, 10),
    "training.optimizer.betas": Each(Range(0, 1, hi_open=True), length=2),
    "training.optimizer.eps": Range(0, 1, lo_open=True),
    "training.scheduler.name": TYPED,
    "training.scheduler.warmup": Range(0, BIG, note="< 1: fraction of the total steps; >= 1: steps", extra=_warmup),
    "training.scheduler.min_lr": Range(0, 1e4, note="<= training.optimizer.lr"),
    "training.scheduler.num_cycles": Range(1, 10_000),
    "training.early_stopping.enabled": TYPED,
    "training.early_stopping.patience": Range(1, 10 ** 6, note="validations"),
    "training.early_stopping.min_delta": Range(0, 1e9),
    "training.early_stopping.metric": Check(_metric, "a validation metric; null = validation.best_metric"),
    "training.early_stopping.mode": TYPED,
    "validation.num_samples": Range(0, 100_000, note="chains sampled per validation; 0 = loss only"),
    "validation.sampling_steps": Range(1, 10_000),
    "validation.max_length": Range(1, 100_000, note="longer chains are centre-cropped for validation"),
    "validation.best_metric": Check(_metric, "a validation metric"),
    "validation.best_mode": TYPED,
    "checkpoint.save_every_steps": Range(1, BIG, note="optimizer steps between 'latest' checkpoints"),
    "checkpoint.save_every_epochs": Range(0, 10 ** 6, note="0 = no epoch snapshots"),
    "checkpoint.keep_last_n": Range(1, 10 ** 6, note="step checkpoints kept; 'latest' needs at least 1"),
    "checkpoint.export_best": TYPED,
    "health.enabled": TYPED,
    "health.window": Range(2, 10 ** 6, note="steps"),
    "health.loss_cap": Range(0, 1e30, lo_open=True),
    "health.spike_sigma": Range(0, 1e6, lo_open=True),
    "health.stagnation_window": Range(2, 10 ** 7, note="steps"),
    "health.stagnation_eps": Range(0, 1e6),
    "health.grad_norm_max": Range(0, 1e30, lo_open=True, note="> health.grad_norm_min"),
    "health.grad_norm_min": Range(0, 1e30, note="< health.grad_norm_max"),
    "health.lr_min": Range(0, 10, note="<= health.lr_max"),
    "health.lr_max": Range(0, 1e6, lo_open=True),
    "health.slow_batch_factor": Range(1, 1e6, lo_open=True),
    "health.data_wait_share": Range(0, 1, lo_open=True),
    "health.memory_share": Range(0, 1, lo_open=True),
    "health.skip_nonfinite": TYPED,
    "health.max_bad_steps": Range(1, 10 ** 6),
    "health.rollback_on_spike": TYPED,
    "health.weight_growth_max": Range(1, 1e12, lo_open=True, note="x weight norm in one update = exploded"),
    "health.divergence_factor": Range(0, 1e12, note="0 = off; x the lowest loss level = diverged"),
    "health.start_factor": Range(0, 1e12, note="0 = off; x the untrained model's loss level = diverged"),
    "health.lr_backoff": Range(0, 1, lo_open=True),
    "health.max_rollbacks": Range(0, 10 ** 6, note="0 = give up at the first rollback"),
    "health.oom_recovery": TYPED,
    "health.memory_cleanup": TYPED,
    "health.inject_faults": Check(_faults, "a fault spec such as \"nan_loss@5,oom@7:rank1\" (tests only); empty = off"),
    "logging.output_dir": TEXT,
    "logging.run_name": Check(_safe_name, "one folder name; null = <config stem>_<timestamp>"),
    "logging.log_with": Each(Choice(("wandb", "tensorboard")), unique=True),
    "logging.wandb_project": Check(_nonempty, "non-empty text"),
    "logging.wandb_mode": TYPED,
    "logging.progress_bar": TYPED,
    "logging.log_level": TYPED,
    "distributed.find_unused_parameters": TYPED,
    "distributed.timeout_s": Range(1, 7 * 86400, note="seconds"),
}


# --------------------------------------------------------------------------- relations between keys
def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def model_dims(m: Any) -> dict[str, int | None]:
    """model.size's registry entry with explicit d_model/num_layers/num_heads/d_pair applied."""
    dims: dict[str, int | None] = dict(MODEL_SIZES.get(m.size, {}))
    for k in ("d_model", "num_layers", "num_heads", "d_pair"):
        if getattr(m, k) is not None or k not in dims:
            dims[k] = getattr(m, k)
    return dims


def _relations(cfg: Any) -> list[tuple[tuple[str, ...], str]]:
    """(keys involved, what is wrong) for every broken relation."""
    out = []
    d, t, m, h, v = cfg.diffusion, cfg.training, cfg.model, cfg.health, cfg.validation
    if d.sigma_min >= d.sigma_max:
        out.append((("diffusion.sigma_min", "diffusion.sigma_max"), "diffusion.sigma_min must be < diffusion.sigma_max"))
    dims = model_dims(m)
    if m.size == "custom" and (missing := [k for k, x in dims.items() if x is None]):
        out.append(((f"model.{missing[0]}", "model.size"),
                    f"model.size=custom needs model.{', model.'.join(missing)} (or pick a size: tiny/small/base)"))
    elif dims["d_model"] is not None and dims["num_heads"] and dims["d_model"] % dims["num_heads"]:
        given = tuple(f"model.{k}" for k in ("d_model", "num_heads") if getattr(m, k) is not None)
        out.append(((*given, "model.size"), f"model.d_model={dims['d_model']} must be divisible by "
                                            f"model.num_heads={dims['num_heads']}"))
    if m.top_k > m.num_experts:
        out.append((("model.top_k", "model.num_experts"), "model.top_k must be <= model.num_experts"))
    if t.scheduler.min_lr > t.optimizer.lr:
        out.append((("training.scheduler.min_lr", "training.optimizer.lr"),
                    "training.scheduler.min_lr must be <= training.optimizer.lr"))
    if h.lr_min > h.lr_max:
        out.append((("health.lr_min", "health.lr_max"), "health.lr_min must be <= health.lr_max"))
    if h.grad_norm_min >= h.grad_norm_max:
        out.append((("health.grad_norm_min", "health.grad_norm_max"), "health.grad_norm_min must be < health.grad_norm_max"))
    if t.batch_size is not None and cfg.data.batch_size is not None and t.batch_size != cfg.data.batch_size:
        out.append((("training.batch_size", "data.batch_size"), "training.batch_size and data.batch_size disagree; set only one"))
    es = t.early_stopping
    for key, metric, mode_key, mode in (("validation.best_metric", v.best_metric, "validation.best_mode", v.best_mode),
                                        ("training.early_stopping.metric", es.metric or v.best_metric,
                                         "training.early_stopping.mode", es.mode or v.best_mode)):
        want = VAL_METRICS.get(metric)
        if want and mode != want:
            better = "lower" if want == "min" else "higher"
            out.append(((key, mode_key), f"{key}={metric} is better when {better} but {mode_key}={mode} would keep "
                                         f"the worst checkpoint; set {mode_key}={want}"))
        if metric in SAMPLED and v.num_samples == 0:
            out.append(((key, "validation.num_samples"), f"{key}={metric} needs sampled structures but "
                                                         "validation.num_samples=0; sample >= 1 or use val/loss"))
    if cfg.data.use_predicted_structures and not m.structure_encoder.use_esmfold:
        out.append((("data.use_predicted_structures", "model.structure_encoder.use_esmfold"),
                    "data.use_predicted_structures=true needs model.structure_encoder.use_esmfold=true and "
                    "model.structure_encoder.esmfold_path=DIR (a local ESMFold), or set it to false"))
    return out


def find_problem(cfg: Any, keys: list[str], source: Callable[[str], str]) -> str | None:
    """The first rule a typed Config breaks, as one line naming key, value, source and allowed range."""
    for key in keys:
        value = _get(cfg, key)
        if value is None:
            continue
        rule = RULES[key]
        if isinstance(value, float) and not math.isfinite(value):
            why = "must be a finite number"
        else:
            why = rule.problem(value)
        if why is not None:
            allowed = "" if "allowed:" in why else f"; allowed: {rule.describe()}"
            return f"{key}={value!r} ({source(key)}) {why}{allowed}"
    for involved, why in _relations(cfg):
        values = ", ".join(f"{k}={_get(cfg, k)!r} ({source(k)})" for k in involved)
        return f"{why}: {values}"
    return None
