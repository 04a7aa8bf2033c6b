"""Read and write PDB/mmCIF(.gz) chains with gemmi: Chain(sequence, coords [L, A, 3], mask [L, A], kind)."""
from __future__ import annotations

import functools
import gzip
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

logger = logging.getLogger(__name__)

try:  # ISA-L's inflate is ~3.5x faster than zlib's (the largest cost we add to gemmi's own parse); same streams
    from isal import isal_zlib as _inflate
except ImportError:  # optional: plain zlib
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error, _inflate.error)

DEFAULT_ATOMS: dict[str, tuple[str, ...]] = {"rna": ("C4'",), "protein": ("CA",)}
MAX_FILE_BYTES = 200 * 1024**2     # larger inputs are almost surely not one structure
MAX_TEXT_BYTES = 1024**3           # after gunzip (guards against gzip bombs)
MAX_ABS_COORD = 1e4                # Angstrom; beyond this a coordinate is garbage
_ALPHABET = {"rna": "ACGUN", "protein": "ACDEFGHIKLMNPQRSTVWYX"}
_PURINES = set("AG")
_AA3 = dict(zip("ACDEFGHIKLMNPQRSTVWY", "ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP TYR".split(), strict=True))
_CHAIN_POOL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TEXT = bytes(range(32, 127)) + b"\t\n\r"
_PDB_XYZ = re.compile(rb"(?:ATOM  |HETATM).{24}(.{24})")     # columns 31-54: x, y, z (.match: first line)
_PDB_XYZ_NL = re.compile(rb"\n(?:ATOM  |HETATM).{24}(.{24})")  # a literal first byte: re scans with memchr
_NUMERIC = b"0123456789 .eE+-naifNAIF"   # what numbers (and nan/inf) are written with
_ATOM, _HETATM = (int.from_bytes(b"ATOM", "little"), int.from_bytes(b"  ", "little")), \
    (int.from_bytes(b"HETA", "little"), int.from_bytes(b"TM", "little"))   # record names as <u4, <u2


class StructureError(ValueError):
    """A whole structure file could not be read; the message is one line that says why."""


@dataclass
class Chain:
    """One polymer chain with A selected atoms per residue."""
    id: str                       # "<file stem>_<chain name>"
    kind: str                     # "rna" | "protein"
    sequence: str                 # one letter per residue (N / X for unknown residues)
    coords: np.ndarray            # [L, A, 3] float32, 0.0 where missing
    mask: np.ndarray              # [L, A] bool, True = atom present
    atoms: tuple[str, ...]        # len A, alternatives ("N1/N9") kept as written
    residue_numbers: np.ndarray   # [L] int, author residue numbers
    b_factors: np.ndarray         # [L] float32, B-factor of the first present atom (pLDDT for predictions)
    source: str
    chain_name: str


@dataclass
class Skipped:
    """A chain that was not returned, with a one-line reason."""
    source: str
    chain: str | None
    reason: str


def file_stem(path: str | Path) -> str:
    """File name without .gz and the structure extension: 'x/1ehz.cif.gz' -> '1ehz'."""
    name = Path(path).name
    name = name[:-3] if name.lower().endswith(".gz") else name
    ext = next((e for e in (".mmcif", ".pdb", ".cif", ".ent") if name.lower().endswith(e)), "")
    return name[: len(name) - len(ext)]


def _one_line(err: BaseException) -> str:
    return (" ".join(str(err).split()) or type(err).__name__)[:200]


def _gunzip(data: bytes, path: Path) -> bytes:
    """Gunzip (every member: bgzip writes many) with a size cap (gzip bombs); truncated streams are errors."""
    out, total, rest = [], 0, data
    try:
        while rest[:2] == b"\x1f\x8b":
            d = _inflate.decompressobj(wbits=31)
            out.append(d.decompress(rest, MAX_TEXT_BYTES + 1 - total))
            total += len(out[-1])
            if total > MAX_TEXT_BYTES:
                raise StructureError(f"{path}: too large (over {MAX_TEXT_BYTES // 1024**2} MB after gunzip); "
                                     "split the file")
            if not d.eof:
                raise zlib.error("compressed file ended before the end-of-stream marker was reached")
            rest = d.unused_data
    except _INFLATE_ERRORS as err:
        raise StructureError(f"{path}: broken or truncated gzip ({_one_line(err)}); re-download the file") from err
    if rest.strip(b"\x00"):  # zero padding after the last member is allowed, anything else is not
        raise StructureError(f"{path}: broken or truncated gzip (data after the end of the gzip stream); "
                             "re-download the file")
    return out[0] if len(out) == 1 else b"".join(out)


