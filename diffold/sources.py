"""Where chains come from: directory / glob / CSV manifest -> entries -> featurized rows; report; split."""
from __future__ import annotations

import csv
import glob
import hashlib
import math
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Features, List, Value

from diffold import structure
from diffold.sanity import GeometryLimits, geometry_problem
from diffold.tasks import Task

STRUCTURE_SUFFIXES = (".pdb", ".cif", ".mmcif", ".ent")
NO_STRUCTURE = "no structure (set data.use_predicted_structures to predict one)"
NOT_A_FILE = "not a file: a directory with a structure-file name (any files inside it are read as usual)"
MAX_WEIGHT = 1e6  # a larger per-chain weight overflows float32 losses (or is a typo)
VAL_NAMES = {"val", "valid", "validation", "dev"}
TRAIN_NAMES = {"train", "training"}
TEST_NAMES = {"test", "testing", "holdout", "held-out", "held_out"}


class DataError(ValueError):
    """The input yields nothing usable, or a manifest is malformed as a whole; one line, says what to do."""


@dataclass(frozen=True)
class Entry:
    """One manifest row (or one discovered file): what to parse and which chain to take."""

    path: str                  # absolute structure path
    display: str               # how reports name it: the path as written, or relative to the input dir
    id: str | None             # chain id; None for discovered files (id = <file stem>_<chain>)
    chain: str | None = None   # chain name inside the file; None = every chain of the task's kind
    sequence: str | None = None
    weight: float = 1.0
    split: str | None = None


@dataclass
class SplitReport:
    """What one split used and skipped (docs/run_directory.md, data_report.json)."""

    files_seen: int = 0
    chains_used: int = 0
    by_kind: Counter = field(default_factory=Counter)  # every parsed chain by molecule kind
    skipped: Counter = field(default_factory=Counter)  # reason category -> count
    skipped_items: list[dict] = field(default_factory=list)
    cropped: int = 0
    ids: list[str] = field(default_factory=list)

    def skip(self, source: str, chain: str | None, reason: str) -> None:
        """Count one skipped item under its category (the reason before ': ') and keep the full line."""
        self.skipped[reason.split(": ", 1)[0]] += 1
        self.skipped_items.append({"source": source, "chain": chain, "reason": reason})

    def top_reasons(self, n: int = 3) -> str:
        return ", ".join(f"{r} x{c}" for r, c in self.skipped.most_common(n)) or "nothing was found"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["by_kind"], d["skipped"] = dict(self.by_kind), dict(self.skipped)
        return d


@dataclass
class DataReport:
    """Per-split reports plus how train/val were split and whether the featurization cache was reused."""

    train: SplitReport = field(default_factory=SplitReport)
    val: SplitReport = field(default_factory=SplitReport)
    split_method: str = "separate files"
    cache_hit: dict[str, bool] = field(default_factory=dict)  # source path -> reused an existing cache
    preprocessing: dict = field(default_factory=dict)  # predicted-structure / PLM-feature pass counts

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "val": self.val.to_dict(),
                "split_method": self.split_method, "cache_hit": dict(self.cache_hit),
                "preprocessing": dict(self.preprocessing)}


# --------------------------------------------------------------------------- discovery
def has_structure_suffix(p: Path) -> bool:
    return p.name.lower().removesuffix(".gz").endswith(STRUCTURE_SUFFIXES)


def collect(path: str, task_kind: str, report: SplitReport, missing: list[Entry] | None = None) -> list[Entry]:
    """Entries of a directory (recursive), a glob, a single structure file, or a CSV manifest.

    missing: a list that receives manifest rows with a sequence but no structure file (Entry with
    path "", for the predicted-structure pass) instead of skipping them.
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        return read_manifest(p, task_kind, report, missing)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if has_structure_suffix(f))
        return _files(found, report, lambda f: str(f.relative_to(p)))
    if p.is_file():
        return [Entry(str(p.resolve()), str(p), None)]
    matches = sorted(Path(m) for m in glob.glob(path, recursive=True))
    if not matches:
        raise DataError(f"{path}: no such file, directory or glob match (data.train_path / data.val_path)")
    for m in matches:
        if m.is_file() and not has_structure_suffix(m):
            report.skip(str(m), None, "not a structure file: expected .pdb/.cif/.ent(.gz)")
    return _files([m for m in matches if has_structure_suffix(m)], report, str)


def _files(paths: list[Path], report: SplitReport, display) -> list[Entry]:
    """Entries of existing files; directories with a structure name, broken links etc. are reported."""
    entries = []
    for f in paths:
        if f.is_file():
            entries.append(Entry(str(f.resolve()), display(f), None))
        elif f.is_dir():
            report.skip(display(f), None, NOT_A_FILE)
        else:
            report.skip(display(f), None, f"file not found: {f} (a broken link?)")
    return entries


def read_manifest(path: Path, task_kind: str, report: SplitReport, missing: list[Entry] | None = None) -> list[Entry]:
    """CSV rows -> entries; row problems are skipped with a reason, a bad header is a DataError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: cannot read the manifest as UTF-8 text ({type(e).__name__})") from None
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    cols = {c.strip() for c in (reader.fieldnames or []) if c}
    if "id" not in cols or not cols & {"sequence", "structure_path"}:
        raise DataError(f"{path}: manifest needs columns 'id' and 'sequence' and/or 'structure_path' "
                        f"(has {sorted(cols) or 'no header'})")
    seen: set[str] = set()
    entries = []
    for raw in _readable_rows(reader, path.name, report):
        where = f"{path.name}:{reader.line_num}"  # the row's (last) line in the file
        if None in raw:
            report.skip(where, None, f"malformed row: more fields than the {len(cols)}-column header")
            continue
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        entry = _row_entry(row, path.parent, task_kind, where, seen, report, missing)
        if entry is not None:
            entries.append(entry)
    return entries


