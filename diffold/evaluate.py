"""Evaluate a trained model on held-out structures, beside the baselines every model must beat.

    python -m diffold.evaluate --checkpoint RUN/export --input data/examples/val.csv \
        [--num_samples K] [--steps N] [--seed S] [--max_length N] [--out DIR]

For every chain of the model's molecule kind in --input (a CSV manifest like data/examples/val.csv,
a directory of structure files, or one file), K structures are sampled for the WHOLE chain (a
chain longer than --max_length is centre-cropped and the log says so) and scored on the
representative atom (RNA C4', protein CA) with RMSD / TM-score / GDT-TS / lDDT (RNA: 30 A radius,
lddt_15 too), the mean |d(i,i+1) - native| bond-length error and the median consecutive distance.
Reported per chain and as means: the model's best of K and mean of K, and each baseline (ideal
helix, random walk; diffold/baselines.py). Writes results.csv (one row per chain and structure
source), results.json (everything, plus the validation keys val/<metric>, val_baseline/<metric>,
val/<metric>_over_baseline with the model's mean of K) and prints the table.

With --num_samples 1, --seed = training.seed and --steps = validation.sampling_steps, the numbers
equal what validation logged for the same chains and weights (same noise, same scoring code).
Exit codes: 0 all samples scored; 1 some samples were non-finite (counted, not scored); 2 bad input.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffold.checkpoint import CheckpointError
from diffold.scoring import (
    BaselineScores,
    best_scores,
    consecutive_distance,
    mean_scores,
    score_chain,
    summarize,
)
from diffold.validation import representative_atom

log = logging.getLogger("diffold.evaluate")
CSV_COLUMNS = ("chain", "length", "cropped", "source", "samples_scored", "samples_failed", "rmsd", "tm", "gdt_ts",
               "gdt_ha", "lddt", "lddt_15", "bond_length_error", "consecutive_distance", "native_consecutive_distance")
SOURCES = ("model_best", "model_mean", "helix", "random_walk")
MEAN_COLUMNS = (("rmsd", "RMSD"), ("tm", "TM"), ("gdt_ts", "GDT-TS"), ("lddt", "lDDT"), ("lddt_15", "lDDT15"),
                ("bond_length_error", "bond err"), ("consecutive_distance", "d(i,i+1)"))


def load_chains(path: Path, task, atoms, min_length: int, max_length: int) -> list[dict]:
    """Whole-chain examples (dicts like StructureDataset items) from a CSV, a directory or a file."""
    from diffold.featurize import FeatureSpec, featurize_file
    from diffold.sources import DataError, SplitReport, collect, group_by_file

    if not path.exists():
        raise ValueError(f"--input {path}: no such file or directory (give a CSV manifest, a directory or a structure file)")
    report = SplitReport()
    try:
        groups = group_by_file(collect(str(path), task.kind, report))
    except DataError as e:
        raise ValueError(str(e)) from None
    items, spec = [], FeatureSpec(task.name, task.kind, task.alphabet, tuple(atoms), min_length)
    for g in groups:
        for row in featurize_file(g["path"], g["display"], g["entries"], spec):
            if row["skip_reason"]:
                report.skip(row["source"], row["chain"] or None, row["skip_reason"])
            else:
                items.append(as_item(row, len(atoms), max_length))
    if not items:
        raise ValueError(f"--input {path}: no usable {task.kind} chain (top skip reasons: {report.top_reasons()})")
    if report.skipped:
        log.info("skipped %d item(s) of %s: %s", sum(report.skipped.values()), path, report.top_reasons(5))
    return items


def as_item(row: dict, num_atoms: int, max_length: int) -> dict:
    """Featurized row -> centred example, centre-cropped to max_length residues (item["cropped"])."""
    n = int(row["length"])
    mask = np.asarray(row["atom_mask"], dtype=bool).reshape(n, num_atoms)
    coords = np.asarray(row["coords"], dtype=np.float32).reshape(n, num_atoms, 3)
    start = max(0, (n - max_length) // 2)
    sl = slice(start, start + max_length)
    mask, coords = mask[sl], coords[sl]
    coords = np.where(mask[..., None], coords - coords[mask].mean(axis=0), 0.0).astype(np.float32)
    return {"id": row["id"], "tokens": torch.as_tensor(np.asarray(row["tokens"])[sl], dtype=torch.long),
            "coords": torch.from_numpy(coords), "atom_mask": torch.from_numpy(mask.copy()),
            "residue_index": torch.as_tensor(np.asarray(row["residue_index"])[sl], dtype=torch.long),
            "weight": 1.0, "cropped": n > max_length, "full_length": n}


@torch.no_grad()
def evaluate_chain(model, diffusion, item: dict, task, rep: int, num_samples: int, steps, seed: int,
                   baselines: BaselineScores) -> dict:
    """Scores of K samples of one chain, their best/mean, the baselines and the native geometry."""
    from diffold.data import collate

    batch = collate([item] * num_samples)
    gen = torch.Generator().manual_seed(seed)
    coords = diffusion.sample(model, batch, steps, gen)[:, :, rep].float().numpy()  # [K, L, 3]
    ref, mask = item["coords"][:, rep].numpy(), item["atom_mask"][:, rep].numpy()
    index = item["residue_index"].numpy()
    finite = [k for k in range(num_samples) if np.isfinite(coords[k]).all()]
    samples = [score_chain(coords[k], ref, mask, index, task) for k in finite]
    return {"id": item["id"], "length": len(ref), "cropped": item["cropped"], "full_length": item["full_length"],
            "samples": samples, "failed": num_samples - len(finite),
            "model_best": best_scores(samples) if samples else {}, "model_mean": mean_scores(samples) if samples else {},
            "baselines": baselines.get(task, item["id"], ref, mask, index),
            "native_consecutive_distance": consecutive_distance(ref, mask, index)}


def evaluate_chains(model, diffusion, task, atoms, items: list[dict], num_samples: int, steps: int, seed: int) -> list[dict]:
    """evaluate_chain for every item (chain i sampled with seed + i), one progress line per chain."""
    rep, baselines, chains = representative_atom(task, atoms), BaselineScores(), []
    log.info("%d %s chain(s), %d sample(s) each, %d sampler steps, atom %s", len(items), task.kind,
             num_samples, steps, atoms[rep])
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        c = evaluate_chain(model, diffusion, item, task, rep, num_samples, steps, seed + i, baselines)
        chains.append(c)
        got = f"lddt best {c['model_best']['lddt']:.3f}" if c["samples"] else "no finite sample"
        log.info("chain %d/%d %s (%d residues): %s, %d failed, %.1f s", i + 1, len(items), c["id"], c["length"],
                 got, c["failed"], time.perf_counter() - t0)
    return chains


def summary(chains: list[dict]) -> dict:
    """Means over the chains with >= 1 scored sample, per structure source, + the validation keys."""
    scored = [c for c in chains if c["samples"]]
    out = {"chains": len(chains), "chains_scored": len(scored), "samples_failed": sum(c["failed"] for c in chains)}
    if not scored:
        return out
    for src in SOURCES:
        out[src] = mean_scores([c[src] if src.startswith("model") else c["baselines"][src] for c in scored])
    out["native_consecutive_distance"] = mean_scores([{"d": c["native_consecutive_distance"]} for c in scored])["d"]
    out["validation_keys"] = summarize([{"model": c["model_mean"], "baselines": c["baselines"]} for c in chains], "val")
    return out


def csv_rows(chains: list[dict]) -> list[dict]:
    rows = []
    for c in chains:
        for src in SOURCES:
            scores = c[src] if src.startswith("model") else c["baselines"][src]
            rows.append({"chain": c["id"], "length": c["length"], "cropped": c["cropped"], "source": src,
                         "samples_scored": len(c["samples"]), "samples_failed": c["failed"],
                         "native_consecutive_distance": c["native_consecutive_distance"],
                         **{k: scores.get(k, "") for k in CSV_COLUMNS[6:-1]}})
    return rows


def format_table(chains: list[dict], summ: dict, num_samples: int) -> str:
    """Per-chain lDDT/TM/consecutive distance, then the mean of every metric per structure source."""
    lines = [f"{'chain':<14}{'L':>5}  {'lDDT best/mean':>15}{'helix':>7}{'walk':>7}  {'TM best/mean':>13}"
             f"{'helix':>7}{'walk':>7}  {'d(i,i+1) sample/native':>23}"]
    for c in chains:
        if not c["samples"]:
            lines.append(f"{c['id']:<14}{c['length']:>5}  all {num_samples} samples failed (non-finite)")
            continue
        b, m, h, w = c["model_best"], c["model_mean"], c["baselines"]["helix"], c["baselines"]["random_walk"]
        lines.append(f"{c['id']:<14}{c['length']:>5}{'*' if c['cropped'] else ' '} {b['lddt']:>7.3f}/{m['lddt']:<7.3f}"
                     f"{h['lddt']:>7.3f}{w['lddt']:>7.3f}  {b['tm']:>6.3f}/{m['tm']:<6.3f}{h['tm']:>7.3f}{w['tm']:>7.3f}"
                     f"  {m['consecutive_distance']:>11.2f}/{c['native_consecutive_distance']:<6.2f}")
    if "model_best" in summ:
        cols = [(k, name) for k, name in MEAN_COLUMNS if k in summ["model_mean"]]
        cropped = " (* = centre-cropped)" if any(c["cropped"] for c in chains) else ""
        lines += ["", f"mean over {summ['chains_scored']} chains{cropped}",
                  f"{'':<22}" + "".join(f"{name:>10}" for _, name in cols)]
        for src in SOURCES:
            label = {"model_best": f"model best of {num_samples}", "model_mean": f"model mean of {num_samples}"}.get(src, src)
            lines.append(f"{label:<22}" + "".join(f"{summ[src][k]:>10.3f}" for k, _ in cols))
        lines.append(f"{'native':<22}{'':>{10 * (len(cols) - 1)}}{summ['native_consecutive_distance']:>10.3f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="export bundle (RUN/export) or a training checkpoint")
    p.add_argument("--input", required=True, type=Path, help="CSV manifest, directory or structure file")
    p.add_argument("--num_samples", type=int, default=5, help="samples per chain (best of K and mean of K)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: diffusion.num_sampling_steps)")
    p.add_argument("--seed", type=int, default=None, help="chain i uses seed + i (default: training.seed)")
    p.add_argument("--max_length", type=int, default=None, help="crop longer chains (default: validation.max_length)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: CHECKPOINT/evaluate_<input>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
    from diffold.predict import load_bundle

    if args.num_samples < 1 or (args.steps is not None and args.steps < 1):
        print("error: --num_samples and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        model, diffusion, task, atoms, cfg = load_bundle(args.checkpoint)
        if cfg.model.feature_dim > 0:
            raise ValueError("this model needs per-residue PLM features; evaluate supports feature-free models only")
        max_length = args.max_length or cfg.validation.max_length
        chains_in = load_chains(args.input, task, atoms, cfg.data.min_length, max_length)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seed = cfg.training.seed if args.seed is None else args.seed
    steps = args.steps or cfg.diffusion.num_sampling_steps
    out = args.out or args.checkpoint / f"evaluate_{args.input.stem}"
    cropped = [f"{c['id']} ({c['full_length']})" for c in chains_in if c["cropped"]]
    if cropped:
        log.info("chains longer than --max_length=%d are centre-cropped to it: %s", max_length, ", ".join(cropped))
    chains = evaluate_chains(model, diffusion, task, atoms, chains_in, args.num_samples, steps, seed)
    summ = summary(chains)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(chains))
    meta = {"checkpoint": str(args.checkpoint), "input": str(args.input), "task": task.name, "atom": atoms[representative_atom(task, atoms)],
            "num_samples": args.num_samples, "steps": steps, "seed": seed, "max_length": max_length}
    (out / "results.json").write_text(json.dumps({**meta, "summary": summ, "chains": chains}, indent=1))
    print(format_table(chains, summ, args.num_samples))
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.json'}")
    if summ["samples_failed"]:
        print(f"warning: {summ['samples_failed']} sample(s) were non-finite: counted, not scored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
