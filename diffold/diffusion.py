"""Diffusion formulations behind one interface: EDM (Karras et al. 2022) and DDPM/DDIM.

Both: `loss(model, batch) -> LossOutput` with per-example values, `sample(model, batch)`,
`noise_bins` for per-noise-level loss logging. Training randomness uses the torch GLOBAL RNG
so that the loop's checkpointed RNG state makes resumes exact. The model may be DDP-wrapped:
it is only ever called, never inspected.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from einops import rearrange
from torch import Tensor

from diffold.batch import Batch
from diffold.geometry import centre, kabsch_align, random_rotations, rotate
from diffold.sampling import ddim_sample, ddim_timesteps, heun_sample, karras_sigmas

TRANSLATION_STD = 1.0  # Angstrom; random translation of the augmented target (AF3 s_trans)
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
CHURN_RANGE = (0.03, 3.0)  # x sigma_data: noise levels where sampling churn applies (0.5-50 A at 16 A)


class LossOutput(NamedTuple):
    total: Tensor              # [B] per example
    terms: dict[str, Tensor]   # "diffusion", "structure", "moe_aux", each [B]
    sigma: Tensor              # [B] noise level (EDM: sigma in A; DDPM: timestep) for bin logging


def weighted_mean(per_example: Tensor, weights: Tensor) -> Tensor:
    """Reduce a per-example loss [B] with the batch's chain weights [B] to a scalar."""
    w = weights.to(per_example.dtype)
    return (per_example * w).sum() / w.sum().clamp_min(1e-8)