def _readable_rows(reader: csv.DictReader, name: str, report: SplitReport):
    """The reader's rows; a row the csv module refuses (e.g. a field over its 128 KiB limit) is skipped."""
    failed = 0  # refused lines since the last good row: line_num counts them only at the next good row
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            failed += 1
            report.skip(f"{name}:{reader.line_num + failed}", None, f"malformed row: {e}")
            continue
        failed = 0
        yield row


def _row_entry(row: dict, root: Path, task_kind: str, where: str, seen: set, report: SplitReport,
               missing: list[Entry] | None = None) -> Entry | None:
    rid, chain = row.get("id", ""), row.get("chain") or None
    if not rid:
        return report.skip(where, chain, "missing id")
    if rid in seen:
        return report.skip(where, chain, f"duplicate id: '{rid}' (kept the first)")
    seen.add(rid)
    weight_text = row.get("weight", "")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight <= 0 or weight > MAX_WEIGHT:  # weights are stored as float32
        return report.skip(where, chain, f"bad weight: {weight_text!r} (need a finite number > 0 and <= {MAX_WEIGHT:g})")
    molecule = row.get("molecule", "").lower()
    if molecule and molecule != task_kind:
        return report.skip(where, chain, f"molecule is {molecule}, task is {task_kind}")
    seq = "".join(row.get("sequence", "").split()).upper() or None
    if seq is not None and not seq.isalpha():
        return report.skip(where, chain, f"bad sequence: {seq[:20]!r} (letters only)")
    rel = row.get("structure_path", "")
    if not rel and seq and missing is not None:  # to be predicted (data.use_predicted_structures)
        return missing.append(Entry("", where, rid, chain, seq, weight, row.get("split", "").lower() or None))
    if not rel:
        return report.skip(where, chain, NO_STRUCTURE if seq else "no sequence and no structure_path")
    try:
        full = (root / rel).resolve()
        found = full.is_file()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop (RuntimeError)
        return report.skip(where, chain, f"bad structure_path: {rel[:60]!r} ({type(e).__name__}: {str(e)[:60]})")
    if not found:
        return report.skip(where, chain, f"not a file: {full} is a directory" if full.is_dir() else f"file not found: {full}")
    return Entry(str(full), rel, rid, chain, seq, weight, row.get("split", "").lower() or None)


def group_by_file(entries: list[Entry]) -> list[dict]:
    """One featurization work item per structure file (a file is parsed once for all its rows)."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.path].append(e)
    return [{"path": p, "display": es[0].display, "entries": [asdict(e) for e in es]} for p, es in groups.items()]


# --------------------------------------------------------------------------- split
def kmer_size(alphabet_size: int) -> int:
    """Smallest k with alphabet^k >= 2^18 (RNA 9, protein 5): chance k-mer matches stay rare."""
    return max(3, math.ceil(18 * math.log(2) / math.log(max(alphabet_size, 2))))


def cluster(sequences: list[str], identity: float, k: int) -> list[int]:
    """Cluster label per sequence: identical or k-mer-similar (>= identity) sequences share a label.

    Two sequences link when the shared fraction of the shorter one's k-mers is >= identity**k, the
    expected k-mer survival at that identity; fragments of a longer chain link to it too.
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
    threshold = identity**k
    for i, own in kmers.items():
        shared = Counter(j for km in own for j in index[km] if j < i)
        for j, c in shared.items():
            if c >= threshold * max(1, min(len(own), len(kmers[j]))):
                union(i, j)
    return [find(i) for i in range(len(sequences))]


def cluster_split(sequences: list[str], identity: float, val_fraction: float, alphabet_size: int) -> list[bool]:
    """Deterministic val flags: whole clusters go to val, in hashed order, until ~val_fraction of chains."""
    labels = cluster(sequences, identity, kmer_size(alphabet_size))
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


# --------------------------------------------------------------------------- featurization
PARSE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, zlib.error)  # what unreadable files raise
FEATURES = Features({
    "id": Value("string"), "source": Value("string"), "chain": Value("string"), "kind": Value("string"),
    "sequence": Value("string"), "split": Value("string"), "weight": Value("float32"),
    "length": Value("int32"), "skip_reason": Value("string"),  # "" = usable chain
    "tokens": List(Value("int8")),            # [L]
    "coords": List(Value("float32")),         # [L * A * 3], 0 where unobserved
    "atom_mask": List(Value("bool")),         # [L * A]
    "residue_index": List(Value("int32")),    # [L], gap-aware position in the full chain
})


