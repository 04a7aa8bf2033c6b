"""Validation: loss on the val set, and WHOLE val chains sampled from noise, scored beside the baselines.

Structures are sampled for the full chain (users predict full chains; a model trained on crops
must hold its geometry at full length), up to validation.max_length residues: a longer chain is
centre-cropped to that length and the log says so once. Every chain is also scored for the
baselines of diffold/baselines.py (cached: computed once per run), so each validation logs
val/<metric> beside val_baseline/<metric> and val/<metric>_over_baseline (diffold/scoring.py).

Runs inside torch.random.fork_rng with a fixed seed: validation results are comparable between
validations and the training RNG stream is untouched (exact resume depends on that).
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from diffold.data import collate
from diffold.paths import safe_filename
from diffold.scoring import BaselineScores, score_chain, summarize
from diffold.structure import chain_from_coords, write_structure

log = logging.getLogger(__name__)
BASELINE_CACHE = BaselineScores()  # module level: one per training process, reused by every validation
_SAID: set[str] = set()            # log lines said once per process


def say_once(message: str, *args) -> None:
    text = message % args
    if text not in _SAID:
        _SAID.add(text)
        log.info(text)


def representative_atom(task, atoms: tuple[str, ...]) -> int:
    """Index of the atom the metrics use (RNA C4', protein CA when present in the atom set)."""
    return atoms.index(task.default_atoms[0]) if task.default_atoms[0] in atoms else 0


def detokenize(task, tokens: torch.Tensor) -> str:
    return "".join(task.alphabet[t - 1] if t > 0 else task.unknown for t in tokens.tolist())


def whole_chains(val_dataset, max_length: int):
    """The val dataset with crops only above max_length (it crops to data.max_length for the loss)."""
    full = copy.copy(val_dataset)
    full.max_length = max_length
    cropped = [f"{cid} ({n})" for cid, n in zip(val_dataset.ids, val_dataset.full_lengths) if n > max_length]
    if cropped:
        say_once("validation samples whole chains up to validation.max_length=%d residues; centre-cropped to it: %s",
                 max_length, ", ".join(cropped))
    return full


@torch.no_grad()
def validation_loss(acc, model, diffusion, val_loader) -> float:
    total = torch.zeros(2, device=acc.device)  # [sum of per-chain losses, chains]
    for batch in val_loader:
        out = diffusion.loss(model, batch.to(acc.device))
        total += torch.stack([out.total.float().sum(), torch.tensor(float(len(batch)), device=acc.device)])
    total = acc.reduce(total, reduction="sum")
    s, n = total.tolist()
    return s / max(n, 1.0)


def score_sample(pred: np.ndarray, batch, rep: int, task, baselines: BaselineScores = BASELINE_CACHE) -> dict:
    """{"model": scores, "baselines": {name: scores}} of one sampled chain [L, A, 3] (batch of 1, unpadded)."""
    ref = batch.coords[0, :, rep].float().cpu().numpy()      # [L, 3]
    mask = batch.atom_mask[0, :, rep].cpu().numpy()          # [L]
    index = batch.residue_index[0].cpu().numpy()             # [L]
    try:
        return {"model": score_chain(pred[:, rep], ref, mask, index, task),
                "baselines": baselines.get(task, batch.ids[0], ref, mask, index)}
    except ValueError as e:  # e.g. < 3 observed atoms, or a non-finite sample: reported, not averaged
        log.warning("validation chain %s not scored: %s", batch.ids[0], e)
        return {"model": {}, "baselines": {}}


@torch.no_grad()
def sample_and_score(acc, model, diffusion, val_dataset, cfg, task, atoms, num_steps: int) -> list[dict]:
    """Each rank samples its share of the first validation.num_samples whole chains; gathered to all ranks."""
    n = min(cfg.validation.num_samples, len(val_dataset))
    mine = list(range(acc.process_index, n, acc.num_processes))
    rep = representative_atom(task, atoms)
    chains = whole_chains(val_dataset, cfg.validation.max_length)
    results = []
    for k, i in enumerate(mine):
        t0 = time.perf_counter()
        batch = collate([chains[i]]).to(acc.device)
        gen = torch.Generator(device=acc.device).manual_seed(cfg.training.seed + i)
        pred = diffusion.sample(model, batch, num_steps=num_steps, generator=gen)[0].float().cpu().numpy()  # [L, A, 3]
        record = score_sample(pred, batch, rep, task)
        model_lddt = record["model"].get("lddt", float("nan"))
        helix = record["baselines"].get("helix", {}).get("lddt", float("nan"))
        log.info("validation sample %d/%d: %s, %d residues, %d steps: lddt %.3f (helix %.3f) in %.1f s",
                 k + 1, len(mine), batch.ids[0], pred.shape[0], num_steps, model_lddt, helix, time.perf_counter() - t0)
        results.append({"id": batch.ids[0], **record, "coords": pred.astype(np.float32),
                        "mask": batch.atom_mask[0].cpu().numpy(), "sequence": detokenize(task, batch.tokens[0])})
    return acc.gather_for_metrics(results, use_gather_object=True)


def write_samples(results: list[dict], out_dir: Path, task, atoms) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        if not np.isfinite(r["coords"]).all():  # a failed sample is reported by score_sample, never written
            continue
        chain = chain_from_coords(r["id"], task.kind, r["sequence"], r["coords"], atoms)
        path = out_dir / safe_filename(r["id"], ".pdb")
        write_structure(path, [chain])
        paths.append(path)
    return paths


def validate(acc, model, diffusion, val_loader, val_dataset, cfg, task, atoms, run_dir: Path, step: int) -> dict:
    """Loss + whole-chain sampled-structure metrics with the (EMA) `model`, beside the baselines."""
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.training.seed)
        metrics = {"val/loss": validation_loss(acc, model, diffusion, val_loader)}
        results = sample_and_score(acc, model, diffusion, val_dataset, cfg, task, atoms, cfg.validation.sampling_steps)
    metrics.update(summarize(results, "val"))
    if acc.is_main_process and results:
        write_samples(results, Path(run_dir) / "samples" / f"step_{step:09d}", task, atoms)
    return metrics
