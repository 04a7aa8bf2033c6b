"""Every numeric routine on the training/validation hot path meets NaN / Inf input without raising:
it returns NaN (or a flag) for the affected example only, so the loop's bad-step policy can act.

Before issue 15, a diverged model made `torch.linalg.svd` raise inside the loss (a traceback
instead of a rollback); these tests pin that it cannot happen again in any of these routines.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffold.batch import Batch
from diffold.config import HealthConfig, load_config
from diffold.diffusion import EDM, aligned_mse, bond_loss, smooth_lddt
from diffold.geometry import kabsch_align, kabsch_rotation, weighted_rmsd
from diffold.health import HealthMonitor
from diffold.sampling import heun_sample, karras_sigmas
from diffold.tasks import get_task

BAD = [float("nan"), float("inf"), -float("inf"), 1e38]


def helix(n: int = 12) -> torch.Tensor:
    t = torch.linspace(0, 3 * math.pi, n)
    return torch.stack([9 * torch.cos(t), 9 * torch.sin(t), 2.8 * t], -1)  # [n, 3]


def pair(bad: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch of 2: example 0 clean, example 1 with one poisoned coordinate. [2, n, 3] x2, weights [2, n]."""
    x = helix().repeat(2, 1, 1)
    y = x + 0.1 * torch.randn_like(x)
    y[1, 3, 1] = bad
    return x, y, torch.ones(2, x.shape[1])


@pytest.mark.parametrize("bad", BAD)
def test_kabsch_never_raises_and_flags_only_the_bad_example(bad):
    x, y, w = pair(bad)
    rot = kabsch_rotation(y, x, w)                       # [2, 3, 3]
    assert torch.allclose(rot[0] @ rot[0].T, torch.eye(3), atol=1e-5)  # the clean example is unaffected
    aligned = kabsch_align(y, x, w)
    rmsd = weighted_rmsd(y, x, w)
    assert torch.isfinite(aligned[0]).all() and float(rmsd[0]) < 1.0
    if not math.isfinite(bad):
        assert not torch.isfinite(rmsd[1])               # NaN: the loop's bad-step flag, not an exception


def test_kabsch_ignores_nonfinite_values_at_masked_points():
    x, y, w = pair(float("nan"))
    w[1, 3] = 0  # the poisoned point is masked out: the fit must not see it
    assert torch.isfinite(kabsch_align(y, x, w)[1][w[1] > 0]).all()


@pytest.mark.parametrize("bad", BAD)
def test_structure_losses_return_nan_per_example(bad):
    x, y, _ = pair(bad)
    pred, target = y[:, :, None], x[:, :, None]          # [2, n, 1, 3]
    mask = torch.ones(2, x.shape[1], 1, dtype=torch.bool)
    batch = SimpleNamespace(atom_mask=mask, residue_mask=mask[..., 0],
                            residue_index=torch.arange(x.shape[1]).repeat(2, 1))
    for value in (aligned_mse(pred, target, mask), smooth_lddt(pred, target, mask, 15.0), bond_loss(pred, batch, 6.0)):
        assert value.shape == (2,) and torch.isfinite(value[0])


class NaNModel(torch.nn.Module):
    """A diverged network: finite inputs in, NaN out (what lr=1000 produces after one update)."""

    def forward(self, x, c_noise, *rest):
        return torch.full_like(x, float("nan")), x.new_zeros(x.shape[0])


def toy_batch(n: int = 12) -> Batch:
    coords = helix(n)[None, :, None]                    # [1, n, 1, 3]
    mask = torch.ones(1, n, 1, dtype=torch.bool)
    return Batch(["h"], torch.ones(1, n, dtype=torch.long), coords, mask, mask[..., 0],
                 torch.arange(n)[None], torch.ones(1))


def test_edm_loss_and_sampler_with_a_diverged_model_do_not_raise():
    cfg = load_config(None, overrides=["diffusion.smooth_lddt_weight=1", "diffusion.bond_loss_weight=0.1"], env={})
    edm = EDM(cfg.diffusion, get_task("rna"))
    out = edm.loss(NaNModel(), toy_batch())
    assert not torch.isfinite(out.total).any()           # a NaN loss, flagged by the loop
    x = heun_sample(lambda x, s: torch.full_like(x, float("nan")), (1, 12, 1, 3), karras_sigmas(5, 0.002, 160, 7),
                    torch.ones(1, 12, dtype=torch.bool), churn=1.0)
    assert x.shape == (1, 12, 1, 3)


def test_grad_norm_of_nonfinite_gradients_is_nan_not_an_error():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert math.isnan(float(torch.nn.utils.clip_grad_norm_([p], 1.0)))


@pytest.mark.parametrize("loss,grad", [(float("nan"), 1.0), (1.0, float("inf")), (1e308, 1e308), (float("-inf"), 0.0)])
def test_health_monitor_takes_any_number_and_stays_json_safe(loss, grad):
    mon = HealthMonitor(HealthConfig(), warmup_steps=0, total_steps=100)
    for s in range(30):
        mon.update(s, {"total": 1.0 + 0.01 * (s % 3)}, 1.0, 1e-4)
    rep = mon.update(30, {"total": loss}, grad, 1e-4)
    assert rep.overall_status == "critical" and rep.bad_step
    json.dumps(mon.state_dict(), allow_nan=False)


def test_weight_check_flags_nonfinite_weights_and_optimizer_state():
    from diffold.loop import Stepper

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    fake = SimpleNamespace(model=model, optimizer=opt, last_norm=None, _params=None)
    check = Stepper.check_weights.__get__(fake)
    fake._param_norm = Stepper._param_norm.__get__(fake)
    state_ok = Stepper.optimizer_state_finite.__get__(fake)
    assert check().finite and state_ok()
    next(iter(opt.state.values()))["exp_avg_sq"][0, 0] = float("inf")   # optimizer state only: checkpoints
    assert check().finite and not state_ok()                            # written now are marked unhealthy
    opt.state.clear()
    with torch.no_grad():
        model.weight.mul_(100.0)
    assert check().growth > 2.0                          # an explosion, measured against the last check
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not check().finite


def test_all_metrics_rejects_nonfinite_coordinates_with_a_message():
    """The metrics library raises ValueError (one line) on NaN coordinates; validation turns that into
    an unscored sample (tests/test_recovery.py runs a diverged validation end to end)."""
    from diffold.metrics import all_metrics

    ref = helix().numpy()
    pred = ref.copy()
    pred[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        all_metrics(pred, ref, molecule="rna")
