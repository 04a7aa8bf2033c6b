"""Exponential moving average of model weights; validation and sampling use it."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps `module`, an fp32 frozen copy of the model, as the running average of its parameters."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * param, one fused foreach call."""
        ema_p = [p for p in self.module.parameters()]
        src = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
