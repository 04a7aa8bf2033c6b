"""Predict structures from a trained model.

    python -m diffold.predict --checkpoint outputs/run/export \
        --input seqs.fasta|structures/ --num_samples K --out DIR [--steps N] [--seed S]

--checkpoint: an inference bundle (model.safetensors + config.json: RUN/export holds the final
weights, RUN/checkpoints/best/export the best) or a training checkpoint directory (its EMA weights).
--input: a FASTA file, or structure file(s)/a directory: then the chain's sequence is predicted and
RMSD / TM / GDT-TS / lDDT / bond-length error against that reference structure are written to
metrics.json (residue correspondence by position in the chain, numbering gaps kept as in training).
Sequences must match the model's molecule (an RNA model refuses a protein sequence and vice versa).

One log line per chain says how long its samples took. A sample that is not finite (NaN/inf) is
reported for its chain and counted; no file is written for it.
Exit codes: 0 every sample written; 1 some samples failed (see the log; the others are written);
2 bad input (checkpoint, input file, sequence of the wrong molecule).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffold.batch import Batch
from diffold.checkpoint import CheckpointError, load_weights_safely, verify
from diffold.config import config_from_dict
from diffold.paths import safe_filename

log = logging.getLogger(__name__)
STRUCTURE_SUFFIXES = (".pdb", ".cif", ".ent", ".gz")
NUCLEOTIDES = set("ACGUTN")


def load_bundle(path: Path):
    """(model, diffusion, task, atoms, cfg) from an export bundle or a training checkpoint."""
    from diffold.diffusion import build_diffusion
    from diffold.model import build_model
    from diffold.tasks import get_task

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        meta = json.loads((path / "config.json").read_text())
        sections = ("diffusion", "training", "validation", "data")  # the last three only in newer bundles
        tree = {"task": meta["task"], "model": {k: meta[k] for k in meta if k not in ("task", "atoms", *sections)},
                **{k: meta[k] for k in sections if k in meta}}
        weights, atoms = path / "model.safetensors", tuple(meta["atoms"])
    elif (path / "meta.json").is_file():
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"{path}: {reason}")
        tree = json.loads((path / "meta.json").read_text())["config"]
        weights, atoms = path / "ema.safetensors", None
    elif (path / "export" / "config.json").is_file() or (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path} is a run directory: pass --checkpoint {path / 'export'} (final weights) "
                              f"or {path / 'checkpoints' / 'best' / 'export'} (best validation)")
    else:
        raise CheckpointError(f"{path}: neither an export bundle (model.safetensors + config.json) nor a checkpoint (meta.json)")
    cfg = config_from_dict(tree, source=str(path))
    task = get_task(cfg.task)
    atoms = atoms or task.resolve_atoms(cfg.data.atoms)
    model = build_model(cfg, num_atoms=len(atoms))
    model.load_state_dict(load_weights_safely(weights))
    return model.eval(), build_diffusion(cfg, task), task, atoms, cfg


def check_molecule(name: str, sequence: str, task) -> None:
    """ValueError (one line) when a FASTA sequence cannot be of the model's molecule."""
    letters = set(sequence) - {"-", "*"}
    if task.kind == "rna" and not letters <= NUCLEOTIDES:
        odd = "".join(sorted(letters - NUCLEOTIDES))[:10]
        raise ValueError(f"sequence '{name}' has letters {odd!r} outside ACGU(N): this is an RNA model; "
                         "a protein sequence needs a model trained with --task protein")
    if task.kind == "protein" and len(sequence) >= 10 and letters <= NUCLEOTIDES:
        raise ValueError(f"sequence '{name}' looks like a nucleic acid (only {''.join(sorted(letters))}): this is a "
                         "protein model; an RNA sequence needs a model trained with --task rna")


def read_inputs(path: Path, task, atoms) -> list[tuple[str, str, object]]:
    """[(id, sequence, reference Chain or None)] from FASTA or structure files."""
    from diffold.structure import StructureError, parse_structure

    if not path.exists():
        raise ValueError(f"--input {path}: no such file or directory")
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
        for n, s in entries:
            check_molecule(n, s.upper(), task)
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


