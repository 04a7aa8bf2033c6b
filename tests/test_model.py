"""Denoiser network: sizes, padding invariance, equivariance, MoE routing, checkpointing."""
import pytest
import torch

from diffold.config import load_config
from diffold.geometry import random_rotations, rotate
from diffold.model import MODEL_SIZES, DenoiserBlock, build_model, count_parameters, resolve_size
from diffold.moe import MoEFeedForward
from diffold.tasks import get_task

VOCAB = get_task("rna").vocab_size


def _cfg(*overrides):
    return load_config(None, overrides=list(overrides), env={})


def _inputs(b=2, n=10, atoms=1, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, atoms, 3, generator=g)
    tokens = torch.randint(1, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    for i, length in enumerate(lengths or []):
        mask[i, length:] = False
    return dict(x=x, c_noise=torch.randn(b, generator=g), tokens=tokens * mask, residue_mask=mask,
                residue_index=torch.arange(n).repeat(b, 1), atom_mask=mask[..., None].expand(b, n, atoms).clone())


def _run(model, inp):
    return model(inp["x"], inp["c_noise"], inp["tokens"], inp["residue_mask"], inp["residue_index"],
                 inp["atom_mask"], inp.get("features"))


def _model(*overrides, atoms=1, seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg(*overrides), atoms).eval()


def test_parameter_counts():
    counts = {s: count_parameters(build_model(_cfg(f"model.size={s}"), 1)) for s in ("tiny", "small")}
    assert counts["tiny"] < 1_000_000
    assert counts["tiny"] < counts["small"] < 20_000_000
    base = build_model(_cfg("model.size=base"), 1)  # built, never run
    assert 90e6 < count_parameters(base) < 110e6
    assert set(MODEL_SIZES) == {"tiny", "small", "base"}


def test_size_overrides_and_custom():
    dims = resolve_size(_cfg("model.size=tiny", "model.d_model=32", "model.num_heads=2").model)
    assert dims["d_model"] == 32 and dims["num_heads"] == 2 and dims["num_layers"] == MODEL_SIZES["tiny"]["num_layers"]
    model = build_model(_cfg("model.size=custom", "model.d_model=32", "model.num_layers=1", "model.num_heads=4",
                             "model.d_pair=8"), 1)
    assert sum(isinstance(m, DenoiserBlock) for m in model.modules()) == 1
    with pytest.raises(ValueError, match="model.d_model"):
        build_model(_cfg("model.size=custom"), 1)
    with pytest.raises(ValueError, match="divisible"):
        build_model(_cfg("model.d_model=30", "model.num_heads=4"), 1)


@pytest.mark.parametrize("head", ["equivariant", "af3"])
@pytest.mark.parametrize("atoms", [1, 3])
def test_padding_does_not_change_real_residues(head, atoms):
    model = _model(f"model.head={head}", "model.use_moe=true", atoms=atoms)
    short = _inputs(b=1, n=7, atoms=atoms)
    padded = _inputs(b=1, n=12, atoms=atoms, seed=1, lengths=[7])  # garbage coordinates in the padding
    for key in ("x", "tokens", "residue_index", "atom_mask"):
        padded[key][:, :7] = short[key]
    padded["c_noise"] = short["c_noise"]
    with torch.no_grad():
        out_short, aux_short = _run(model, short)
        out_pad, aux_pad = _run(model, padded)
    assert torch.allclose(out_pad[:, :7], out_short, atol=1e-5)
    assert torch.equal(out_pad[:, 7:], torch.zeros_like(out_pad[:, 7:]))
    assert torch.allclose(aux_pad, aux_short, atol=1e-6)


def test_batch_rows_are_independent():
    model = _model()
    inp = _inputs(b=3, n=9, lengths=[9, 5, 7])
    with torch.no_grad():
        together, _ = _run(model, inp)
        for i in range(3):
            alone, _ = _run(model, {k: v[i:i + 1] for k, v in inp.items()})
            assert torch.allclose(together[i], alone[0], atol=1e-5)


@pytest.mark.parametrize("atoms", [1, 2])
def test_default_head_is_rotation_equivariant_and_translation_invariant(atoms):
    model = _model(atoms=atoms)
    inp = _inputs(b=2, n=11, atoms=atoms, lengths=[11, 8])
    rot = random_rotations(2, generator=torch.Generator().manual_seed(3))
    moved = dict(inp, x=rotate(inp["x"], rot) + torch.tensor([0.7, -1.1, 2.0]) * inp["residue_mask"][..., None, None])
    with torch.no_grad():
        out, _ = _run(model, inp)
        out_moved, _ = _run(model, moved)
    assert out.abs().max() > 1e-3  # a trivial zero output would pass the check below
    assert torch.allclose(out_moved, rotate(out, rot), atol=1e-4)


def test_default_head_tells_mirror_images_apart():
    # E(3) incl. reflections would sample mirror-image folds half the time; ours is SE(3) only.
    model = _model()
    inp = _inputs(b=1, n=11)
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    with torch.no_grad():
        out, _ = _run(model, inp)
        out_mirror, _ = _run(model, dict(inp, x=inp["x"] * mirror))
    assert (out_mirror - out * mirror).abs().max() > 1e-4


def test_af3_head_is_not_equivariant():
    model = _model("model.head=af3")
    torch.nn.init.normal_(model.head.weight, std=0.1)  # zero-initialised head: make it non-trivial
    inp = _inputs(b=1, n=8)
    rot = random_rotations(1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = _run(model, inp)
        out_rot, _ = _run(model, dict(inp, x=rotate(inp["x"], rot)))
    assert (out_rot - rotate(out, rot)).abs().max() > 1e-3


def test_features_are_used_and_required():
    model = _model("model.feature_dim=5")
    inp = _inputs(b=1, n=6)
    f = torch.randn(1, 6, 5)
    with torch.no_grad():
        a, _ = _run(model, dict(inp, features=f))
        b, _ = _run(model, dict(inp, features=f * 2))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="feature_dim"):
        _run(model, inp)


def test_moe_routes_each_token_to_top_k_experts():
    moe = MoEFeedForward(d_model=16, ff_mult=2, num_experts=4, top_k=2)
    seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    y, aux = moe(x, mask)
    assert len(seen) == 4 and sum(seen) == 2 * 9 * 2  # every token dispatched to exactly k experts
    assert y.shape == x.shape and aux.shape == (2,) and torch.isfinite(aux).all() and (aux > 0).all()
    aux.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_output_is_gate_weighted_sum_of_chosen_experts():
    moe = MoEFeedForward(d_model=8, ff_mult=2, num_experts=3, top_k=2)
    x = torch.randn(1, 5, 8)
    y, _ = moe(x, torch.ones(1, 5, dtype=torch.bool))
    probs = moe.router(x).softmax(-1)
    gate, idx = probs.topk(2, -1)
    gate = gate / gate.sum(-1, keepdim=True)
    expected = sum(gate[..., k, None] * torch.stack([moe.experts[int(e)](x[0, t]) for t, e in enumerate(idx[0, :, k])])[None]
                   for k in range(2))
    assert torch.allclose(y, expected, atol=1e-5)


def test_moe_aux_loss_prefers_balance():
    moe = MoEFeedForward(d_model=8, ff_mult=1, num_experts=4, top_k=1)
    x = torch.randn(1, 64, 8)
    x[..., 0] = x[..., 0].abs() + 1
    mask = torch.ones(1, 64, dtype=torch.bool)
    with torch.no_grad():
        _, spread = moe(x, mask)  # random router: tokens spread over experts
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0  # every token -> expert 0 with probability ~1
        _, collapsed = moe(x, mask)
    assert abs(collapsed.item() - 4.0) < 1e-2  # Switch loss = num_experts when fully collapsed
    assert spread.item() < collapsed.item() - 1


def test_model_with_moe_returns_aux():
    model = _model("model.use_moe=true", "model.num_experts=4", "model.top_k=2")
    _, aux = _run(model, _inputs(b=2, n=6))
    assert aux.shape == (2,) and (aux > 0).all()
    _, aux_dense = _run(_model(), _inputs(b=2, n=6))
    assert torch.equal(aux_dense, torch.zeros(2))


def test_activation_checkpointing_matches_plain():
    plain = _model().train()
    ckpt = _model("model.activation_checkpointing=true").train()
    ckpt.load_state_dict(plain.state_dict())
    inp = _inputs(b=2, n=7, lengths=[7, 4])
    grads = []
    for model in (plain, ckpt):
        out, _ = _run(model, inp)
        out.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_gradients_reach_all_parameters():
    model = _model("model.use_moe=true").train()
    out, aux = _run(model, _inputs(b=2, n=8))
    (out.square().sum() + aux.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # DDP with find_unused_parameters=False needs every parameter used
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_all_padding_row_stays_finite():
    model = _model()
    inp = _inputs(b=2, n=5, lengths=[5, 0])
    out, _ = _run(model, inp)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))


