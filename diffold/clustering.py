"""Sequence clusters for the train/val split and for cluster-size weights: built-in k-mer linkage or MMseqs2.

Both methods mean the same thing by `data.cluster_identity` (sequence identity) and
`data.cluster_coverage` (fraction of the SHORTER sequence that must match, so a fragment joins
its full-length parent): the built-in method estimates identity from shared k-mers (grows ~n^1.7,
fine for a few thousand distinct sequences); MMseqs2 `easy-linclust` aligns (linear time; nucleotide
mode for RNA) and is used for large sets when the `mmseqs` binary is installed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MMSEQS_AUTO_MIN = 2000  # distinct sequences from which cluster_method=auto uses MMseqs2 (when installed)


@dataclass(frozen=True)
class ClusterSettings:
    method: str = "auto"        # "auto" | "builtin" | "mmseqs"
    identity: float = 0.9
    coverage: float = 0.8
    kind: str = "rna"           # "rna" (nucleotide mode) | "protein"
    alphabet_size: int = 4      # letters without the unknown one (k-mer size of the built-in method)
    threads: int = 1


# --------------------------------------------------------------------------- built-in
def kmer_size(alphabet_size: int) -> int:
    """Smallest k with alphabet^k >= 2^18 (RNA 9, protein 5): chance k-mer matches stay rare."""
    return max(3, math.ceil(18 * math.log(2) / math.log(max(alphabet_size, 2))))


def cluster(sequences: list[str], identity: float, k: int, coverage: float = 1.0) -> list[int]:
    """Cluster label per sequence: identical or k-mer-similar sequences share a label (single linkage).

    Two sequences link when the shared fraction of the shorter one's k-mers is >= coverage *
    identity**k (the expected k-mer survival at that identity over that fraction of it).
    """
    parent = list(range(len(sequences)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    index: dict[str, list[int]] = defaultdict(list)   # k-mer -> unique-sequence indices
    kmers: dict[int, set[str]] = {}
    for i, s in enumerate(sequences):
        if s in first:
            union(i, first[s])
            continue
        first[s] = i
        kmers[i] = {s[j : j + k] for j in range(len(s) - k + 1)}
        for km in kmers[i]:
            index[km].append(i)
    threshold = coverage * identity**k
    for i, own in kmers.items():
        shared = Counter(j for km in own for j in index[km] if j < i)
        for j, c in shared.items():
            if c >= threshold * max(1, min(len(own), len(kmers[j]))):
                union(i, j)
    return [find(i) for i in range(len(sequences))]


# --------------------------------------------------------------------------- MMseqs2
def find_mmseqs() -> str | None:
    """Path of the `mmseqs` binary on PATH, or None."""
    return shutil.which("mmseqs")


def mmseqs_version(binary: str) -> str:
    out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "unknown"


def mmseqs_cluster(unique: list[str], s: ClusterSettings, binary: str, work_root: Path) -> list[int]:
    """Label per distinct sequence from `mmseqs easy-linclust` (representative's index; missing = own)."""
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tmp-mmseqs-", dir=work_root))  # under data.cache_dir, removed after
    try:
        fasta = work / "in.fasta"
        fasta.write_text("".join(f">{i}\n{seq}\n" for i, seq in enumerate(unique)))
        cmd = [binary, "easy-linclust", str(fasta), str(work / "out"), str(work / "tmp"),
               "--min-seq-id", str(s.identity), "-c", str(s.coverage),
               "--cov-mode", "1",        # coverage of the member: with --cluster-mode 2 the longer is the representative
               "--cluster-mode", "2",    # greedy by length (CD-HIT-like): members are never longer than their rep
               "--dbtype", "2" if s.kind == "rna" else "1", "--threads", str(max(1, s.threads)), "-v", "1"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            tail = " ".join((run.stderr or run.stdout).split())[-300:]
            raise RuntimeError(f"mmseqs easy-linclust exited with {run.returncode}: {tail}")
        labels = list(range(len(unique)))
        for line in (work / "out_cluster.tsv").read_text().splitlines():
            rep, member = line.split("\t")
            labels[int(member)] = int(rep)
        return labels
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- choice, cache, split, weights
def choose_method(n_unique: int, s: ClusterSettings) -> tuple[str, str]:
    """(method, why) for n distinct sequences; 'mmseqs' only when the binary is installed."""
    binary = find_mmseqs()
    if s.method == "builtin":
        return "builtin", "data.cluster_method=builtin"
    if s.method == "mmseqs":
        return ("mmseqs", "data.cluster_method=mmseqs") if binary else (
            "builtin", "data.cluster_method=mmseqs but no `mmseqs` binary on PATH (install: apt-get install mmseqs2)")
    if n_unique < MMSEQS_AUTO_MIN:
        return "builtin", f"auto: {n_unique} distinct sequences < {MMSEQS_AUTO_MIN}"
    if not binary:
        return "builtin", (f"auto: {n_unique} distinct sequences, but no `mmseqs` binary on PATH "
                           "(apt-get install mmseqs2 makes this linear-time)")
    return "mmseqs", f"auto: {n_unique} distinct sequences >= {MMSEQS_AUTO_MIN}"


def cluster_labels(sequences: list[str], s: ClusterSettings, cache_dir: Path | None) -> tuple[list[int], dict]:
    """Label per sequence and a record of how it was made (data_report.json 'clustering'), cached by content."""
    unique = sorted(set(sequences))
    method, why = choose_method(len(unique), s)
    key = hashlib.sha256(json.dumps([method, s.identity, s.coverage, s.kind, s.alphabet_size, unique]).encode()).hexdigest()
    path = cache_dir / "clusters" / f"{method}-{key[:32]}.json" if cache_dir else None
    record: dict = {}
    if path is not None and path.is_file():
        record = json.loads(path.read_text())
        record["reused"] = str(path)
        logger.info("clusters: reused %s (%s, %d clusters of %d distinct sequences)",
                    path, record["tool"], record["clusters"], len(unique))
    else:
        t0 = time.perf_counter()
        if method == "mmseqs":
            binary = find_mmseqs()
            tool = f"mmseqs2 {mmseqs_version(binary)} easy-linclust"
            try:
                labels = mmseqs_cluster(unique, s, binary, (cache_dir or Path(tempfile.gettempdir())))
            except (RuntimeError, OSError, ValueError) as e:  # a failing external tool: say so, use the built-in
                method, why = "builtin", f"mmseqs failed: {' '.join(str(e).split())[:200]}"
        if method == "builtin":
            k = kmer_size(s.alphabet_size)
            tool = f"built-in k-mer linkage (k={k})"
            labels = cluster(unique, s.identity, k, s.coverage)
        record = {"method": method, "tool": tool, "why": why, "identity": s.identity, "coverage": s.coverage,
                  "sequences": len(unique), "clusters": len(set(labels)),
                  "seconds": round(time.perf_counter() - t0, 3), "labels": labels}
        if path is not None:
            _write_json_atomic(path, record)
        fell_back = method == "builtin" and (s.method == "mmseqs" or why.startswith("mmseqs failed"))  # a warning
        (logger.warning if fell_back else logger.info)(
            "clusters: %s (%s): %d clusters of %d distinct sequences in %.1f s",
            tool, why, record["clusters"], len(unique), record["seconds"])
    label_of = dict(zip(unique, record["labels"], strict=True))
    return [label_of[q] for q in sequences], {k: v for k, v in record.items() if k != "labels"}


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def split_by_clusters(sequences: list[str], labels: list[int], val_fraction: float) -> list[bool]:
    """Deterministic val flags: whole clusters go to val, in hashed order, until ~val_fraction of chains."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        members[lab].append(i)
    if len(members) < 2 or val_fraction <= 0:
        return [False] * len(sequences)
    target = max(1, round(val_fraction * len(sequences)))
    # order clusters by a hash of their sorted sequences: independent of file order and of the seed
    order = sorted(members.values(), key=lambda m: hashlib.sha256(
        "\n".join(sorted(sequences[i] for i in m)).encode()).hexdigest())
    is_val, n_val = [False] * len(sequences), 0
    for m in order:
        if n_val + len(m) <= target and n_val + len(m) < len(sequences):
            for i in m:
                is_val[i] = True
            n_val += len(m)
    if n_val == 0:  # every cluster is bigger than the target: take the smallest one
        for i in min(order, key=len):
            is_val[i] = True
    return is_val


def cluster_size_weights(labels: list[int]) -> list[float]:
    """Per-chain factor 1 / (chains in its cluster), scaled so the factors average 1."""
    size = Counter(labels)
    raw = [1.0 / size[lab] for lab in labels]
    scale = len(raw) / sum(raw) if raw else 1.0
    return [r * scale for r in raw]
