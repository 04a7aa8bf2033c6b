"""Mixture-of-experts feed-forward with top-k routing and a Switch-style load-balancing loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class FeedForward(nn.Module):
    """Two-layer GELU MLP: d -> ff_mult*d -> d."""

    def __init__(self, d_model: int, ff_mult: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, ff_mult * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * d_model, d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MoEFeedForward(nn.Module):
    """Token-choice top-k MoE (Shazeer et al. 2017; aux loss of Fedus et al. 2022, Switch, eq. 4)."""

    def __init__(self, d_model: int, ff_mult: int, num_experts: int, top_k: int, dropout: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"model.top_k={top_k} must be in [1, model.num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, ff_mult, dropout) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, d], mask [B, L] bool -> (y [B, L, d], per-example aux loss [B])."""
        b, n, _ = x.shape
        logits = self.router(x).float()  # [B, L, E]; fp32 routing is more stable under bf16
        probs = logits.softmax(-1)
        gate, idx = probs.topk(self.top_k, dim=-1)  # [B, L, k]
        gate = gate / gate.sum(-1, keepdim=True)  # renormalise over the chosen experts

        flat_x = rearrange(x, "b l d -> (b l) d")
        flat_idx = rearrange(idx, "b l k -> (b l) k")
        flat_gate = rearrange(gate, "b l k -> (b l) k").to(x.dtype)
        out = torch.zeros_like(flat_x)
        for e, expert in enumerate(self.experts):
            # Every expert runs (possibly on zero tokens) so DDP always sees all parameters used.
            tok, slot = torch.where(flat_idx == e)
            y = expert(flat_x[tok]) * flat_gate[tok, slot, None]
            out = out.index_add(0, tok, y.to(out.dtype))  # autocast may return a lower precision
        y = rearrange(out, "(b l) d -> b l d", b=b, l=n)

        # Switch load balancing per example over its real tokens: E * sum_e f_e * P_e,
        # f_e = share of routed assignments to expert e, P_e = mean router probability.
        w = mask.float()[..., None]  # [B, L, 1]
        count = w.sum(1).clamp_min(1.0)  # [B, 1]
        assigned = F.one_hot(idx, self.num_experts).float().sum(-2) / self.top_k  # [B, L, E]
        frac = (assigned * w).sum(1) / count  # [B, E]
        mean_prob = (probs * w).sum(1) / count  # [B, E]
        aux = self.num_experts * (frac * mean_prob).sum(-1)  # [B]; 1.0 when perfectly balanced
        return y, aux
