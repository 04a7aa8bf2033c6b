"""Where chains come from: a directory, a glob or a CSV manifest -> entries (one per file and chain)."""
from __future__ import annotations

import csv
import glob
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from diffold.report import DataReport, SplitReport  # noqa: F401  (re-exported: diffold.predicted imports them here)

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
