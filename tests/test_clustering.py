"""Sequence clustering for the split: built-in k-mer linkage vs MMseqs2, fallback, caching, cluster weights."""
from __future__ import annotations

import csv
import logging
import shutil

import pytest
from synthetic import ROOT
from test_data import make_cfg, make_chain, mutate, random_seq, write

from diffold import clustering
from diffold.clustering import ClusterSettings, cluster, cluster_labels, kmer_size
from diffold.data import build_datasets
from diffold.report import DataReport

EXAMPLES = ROOT / "data" / "examples"
needs_mmseqs = pytest.mark.skipif(shutil.which("mmseqs") is None,
                                  reason="no `mmseqs` binary on PATH (CI installs it: apt-get install -y mmseqs2)")


def example_sequences(kind: str) -> list[str]:
    rows = []
    for split in ("train", "val"):
        with open(EXAMPLES / f"{split}.csv", newline="") as fh:
            rows += [r for r in csv.DictReader(fh) if r["molecule"] == kind]
    return [r["sequence"] for r in rows]


def partition(seqs: list[str], labels: list[int]) -> set[frozenset]:
    parts: dict[int, set] = {}
    for s, lab in zip(seqs, labels, strict=True):
        parts.setdefault(lab, set()).add(s)
    return {frozenset(p) for p in parts.values()}


@needs_mmseqs
def test_mmseqs_and_builtin_agree_on_the_examples_at_identity_09():
    """Proteins: the same clusters. RNA, the documented difference: MMseqs2 linclust does not link fragments
    shorter than ~30 nt to their parent (its k-mers are longer), so the built-in single linkage also merges two
    rRNAs through such a fragment; every MMseqs2 cluster lies inside one built-in cluster (never less strict)."""
    for kind, alphabet in (("protein", 20), ("rna", 4)):
        seqs = example_sequences(kind)
        got = {}
        for method in ("builtin", "mmseqs"):
            labels, record = cluster_labels(seqs, ClusterSettings(method, 0.9, 0.8, kind, alphabet, 1), None)
            assert record["method"] == method
            got[method] = partition(seqs, labels)
        if kind == "protein":
            assert got["builtin"] == got["mmseqs"] and len(got["mmseqs"]) == 78
            continue
        assert all(any(m <= b for b in got["builtin"]) for m in got["mmseqs"])          # a refinement
        differing = got["builtin"] - got["mmseqs"]
        assert differing and all(min(map(len, b)) < 30 for b in differing)             # only through fragments


def test_missing_mmseqs_falls_back_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(clustering, "find_mmseqs", lambda: None)
    d = tmp_path / "s"
    d.mkdir()
    for i in range(8):
        write(d / f"c{i}.pdb", make_chain(random_seq(40, seed=i), seed=i))
    with caplog.at_level(logging.INFO, logger="diffold.clustering"):
        tr, va, rep = build_datasets(make_cfg(tmp_path, d, val_fraction=0.25, cluster_method="mmseqs"))
    lines = [r for r in caplog.records if r.name == "diffold.clustering"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "no `mmseqs` binary on PATH (install: apt-get install mmseqs2)" in lines[0].getMessage()
    assert rep.clustering["method"] == "builtin" and "built-in k-mer linkage" in rep.split_method
    assert len(va) == 2 and len(tr) == 6


@needs_mmseqs
def test_auto_uses_mmseqs_for_large_sets_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(clustering, "MMSEQS_AUTO_MIN", 10)  # the shipped set stands in for a large one
    cfg = make_cfg(tmp_path, EXAMPLES / "train.csv", task="protein")
    tr, va, rep = build_datasets(cfg)
    assert rep.clustering["method"] == "mmseqs" and rep.clustering["tool"].startswith("mmseqs2 ")
    assert "easy-linclust" in rep.split_method and "coverage >= 0.8" in rep.split_method
    assert rep.clustering["why"].startswith("auto: ") and len(va) > 0
    cached = list((tmp_path / "cache" / "clusters").glob("mmseqs-*.json"))
    assert len(cached) == 1
    again = build_datasets(cfg)
    assert again[2].clustering["reused"] == str(cached[0]) and again[1].ids == va.ids


def test_builtin_coverage_lowers_the_shared_kmer_threshold():
    """Link when shared k-mers >= coverage x identity^k of the shorter one's (0.9^9 = 39 % at coverage 1)."""
    base = random_seq(200, seed=3)
    partial = base[:75] + random_seq(125, seed=4)   # 67 of its 192 9-mers (35 %) are the parent's
    k = kmer_size(4)
    assert len(set(cluster([base, partial], 0.9, k, coverage=0.8))) == 1
    assert len(set(cluster([base, partial], 0.9, k, coverage=1.0))) == 2


def test_cluster_size_weights(tmp_path):
    d = tmp_path / "fam"
    d.mkdir()
    base = random_seq(80, seed=100)
    for m in range(3):                                       # one family of 3 near-identical chains
        write(d / f"f{m}.pdb", make_chain(mutate(base, m, m), seed=m))
    for s in range(3):                                       # 3 unrelated chains
        write(d / f"u{s}.pdb", make_chain(random_seq(60, seed=200 + s)))
    val = write(tmp_path / "v.pdb", make_chain(random_seq(50, seed=300)))
    plain = build_datasets(make_cfg(tmp_path / "a", d, val))[0]
    tr, _, rep = build_datasets(make_cfg(tmp_path / "b", d, val, cluster_weights=True))
    w = dict(zip(tr.ids, tr.weights, strict=True))
    assert plain.weights == [1.0] * 6
    assert w["f0_A"] == pytest.approx(w["u0_A"] / 3) and sum(tr.weights) == pytest.approx(6.0)
    assert "1 / cluster size" in rep.clustering["weights"]


def test_report_has_clustering_record():
    assert "clustering" in DataReport().to_dict()
