"""Rigid geometry in torch: centring, weighted Kabsch alignment, uniform random rotations."""
from __future__ import annotations

from typing import Optional

import torch
from einops import einsum

_EPS = 1e-8


def centre(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract the (mask-)weighted centroid of each example; masked points become 0."""
    w = mask.to(x.dtype)  # [B, N]
    centroid = (x * w[..., None]).sum(-2, keepdim=True) / w.sum(-1)[..., None, None].clamp_min(_EPS)  # [B, 1, 3]
    return (x - centroid) * w[..., None]


def kabsch_rotation(mobile: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Proper rotation R [B, 3, 3] minimising sum_i w_i |R (m_i - m_c) - (t_i - t_c)|^2 (no gradient)."""
    with torch.no_grad():
        w = weights.to(torch.float64)  # [B, N]; float64 SVD: ill-conditioned covariances are common
        m = mobile.detach().to(torch.float64)
        t = target.detach().to(torch.float64)
        wsum = w.sum(-1)[..., None, None].clamp_min(_EPS)  # [B, 1, 1]
        mc = m - (m * w[..., None]).sum(-2, keepdim=True) / wsum  # [B, N, 3]
        tc = t - (t * w[..., None]).sum(-2, keepdim=True) / wsum
        h = einsum(w[..., None] * mc, tc, "b n i, b n j -> b i j")  # [B, 3, 3] covariance
        u, _, vh = torch.linalg.svd(h)
        # Reflection fix (Kabsch 1976): flip the weakest axis when det(V U^T) < 0.
        d = torch.sign(torch.linalg.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
        d = torch.where(d == 0, torch.ones_like(d), d)  # degenerate (e.g. all-zero) input -> no flip
        diag = torch.ones_like(h[..., 0])  # [B, 3]
        diag[..., -1] = d
        rot = vh.transpose(-1, -2) @ torch.diag_embed(diag) @ u.transpose(-1, -2)  # [B, 3, 3]
        rot = torch.where(torch.isfinite(rot).all(-1).all(-1)[..., None, None], rot, torch.eye(3, dtype=rot.dtype, device=rot.device))
    return rot.to(mobile.dtype)


def kabsch_align(mobile: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mobile [B, N, 3] rigidly superposed onto target [B, N, 3] with per-point weights [B, N].

    Zero weights mask points out of the fit (they are still moved). The rotation is detached
    (as in AlphaFold 3); gradients flow through the centroids and the mobile points.
    """
    w = weights.to(mobile.dtype)  # [B, N]
    wsum = w.sum(-1)[..., None, None].clamp_min(_EPS)  # [B, 1, 1]
    m_centroid = (mobile * w[..., None]).sum(-2, keepdim=True) / wsum  # [B, 1, 3]
    t_centroid = (target * w[..., None]).sum(-2, keepdim=True) / wsum
    rot = kabsch_rotation(mobile, target, weights)  # [B, 3, 3]
    return einsum(mobile - m_centroid, rot, "b n j, b i j -> b n i") + t_centroid


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Apply per-example rotations [B, 3, 3] to points [B, ..., 3]."""
    flat = x.reshape(x.shape[0], -1, 3)  # [B, N, 3]
    return einsum(flat, rot, "b n j, b i j -> b n i").reshape(x.shape)


def random_rotations(
    batch: int,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniformly distributed proper rotations [B, 3, 3] (normalised Gaussian quaternions)."""
    if device is None and generator is not None:
        device = generator.device
    q = torch.randn(batch, 4, generator=generator, device=device, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # uniform on S^3 -> Haar on SO(3)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(batch, 3, 3)
    return rot.to(dtype)


def weighted_rmsd(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-example RMSD [B] between points [B, N, 3] after superposing x onto y."""
    aligned = kabsch_align(x, y, weights)
    w = weights.to(x.dtype)
    sq = ((aligned - y) ** 2).sum(-1)  # [B, N]
    return ((sq * w).sum(-1) / w.sum(-1).clamp_min(_EPS)).sqrt()
