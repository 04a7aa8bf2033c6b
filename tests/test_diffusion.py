"""EDM / DDPM: preconditioning, loss invariances, padding, samplers."""
import dataclasses
import math

import pytest
import torch

from diffold.batch import Batch
from diffold.config import load_config
from diffold.diffusion import (
    DDPM,
    EDM,
    aligned_mse,
    bond_loss,
    build_diffusion,
    make_alpha_bars,
    smooth_lddt,
    weighted_mean,
)
from diffold.geometry import random_rotations, rotate
from diffold.model import build_model
from diffold.sampling import ddim_timesteps, karras_sigmas
from diffold.tasks import get_task

TASK = get_task("rna")


def _cfg(*overrides):
    return load_config(None, overrides=["diffusion.augment_rotation=false", *overrides], env={})


def _chain(n, seed, atoms=1):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n, 3, generator=g)
    steps = 6.0 * steps / steps.norm(dim=-1, keepdim=True)  # 6 A bonds, a random-walk chain
    x = steps.cumsum(0)
    x = x - x.mean(0)
    return x[:, None].repeat(1, atoms, 1) + torch.randn(n, atoms, 3, generator=g) * (atoms > 1)


def _batch(lengths, atoms=1, seed=0, pad_to=None):
    """Padded batch with garbage in the padding (it must never matter)."""
    L = pad_to or max(lengths)
    b = len(lengths)
    coords = torch.randn(b, L, atoms, 3) * 50
    atom_mask = torch.zeros(b, L, atoms, dtype=torch.bool)
    residue_mask = torch.zeros(b, L, dtype=torch.bool)
    tokens = torch.randint(1, TASK.vocab_size, (b, L), generator=torch.Generator().manual_seed(seed))
    for i, n in enumerate(lengths):
        coords[i, :n] = _chain(n, seed + i, atoms)
        atom_mask[i, :n] = True
        residue_mask[i, :n] = True
    atom_mask[0, 1, 0] = False  # one unobserved atom inside a real residue
    return Batch(
        ids=[f"c{i}" for i in range(b)], tokens=tokens * residue_mask, coords=coords, atom_mask=atom_mask,
        residue_mask=residue_mask, residue_index=torch.arange(L).repeat(b, 1) + 3, weights=torch.ones(b),
    )


def _model(cfg, atoms=1, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, atoms).eval()


# ------------------------------------------------------------------ EDM preconditioning
def test_preconditioning_identities():
    edm = EDM(_cfg().diffusion, TASK)
    sigma = torch.logspace(-4, 3, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    sd = edm.sigma_data
    # Unit-variance input and unit effective training target (Karras et al. 2022, appendix B.6).
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones_like(sigma))
    assert torch.allclose(edm.loss_weight(sigma) * c_out ** 2, torch.ones_like(sigma))
    assert torch.allclose(c_skip ** 2 * sigma ** 2 + (1 - c_skip) ** 2 * sd ** 2, c_out ** 2)
    assert torch.allclose(c_noise, sigma.log() / 4)
    assert torch.isfinite(edm.loss_weight(sigma)).all()
    # As sigma -> 0: c_skip -> 1, c_out -> 0, so D = c_skip x + c_out F -> x for any bounded F.
    x, f = torch.randn(5, dtype=torch.float64) * 10, torch.randn(5, dtype=torch.float64)
    for s in (1e-2, 1e-4, 1e-6):
        cs, co, _, _ = edm.precondition(torch.tensor(s, dtype=torch.float64))
        assert (cs * x + co * f - x).abs().max() < s * (1 + f.abs().max())  # error O(sigma)
    assert abs(float(edm.precondition(torch.tensor(sd))[0]) - 0.5) < 1e-12


def test_training_sigmas_follow_lognormal():
    edm = EDM(_cfg().diffusion, TASK)
    torch.manual_seed(0)
    log_s = edm.sample_sigma(20000, torch.device("cpu")).log()
    assert abs(log_s.mean().item() - (math.log(edm.sigma_data) + edm.cfg.p_mean)) < 0.05
    assert abs(log_s.std().item() - edm.cfg.p_std) < 0.05


