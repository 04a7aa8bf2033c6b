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
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)



def improved(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """value beats best by more than min_delta in direction mode ('min' | 'max'); None is always beaten."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