def _windows(data: bytes, offset: int, width: int) -> np.ndarray:
    """[N, width] overlapping view: row i is data[offset + i : offset + i + width] (no copy)."""
    return np.ndarray((len(data) - offset - width + 1, width), np.uint8, data, offset, (1, 1))


def _ints(data: bytes, offset: int, dtype: str) -> np.ndarray:
    """[N] overlapping (unaligned) view: item i is the little-endian integer at data[offset + i:]."""
    size = np.dtype(dtype).itemsize
    return np.ndarray((len(data) - offset - size + 1,), dtype, data, offset, (1,))


def _bad_xyz_line(data: bytes) -> int:
    """1-based line of the first PDB ATOM/HETATM record whose x/y/z columns hold a non-number (0 if none)."""
    buf = np.frombuffer(data, dtype=np.uint8)                            # [N] no copy
    if len(buf) < 54:
        return _bad_xyz_line_scan(data)
    nl = np.flatnonzero(buf == 10)                                       # [lines - 1]
    starts = np.concatenate(([0], nl + 1))                              # [lines]
    ends = np.append(nl, len(buf))                                      # [lines] exclusive, without the newline
    s = starts[ends - starts >= 54]                                     # a record's x/y/z end at column 54
    four, two = _ints(data, 0, "<u4")[s], _ints(data, 4, "<u2")[s]    # line bytes 1-4 and 5-6 as integers
    s = s[((four == _ATOM[0]) & (two == _ATOM[1])) | ((four == _HETATM[0]) & (two == _HETATM[1]))]
    # one C pass over the records' columns 31-54 (rows copied whole, not gathered byte by byte)
    if not _windows(data, 30, 24)[s].tobytes().translate(None, _NUMERIC):
        return 0
    return _bad_xyz_line_scan(data)                                     # rare: the regex finds the line number


def _bad_xyz_line_scan(data: bytes) -> int:
    """_bad_xyz_line by regex (what the vectorised test is checked against); finds the line number."""
    first = _PDB_XYZ.match(data)                      # the first line has no newline before it
    if first and first.group(1).translate(None, _NUMERIC):
        return 1
    if not b"".join(_PDB_XYZ_NL.findall(data)).translate(None, _NUMERIC):  # the common case: one fast pass
        return 0
    bad = next(m for m in _PDB_XYZ_NL.finditer(data) if m.group(1).translate(None, _NUMERIC))
    return data.count(b"\n", 0, bad.start()) + 2


def _read_text(path: Path) -> bytes:
    """File content (gunzipped if it has the gzip magic) after size and binary-garbage checks."""
    if not path.is_file():
        raise StructureError(f"{path}: no such file (or not a regular file); check the path")
    if (size := path.stat().st_size) > MAX_FILE_BYTES:
        raise StructureError(f"{path}: too large ({size / 1024**2:.0f} MB is over the {MAX_FILE_BYTES // 1024**2} MB limit); "
                             "split it into one file per chain")
    try:
        data = path.read_bytes()
    except OSError as err:   # permissions, I/O errors
        raise StructureError(f"{path}: cannot read ({_one_line(err)})") from err
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, path)
    if not data or data.isspace():
        raise StructureError(f"{path}: empty file")
    head = data[:65536]
    if b"\x00" in head or len(head.translate(None, _TEXT)) > 0.05 * len(head):  # text is (nearly) all ASCII
        raise StructureError(f"{path}: binary content, not PDB/mmCIF text (bzip2/xz/BinaryCIF/MMTF? "
                             "decompress or convert to PDB/mmCIF first)")
    return data