def make_batch(task, sequence: str, num_atoms: int, copies: int, features: torch.Tensor | None = None,
               residue_index: torch.Tensor | None = None) -> Batch:
    """`copies` rows of one sequence to sample from; residue_index [L] (default 0..L-1), features [L, F]."""
    tokens = task.tokenize(sequence)
    L = len(tokens)
    index = torch.arange(L) if residue_index is None else torch.as_tensor(residue_index, dtype=torch.long)
    return Batch(
        features=None if features is None else features.expand(copies, *features.shape).clone(),
        ids=[f"s{i}" for i in range(copies)], tokens=tokens.expand(copies, L).clone(),
        coords=torch.zeros(copies, L, num_atoms, 3), atom_mask=torch.ones(copies, L, num_atoms, dtype=torch.bool),
        residue_mask=torch.ones(copies, L, dtype=torch.bool), residue_index=index.expand(copies, L).clone(),
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
    from diffold.featurize import residue_positions
    from diffold.scoring import score_chain
    from diffold.structure import chain_from_coords, write_structure
    from diffold.validation import representative_atom

    try:
        if args.num_samples < 1 or (args.steps is not None and args.steps < 1):
            raise ValueError("--num_samples and --steps must be >= 1")
        model, diffusion, task, atoms, cfg = load_bundle(args.checkpoint)
        inputs = read_inputs(args.input, task, atoms)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rep, report, written, failed = representative_atom(task, atoms), {}, 0, 0
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.steps or cfg.diffusion.num_sampling_steps
    embedder = None
    if cfg.model.feature_dim > 0:  # trained with per-residue PLM features: compute them the same way
        enc = cfg.model.structure_encoder
        if not enc.plm_path or not Path(enc.plm_path).is_dir():
            print(f"error: this model needs per-residue features from model.structure_encoder.plm_path={enc.plm_path!r}, "
                  "which is not a local directory here; copy the ESM-2 model there", file=sys.stderr)
            return 2
        from diffold.plm import Embedder

        embedder = Embedder(enc.plm_path, enc.plm_layer)
    log.info("%d %s chain(s) x %d sample(s), %d sampler steps", len(inputs), task.kind, args.num_samples, steps)
    for n, (chain_id, sequence, ref) in enumerate(inputs):
        t0 = time.perf_counter()
        feats = embedder.embed([sequence])[0] if embedder is not None else None
        # training numbers residues with their gaps (sources.residue_positions); a FASTA has none
        index = torch.from_numpy(residue_positions(ref.residue_numbers)) if ref is not None else None
        with torch.no_grad():
            batch = make_batch(task, sequence, len(atoms), args.num_samples, feats, index)
            coords = diffusion.sample(model, batch, steps, gen)
        bad = []
        for k in range(args.num_samples):
            pred = coords[k].numpy().astype(np.float32)
            name = f"{chain_id}_sample{k}"
            if not np.isfinite(pred).all():
                bad.append(k)
                continue
            numbers = ref.residue_numbers if ref is not None else None
            write_structure(args.out / safe_filename(name, ".pdb"),
                            [chain_from_coords(name, task.kind, sequence, pred, atoms, residue_numbers=numbers)])
            written += 1
            if ref is not None:
                report[name] = score_chain(pred[:, rep], ref.coords[:, rep], ref.mask[:, rep], index.numpy(), task)
                log.info("%s: %s", name, ", ".join(f"{m}={v:.3f}" for m, v in report[name].items()))
        failed += len(bad)
        log.info("chain %d/%d %s (%d residues): %d sample(s) in %.1f s%s", n + 1, len(inputs), chain_id, len(sequence),
                 args.num_samples, time.perf_counter() - t0, f"; NOT finite, not written: samples {bad}" if bad else "")
    if report:
        (args.out / "metrics.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %d structure(s) to %s", written, args.out)
    if failed:
        log.error("%d of %d sample(s) were not finite and were not written", failed, len(inputs) * args.num_samples)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
