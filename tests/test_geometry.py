"""Rigid geometry: Kabsch alignment, random rotations, centring."""
import math

import torch

from diffold.geometry import (
    centre,
    chain_tangent,
    dihedral_features,
    kabsch_align,
    kabsch_rotation,
    pair_chirality,
    random_rotations,
    rotate,
    weighted_rmsd,
)


def _points(b=3, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, generator=g) * 5


def test_random_rotations_are_proper_and_orthogonal():
    rot = random_rotations(64, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3).expand(64, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(64), atol=1e-5)


def test_random_rotations_are_uniform():
    # Haar measure: E[R] = 0 and the rotation angle has density (1 - cos t) / pi, so E[trace] = 0.
    rot = random_rotations(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rot.mean(0).abs().max() < 0.03
    assert abs(rot.diagonal(dim1=-2, dim2=-1).sum(-1).mean()) < 0.03


def test_random_rotations_seeded():
    a = random_rotations(4, generator=torch.Generator().manual_seed(3))
    b = random_rotations(4, generator=torch.Generator().manual_seed(3))
    c = random_rotations(4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_kabsch_recovers_rigid_motion():
    x = _points()
    rot = random_rotations(3, generator=torch.Generator().manual_seed(2))
    y = rotate(x, rot) + torch.tensor([1.0, -2.0, 3.0])
    aligned = kabsch_align(x, y, torch.ones(3, 12))
    assert torch.allclose(aligned, y, atol=1e-4)
    assert weighted_rmsd(x, y, torch.ones(3, 12)).max() < 1e-4


def test_kabsch_never_reflects():
    x = _points(b=2)
    mirror = x * torch.tensor([-1.0, 1.0, 1.0])
    rot = kabsch_rotation(x, mirror, torch.ones(2, 12))
    assert torch.allclose(torch.linalg.det(rot), torch.ones(2), atol=1e-5)
    assert weighted_rmsd(x, mirror, torch.ones(2, 12)).min() > 0.5  # a proper rotation cannot fit a mirror


def test_kabsch_zero_weights_mask_points():
    x = _points(b=1, n=10)
    rot = random_rotations(1, generator=torch.Generator().manual_seed(5))
    y = rotate(x, rot)
    y_bad = y.clone()
    y_bad[:, 7:] += 100.0  # garbage in masked points must not affect the fit
    w = torch.ones(1, 10)
    w[:, 7:] = 0
    aligned = kabsch_align(x, y_bad, w)
    assert torch.allclose(aligned[:, :7], y[:, :7], atol=1e-4)


def test_kabsch_weighted_matches_explicit_subset():
    x, y = _points(b=1, n=9, seed=6), _points(b=1, n=9, seed=7)
    w = torch.tensor([[1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.0, 0.2, 1.0]])
    aligned = kabsch_align(x, y, w)
    # The weighted fit minimises sum w |.|^2: any perturbed rotation does worse.
    best = (w * ((aligned - y) ** 2).sum(-1)).sum()
    for seed in range(5):
        small = random_rotations(1, generator=torch.Generator().manual_seed(seed))
        tilt = torch.linalg.matrix_exp(0.05 * (small - small.transpose(1, 2)))
        c = (aligned * w[..., None]).sum(1, keepdim=True) / w.sum()
        other = rotate(aligned - c, tilt) + c
        assert (w * ((other - y) ** 2).sum(-1)).sum() > best


def test_kabsch_degenerate_inputs_are_finite_and_keep_gradients():
    for x in (torch.zeros(2, 5, 3), torch.ones(2, 5, 3), _points(b=2, n=5)):
        x = x.clone().requires_grad_(True)
        y = _points(b=2, n=5, seed=9)
        for w in (torch.ones(2, 5), torch.zeros(2, 5), torch.tensor([[1.0, 0, 0, 0, 0]] * 2)):
            out = kabsch_align(x, y, w)
            assert torch.isfinite(out).all()
            out.square().sum().backward()
            assert torch.isfinite(x.grad).all()
            x.grad = None


def test_kabsch_collinear_points():
    t = torch.linspace(-1, 1, 6)
    x = torch.stack([t, 0 * t, 0 * t], -1)[None]  # a line: rotation about it is undetermined
    rot = random_rotations(1, generator=torch.Generator().manual_seed(1))
    y = rotate(x, rot)
    assert torch.allclose(kabsch_align(x, y, torch.ones(1, 6)), y, atol=1e-4)


def test_centre_uses_mask():
    x = _points(b=2, n=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    c = centre(x, mask)
    assert torch.allclose(c[mask].reshape(-1, 3)[:3].sum(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(c[1].sum(0), torch.zeros(3), atol=1e-4)
    assert torch.equal(c[0, 3:], torch.zeros(3, 3))


def test_rotate_matches_matrix_product():
    x = _points(b=2, n=4)
    rot = random_rotations(2, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([x[i] @ rot[i].T for i in range(2)])
    assert torch.allclose(rotate(x, rot), expected, atol=1e-5)
    theta = math.pi / 2
    rz = torch.tensor([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    assert torch.allclose(rotate(torch.tensor([[[1.0, 0, 0]]]), rz[None]), torch.tensor([[[0.0, 1, 0]]]), atol=1e-6)


def _helix(n=20, handed=1.0):
    t = torch.arange(n, dtype=torch.float32)
    return torch.stack([9 * torch.cos(0.6 * t), handed * 9 * torch.sin(0.6 * t), 2.8 * t], -1)[None]  # [1, n, 3]


def test_dihedral_features_are_invariant_and_chiral():
    x, mask = _helix(), torch.ones(1, 20, dtype=torch.bool)
    feats = dihedral_features(x, mask)
    assert feats.shape == (1, 20, 8)
    rot = random_rotations(1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dihedral_features(rotate(x, rot) + 3.0, mask), feats, atol=1e-4)
    mirrored = dihedral_features(_helix(handed=-1.0), mask)
    assert torch.allclose(mirrored[..., 0::2], feats[..., 0::2], atol=1e-4)  # cos unchanged
    assert torch.allclose(mirrored[..., 1::2], -feats[..., 1::2], atol=1e-4)  # sin flips
    assert feats[0, 1:17, 1].abs().min() > 0.1  # a helix has a clear handedness at scale 1


def test_dihedral_features_ignore_padding():
    x, mask = _helix(), torch.ones(1, 20, dtype=torch.bool)
    mask[:, 12:] = False
    padded = x.clone()
    padded[:, 12:] = 1e3  # garbage
    feats = dihedral_features(padded, mask)
    assert torch.allclose(feats[:, :12], dihedral_features(x[:, :12], mask[:, :12]), atol=1e-5)
    assert torch.equal(feats[:, 12:], torch.zeros_like(feats[:, 12:]))


def test_pair_chirality_is_a_pseudo_scalar():
    x, mask = _helix(), torch.ones(1, 20, dtype=torch.bool)
    chi = pair_chirality(x, chain_tangent(x, mask))
    rot = random_rotations(1, generator=torch.Generator().manual_seed(2))
    xr = rotate(x, rot)
    assert torch.allclose(pair_chirality(xr, chain_tangent(xr, mask)), chi, atol=1e-4)
    xm = x * torch.tensor([1.0, -1.0, 1.0])
    assert torch.allclose(pair_chirality(xm, chain_tangent(xm, mask)), -chi, atol=1e-4)
    assert chi.abs().max() <= 1.0 + 1e-5 and chi.abs().max() > 0.1