def read_gemmi(path: str | Path) -> gemmi.Structure:
    """gemmi.Structure of the first model (first altloc, entities set up), or StructureError."""
    data = _read_text(path := Path(path))
    # mmCIF starts with data_ after blank/comment lines; anything else is read as PDB
    is_cif = re.match(rb"\s*(#[^\n]*\s*)*data_", data[:65536], re.IGNORECASE) is not None
    end = len(data)
    while end and data[end - 1] in b"\r\n":    # the last line without trailing line breaks (no copy of data)
        end -= 1
    last = data[data.rfind(b"\n", 0, end) + 1:end]
    if not is_cif and last[:6] in (b"ATOM  ", b"HETATM") and len(last.rstrip()) < 54:
        # gemmi reads a PDB cut mid-line silently: a coordinate line ends at column 54
        raise StructureError(f"{path}: truncated (last coordinate line is incomplete); re-download the file")
    if not is_cif and (line := _bad_xyz_line(data)):
        # gemmi reads a non-numeric PDB coordinate ('********' overflow, garbage) as 0 without a word
        raise StructureError(f"{path}: corrupt coordinates (line {line}: the x/y/z columns are not numbers); "
                             "re-download or re-export the file")
    try:
        fmt = gemmi.CoorFormat.Mmcif if is_cif else gemmi.CoorFormat.Pdb
        st = gemmi.read_structure_string(data, merge_chain_parts=True, format=fmt)
        while len(st) > 1:                       # NMR ensembles: first model only
            del st[1]
        st.remove_alternative_conformations()    # altloc A / first microheterogeneity variant
        st.setup_entities()
    except (RuntimeError, ValueError, UnicodeDecodeError, IndexError) as err:
        raise StructureError(f"{path}: unparsable: {_one_line(err)}") from err
    if len(st) == 0 or sum(len(ch) for ch in st[0]) == 0:
        raise StructureError(f"{path}: no chains (no atoms in the first model)")
    return st


@functools.lru_cache(maxsize=4096)
def _tabulated_letter(name: str, kind: str) -> str | None:
    info = gemmi.find_tabulated_residue(name)
    if info is None or not info.found():
        return None
    ok = info.is_nucleic_acid() if kind == "rna" else info.is_amino_acid()
    letter = info.one_letter_code.upper()   # gemmi: lower case = modified residue of that parent
    return letter if ok and letter.strip() and letter in _ALPHABET[kind] else None


def residue_letter(name: str, kind: str, parents: dict[str, str] | None = None) -> str:
    """One letter: standard, modified -> parent (gemmi table, then MODRES), else N (RNA) / X (protein)."""
    parent = (parents or {}).get(name)
    return _tabulated_letter(name, kind) or (parent and _tabulated_letter(parent, kind)) or _ALPHABET[kind][-1]


def _classify(span: gemmi.ResidueSpan) -> str:
    """'rna' / 'protein', or a skip reason starting with '!'."""
    ptype, pt = span.check_polymer_type(), gemmi.PolymerType
    known = {pt.PeptideL: "protein", pt.PeptideD: "protein", pt.Rna: "rna", pt.Dna: "!DNA chain"}
    if ptype in known:
        return known[ptype]
    # hybrids and unknown residue names: RNA has O2' (old files: O2*), protein has N + CA
    o2 = sum(r.find_atom("O2'", "*") is not None or r.find_atom("O2*", "*") is not None for r in span)
    ca = sum(r.find_atom("CA", "*") is not None and r.find_atom("N", "*") is not None for r in span)
    if max(o2, ca) > len(span) / 2:
        return "rna" if o2 > ca else "protein"
    return f"!not RNA or protein (polymer type {ptype.name})"


def _alternatives(spec: str, letter: str, kind: str) -> list[str]:
    """'X/Y' for nucleotides: X for pyrimidines, Y for purines ("N1/N9"); else the order as written."""
    alts = spec.split("/")
    return alts[::-1] if kind == "rna" and len(alts) == 2 and letter in _PURINES else alts


@functools.lru_cache(maxsize=4096)
def _spellings(spec: str, letter: str, kind: str) -> tuple[str, ...]:
    """Atom names to try, in order; pre-2007 PDB files spell sugar atoms C4* instead of C4'."""
    return tuple(s for name in _alternatives(spec, letter, kind)
                 for s in ((name, name.replace("'", "*")) if "'" in name else (name,)))