def _call(model, x: Tensor, c_noise: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    out, aux = model(x, c_noise, batch.tokens, batch.residue_mask, batch.residue_index, batch.atom_mask, batch.features)
    return out.float(), aux.float()  # losses in fp32 even under autocast


def _loss_mask(batch: Batch) -> Tensor:
    return batch.atom_mask.bool() & batch.residue_mask.bool()[..., None]  # [B, L, A]


def prepare_target(batch: Batch, augment: bool) -> Tensor:
    """Clean coordinates [B, L, A, 3], centred on observed atoms, optionally randomly rotated + shifted."""
    x0 = batch.coords.float()
    b, n, a, _ = x0.shape
    mask = _loss_mask(batch)
    x0 = centre(rearrange(x0, "b l a c -> b (l a) c"), rearrange(mask, "b l a -> b (l a)"))
    if augment:
        rot = random_rotations(b, device=x0.device)
        x0 = rotate(x0, rot) + torch.randn(b, 1, 3, device=x0.device) * TRANSLATION_STD
    return rearrange(x0, "b (l a) c -> b l a c", l=n, a=a) * mask[..., None]


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-example mean squared error per coordinate [B] over atoms where mask [B, L, A] is True."""
    m = mask.to(pred.dtype)
    sq = (pred - target).square().sum(-1)  # [B, L, A]
    return (sq * m).sum((1, 2)) / (3 * m.sum((1, 2))).clamp_min(1.0)


def aligned_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked MSE [B] after rigidly aligning the target onto the (detached) prediction (AF3)."""
    b, n, a, _ = pred.shape
    flat = rearrange(mask, "b l a -> b (l a)")
    moved = kabsch_align(
        rearrange(target, "b l a c -> b (l a) c"), rearrange(pred.detach(), "b l a c -> b (l a) c"), flat
    )
    return masked_mse(pred, rearrange(moved.detach(), "b (l a) c -> b l a c", l=n, a=a), mask)


def bond_loss(pred: Tensor, batch: Batch, bond_length: float) -> Tensor:
    """Mean (|x_i - x_{i+1}| - bond_length)^2 [B] over consecutive residues, atom slot 0 (A^2)."""
    p = pred[:, :, 0]  # [B, L, 3]; slot 0 is the representative atom (all atom sets keep ~3.8/6 A spacing)
    m = _loss_mask(batch)[:, :, 0]
    pair = m[:, 1:] & m[:, :-1] & ((batch.residue_index[:, 1:] - batch.residue_index[:, :-1]) == 1)
    d = (p[:, 1:] - p[:, :-1]).square().sum(-1).add(1e-8).sqrt()  # [B, L-1]
    pair = pair.to(d.dtype)
    return ((d - bond_length).square() * pair).sum(-1) / pair.sum(-1).clamp_min(1.0)


def smooth_lddt(pred: Tensor, target: Tensor, mask: Tensor, radius: float) -> Tensor:
    """Differentiable lDDT [B] (AF3 suppl. Alg. 27) over atom pairs of different residues."""
    b, n, a, _ = pred.shape
    p, t = rearrange(pred, "b l a c -> b (l a) c"), rearrange(target, "b l a c -> b (l a) c")
    m = rearrange(mask, "b l a -> b (l a)")
    d_pred = (p[:, :, None] - p[:, None]).square().sum(-1).add(1e-8).sqrt()  # [B, N, N]
    d_true = (t[:, :, None] - t[:, None]).square().sum(-1).add(1e-8).sqrt()
    res = torch.arange(n, device=pred.device).repeat_interleave(a)  # residue of each flattened atom
    pair = (d_true < radius) & m[:, :, None] & m[:, None, :] & (res[:, None] != res[None, :])
    delta = (d_pred - d_true).abs()
    score = sum(torch.sigmoid(thr - delta) for thr in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    pair = pair.to(score.dtype)
    npair = pair.sum((1, 2))
    return torch.where(npair > 0, (score * pair).sum((1, 2)) / npair.clamp_min(1.0), torch.ones_like(npair))


class EDM:
    """EDM preconditioning, log-normal training sigmas, aligned weighted MSE, Heun sampler."""

    def __init__(self, dcfg, task, moe_aux_weight: float = 0.0):
        self.cfg, self.task, self.moe_aux_weight = dcfg, task, moe_aux_weight
        self.sigma_data = dcfg.sigma_data

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for noise levels sigma [B] (Karras et al. 2022, Table 1)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, unit loss at init."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, batch_size: int, device: torch.device) -> Tensor:
        """Training noise levels [B]: sigma_data * exp(P_mean + P_std N(0,1)) (AF3 scales EDM's law by sigma_data)."""
        return self.sigma_data * torch.exp(self.cfg.p_mean + self.cfg.p_std * torch.randn(batch_size, device=device))

    def denoise(self, model, x: Tensor, sigma: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) [B, L, A, 3], and the MoE aux loss [B]."""
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in self.precondition(sigma))
        out, aux = _call(model, c_in * x, c_noise[:, 0, 0, 0], batch)
        return c_skip * x + c_out * out, aux

    def loss(self, model, batch: Batch, sigma: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> LossOutput:
        """Per-example EDM loss; sigma [B] / noise [B, L, A, 3] are drawn (global RNG) unless given."""
        mask = _loss_mask(batch)  # [B, L, A]
        x0 = prepare_target(batch, self.cfg.augment_rotation)
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], x0.device)  # [B]
        if noise is None:
            noise = torch.randn_like(x0)
        x_noisy = (x0 + noise * sigma[:, None, None, None]) * batch.residue_mask[..., None, None]
        denoised, aux = self.denoise(model, x_noisy, sigma, batch)
        diffusion = self.loss_weight(sigma) * aligned_mse(denoised, x0, mask)
        structure = torch.zeros_like(diffusion)
        if self.cfg.bond_loss_weight > 0:
            structure = structure + self.cfg.bond_loss_weight * bond_loss(denoised, batch, self.task.bond_length)
        if self.cfg.smooth_lddt_weight > 0:
            lddt = smooth_lddt(denoised, x0, mask, self.task.lddt_radius)
            structure = structure + self.cfg.smooth_lddt_weight * (1 - lddt)
        moe = self.moe_aux_weight * aux  # weighted, so the terms sum to total
        total = diffusion + structure + moe
        return LossOutput(total, {"diffusion": diffusion, "structure": structure, "moe_aux": moe}, sigma.detach())

    def sigmas(self, num_steps: Optional[int] = None, device=None) -> Tensor:
        """Sampling schedule [steps + 1], decreasing, last entry 0."""
        c = self.cfg
        return karras_sigmas(num_steps or c.num_sampling_steps, c.sigma_min, c.sigma_max, c.rho, device)

    def sample(self, model, batch: Batch, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Structures [B, L, A, 3] from noise by the Heun sampler (+ churn if configured); zeros at padding."""
        sigmas = self.sigmas(num_steps, batch.coords.device)
        return heun_sample(
            lambda x, s: self.denoise(model, x, s, batch)[0],
            batch.coords.shape, sigmas, batch.residue_mask.bool(), generator,
            churn=self.cfg.sampling_churn, churn_range=(CHURN_RANGE[0] * self.sigma_data, CHURN_RANGE[1] * self.sigma_data),
            step_scale=self.cfg.sampling_step_scale,
        )

    @property
    def noise_bins(self) -> list[tuple[float, float]]:
        """Log-spaced sigma bins (A): edges sigma_data * 4^k, k = -3..1, open at both ends."""
        edges = [0.0] + [self.sigma_data * 4.0 ** k for k in range(-3, 2)] + [math.inf]
        return list(zip(edges[:-1], edges[1:]))


class DDPM:
    """Epsilon-prediction DDPM (Ho et al. 2020) on coordinates / sigma_data, DDIM sampling."""

    def __init__(self, dcfg, task, moe_aux_weight: float = 0.0):
        self.cfg, self.task, self.moe_aux_weight = dcfg, task, moe_aux_weight
        self.sigma_data = dcfg.sigma_data
        self.num_timesteps = dcfg.num_timesteps
        self.alpha_bars = make_alpha_bars(dcfg.num_timesteps, dcfg.beta_schedule)  # [T] float64 on CPU

    def c_noise(self, t: Tensor) -> Tensor:
        """Same conditioning scale as EDM: ln(sigma)/4 with sigma = sigma_data sqrt((1 - ab)/ab)."""
        ab = self.alpha_bars.to(t.device)[t]
        return (self.sigma_data * ((1 - ab) / ab).sqrt()).log().float() / 4

    def loss(self, model, batch: Batch, t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> LossOutput:
        """Per-example masked MSE between predicted and true noise; t [B] / noise drawn unless given."""
        mask = _loss_mask(batch)
        x0 = prepare_target(batch, self.cfg.augment_rotation) / self.sigma_data  # unit-variance space
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        ab = self.alpha_bars.to(x0.device)[t].float()[:, None, None, None]
        eps = (torch.randn_like(x0) if noise is None else noise) * batch.residue_mask[..., None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        eps_hat, aux = _call(model, x_t, self.c_noise(t), batch)
        diffusion = masked_mse(eps_hat, eps, mask)
        moe = self.moe_aux_weight * aux
        terms = {"diffusion": diffusion, "structure": torch.zeros_like(diffusion), "moe_aux": moe}
        return LossOutput(diffusion + moe, terms, t.float())

    def sample(self, model, batch: Batch, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Structures [B, L, A, 3] by deterministic DDIM; zeros at padding."""
        steps = ddim_timesteps(self.num_timesteps, num_steps or self.cfg.num_sampling_steps)
        x = ddim_sample(
            lambda x, t: _call(model, x, self.c_noise(t), batch)[0],
            batch.coords.shape, self.alpha_bars.float(), steps, batch.residue_mask.bool(), generator,
        )
        return x * self.sigma_data

    @property
    def noise_bins(self) -> list[tuple[float, float]]:
        """Timestep bins (quarters of [0, T])."""
        edges = [round(self.num_timesteps * f) for f in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)]
        return [(float(lo), float(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def make_alpha_bars(num_timesteps: int, schedule: str) -> Tensor:
    """Cumulative alpha products [T]: cosine (Nichol & Dhariwal 2021) or linear (Ho et al. 2020)."""
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif schedule == "linear":
        scale = 1000 / num_timesteps  # keeps the schedule's endpoints meaningful for any T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"diffusion.beta_schedule={schedule!r} is unknown; use 'cosine' or 'linear'")
    return torch.cumprod(1 - betas, dim=0)


Diffusion = Union[EDM, DDPM]  # both: loss(model, batch), sample(model, batch, num_steps, generator), noise_bins


def build_diffusion(cfg, task) -> Diffusion:
    """EDM or DDPM according to cfg.diffusion.formulation."""
    d = cfg.diffusion
    if d.formulation == "edm":
        return EDM(d, task, cfg.model.moe_aux_weight)
    if d.formulation == "ddpm":
        if d.bond_loss_weight > 0 or d.smooth_lddt_weight > 0:
            raise ValueError("diffusion.bond_loss_weight/smooth_lddt_weight apply to formulation=edm only; set them to 0")
        return DDPM(d, task, cfg.model.moe_aux_weight)
    raise ValueError(f"diffusion.formulation={d.formulation!r} is unknown; use 'edm' or 'ddpm'")