# ------------------------------------------------------------------ loss
def test_loss_shapes_and_breakdown():
    cfg = _cfg("diffusion.bond_loss_weight=0.1", "diffusion.smooth_lddt_weight=1.0")
    edm, batch = build_diffusion(cfg, TASK), _batch([9, 12])
    out = edm.loss(_model(cfg), batch)
    assert out.total.shape == (2,) and out.sigma.shape == (2,)
    assert set(out.terms) == {"diffusion", "structure", "moe_aux"}
    assert torch.allclose(out.total, sum(out.terms.values()))
    assert (out.terms["structure"] > 0).all() and (out.terms["moe_aux"] == 0).all()
    assert torch.isfinite(weighted_mean(out.total, batch.weights))


def test_loss_is_about_one_at_init():
    # lambda(sigma) makes an untrained denoiser's loss ~1 at every noise level (EDM design).
    cfg = _cfg()
    edm, model, batch = build_diffusion(cfg, TASK), _model(cfg), _batch([20, 20, 20, 20])
    torch.manual_seed(1)
    losses = torch.cat([edm.loss(model, batch).total for _ in range(5)])
    assert 0.2 < losses.mean().item() < 5


def test_loss_invariant_to_translation_of_target():
    cfg = _cfg("diffusion.smooth_lddt_weight=1.0", "diffusion.bond_loss_weight=0.1")
    edm, model, batch = build_diffusion(cfg, TASK), _model(cfg), _batch([10, 8])
    shifted = Batch(**{**batch.__dict__, "coords": batch.coords + torch.tensor([30.0, -12.0, 7.0])})
    torch.manual_seed(3)
    a = edm.loss(model, batch).total
    torch.manual_seed(3)
    b = edm.loss(model, shifted).total
    assert torch.allclose(a, b, atol=1e-4)


def test_aligned_loss_invariant_to_rigid_motion_of_target():
    batch = _batch([10, 8])
    mask = batch.atom_mask & batch.residue_mask[..., None]
    pred = batch.coords + torch.randn_like(batch.coords)
    rot = random_rotations(2, generator=torch.Generator().manual_seed(0))
    moved = rotate(batch.coords, rot) + torch.tensor([5.0, 1.0, -4.0])
    assert torch.allclose(aligned_mse(pred, batch.coords, mask), aligned_mse(pred, moved, mask), atol=1e-4)


def test_full_edm_loss_rotation_invariant_with_equivariant_model():
    # Same noise realisation expressed in the rotated frame: the loss must not change.
    cfg = _cfg()
    edm, model, batch = build_diffusion(cfg, TASK), _model(cfg), _batch([10, 8])
    rot = random_rotations(2, generator=torch.Generator().manual_seed(4))
    rotated = Batch(**{**batch.__dict__, "coords": rotate(batch.coords, rot)})
    sigma, noise = torch.tensor([3.0, 20.0]), torch.randn_like(batch.coords)
    a = edm.loss(model, batch, sigma=sigma, noise=noise).total
    b = edm.loss(model, rotated, sigma=sigma, noise=rotate(noise, rot)).total
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_padded_batch_equals_one_by_one(moe):
    cfg = _cfg("diffusion.smooth_lddt_weight=1.0", "diffusion.bond_loss_weight=0.1", f"model.use_moe={moe}",
               "model.moe_aux_weight=0.1")
    edm, model = build_diffusion(cfg, TASK), _model(cfg, atoms=2)
    batch = _batch([7, 11], atoms=2, pad_to=13)
    sigma, noise = torch.tensor([2.0, 30.0]), torch.randn_like(batch.coords)
    together = edm.loss(model, batch, sigma=sigma, noise=noise)
    for i, n in enumerate([7, 11]):
        single = batch.select([i])
        single = Batch(**{**single.__dict__, **{k: getattr(single, k)[:, :n] for k in
                                                ("tokens", "coords", "atom_mask", "residue_mask", "residue_index")}})
        alone = edm.loss(model, single, sigma=sigma[i:i + 1], noise=noise[i:i + 1, :n])
        for key in together.terms:
            assert torch.allclose(together.terms[key][i], alone.terms[key][0], rtol=1e-4, atol=1e-6), key


