"""The tiny model memorises one real RNA chain: loss falls and structures sampled from noise match it.

Recipe (2-core VM, one torch thread, ~40-50 s): 1000 AdamW steps at lr 3e-3, 8 noisy
copies of the chain per step, then 8 samples with 50 Heun steps and EDM churn 40.
"""
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffold.batch import Batch
from diffold.config import load_config
from diffold.diffusion import build_diffusion, weighted_mean
from diffold.metrics import lddt
from diffold.model import build_model
from diffold.structure import parse_structure
from diffold.tasks import get_task

CHAIN = Path(__file__).resolve().parents[1] / "data" / "examples" / "rna" / "2a43.pdb.gz"  # 26 nt, experimental (rna-tools extract)
STEPS, COPIES, SAMPLES = 1000, 8, 8
CROP_STEPS = 600  # length-generalisation test: steps on crops of 32


def _batch(chain, task, copies: int) -> Batch:
    """`copies` identical rows of one chain (representative atom only), centred."""
    coords = torch.tensor(chain.coords[:, :1])  # [L, 1, 3]
    mask = torch.tensor(chain.mask[:, :1])
    coords = coords - coords[mask[:, 0]].mean(0)
    n = len(chain.sequence)
    return Batch(
        ids=[chain.id] * copies, tokens=task.tokenize(chain.sequence).repeat(copies, 1),
        coords=coords.repeat(copies, 1, 1, 1), atom_mask=mask.repeat(copies, 1, 1),
        residue_mask=torch.ones(copies, n, dtype=torch.bool), residue_index=torch.arange(n).repeat(copies, 1),
        weights=torch.ones(copies),
    )


@pytest.mark.slow
def test_tiny_model_overfits_one_real_chain():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core VM, 2 threads are several times slower under load
    try:
        torch.manual_seed(0)
        chains, _ = parse_structure(CHAIN)
        chain = chains[0]
        cfg = load_config(None, overrides=[
            "model.size=tiny", "diffusion.augment_rotation=false", "diffusion.sampling_churn=40",
        ], env={})
        task = get_task(cfg.task)
        assert chain.kind == task.name and 20 <= len(chain.sequence) <= 40
        batch = _batch(chain, task, COPIES)
        model, diffusion = build_model(cfg, num_atoms=1), build_diffusion(cfg, task)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        warmup = 100  # then cosine to 10% of the peak
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS))))

        start, losses = time.perf_counter(), []
        for _ in range(STEPS):
            loss = weighted_mean(diffusion.loss(model, batch).total, batch.weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        train_s = time.perf_counter() - start

        model.eval()
        pred = diffusion.sample(model, batch, num_steps=50, generator=torch.Generator().manual_seed(1))
        ref = batch.coords[0, :, 0].numpy()
        scores = np.array([lddt(pred[k, :, 0].numpy(), ref, inclusion_radius=15.0) for k in range(SAMPLES)])
        scores30 = np.array([lddt(pred[k, :, 0].numpy(), ref, inclusion_radius=30.0) for k in range(SAMPLES)])
        first, last = np.mean(losses[:20]), np.mean(losses[-100:])
        print(f"\n{STEPS} steps in {train_s:.1f} s; loss {first:.3f} -> {last:.3f}; lDDT@15 per sample "
              f"{np.round(np.sort(scores), 2)} (median {np.median(scores):.3f}), lDDT@30 median {np.median(scores30):.3f}")
        assert last <= 0.2 * first, f"loss fell only {100 * (1 - last / first):.0f}%"
        assert np.median(scores) >= 0.8, f"median lDDT {np.median(scores):.3f} < 0.8: {np.round(scores, 3)}"
        assert np.isfinite(pred.numpy()).all()
    finally:
        torch.set_num_threads(threads)


def _helices(n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """n A-form-like C4' helices [n, length, 1, 3] (radius 9.4 A, rise 2.8 A, 32.7 deg; 6.0 A steps),
    random phase and orientation, 0.3 A noise: a family of real-looking chains longer than the crops."""
    from diffold.geometry import random_rotations, rotate

    t = np.arange(length)[None] + rng.uniform(0, 11, (n, 1))
    phi = np.radians(360 / 11) * t
    x = np.stack([9.4 * np.cos(phi), 9.4 * np.sin(phi), 2.8 * t], -1) + rng.normal(0, 0.3, (n, length, 3))
    x = torch.tensor(x, dtype=torch.float32)
    x = rotate(x - x.mean(1, keepdim=True), random_rotations(n, torch.Generator().manual_seed(int(rng.integers(1 << 30)))))
    return x[:, :, None]


@pytest.mark.slow
def test_trained_on_crops_of_32_samples_96_residues_with_native_bond_lengths():
    # issue 21: a model trained on crops must keep its geometry on longer chains. The old head
    # averaged unbounded messages over ALL residues, so its bonds stretched beyond the crop length.
    from diffold.scoring import consecutive_distance

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        cfg = load_config(None, overrides=["model.size=tiny", "diffusion.augment_rotation=false"], env={})
        task = get_task(cfg.task)
        model, diffusion = build_model(cfg, num_atoms=1), build_diffusion(cfg, task)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        pool = _helices(64, 96, rng)                    # [64, 96, 1, 3]
        crop, batch_size, steps = 32, 8, CROP_STEPS
        start = time.perf_counter()
        for _ in range(steps):
            rows = rng.integers(0, len(pool), batch_size)
            s = rng.integers(0, 96 - crop + 1, batch_size)
            coords = torch.stack([pool[r, a:a + crop] for r, a in zip(rows, s)])
            coords = coords - coords.mean(1, keepdim=True)
            batch = Batch(ids=["h"] * batch_size, tokens=torch.randint(1, task.vocab_size, (batch_size, crop)),
                          coords=coords, atom_mask=torch.ones(batch_size, crop, 1, dtype=torch.bool),
                          residue_mask=torch.ones(batch_size, crop, dtype=torch.bool),
                          residue_index=torch.arange(crop).repeat(batch_size, 1), weights=torch.ones(batch_size))
            loss = weighted_mean(diffusion.loss(model, batch).total, batch.weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        train_s = time.perf_counter() - start
        model.eval()
        native = pool[0, :, 0].numpy()
        long = Batch(ids=["h"] * 3, tokens=torch.randint(1, task.vocab_size, (3, 96)), coords=torch.zeros(3, 96, 1, 3),
                     atom_mask=torch.ones(3, 96, 1, dtype=torch.bool), residue_mask=torch.ones(3, 96, dtype=torch.bool),
                     residue_index=torch.arange(96).repeat(3, 1), weights=torch.ones(3))
        pred = diffusion.sample(model, long, num_steps=50, generator=torch.Generator().manual_seed(1))
        ones, index = np.ones(96, bool), np.arange(96)
        want = consecutive_distance(native, ones, index)
        got = [consecutive_distance(pred[k, :, 0].numpy(), ones, index) for k in range(3)]
        print(f"\n{steps} steps on crops of {crop} in {train_s:.1f} s; median consecutive distance at 96 residues "
              f"{np.round(got, 2)} vs native {want:.2f}")
        assert all(abs(g / want - 1) < 0.15 for g in got), f"{got} vs native {want:.2f}"
    finally:
        torch.set_num_threads(threads)
