"""Exponential moving average of model weights; validation and sampling use it."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps `module`, an fp32 frozen copy of the model, as the running average of its parameters."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._pairs: tuple | None = None  # (model id, ema params, model params, buffer pairs), built once

    def _lists(self, model: torch.nn.Module) -> tuple:
        if self._pairs is None or self._pairs[0] != id(model):
            self._pairs = (id(model), list(self.module.parameters()), list(model.parameters()),
                           list(zip(self.module.buffers(), model.buffers())))
        return self._pairs

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * param, one fused foreach call (hot path: lists cached)."""
        _, ema_p, src, buffers = self._lists(model)
        if src and src[0].dtype != torch.float32:  # low-precision params: lerp needs matching dtypes
            src = [p.float() for p in src]
        torch._foreach_lerp_(ema_p, src, 1.0 - self.decay)
        for b_ema, b in buffers:
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
