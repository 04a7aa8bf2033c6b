"""Score a predicted structure file against a reference: RMSD, TM-score, GDT-TS/HA, lDDT.

    python -m diffold.metrics pred.pdb ref.pdb [--molecule rna|protein] [--atom NAME] [--chain A] [--json]

One representative atom per residue (default RNA C4', protein CA); residues are matched BY RESIDUE
NUMBER between the first chain of each file (or --chain). TM/GDT are normalised by the number of
reference residues that have the atom, so residues missing from the prediction count 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from diffold.metrics import MOLECULES, all_metrics, d0


@dataclass
class Pair:
    """Matched representative atoms of two chains: row i = i-th reference residue that has the atom."""

    pred: np.ndarray                 # [N, 3]
    ref: np.ndarray                  # [N, 3]
    mask: np.ndarray                 # [N] bool, residue also present (with the atom) in pred
    kind: str                        # molecule kind of the reference chain
    atom: str
    descriptions: tuple[str, str]    # "path chain A (rna, 60 residues)" for pred, ref
    notes: list[str] = field(default_factory=list)  # what was dropped or looks wrong, one line each


def _pick_chain(path: str, atom: Optional[str], chain: Optional[str]):
    from diffold.structure import StructureError, parse_structure  # lazy: gemmi only for the CLI

    atoms = {"rna": (atom,), "protein": (atom,)} if atom else None
    chains, skipped = parse_structure(path, atoms=atoms)
    if chain is not None:
        chains = [c for c in chains if c.chain_name == chain]
    if not chains:
        why = "; ".join(f"chain {s.chain}: {s.reason}" for s in skipped) or "no RNA/protein chain"
        wanted = f"chain {chain!r}" if chain is not None else "an RNA or protein chain"
        raise StructureError(f"{path} has no usable {wanted} ({why})")
    return chains[0]


def _first_index(numbers: np.ndarray, present: np.ndarray) -> tuple[dict[int, int], int]:
    """Residue number -> row of its first present occurrence, and how many repeats were ignored."""
    index: dict[int, int] = {}
    repeats = 0
    for i in np.flatnonzero(present):
        num = int(numbers[i])
        if num in index:
            repeats += 1
        else:
            index[num] = int(i)
    return index, repeats


def load_pair(pred_path: str, ref_path: str, atom: Optional[str] = None, chain: Optional[str] = None) -> Pair:
    """Parse both files and match residues by residue number (first occurrence of a repeated number)."""
    p, r = _pick_chain(pred_path, atom, chain), _pick_chain(ref_path, atom, chain)
    if p.kind != r.kind:  # nothing to compare: say so instead of "0 atoms matched"
        raise ValueError(f"{pred_path} chain {p.chain_name} is {p.kind} but {ref_path} chain {r.chain_name} is "
                         f"{r.kind}: compare two structures of the same molecule (pick chains with --chain)")
    notes = []
    ref_index, ref_rep = _first_index(r.residue_numbers, r.mask[:, 0])
    pred_index, pred_rep = _first_index(p.residue_numbers, p.mask[:, 0])
    for name, rep in (("ref", ref_rep), ("pred", pred_rep)):
        if rep:
            notes.append(f"{rep} repeated residue numbers in {name} (insertion codes?) ignored; first occurrence used")
    numbers = list(ref_index)                                   # reference residues having the atom
    rows = [ref_index[k] for k in numbers]
    mask = np.array([k in pred_index for k in numbers], dtype=bool)
    pred = np.zeros((len(numbers), 3))
    pred[mask] = p.coords[[pred_index[k] for k in numbers if k in pred_index], 0]
    missing = int((~mask).sum())
    if missing:
        notes.append(f"{missing} reference residues have no matching residue in pred; they count 0 in TM/GDT")
    mismatched = sum(p.sequence[pred_index[k]] != r.sequence[ref_index[k]] for k in numbers if k in pred_index)
    if mismatched:
        notes.append(f"{mismatched} matched residues differ in residue type: check the numbering")
    return Pair(pred=pred, ref=r.coords[rows, 0].astype(np.float64), mask=mask, kind=r.kind,
                atom=r.atoms[0], descriptions=(_describe(p, pred_path), _describe(r, ref_path)), notes=notes)


def _describe(chain, path: str) -> str:
    return f"{path} chain {chain.chain_name} ({chain.kind}, {len(chain.sequence)} residues)"


def score_pair(pair: Pair, molecule: Optional[str] = None) -> dict:
    """all_metrics of a Pair, normalised by the reference length, plus what was compared."""
    molecule = molecule or pair.kind
    scores = all_metrics(pair.pred, pair.ref, molecule=molecule, mask=pair.mask, ref_length=len(pair.ref))
    return {
        "metrics": scores, "molecule": molecule, "atom": pair.atom, "d0": d0(len(pair.ref), molecule),
        "correspondence": "residue_number", "matched": int(pair.mask.sum()), "ref_length": len(pair.ref),
        "pred": pair.descriptions[0], "ref": pair.descriptions[1], "notes": pair.notes,
    }


def format_report(report: dict) -> str:
    m, radius = report["metrics"], 30 if report["molecule"] == "rna" else 15
    lines = [
        f"pred  {report['pred']}",
        f"ref   {report['ref']}",
        f"atom {report['atom']}, molecule {report['molecule']} (d0 = {report['d0']:.2f} A); residues matched "
        f"BY RESIDUE NUMBER: {report['matched']} of {report['ref_length']} reference residues",
        *(f"note: {n}" for n in report["notes"]),
        f"RMSD     {m['rmsd']:8.3f} A  ({report['matched']} atoms, after Kabsch superposition)",
        f"TM-score {m['tm']:8.4f}    (normalised by {report['ref_length']} reference residues)",
        f"GDT-TS   {m['gdt_ts']:8.4f}",
        f"GDT-HA   {m['gdt_ha']:8.4f}",
        f"lDDT     {m['lddt']:8.4f}    (inclusion radius {radius} A)",
    ]
    if "lddt_15" in m:
        lines.append(f"lDDT_15  {m['lddt_15']:8.4f}    (inclusion radius 15 A, for comparison with protein-style lDDT)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffold.metrics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pred", help="predicted structure (.pdb/.cif, optionally .gz)")
    ap.add_argument("ref", help="reference structure")
    ap.add_argument("--molecule", choices=MOLECULES, default=None, help="d0 / lDDT radius (default: ref chain kind)")
    ap.add_argument("--atom", default=None, help="representative atom name (default: RNA C4', protein CA)")
    ap.add_argument("--chain", default=None, help="chain name to compare in both files (default: first chain)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    try:
        report = score_pair(load_pair(args.pred, args.ref, args.atom, args.chain), args.molecule)
    except (ValueError, OSError) as e:  # StructureError is a ValueError; metrics raise ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