def _row(display: str, chain: str | None, reason: str = "", kind: str = "", **arrays) -> dict:
    row = {"id": "", "source": display, "chain": chain or "", "kind": kind, "sequence": "", "split": "",
           "weight": 1.0, "length": 0, "skip_reason": reason, "tokens": np.zeros(0, np.int8),
           "coords": np.zeros(0, np.float32), "atom_mask": np.zeros(0, bool), "residue_index": np.zeros(0, np.int32)}
    row.update(arrays)
    return row


def as_reason(text: str) -> str:
    """'category: detail' form of a parser message, so counts group by category and read once:
    'too short (5 < 10 residues)' -> 'too short: 5 < 10 residues'; 'unparsable: x' stays."""
    text = " ".join(text.split())
    if re.match(r"[^():;]+: ", text):  # already 'category: detail'
        return text
    m = re.match(r"([^():;]+?) \(((?:[^()]|\([^()]*\))*)\)(.*)", text)  # 'category (detail)[; hint]'
    return f"{m[1]}: {m[2]}{m[3]}" if m else text


def residue_positions(numbers: np.ndarray) -> np.ndarray:
    """[L] positions that keep moderate numbering gaps (missing residues); odd steps count as 1."""
    steps = np.diff(np.asarray(numbers, dtype=np.int64))
    steps = np.where((steps >= 1) & (steps <= 50), steps, 1)  # insertion codes, restarts, huge jumps
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int32)


def _chain_problem(ch, entry: dict, task: Task, min_length: int, limits: GeometryLimits) -> str:
    """Why a parsed chain cannot be used ('' if it can)."""
    if ch.kind != task.kind:
        return f"molecule is {ch.kind}, task is {task.name}"
    observed = ch.mask.any(axis=1)  # [L]; non-finite coordinates are the parser's check
    if observed.sum() < min_length:
        return f"too few observed residues: {int(observed.sum())} < data.min_length={min_length}"
    absurd = geometry_problem(ch.coords, ch.mask, ch.residue_numbers, limits)
    if absurd:
        return absurd
    want = entry.get("sequence")
    if want and want != ch.sequence.upper():
        diff = next((i for i, (a, b) in enumerate(zip(want, ch.sequence.upper(), strict=False)) if a != b), None)
        at = f"first difference at {diff}" if diff is not None else "one is a prefix of the other"
        return f"sequence mismatch: manifest {len(want)} residues, structure {len(ch.sequence)} ({at})"
    return ""


def featurize_file(path: str, display: str, entries: list[dict], task: Task, atoms: tuple, min_length: int,
                   limits: GeometryLimits = GeometryLimits()) -> list[dict]:
    """Parse one file once; one row per usable chain and one per skipped item (with its reason)."""
    try:
        chains, skipped = structure.parse_structure(path, atoms={task.kind: atoms}, min_length=min_length)
    except PARSE_ERRORS as e:  # StructureError, or whatever else a broken file makes gemmi raise
        return [_row(display, None, as_reason(str(e).removeprefix(f"{path}: ")) or type(e).__name__)]
    wanted = {e["chain"] for e in entries if e["chain"]}
    discovered = entries[0]["id"] is None  # directory/glob input: every chain, id from file stem
    whole_file = discovered or any(not e["chain"] for e in entries)
    rows = [_row(display, s.chain, as_reason(s.reason)) for s in skipped if whole_file or s.chain in wanted or s.chain is None]
    if not chains and not skipped:
        return rows + [_row(display, None, "no chains: file has no polymer chain")]
    by_name = {c.chain_name: c for c in chains}
    for e in entries:
        if e["chain"]:
            picked = [by_name[e["chain"]]] if e["chain"] in by_name else []
            if not picked and e["chain"] not in {s.chain for s in skipped}:
                rows.append(_row(display, e["chain"], f"chain not found: '{e['chain']}' (file has {sorted(by_name)})"))
        else:
            picked = chains
        for ch in picked:
            if e["id"] is None:
                cid = ch.id  # <file stem>_<chain name>
            else:
                n_task = sum(c.kind == task.kind for c in picked)
                cid = e["id"] if len(picked) == 1 or n_task == 1 else f"{e['id']}_{ch.chain_name}"
            reason = _chain_problem(ch, e, task, min_length, limits)
            if reason:
                rows.append(_row(display, ch.chain_name, reason, kind=ch.kind))
                continue
            mask = ch.mask.astype(bool)
            coords = np.where(mask[..., None], ch.coords, 0.0).astype(np.float32)  # [L, A, 3]
            rows.append(_row(
                display, ch.chain_name, kind=ch.kind, id=cid, sequence=ch.sequence, split=e["split"] or "",
                weight=float(e["weight"]), length=len(ch.sequence), tokens=task.tokenize(ch.sequence).numpy().astype(np.int8),
                coords=coords.reshape(-1), atom_mask=mask.reshape(-1),
                residue_index=residue_positions(ch.residue_numbers)))
    return rows
