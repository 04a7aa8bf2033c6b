"""Predict structures from a trained model.

    python -m diffold.predict --checkpoint outputs/run/checkpoints/best/export \
        --input seqs.fasta|structures/ --num_samples K --out DIR [--steps N] [--seed S]

--checkpoint: an inference bundle (model.safetensors + config.json, exported for `best` and at the
end of training) or a training checkpoint directory (its EMA weights are used).
--input: a FASTA file, or structure file(s)/a directory: then the chain's sequence is predicted and
RMSD / TM / GDT-TS / lDDT against that reference structure are written to metrics.json
(residue correspondence by position in the chain).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from diffold.batch import Batch
from diffold.checkpoint import CheckpointError, load_weights_safely, verify
from diffold.config import config_from_dict
from diffold.paths import safe_filename

log = logging.getLogger(__name__)
STRUCTURE_SUFFIXES = (".pdb", ".cif", ".ent", ".gz")


def load_bundle(path: Path):
    """(model, diffusion, task, atoms, cfg) from an export bundle or a training checkpoint."""
    from diffold.diffusion import build_diffusion
    from diffold.model import build_model
    from diffold.tasks import get_task

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        meta = json.loads((path / "config.json").read_text())
        tree = {"task": meta["task"], "model": {k: meta[k] for k in meta if k not in ("task", "atoms", "diffusion")},
                "diffusion": meta["diffusion"]}
        weights, atoms = path / "model.safetensors", tuple(meta["atoms"])
    elif (path / "meta.json").is_file():
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"{path}: {reason}")
        tree = json.loads((path / "meta.json").read_text())["config"]
        weights, atoms = path / "ema.safetensors", None
    else:
        raise CheckpointError(f"{path}: neither an export bundle (model.safetensors + config.json) nor a checkpoint (meta.json)")
    cfg = config_from_dict(tree, source=str(path))
    task = get_task(cfg.task)
    atoms = atoms or task.resolve_atoms(cfg.data.atoms)
    model = build_model(cfg, num_atoms=len(atoms))
    model.load_state_dict(load_weights_safely(weights))
    return model.eval(), build_diffusion(cfg, task), task, atoms, cfg


def read_inputs(path: Path, task, atoms) -> list[tuple[str, str, object]]:
    """[(id, sequence, reference Chain or None)] from FASTA or structure files."""
    from diffold.structure import StructureError, parse_structure

    if path.is_file() and path.suffix.lower() in (".fa", ".fasta", ".fna", ".faa", ".txt"):
        entries, name = [], None
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith(">"):
                name = line[1:].split()[0] or f"seq{len(entries)}"
                entries.append([name, ""])
            elif line and entries:
                entries[-1][1] += line
        if not entries:
            raise ValueError(f"{path}: no FASTA records ('>name' lines) found")
        return [(n, s.upper(), None) for n, s in entries]
    files = sorted(p for p in path.rglob("*") if p.name.lower().endswith(STRUCTURE_SUFFIXES)) if path.is_dir() else [path]
    out = []
    for f in files:
        try:
            chains, _ = parse_structure(f, atoms={task.kind: atoms})
        except StructureError as e:
            log.warning("skipping %s: %s", f, e)
            continue
        out += [(c.id, c.sequence, c) for c in chains if c.kind == task.kind]
    if not out:
        raise ValueError(f"{path}: no {task.kind} chain found")
    return out


def make_batch(task, sequence: str, num_atoms: int, copies: int, features: torch.Tensor | None = None) -> Batch:
    """`copies` rows of one sequence to sample from; features [L, F] when the model was trained with them."""
    tokens = task.tokenize(sequence)
    L = len(tokens)
    return Batch(
        features=None if features is None else features.expand(copies, *features.shape).clone(),
        ids=[f"s{i}" for i in range(copies)], tokens=tokens.expand(copies, L).clone(),
        coords=torch.zeros(copies, L, num_atoms, 3), atom_mask=torch.ones(copies, L, num_atoms, dtype=torch.bool),
        residue_mask=torch.ones(copies, L, dtype=torch.bool), residue_index=torch.arange(L).expand(copies, L).clone(),
        weights=torch.ones(copies),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: diffusion.num_sampling_steps)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
    from diffold.evaluate import representative_atom
    from diffold.metrics import all_metrics
    from diffold.structure import chain_from_coords, write_structure

    try:
        model, diffusion, task, atoms, cfg = load_bundle(args.checkpoint)
        inputs = read_inputs(args.input, task, atoms)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rep, report = representative_atom(task, atoms), {}
    gen = torch.Generator().manual_seed(args.seed)
    embedder = None
    if cfg.model.feature_dim > 0:  # trained with per-residue PLM features: compute them the same way
        enc = cfg.model.structure_encoder
        if not enc.plm_path or not Path(enc.plm_path).is_dir():
            print(f"error: this model needs per-residue features from model.structure_encoder.plm_path={enc.plm_path!r}, "
                  "which is not a local directory here; copy the ESM-2 model there", file=sys.stderr)
            return 2
        from diffold.plm import Embedder

        embedder = Embedder(enc.plm_path, enc.plm_layer)
    for chain_id, sequence, ref in inputs:
        feats = embedder.embed([sequence])[0] if embedder is not None else None
        with torch.no_grad():
            batch = make_batch(task, sequence, len(atoms), args.num_samples, feats)
            coords = diffusion.sample(model, batch, args.steps, gen)
        for k in range(args.num_samples):
            pred = coords[k].numpy().astype(np.float32)
            name = f"{chain_id}_sample{k}"
            write_structure(args.out / safe_filename(name, ".pdb"), [chain_from_coords(name, task.kind, sequence, pred, atoms)])
            if ref is not None:
                report[name] = all_metrics(pred[:, rep], ref.coords[:, rep], molecule=task.tm_molecule, mask=ref.mask[:, rep])
                log.info("%s: %s", name, ", ".join(f"{m}={v:.3f}" for m, v in report[name].items()))
    if report:
        (args.out / "metrics.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %d structure(s) to %s", len(inputs) * args.num_samples, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