def parse_structure(path: str | Path, atoms: dict[str, tuple[str, ...]] | None = None,
                    min_length: int = 1) -> tuple[list[Chain], list[Skipped]]:
    """RNA and protein chains of the first model; per-chain problems come back as Skipped."""
    atoms = {**DEFAULT_ATOMS, **(atoms or {})}
    st = read_gemmi(path)
    parents = {m.res_id.name: m.parent_comp_id for m in st.mod_residues if m.parent_comp_id}  # MODRES
    stem, source = file_stem(path), str(path)
    chains, skipped = [], []
    for gchain in st[0]:
        try:
            result = _chain(gchain, atoms, parents, min_length, f"{stem}_{gchain.name}", source)
        except (RuntimeError, ValueError, IndexError) as err:   # a chain gemmi cannot walk: report, go on
            result = f"unreadable chain: {_one_line(err)}"
        if isinstance(result, Chain):
            chains.append(result)
        else:
            skipped.append(Skipped(source, gchain.name, result))
    return chains, skipped


def _chain(gchain: gemmi.Chain, atoms: dict, parents: dict, min_length: int, cid: str, source: str) -> Chain | str:
    """A Chain, or the reason it is skipped."""
    span = gchain.get_polymer()
    if len(span) == 0:
        return "no polymer chain (ligands/water only)"
    kind = _classify(span)
    if kind.startswith("!"):
        return kind[1:]
    if len(span) < min_length:
        return f"too short ({len(span)} < {min_length} residues)"
    names = tuple(atoms[kind])
    a, plans = len(names), {}                                          # residue name -> (letter, spellings per atom)
    letters, xyz, where, bfac, nums = [], [], [], [], []               # filled per residue, scattered once below
    for i, res in enumerate(span):
        plan = plans.get(name := res.name)
        if plan is None:
            letter = residue_letter(name, kind, parents)
            plan = plans[name] = (letter, tuple(enumerate(_spellings(spec, letter, kind) for spec in names)))
        letters.append(plan[0])
        first = None
        for j, spellings in plan[1]:
            for spelling in spellings:                                 # the first present spelling of atom j
                atom = res.find_atom(spelling, "*")
                # zero occupancy at the exact origin = write_structure's placeholder for an unobserved residue
                if atom is not None and not (atom.occ == 0 and atom.pos.length() == 0):
                    xyz.append(atom.pos.tolist())
                    where.append(i * a + j)
                    first = atom if first is None else first
                    break
        bfac.append((first if first is not None else res[0]).b_iso)
        nums.append(res.seqid.num)
    seq = "".join(letters)
    coords = np.zeros((len(span) * a, 3), dtype=np.float64)            # [L * A, 3]
    mask = np.zeros(len(span) * a, dtype=bool)                         # [L * A]
    if where:
        coords[where] = xyz
        mask[where] = True
    coords, mask = coords.reshape(len(span), a, 3), mask.reshape(len(span), a)   # [L, A, 3], [L, A]
    bfac = np.asarray(bfac, dtype=np.float32)                           # [L]
    if not mask.any():
        return f"missing atoms (none of the atoms {','.join(names)} is present)"
    real = coords[mask]                                                # [N, 3]
    if not np.isfinite(real).all():
        return "non-finite coordinates (NaN or inf)"
    if np.abs(real).max() > MAX_ABS_COORD:
        return f"absurd coordinates (|x| > {MAX_ABS_COORD:g} A)"
    return Chain(id=cid, kind=kind, sequence=seq, coords=coords.astype(np.float32), mask=mask, atoms=names,
                 residue_numbers=np.array(nums, dtype=np.int64), b_factors=bfac,
                 source=source, chain_name=gchain.name)