def test_bond_and_smooth_lddt_terms():
    batch = _batch([12])
    x = batch.coords
    mask = batch.atom_mask & batch.residue_mask[..., None]
    assert bond_loss(x, batch, 6.0).item() < 1e-6  # _chain uses exact 6 A steps (pair with atom 1 excluded)
    assert bond_loss(x * 1.5, batch, 6.0).item() > 1.0
    rot = random_rotations(1, generator=torch.Generator().manual_seed(0))
    same = smooth_lddt(x, x, mask, 15.0)
    assert torch.allclose(smooth_lddt(rotate(x, rot), x, mask, 15.0), same, atol=1e-5)
    worse = smooth_lddt(x + torch.randn_like(x) * 2, x, mask, 15.0)
    assert worse < same and 0 < worse.item() < 1


# ------------------------------------------------------------------ samplers
def test_karras_schedule_monotone_and_ends_at_zero():
    d = _cfg().diffusion
    for steps in (1, 2, 5, 50):
        s = karras_sigmas(steps, d.sigma_min, d.sigma_max, d.rho)
        assert s.shape == (steps + 1,) and s[-1] == 0
        assert (s[1:] < s[:-1]).all()
        assert math.isclose(s[0].item(), d.sigma_max, rel_tol=1e-5)
        if steps > 1:
            assert math.isclose(s[-2].item(), d.sigma_min, rel_tol=1e-4)


def _oracle_edm_model(edm, x0):
    """F such that D(x; sigma) = x0 exactly: the ideal denoiser of a one-structure dataset."""
    def model(x_in, c_noise, *rest):
        sigma = torch.exp(4 * c_noise)[:, None, None, None]
        c_skip, c_out, c_in, _ = edm.precondition(sigma)
        return (x0 - c_skip * x_in / c_in) / c_out, torch.zeros(x_in.shape[0])
    return model


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_heun_sampler_reaches_the_ideal_denoisers_structure(churn):
    cfg = _cfg(f"diffusion.sampling_churn={churn}")
    edm, batch = build_diffusion(cfg, TASK), _batch([9, 9])
    out = edm.sample(_oracle_edm_model(edm, batch.coords), batch, num_steps=8,
                     generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch.coords - batch.coords.mean((1, 2), keepdim=True), atol=1e-3)


def test_sampler_is_seeded_masked_and_deterministic():
    cfg = _cfg()
    edm, model, batch = build_diffusion(cfg, TASK), _model(cfg), _batch([6, 9])
    a = edm.sample(model, batch, num_steps=3, generator=torch.Generator().manual_seed(7))
    b = edm.sample(model, batch, num_steps=3, generator=torch.Generator().manual_seed(7))
    c = edm.sample(model, batch, num_steps=3, generator=torch.Generator().manual_seed(8))
    assert a.shape == batch.coords.shape and torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(a[0, 6:], torch.zeros_like(a[0, 6:])) and torch.isfinite(a).all()


