"""The shipped data/examples set: real chains that parse, enough of each kind, a leak-free split."""
from __future__ import annotations

import csv
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from diffold.structure import parse_structure

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "examples"
COLUMNS = ["id", "structure_path", "chain", "molecule", "sequence", "split", "weight"]


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_examples", ROOT / "scripts" / "build_examples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_examples"] = module          # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _load_builder()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = []
    for split in ("train", "val"):
        with open(EXAMPLES / f"{split}.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == COLUMNS
            out += [dict(r) for r in reader]
    return out


def test_every_row_parses_to_its_chain(rows):
    by_file = defaultdict(list)
    for r in rows:
        by_file[r["structure_path"]].append(r)
    for rel, file_rows in by_file.items():
        path = EXAMPLES / rel                      # relative to the CSV's folder
        assert not Path(rel).is_absolute() and path.is_file(), rel
        chains, _ = parse_structure(path, min_length=10)
        by_name = {c.chain_name: c for c in chains}
        for r in file_rows:
            ch = by_name[r["chain"]]
            assert ch.id == r["id"] and ch.kind == r["molecule"] and ch.sequence == r["sequence"]
            assert len(ch.sequence) >= 10 and ch.mask.mean() > 0.9


def test_counts_ids_and_weights(rows):
    kinds = [r["molecule"] for r in rows]
    assert kinds.count("rna") >= 20 and kinds.count("protein") >= 40
    assert len({r["id"] for r in rows}) == len(rows)
    for split in ("train", "val"):
        assert {r["molecule"] for r in rows if r["split"] == split} == {"rna", "protein"}
    assert all(0 < float(r["weight"]) <= 1 for r in rows)
    val = sum(r["split"] == "val" for r in rows) / len(rows)
    assert 0.1 <= val <= 0.3


def test_long_rrna_is_one_chain(rows):
    """The 16S rRNA (3JBV) is shipped whole so that cropping of long chains is exercised."""
    (r,) = [r for r in rows if r["id"] == "3jbv_A"]
    assert r["molecule"] == "rna" and len(r["sequence"]) >= 1500 and r["split"] == "train"


def test_no_molecule_straddles_the_split(rows, builder):
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert not {r["sequence"] for r in train} & {r["sequence"] for r in val}
    for v in val:
        for t in train:
            if t["molecule"] == v["molecule"]:
                assert not builder.same_molecule(v["sequence"], t["sequence"]), (v["id"], t["id"])


def test_splits_are_reproducible(rows, builder):
    """Re-running the split assignment on the shipped chains gives the shipped split and weights."""
    fresh = [{k: r[k] for k in ("id", "molecule", "sequence")} for r in rows]
    builder.assign_splits(fresh)
    assert [(r["split"], r["weight"]) for r in fresh] == [(r["split"], r["weight"]) for r in rows]


def test_size_and_provenance(rows):
    files = [p for p in EXAMPLES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 8 * 1024**2
    text = (EXAMPLES / "PROVENANCE.md").read_text()
    assert "CC0" in text
    for r in rows:
        assert f"| {r['id']} |" in text and f"`{r['structure_path']}`" in text
    shipped = {p.relative_to(EXAMPLES).as_posix() for p in files if p.name.endswith(".gz")}
    assert shipped == {r["structure_path"] for r in rows}   # no stray structure files


def test_sequence_identity(builder):
    assert builder.sequence_identity("ACGUACGU", "ACGUACGU") == 1.0
    assert builder.sequence_identity("ACGUACGUAC", "GGGGACGUACGUACGGGG") == 1.0     # fragment inside
    assert builder.sequence_identity("ACGUACGUAC", "ACGUAGGUAC") == pytest.approx(0.9)
    assert builder.sequence_identity("AAAAAAAAAA", "CCCCCCCCCC") == 0.0
    # a 10-mer at 90% somewhere in a long chain is chance, not the same molecule
    assert not builder.same_molecule("ACGUAGGUAC", "UUUU" + "ACGUACGUAC" + "U" * 40)
    assert builder.same_molecule("ACGUAGGUACGUACGUAGGUAC", "ACGUACGUACGUACGUACGUAC")


def test_no_shipped_chain_is_absurd():
    """The absurd-geometry defaults (diffold/sanity.py) reject none of the shipped real chains, with margin:
    the largest distance between consecutive-numbered residues is 4qlm_A's 25.5 A (a renumbered extract
    hiding a break), every other chain stays under 7.4 A (C4'-C4') / 4.0 A (CA-CA)."""
    import numpy as np

    from diffold.sanity import GeometryLimits, geometry_problem

    limits, worst = GeometryLimits(), {}
    for path in sorted(EXAMPLES.rglob("*.gz")):
        for ch in parse_structure(path, min_length=1)[0]:
            assert geometry_problem(ch.coords, ch.mask, ch.residue_numbers, limits) == "", ch.id
            ok = ch.mask[1:, 0] & ch.mask[:-1, 0] & (np.diff(ch.residue_numbers) == 1)
            d = np.linalg.norm(np.diff(ch.coords[:, 0], axis=0), axis=1)[ok]
            worst[ch.id] = float(d.max()) if len(d) else 0.0
    top = sorted(worst, key=worst.get)[-2:]
    assert top[-1] == "4qlm_A" and 25 < worst["4qlm_A"] < 26 and worst[top[0]] < 7.4
    assert worst["4qlm_A"] * 1.9 < limits.max_consecutive_distance
    assert len(worst) > 100
