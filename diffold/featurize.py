"""One structure file -> featurized rows (one per usable chain, one per skipped item) -> an Arrow table.

Imports no torch and no datasets: this module runs in the featurization worker processes
(diffold/workers.py), which must start in a fraction of a second.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from diffold import structure
from diffold.sanity import GeometryLimits, geometry_problem

PARSE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, zlib.error)  # what unreadable files raise
SCHEMA = pa.schema([  # one row per chain or skipped item; datasets.Features are derived from it
    ("id", pa.string()), ("source", pa.string()), ("chain", pa.string()), ("kind", pa.string()),
    ("sequence", pa.string()), ("split", pa.string()), ("weight", pa.float32()),
    ("length", pa.int32()), ("skip_reason", pa.string()),    # "" = usable chain
    ("tokens", pa.list_(pa.int8())),                         # [L]
    ("coords", pa.list_(pa.float32())),                      # [L * A * 3], 0 where unobserved
    ("atom_mask", pa.list_(pa.bool_())),                     # [L * A]
    ("residue_index", pa.list_(pa.int32())),                 # [L], gap-aware position in the full chain
])
_LISTS = {"tokens": np.int8, "coords": np.float32, "atom_mask": np.bool_, "residue_index": np.int32}


@dataclass(frozen=True)
class FeatureSpec:
    """Everything the featurized rows depend on besides the file (part of every cache key)."""

    task: str                       # task name ("rna" | "protein")
    kind: str                       # molecule kind of the task's chains
    alphabet: str                   # residue letters; token = index + 1, the last letter is 'unknown'
    atoms: tuple[str, ...]          # atoms per residue
    min_length: int
    limits: GeometryLimits = field(default_factory=GeometryLimits)

    def to_dict(self) -> dict:
        return {**asdict(self), "atoms": list(self.atoms)}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(**{**d, "atoms": tuple(d["atoms"]), "limits": GeometryLimits(**d["limits"])})

    def tokenize(self, sequence: str) -> np.ndarray:
        """[L] int8 tokens, as Task.tokenize (1..len(alphabet); unknown letters -> the last one)."""
        lut = np.full(256, len(self.alphabet), dtype=np.int8)
        for i, c in enumerate(self.alphabet):
            lut[ord(c)] = i + 1
        return lut[np.frombuffer(sequence.upper().encode("ascii", "replace"), dtype=np.uint8)]


def _row(display: str, chain: str | None, reason: str = "", kind: str = "", **arrays) -> dict:
    row = {"id": "", "source": display, "chain": chain or "", "kind": kind, "sequence": "", "split": "",
           "weight": 1.0, "length": 0, "skip_reason": reason}
    row.update({k: np.zeros(0, t) for k, t in _LISTS.items()})
    row.update(arrays)
    return row


def skip_row(display: str, reason: str) -> dict:
    """The row of a file that produced nothing but a reason (e.g. a parser timeout)."""
    return _row(display, None, reason)


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


def _chain_problem(ch, entry: dict, spec: FeatureSpec) -> str:
    """Why a parsed chain cannot be used ('' if it can)."""
    if ch.kind != spec.kind:
        return f"molecule is {ch.kind}, task is {spec.task}"
    observed = ch.mask.any(axis=1)  # [L]; non-finite coordinates are the parser's check
    if observed.sum() < spec.min_length:
        return f"too few observed residues: {int(observed.sum())} < data.min_length={spec.min_length}"
    absurd = geometry_problem(ch.coords, ch.mask, ch.residue_numbers, spec.limits)
    if absurd:
        return absurd
    want = entry.get("sequence")
    if want and want != ch.sequence.upper():
        diff = next((i for i, (a, b) in enumerate(zip(want, ch.sequence.upper(), strict=False)) if a != b), None)
        at = f"first difference at {diff}" if diff is not None else "one is a prefix of the other"
        return f"sequence mismatch: manifest {len(want)} residues, structure {len(ch.sequence)} ({at})"
    return ""


def featurize_file(path: str, display: str, entries: list[dict], spec: FeatureSpec) -> list[dict]:
    """Parse one file once; one row per usable chain and one per skipped item (with its reason)."""
    try:
        chains, skipped = structure.parse_structure(path, atoms={spec.kind: spec.atoms}, min_length=spec.min_length)
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
                n_task = sum(c.kind == spec.kind for c in picked)
                cid = e["id"] if len(picked) == 1 or n_task == 1 else f"{e['id']}_{ch.chain_name}"
            reason = _chain_problem(ch, e, spec)
            if reason:
                rows.append(_row(display, ch.chain_name, reason, kind=ch.kind))
                continue
            mask = ch.mask.astype(bool)
            coords = np.where(mask[..., None], ch.coords, 0.0).astype(np.float32)  # [L, A, 3]
            rows.append(_row(
                display, ch.chain_name, kind=ch.kind, id=cid, sequence=ch.sequence, split=e["split"] or "",
                weight=float(e["weight"]), length=len(ch.sequence), tokens=spec.tokenize(ch.sequence),
                coords=coords.reshape(-1), atom_mask=mask.reshape(-1),
                residue_index=residue_positions(ch.residue_numbers)))
    return rows


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows -> one Arrow table with SCHEMA; list columns are built from concatenated numpy arrays (fast)."""
    cols = {}
    for name in SCHEMA.names:
        if name in _LISTS:
            parts = [np.asarray(r[name], dtype=_LISTS[name]).reshape(-1) for r in rows]
            offsets = np.zeros(len(parts) + 1, dtype=np.int32)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            values = np.concatenate(parts) if parts else np.zeros(0, _LISTS[name])
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=SCHEMA.field(name).type.value_type))
        else:
            cols[name] = pa.array([r[name] for r in rows], type=SCHEMA.field(name).type)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_table(table: pa.Table, path) -> None:
    """Arrow IPC stream (what datasets.Dataset.from_file memory-maps)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