@pytest.mark.parametrize("scale", [3.0, 10.0])
def test_a_finite_model_never_samples_nan(scale):
    # The old head's update was linear in the input coordinates with unbounded weights: D grew with
    # x along the trajectory until it overflowed (5 of 12 seeds NaN for a smoke model at 50 steps).
    # Now |F| per atom is softly bounded, so even a model with blown-up weights stays finite.
    from diffold.model import OUTPUT_BOUND

    cfg = _cfg()
    edm, model, batch = build_diffusion(cfg, TASK), _model(cfg, atoms=2), _batch([40, 25], atoms=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        x_in = torch.randn(2, 40, 2, 3) * 50
        out, _ = model(x_in, torch.zeros(2), batch.tokens, batch.residue_mask, batch.residue_index, batch.atom_mask)
    assert out.norm(dim=-1).max() <= OUTPUT_BOUND
    x = edm.sample(model, batch, num_steps=50, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and x.abs().max() < 1e3


def test_step_scale_sharpens_samples_of_a_gaussian():
    # For data x0 ~ N(0, s^2) the ideal denoiser is D(x; sigma) = x s^2 / (s^2 + sigma^2): the ODE
    # (step scale 1) samples the data spread s; a step scale > 1 samples a narrower distribution.
    edm = build_diffusion(_cfg(), TASK)
    spread = 5.0

    def model(x_in, c_noise, *rest):
        sigma = torch.exp(4 * c_noise)[:, None, None, None]
        c_skip, c_out, c_in, _ = edm.precondition(sigma)
        x = x_in / c_in
        return (x * spread ** 2 / (spread ** 2 + sigma ** 2) - c_skip * x) / c_out, torch.zeros(x_in.shape[0])

    batch = _batch([200] * 8)
    stds = {}
    for eta in (1.0, 1.5):
        edm.cfg = dataclasses.replace(edm.cfg, sampling_step_scale=eta)
        x = edm.sample(model, batch, num_steps=50, generator=torch.Generator().manual_seed(0))
        stds[eta] = float(x[batch.residue_mask].std())
    assert stds[1.0] == pytest.approx(spread, rel=0.05)
    assert stds[1.5] < 0.9 * spread


def test_churn_is_seeded_and_changes_the_trajectory():
    cfg = _cfg("diffusion.sampling_churn=40")
    edm, model, batch = build_diffusion(cfg, TASK), _model(cfg), _batch([8, 8])
    plain = build_diffusion(_cfg(), TASK).sample(model, batch, num_steps=6, generator=torch.Generator().manual_seed(7))
    a = edm.sample(model, batch, num_steps=6, generator=torch.Generator().manual_seed(7))
    b = edm.sample(model, batch, num_steps=6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, plain)


def test_noise_bins_are_contiguous():
    for formulation in ("edm", "ddpm"):
        bins = build_diffusion(_cfg(f"diffusion.formulation={formulation}"), TASK).noise_bins
        assert all(lo < hi for lo, hi in bins)
        assert all(bins[i][1] == bins[i + 1][0] for i in range(len(bins) - 1))


# ------------------------------------------------------------------ DDPM
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddpm_schedule(schedule):
    ab = make_alpha_bars(1000, schedule)
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 0.01 and 0.99 < ab[0] < 1
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_ddpm_loss_and_sampler_run():
    cfg = _cfg("diffusion.formulation=ddpm", "diffusion.num_timesteps=100")
    ddpm, model, batch = build_diffusion(cfg, TASK), _model(cfg), _batch([6, 9])
    assert isinstance(ddpm, DDPM)
    out = ddpm.loss(model, batch)
    assert out.total.shape == (2,) and torch.isfinite(out.total).all() and (out.total > 0).all()
    out.total.mean().backward()
    x = ddpm.sample(model, batch, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == batch.coords.shape and torch.isfinite(x).all()
    assert torch.equal(x[0, 6:], torch.zeros_like(x[0, 6:]))


def test_ddim_with_ideal_noise_predictor_recovers_structure():
    cfg = _cfg("diffusion.formulation=ddpm", "diffusion.num_timesteps=200")
    ddpm, batch = build_diffusion(cfg, TASK), _batch([8])
    x0 = batch.coords / ddpm.sigma_data

    def model(x_t, c_noise, *rest):
        sigma = torch.exp(4 * c_noise)[:, None, None, None] / ddpm.sigma_data
        ab = 1 / (1 + sigma ** 2)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), torch.zeros(x_t.shape[0])

    out = ddpm.sample(model, batch, num_steps=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch.coords - batch.coords.mean((1, 2), keepdim=True), atol=1e-2)


def test_ddpm_rejects_structure_terms():
    with pytest.raises(ValueError, match="formulation=edm"):
        build_diffusion(_cfg("diffusion.formulation=ddpm", "diffusion.bond_loss_weight=1.0"), TASK)
