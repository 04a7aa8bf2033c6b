"""Optimizers (AdamW | Lion) with no-decay groups, and schedules from transformers."""
from __future__ import annotations

import math

import torch
from lion_pytorch import Lion
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from diffold.config import OptimizerConfig, SchedulerConfig

NO_DECAY_TYPES = (torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.RMSNorm)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases and embeddings get none."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_TYPES):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, plain = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "lion":  # Chen et al. 2023: use ~3-10x lower lr and ~3-10x higher decay than AdamW
        return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"training.optimizer.name={cfg.name!r}: choose adamw or lion")


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """warmup < 1 is a fraction of total optimizer steps, >= 1 a step count."""
    return int(math.ceil(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def build_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int, base_lr: float):
    """One scheduler.step() per real optimizer step (the loop steps it itself; see accelerate-notes)."""
    warm = warmup_steps(cfg, total_steps)
    if cfg.name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warm)
    if cfg.name == "warmup_cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warm, total_steps, min_lr=min(cfg.min_lr, base_lr)
        )
    if cfg.name == "warmup_cosine_restarts":
        return get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warm, total_steps, cfg.num_cycles)
    raise ValueError(f"training.scheduler.name={cfg.name!r}: choose warmup_cosine, warmup_cosine_restarts or constant")
