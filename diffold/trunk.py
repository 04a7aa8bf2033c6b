"""The transformer trunk of the denoiser: the noise-level embedding and pair-biased DiT-style blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffold.moe import FeedForward, MoEFeedForward


class FourierEmbedding(nn.Module):
    """Fixed random Fourier features of the noise level (AF3 Alg. 22; EDM uses a similar map)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # identical on every rank without a broadcast
        self.register_buffer("w", torch.randn(dim, generator=g))
        self.register_buffer("b", torch.rand(dim, generator=g))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return torch.cos(2 * math.pi * (c_noise[:, None] * self.w + self.b))  # [B, dim]


class DenoiserBlock(nn.Module):
    """Pre-norm block: noise-modulated LN -> pair-biased SDPA -> modulated LN -> (MoE) FFN."""

    def __init__(self, d_model: int, num_heads: int, d_pair: int, mcfg):
        super().__init__()
        self.num_heads, self.dropout = num_heads, mcfg.dropout
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.modulation = nn.Linear(d_model, 6 * d_model)  # adaLN (DiT): shift/scale/gate from the noise
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.pair_bias = nn.Linear(d_pair, num_heads, bias=False)
        self.out = nn.Linear(d_model, d_model)
        if mcfg.use_moe:
            self.ff = MoEFeedForward(d_model, mcfg.ff_mult, mcfg.num_experts, mcfg.top_k, mcfg.dropout)
        else:
            self.ff = FeedForward(d_model, mcfg.ff_mult, mcfg.dropout)

    def forward(
        self, h: torch.Tensor, z: torch.Tensor, cond: torch.Tensor, key_bias: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, L, d], z [B, L, L, dp], cond [B, d], key_bias [B, 1, 1, L], mask [B, L] -> (h, aux [B])."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = self.norm1(h) * (1 + scale1) + shift1
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.num_heads)
        bias = rearrange(self.pair_bias(z), "b i j h -> b h i j") + key_bias  # [B, H, L, L]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        h = h + (1 + gate1) * self.out(rearrange(o, "b h l e -> b l (h e)"))
        x = self.norm2(h) * (1 + scale2) + shift2
        if isinstance(self.ff, MoEFeedForward):
            y, aux = self.ff(x, mask)
        else:
            y, aux = self.ff(x), h.new_zeros(h.shape[0])
        return h + (1 + gate2) * y, aux