def test_compiles_without_graph_breaks():
    model = _model()
    inp = _inputs(b=1, n=6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        ref, _ = _run(model, inp)
        out, _ = _run(compiled, inp)
    assert torch.allclose(ref, out, atol=1e-5)


def test_pair_features_in_row_chunks_match_all_rows():
    """model.pair_chunk_size builds the pair representation a few rows at a time: same outputs and gradients."""
    plain = _model().train()
    chunked = _model("model.pair_chunk_size=3", "model.activation_checkpointing=true").train()
    chunked.load_state_dict(plain.state_dict())
    inp = _inputs(b=2, n=11, lengths=[11, 6])
    outs, grads = [], []
    for model in (plain, chunked):
        out, _ = _run(model, inp)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_rbf_has_no_subnormal_values():
    """Evaluated far in its tails the Gaussian basis gave subnormal floats (slow on CPUs): now exactly 0 there."""
    from diffold.model import rbf

    d = torch.linspace(0, 50, 20001)
    out = rbf(d)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((out != 0) & (out.abs() < tiny)).any()
    assert (out == 0).any() and out.max() <= 1.0
    exact = torch.exp(-(((d[:, None] - torch.linspace(0, 3.0, out.shape[-1])) / (3.0 / (out.shape[-1] - 1))) ** 2))
    assert torch.allclose(out, exact, atol=1e-12)  # only values below exp(-30) differ


MEMORY_STEP = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.model import make_batch
from diffold.config import load_config
from diffold.diffusion import build_diffusion
from diffold.model import build_model
from diffold.tasks import get_task
torch.set_num_threads(1)
cfg = load_config(None, overrides=["model.size=small"], preset=sys.argv[1] or None, env={{}})
task = get_task("rna")
torch.manual_seed(0)
model, diffusion = build_model(cfg, 1).train(), build_diffusion(cfg, task)
diffusion.loss(model, make_batch(1, 16, task.vocab_size)).total.mean().backward()  # warm-up
batch = make_batch(1, 320, task.vocab_size)
def status_kb(key):  # VmRSS / VmHWM of this process (ru_maxrss would include the forking parent's size)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak) to the current size
before_kb = status_kb("VmRSS")
diffusion.loss(model, batch).total.mean().backward()
print(status_kb("VmHWM") - before_kb)
"""


def test_memory_preset_lowers_the_peak_of_a_training_step(tmp_path):
    """--preset memory (activation checkpointing of trunk, pair features and head; pair features in row chunks)
    at least a third lower peak memory for one small-model step at L=320 (measured ~0.4x: benchmarks/model.py --memory)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "step.py"
    script.write_text(MEMORY_STEP.format(root=str(Path(__file__).resolve().parents[1])))
    peak = {}
    for preset in ("", "memory"):
        r = subprocess.run([sys.executable, str(script), preset], capture_output=True, text=True, timeout=300,
                           env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        peak[preset] = float(r.stdout.split()[-1])
    assert peak["memory"] < 0.67 * peak[""], peak