def chain_from_coords(id: str, kind: str, sequence: str, coords, atoms: tuple[str, ...], mask=None,
                      b_factors=None, residue_numbers=None, chain_name: str = "A") -> Chain:
    """A Chain from arrays (e.g. a prediction): coords [L, A, 3] (or [L, 3] for one atom)."""
    if kind not in DEFAULT_ATOMS:
        raise ValueError(f"kind must be one of {sorted(DEFAULT_ATOMS)}, got {kind!r}")
    n, a, coords = len(sequence), len(atoms), np.asarray(coords, dtype=np.float32)
    coords = coords[:, None, :] if coords.ndim == 2 else coords   # [L, 3] -> [L, 1, 3]
    if coords.shape != (n, a, 3):
        raise ValueError(f"coords shape {coords.shape} does not match {n} residues x {a} atoms x 3")
    mask = np.ones((n, a), dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(n, a)
    bfac = np.zeros(n, np.float32) if b_factors is None else np.asarray(b_factors, np.float32).reshape(n)
    nums = np.arange(1, n + 1) if residue_numbers is None else np.asarray(residue_numbers, np.int64).reshape(n)
    return Chain(id=id, kind=kind, sequence=sequence, coords=np.where(mask[..., None], coords, 0.0).astype(np.float32),
                 mask=mask, atoms=tuple(atoms), residue_numbers=nums, b_factors=bfac, source="", chain_name=chain_name)


def _chain_names(chains: list[Chain], pdb: bool) -> list[str]:
    """A unique name per chain: its own when valid (PDB: one character) and unused, else a free one."""
    own, used = {c.chain_name for c in chains}, []
    for name in (c.chain_name for c in chains):
        if not name or name in used or (pdb and len(name) > 1):
            name = next(c for c in _CHAIN_POOL if c not in used and c not in own)
        used.append(name)
    return used


def build_gemmi(chains: list[Chain], pdb: bool = False) -> gemmi.Structure:
    """gemmi.Structure with the chains' residues and their present, finite atoms."""
    st = gemmi.Structure()
    st.add_model(gemmi.Model(1))
    limit = (-999.0, 9999.0) if pdb else (-np.inf, np.inf)   # PDB columns are %8.3f
    for ch, name in zip(chains, _chain_names(chains, pdb), strict=True):
        bad = ch.mask & ~np.isfinite(ch.coords).all(-1)                       # [L, A]
        clipped = ch.mask & ~bad & ((ch.coords < limit[0]) | (ch.coords > limit[1])).any(-1)
        if bad.any() or clipped.any():
            logger.warning("%s: %d non-finite atoms left out, %d clipped to PDB range", ch.id, bad.sum(), clipped.sum())
        gch = gemmi.Chain(name)
        for i, letter in enumerate(ch.sequence):
            res = gemmi.Residue()
            res.name = (letter if letter in "ACGU" else "N") if ch.kind == "rna" else _AA3.get(letter, "UNK")
            res.seqid = gemmi.SeqId(int(ch.residue_numbers[i]), " ")
            res.entity_type, res.het_flag = gemmi.EntityType.Polymer, "A"
            present = ch.mask[i] & ~bad[i]                                  # [A]
            # a residue with nothing observed keeps its place via one placeholder atom (occupancy 0)
            for j in np.flatnonzero(present) if present.any() else [0]:
                atom = gemmi.Atom()
                atom.name = _alternatives(ch.atoms[j], letter, ch.kind)[0]
                atom.element = gemmi.Element(atom.name.lstrip("0123456789")[:1] or "C")
                xyz = np.clip(ch.coords[i, j].astype(float), *limit) if present[j] else (0.0, 0.0, 0.0)
                atom.pos = gemmi.Position(*xyz)
                atom.occ, atom.b_iso = float(present[j]), float(ch.b_factors[i])
                res.add_atom(atom)
            gch.add_residue(res)
        st[0].add_chain(gch)
    st.setup_entities()
    st.assign_label_seq_id(force=True)
    return st


def write_structure(path: str | Path, chains: list[Chain]) -> None:
    """Write chains to .pdb / .cif (.gz) by extension: atoms with mask True, B-factor column = b_factors."""
    lower = (path := Path(path)).name.lower().removesuffix(".gz")
    if not chains or not lower.endswith((".pdb", ".ent", ".cif", ".mmcif")):
        raise ValueError(f"{path}: need >= 1 chain and a .pdb, .cif, .pdb.gz or .cif.gz path")
    pdb = lower.endswith((".pdb", ".ent"))
    st = build_gemmi(chains, pdb=pdb)
    data = (st.make_pdb_string() if pdb else st.make_mmcif_document().as_string()).encode()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)   # mtime=0: identical chains give identical bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
