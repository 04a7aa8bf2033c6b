"""Validation: loss on the val set and structures sampled from noise, scored with RMSD/TM/GDT/lDDT.

Runs inside torch.random.fork_rng with a fixed seed: validation results are comparable between
validations and the training RNG stream is untouched (exact resume depends on that).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffold.data import collate
from diffold.metrics import all_metrics
from diffold.paths import safe_filename
from diffold.structure import chain_from_coords, write_structure

log = logging.getLogger(__name__)
METRIC_KEYS = {"rmsd": "val/rmsd", "tm": "val/tm", "gdt_ts": "val/gdt_ts", "lddt": "val/lddt"}


def representative_atom(task, atoms: tuple[str, ...]) -> int:
    """Index of the atom the metrics use (RNA C4', protein CA when present in the atom set)."""
    return atoms.index(task.default_atoms[0]) if task.default_atoms[0] in atoms else 0


def detokenize(task, tokens: torch.Tensor) -> str:
    return "".join(task.alphabet[t - 1] if t > 0 else task.unknown for t in tokens.tolist())


@torch.no_grad()
def validation_loss(acc, model, diffusion, val_loader) -> float:
    total = torch.zeros(2, device=acc.device)  # [sum of per-chain losses, chains]
    for batch in val_loader:
        out = diffusion.loss(model, batch.to(acc.device))
        total += torch.stack([out.total.float().sum(), torch.tensor(float(len(batch)), device=acc.device)])
    total = acc.reduce(total, reduction="sum")
    s, n = total.tolist()
    return s / max(n, 1.0)


@torch.no_grad()
def sample_and_score(acc, model, diffusion, val_dataset, cfg, task, atoms, num_steps: int) -> list[dict]:
    """Each rank samples its share of the first validation.num_samples chains; gathered to all ranks."""
    n = min(cfg.validation.num_samples, len(val_dataset))
    mine = list(range(acc.process_index, n, acc.num_processes))
    rep = representative_atom(task, atoms)
    results = []
    for i in mine:
        batch = collate([val_dataset[i]]).to(acc.device)
        gen = torch.Generator(device=acc.device).manual_seed(cfg.training.seed + i)
        pred = diffusion.sample(model, batch, num_steps=num_steps, generator=gen)  # [1, L, A, 3]
        real = batch.residue_mask[0]
        mask = batch.atom_mask[0, real, rep].cpu().numpy()
        p = pred[0, real].float().cpu().numpy()                                    # [L, A, 3]
        t = batch.coords[0, real].float().cpu().numpy()
        try:
            scores = all_metrics(p[:, rep], t[:, rep], molecule=task.tm_molecule, mask=mask)
        except ValueError as e:  # e.g. < 3 observed atoms in the crop: reported, not averaged
            log.warning("validation chain %s not scored: %s", batch.ids[0], e)
            scores = {}
        results.append({
            "id": batch.ids[0], "scores": scores, "coords": p.astype(np.float32),
            "mask": batch.atom_mask[0, real].cpu().numpy(), "sequence": detokenize(task, batch.tokens[0, real]),
        })
    return acc.gather_for_metrics(results, use_gather_object=True)


def write_samples(results: list[dict], out_dir: Path, task, atoms) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        chain = chain_from_coords(r["id"], task.kind, r["sequence"], r["coords"], atoms)
        path = out_dir / safe_filename(r["id"], ".pdb")
        write_structure(path, [chain])
        paths.append(path)
    return paths


def summarize(results: list[dict]) -> dict[str, float]:
    """Mean of each metric over the scored chains (unscored chains are excluded and counted)."""
    scored = [r["scores"] for r in results if r["scores"]]
    out = {name: float(np.mean([s[key] for s in scored])) for key, name in METRIC_KEYS.items() if scored}
    out["val/num_scored"] = float(len(scored))
    return out


def validate(acc, model, diffusion, val_loader, val_dataset, cfg, task, atoms, run_dir: Path, step: int) -> dict:
    """Loss + sampled-structure metrics with the (EMA) `model`; files written by the main process."""
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.training.seed)
        metrics = {"val/loss": validation_loss(acc, model, diffusion, val_loader)}
        results = sample_and_score(acc, model, diffusion, val_dataset, cfg, task, atoms, cfg.validation.sampling_steps)
    metrics.update(summarize(results))
    if acc.is_main_process and results:
        write_samples(results, Path(run_dir) / "samples" / f"step_{step:09d}", task, atoms)
    return metrics
