"""Training counters and bookkeeping that Accelerate does not checkpoint (JSON, no pickle)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class TrainState:
    global_step: int = 0            # optimizer steps done
    epoch: int = 0                  # current epoch (0-based)
    batch_in_epoch: int = 0         # micro-batches of `epoch` already consumed on each rank
    samples_seen: int = 0
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    bad_validations: int = 0        # early-stopping counter
    es_best: Optional[float] = None  # best value of the early-stopping metric
    lr_scale: float = 1.0           # product of rollback LR back-offs
    accumulation_multiplier: int = 1  # > 1 after OOM recovery halved the micro-batch
    loss_history: list[list[float]] = field(default_factory=list)  # [step, mean loss] per log interval
    last_val: dict[str, float] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: Optional[str] = None
    num_processes: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """A TrainState from its JSON form; ValueError naming the first key of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key, value in known.items():
            want = _TYPES.get(key)
            if want is not None and not _fits(value, want):
                raise ValueError(f"key '{key}' must be {want}, got {str(value)[:40]!r}")
        return cls(**known)


_TYPES = {"global_step": "count", "epoch": "count", "batch_in_epoch": "count", "samples_seen": "count",
          "bad_validations": "count", "num_processes": "count", "accumulation_multiplier": "count",
          "lr_scale": "number", "best_value": "number|null", "es_best": "number|null", "best_step": "count|null",
          "loss_history": "list", "last_val": "dict", "health": "dict", "recovery": "dict",
          "wandb_run_id": "str|null"}


def _fits(value, want: str) -> bool:
    """value matches one of the '|'-separated kinds: count (int >= 0), number, list, dict, str, null."""
    for kind in want.split("|"):
        if kind == "null" and value is None:
            return True
        if kind == "count" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return True
        if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind in ("list", "dict", "str") and isinstance(value, {"list": list, "dict": dict, "str": str}[kind]):
            return True
    return False



def improved(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """value beats best by more than min_delta in direction mode ('min' | 'max'); None is always beaten."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
