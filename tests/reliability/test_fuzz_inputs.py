"""Input fuzzing: generated broken/malicious structure files, CSV manifests and YAML configs (fixed seeds).

Every input either yields sane chains/a valid Config or is rejected with a one-line reason: in the
DataReport (structures, manifest rows), as DataError (a manifest unusable as a whole) or ConfigError
(YAML). Nothing else may escape, nothing may run code, nothing may hang. tests/test_bad_inputs.py holds
the hand-written catalogue; these cases are generated (random bytes, truncations of real files at random
offsets, numeric mutations, wrong encodings, NUL bytes, 10^6-residue claims, YAML object tags).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest
from synthetic import deadline

from diffold.config import Config, ConfigError, load_config
from diffold.data import DataError, build_datasets

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "data" / "examples" / "rna"
REJECT, ANY = True, None   # must be rejected / either outcome is fine, as long as it is accounted for
COUNTS: dict[str, int] = {}




def cfg_for(tmp: Path, train, val, cache: Path | None = None) -> Config:
    over = ["task=rna", f"data.train_path={train}", f"data.val_path={val}", f"data.cache_dir={cache or tmp / 'cache'}",
            "training.batch_size=2"]
    return load_config(None, overrides=over, env={})


def good_chain_file(path: Path, n: int = 30, seed: int = 0) -> str:
    """A clean helical RNA chain; returns its sequence."""
    from diffold.structure import chain_from_coords, write_structure

    rng = np.random.default_rng(seed)
    seq = "".join(rng.choice(list("ACGU"), n))
    t = np.arange(n) * 0.6
    xyz = np.stack([9 * np.cos(t), 9 * np.sin(t), 2.8 * np.arange(n)], 1) + rng.normal(0, 0.3, (n, 3))
    write_structure(path, [chain_from_coords("g", "rna", seq, xyz.astype(np.float32), ("C4'",))])
    return seq


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text and "\r" not in text


# --------------------------------------------------------------------------- structure files
@pytest.fixture(scope="module")
def bases() -> dict[str, bytes]:
    """Small real example files (PDB), plus one of them as mmCIF."""
    out = {n: gzip.decompress((EXAMPLES / f"{n}.pdb.gz").read_bytes()) for n in ("1jzc", "404d", "1dqf")}
    st = gemmi.read_structure_string(out["1jzc"].decode(), format=gemmi.CoorFormat.Pdb)
    st.setup_entities()
    out["1jzc_cif"] = st.make_mmcif_document().as_string().encode()
    return out


PDB_GARBAGE = ["     nan", "     inf", "    -inf", "    1e30", "   1e308", "********", "  -1e+38", "   NaN  ",
               "99999999", "   1,5  ", "  0x1p10", "   abc  ", "    #?! "]
CIF_GARBAGE = ["NaN", "inf", "-inf", "1e999", "1e308", "-1e38", "?", ".", "1e30", "0x1F", "1,5", "--3", "abc"]
SEQ_IDS = ["1000000", "999999999999", "100000000000000000000000000000", "-1000000", "0", "1e6", "2147483648", "?"]


def _c4_lines(lines: list[bytes]) -> list[int]:
    """Lines of the atoms the RNA task reads (C4'), so that a mutation there must matter."""
    return [i for i, ln in enumerate(lines) if ln[:6] in (b"ATOM  ", b"HETATM") and ln[12:16].strip() in (b"C4'", b"C4*")]


def pdb_coord_mutation(rng, text: bytes, values: list[str]) -> bytes:
    lines = text.split(b"\n")
    for i in rng.choice(_c4_lines(lines), size=int(rng.integers(1, 4)), replace=False):
        col = 30 + 8 * int(rng.integers(3))
        lines[i] = lines[i][:col] + values[int(rng.integers(len(values)))].encode() + lines[i][col + 8:]
    return b"\n".join(lines)


def cif_mutation(rng, text: bytes, column: str, values: list[str], c4_only: bool, n: int) -> bytes:
    lines = text.split(b"\n")
    cols = [ln.strip().decode() for ln in lines if ln.startswith(b"_atom_site.")]
    k = cols.index(column)
    rows = [i for i, ln in enumerate(lines) if ln.startswith((b"ATOM", b"HETATM")) and (not c4_only or b'"C4\'"' in ln)]
    for i in rng.choice(rows, size=min(n, len(rows)), replace=False):
        parts = lines[i].split()
        parts[k] = values[int(rng.integers(len(values)))].encode()
        lines[i] = b" ".join(parts)
    return b"\n".join(lines)


def structure_cases(rng, bases: dict[str, bytes]) -> list[tuple[str, bytes, object]]:
    """(file name, content, REJECT or ANY)."""
    pdbs = [b for n, b in bases.items() if not n.endswith("cif")]
    cif = bases["1jzc_cif"]
    cases: list[tuple[str, bytes, object]] = []

    def add(kind: str, ext: str, data: bytes, expect) -> None:
        cases.append((f"f{len(cases):03d}_{kind}{ext}", data, expect))

    def pick() -> bytes:
        return pdbs[int(rng.integers(len(pdbs)))]

    for _ in range(12):
        add("random_bytes", ".pdb", rng.integers(0, 256, int(rng.integers(1, 6000)), dtype=np.uint8).tobytes(), REJECT)
    for _ in range(8):
        text = rng.choice(list(b"ATOMHEX 0123456789.-_\n"), int(rng.integers(10, 5000))).astype(np.uint8).tobytes()
        add("random_text", ".cif" if rng.random() < 0.5 else ".pdb", text, REJECT)
    for _ in range(5):
        add("gz_random", ".pdb.gz", gzip.compress(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()), REJECT)
    for _ in range(5):
        z = gzip.compress(pick())
        add("gz_truncated", ".pdb.gz", z[: int(rng.integers(10, len(z) - 10))], REJECT)
    for _ in range(14):  # a cut at a line boundary past residue 10 is still a usable (shorter) chain
        b = pick()
        add("truncated", ".pdb", b[: int(rng.integers(1, len(b)))], ANY)
    for _ in range(6):
        add("truncated", ".cif", cif[: int(rng.integers(1, len(cif)))], ANY)
    for _ in range(8):
        b = bytearray(pick())
        for p in rng.integers(0, len(b), int(rng.integers(1, 50))):
            b[p] = 0
        add("nul_bytes", ".pdb", bytes(b), REJECT)
    for enc in ("utf-16", "utf-16-be", "utf-32", "cp500"):
        add(f"enc_{enc}", ".pdb", pick().decode("ascii").encode(enc), REJECT)
    add("enc_utf8_bom", ".pdb", b"\xef\xbb\xbf" + pick(), ANY)
    add("enc_latin1_remarks", ".pdb", pick().replace(b"REMARK", "REMARK äöüéèà".encode("latin-1"), 3), ANY)
    add("enc_latin1_all", ".pdb", rng.integers(128, 256, 4000, dtype=np.uint8).tobytes(), REJECT)
    for _ in range(16):  # NaN / inf / huge / non-numeric coordinates of atoms the task reads
        add("pdb_coords", ".pdb", pdb_coord_mutation(rng, pick(), PDB_GARBAGE), REJECT)
    for axis in ("x", "y", "z"):
        for _ in range(3):
            add("cif_coords", ".cif", cif_mutation(rng, cif, f"_atom_site.Cartn_{axis}", CIF_GARBAGE, True, 3), REJECT)
    for v in (b"9999", b"-999", b"A000", b"ZZZZ", b"****", b"1e6 "):  # residue numbers from a random atom on
        lines = pick().split(b"\n")
        atoms = [i for i, ln in enumerate(lines) if ln[:6] in (b"ATOM  ", b"HETATM")]
        start = atoms[int(rng.integers(len(atoms)))]
        lines = [ln[:22] + v + ln[26:] if i >= start and i in set(atoms) else ln for i, ln in enumerate(lines)]
        add("pdb_resnum", ".pdb", b"\n".join(lines), ANY)
    for v in SEQ_IDS:  # huge / negative / non-integer residue numbers (10^6-residue claims)
        for column in ("_atom_site.label_seq_id", "_atom_site.auth_seq_id"):
            add("cif_seqid", ".cif", cif_mutation(rng, cif, column, [v], False, 300), ANY)
    add("seqres_claims_1e6", ".pdb", b"SEQRES   1 A 1000000  G  C  A  U\n" + pick(), ANY)
    jump = pick().split(b"\n")
    jump = [ln[:22] + b"9999" + ln[26:] if ln[:4] == b"ATOM" and i > len(jump) // 2 else ln for i, ln in enumerate(jump)]
    add("resnum_jump_to_9999", ".pdb", b"\n".join(jump), ANY)
    add("pdb_20k_residues", ".pdb", b"".join(
        b"ATOM  %5d  C4'   G A%4d    %8.3f%8.3f%8.3f  1.00 20.00           C  \n"
        % (i % 100000, i % 10000, (i * 0.37) % 999, (i * 0.11) % 99, 1.0) for i in range(1, 20001)), ANY)
    for _ in range(5):
        lines = pick().split(b"\n")
        rng.shuffle(lines)
        add("shuffled_lines", ".pdb", b"\n".join(lines), ANY)
    for _ in range(4):
        lines = pick().split(b"\n")
        keep = rng.random(len(lines)) > rng.uniform(0.1, 0.9)
        add("deleted_lines", ".pdb", b"\n".join(ln for ln, k in zip(lines, keep) if k), ANY)
    add("duplicated_atoms", ".pdb", pick() * 2, ANY)
    add("two_mb_line", ".pdb", b"REMARK " + b"A" * 2_000_000 + b"\n" + pick(), ANY)
    add("cr_only", ".pdb", pick().replace(b"\n", b"\r"), ANY)
    add("crlf", ".pdb", pick().replace(b"\n", b"\r\n"), ANY)
    for _ in range(10):  # random garbage over random columns of random atom lines
        lines = pick().split(b"\n")
        atoms = [i for i, ln in enumerate(lines) if ln[:4] == b"ATOM"]
        for i in rng.choice(atoms, size=int(rng.integers(1, 30))):
            c, w = int(rng.integers(0, 78)), int(rng.integers(1, 8))
            junk = rng.choice(list(b"!@#$%^&*()_+-=[]{}|;:,.<>?/~` 0123456789abcXYZ"), w).astype(np.uint8).tobytes()
            lines[i] = lines[i][:c] + junk + lines[i][c + w:]
        add("field_garbage", ".pdb", b"\n".join(lines), ANY)
    for drop in ("_atom_site.Cartn_x", "_atom_site.label_comp_id", "_atom_site.label_atom_id", "_atom_site.auth_asym_id"):
        add("cif_drop_column", ".cif", b"\n".join(ln for ln in cif.split(b"\n") if ln.strip() != drop.encode()), REJECT)
    add("cif_unbalanced_quote", ".cif", cif.replace(b"C4'", b"'C4", 5), ANY)
    add("cif_two_blocks", ".cif", cif + b"\n" + cif, ANY)
    add("cif_no_data_line", ".cif", cif.replace(b"data_", b"", 1), ANY)
    add("cif_loop_only", ".cif", b"data_x\nloop_\n" + b"\n".join(b"_atom_site.f%d" % i for i in range(30)) + b"\n", REJECT)
    return cases


def test_fuzzed_structure_files(bases, tmp_path):
    cases = structure_cases(np.random.default_rng(7), bases)
    d = tmp_path / "fuzz"
    d.mkdir()
    for name, data, _ in cases:
        (d / name).write_bytes(data)
    good_chain_file(d / "good.pdb")
    good_chain_file(tmp_path / "val.pdb", 40, seed=1)
    with deadline(300):
        train, _, report = build_datasets(cfg_for(tmp_path, d, tmp_path / "val.pdb"))
    skipped: dict[str, list[str]] = {}
    for item in report.train.skipped_items:
        assert one_line(item["reason"]), item
        skipped.setdefault(item["source"], []).append(item["reason"])
    outcome = {"rejected": 0, "used": 0}
    for name, _, expect in cases:
        used = [i for i in train.ids if i.startswith(name.split(".")[0] + "_")]
        assert used or skipped.get(name), f"{name}: neither used nor reported"
        if expect is REJECT:
            assert not used, f"{name} should have been rejected, was used as {used}"
        outcome["used" if used else "rejected"] += 1
    assert "good_A" in train.ids
    for i, cid in enumerate(train.ids):  # whatever got through is sane
        item = train[i]
        xyz = item["coords"][item["atom_mask"]]
        assert np.isfinite(xyz.numpy()).all() and xyz.abs().max() < 2e4, cid
        assert item["residue_index"].min() >= 0 and len(item["tokens"]) >= 1
    COUNTS["structure files"] = len(cases)
    print(f"{len(cases)} fuzzed structure files: {outcome}")
    assert len(cases) >= 130


# --------------------------------------------------------------------------- manifests
def row_cases(seq: str) -> list[tuple[dict, object]]:
    """(row, REJECT / ANY / 'use'); each row points at its own copy of a good 30-residue file unless it
    mutates structure_path."""
    rows: list[tuple[dict, object]] = []

    def add(expect, **fields) -> None:
        rows.append(({"id": f"r{len(rows):03d}", **fields}, expect))

    for w, expect in [("1e39", REJECT), ("1e308", REJECT), ("3.4e38", REJECT), ("1e7", REJECT), ("nan", REJECT),
                      ("-nan", REJECT), ("inf", REJECT), ("-inf", REJECT), ("-0", REJECT), ("0x10", REJECT),
                      ("1e400", REJECT), ("0.0", REJECT), ("∞", REJECT), ("heavy", REJECT), ("1_000", ANY),
                      ("1e-50", ANY), ("", "use"), (" 2 ", "use"), ("１", ANY)]:
        add(expect, weight=w)
    for s, expect in [("A" * 1_000_000, REJECT), (seq + "A" * 999_970, REJECT), ("A" * 100_000, REJECT),
                      ("ÄÖÜ" * 10, REJECT), (seq[:-1] + "1", REJECT), ("\x00" * 10, REJECT), ("A\x00C", REJECT),
                      ("ＡＣＧＵ" * 7, REJECT), (seq.lower(), "use"), (" ".join(seq), "use")]:
        add(expect, sequence=s)
    for p in ["", "missing.pdb", "/dev/null", "/dev/zero", "/proc/self/status", "../" * 40 + "etc/passwd", ".", "..",
              "/", "x" * 5000, "a\x00b.pdb", "rows", "../" * 200 + "x.pdb", "loop.pdb", "rows/../rows/../missing.pdb"]:
        add(REJECT, structure_path=p)
    for c, expect in [("Z", REJECT), ("", "use"), ("A" * 10000, REJECT), ("\x00", REJECT), ("Ä", REJECT),
                      ("A,B", REJECT), ("'A'", REJECT)]:
        add(expect, chain=c)
    for m, expect in [("protein", REJECT), ("DNA", REJECT), ("rna", "use"), ("RNA", "use"), ("ＲＮＡ", REJECT),
                      ("x" * 1000, REJECT), ("\x00", REJECT)]:
        add(expect, molecule=m)
    for s in ["test", "VAL", "???", "\x00"]:  # a separate val_path: the split column is not used
        add(ANY, split=s)
    for i, expect in [("", REJECT), (" ", REJECT), ("x" * 100_000, ANY), ("../../etc/passwd", ANY), ("a/b", ANY),
                      ("\x00", ANY), ("ü", ANY), ("dup", "use"), ("dup", REJECT)]:
        rows.append(({"id": i}, expect))
    return rows


def test_fuzzed_manifest_rows(tmp_path):
    seq = good_chain_file(tmp_path / "template.pdb")
    (tmp_path / "rows").mkdir()
    (tmp_path / "loop.pdb").symlink_to(tmp_path / "loop.pdb")
    cases = row_cases(seq)
    cols = ["id", "structure_path", "chain", "molecule", "sequence", "split", "weight"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    rels = []
    for k, (row, _) in enumerate(cases):
        rel = f"rows/{k}.pdb"
        (tmp_path / rel).write_bytes((tmp_path / "template.pdb").read_bytes())
        rel = row.get("structure_path", rel)
        rels.append(rel)
        writer.writerow([{**row, "structure_path": rel}.get(c, "") for c in cols])
    (tmp_path / "m.csv").write_text(buf.getvalue(), encoding="utf-8")
    good_chain_file(tmp_path / "val.pdb", 40, seed=1)
    with deadline(300):
        train, _, report = build_datasets(cfg_for(tmp_path, tmp_path / "m.csv", tmp_path / "val.pdb"))
    by_source: dict[str, list[str]] = {}
    for item in report.train.skipped_items:
        assert one_line(item["reason"]), item
        by_source.setdefault(item["source"], []).append(item["reason"])
    unique_rel = {r for r in rels if rels.count(r) == 1}
    ids = list(train.ids)
    for k, ((row, expect), rel) in enumerate(zip(cases, rels)):
        reasons = by_source.get(f"m.csv:{k + 2}", []) + (by_source.get(rel, []) if rel in unique_rel else [])
        used = row["id"].strip() in ids and not reasons
        if used:
            ids.remove(row["id"].strip())
        assert used or reasons, f"row {k} {str(row)[:80]}: neither used nor reported"
        if expect is REJECT:
            assert not used, f"row {k} {str(row)[:80]} should have been rejected"
        if expect == "use":
            assert used, f"row {k} {str(row)[:80]} should have been used: {reasons}"
    assert not ids, f"used chains that match no row: {ids}"
    assert max(train.weights) <= 1e6 and all(np.isfinite(train.weights))
    COUNTS["manifest rows"] = len(cases)
    assert len(cases) >= 60


def manifest_cases(rng, good: bytes) -> list[tuple[str, bytes, object]]:
    """Whole-manifest mutations of a good manifest: (name, content, REJECT = DataError expected, or ANY)."""
    cases: list[tuple[str, bytes, object]] = []

    def add(kind: str, data: bytes, expect) -> None:
        cases.append((f"m{len(cases):02d}_{kind}", data, expect))

    for _ in range(5):
        add("random_bytes", rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes(), REJECT)
    for _ in range(8):
        add("truncated", good[: int(rng.integers(0, len(good)))], ANY)
    for _ in range(4):
        b = bytearray(good)
        for p in rng.integers(0, len(b), int(rng.integers(1, 10))):
            b[p] = 0
        add("nul_bytes", bytes(b), ANY)
    for enc in ("utf-16", "utf-16-be", "utf-32", "cp500"):
        add(f"enc_{enc}", good.decode().encode(enc), REJECT)
    add("enc_latin1_ids", good.replace(b"g0,", "gä0,".encode("latin-1")), REJECT)
    add("enc_utf8_bom", b"\xef\xbb\xbf" + good, ANY)
    header, body = good.split(b"\n", 1)
    add("header_only", header + b"\n", REJECT)
    add("no_id_column", header.replace(b"id,", b"name,") + b"\n" + body, REJECT)
    add("semicolons", good.replace(b",", b";"), REJECT)
    add("duplicate_columns", header + b",id\n" + body, ANY)
    add("crlf", good.replace(b"\n", b"\r\n"), ANY)
    add("cr_only", good.replace(b"\n", b"\r"), ANY)
    add("unterminated_quote", good.replace(b"g1,", b'"g1,', 1), ANY)
    add("huge_sequence_claim", good + b"big,s0.pdb,,rna," + b"A" * 1_000_000 + b",,1\n", ANY)
    add("thousand_duplicate_rows", good + body * 200, ANY)
    add("blank_lines", good.replace(b"\n", b"\n\n\n"), ANY)
    add("empty", b"", REJECT)
    return cases


def test_fuzzed_manifest_files(tmp_path):
    rows = []
    for i in range(6):
        seq = good_chain_file(tmp_path / f"s{i}.pdb", 30 + i, seed=10 + i)
        rows.append(f"g{i},s{i}.pdb,A,rna,{seq},,1")
    good = ("id,structure_path,chain,molecule,sequence,split,weight\n" + "\n".join(rows) + "\n").encode()
    good_chain_file(tmp_path / "val.pdb", 40, seed=1)
    cases = manifest_cases(np.random.default_rng(11), good)
    outcome = {"DataError": 0, "loaded": 0}
    for name, data, expect in cases:
        path = tmp_path / f"{name}.csv"
        path.write_bytes(data)
        try:
            with deadline(120):
                train, _, report = build_datasets(cfg_for(tmp_path, path, tmp_path / "val.pdb", tmp_path / "cache"))
        except DataError as e:
            assert one_line(str(e)) and str(path) in str(e), f"{name}: {e}"
            outcome["DataError"] += 1
            continue
        assert expect is not REJECT, f"{name}: loaded although it should be rejected"
        assert report.train.chains_used == len(train) >= 1
        assert all(one_line(i["reason"]) for i in report.train.skipped_items), name
        outcome["loaded"] += 1
    COUNTS["manifest files"] = len(cases)
    print(f"{len(cases)} fuzzed manifests: {outcome}")
    assert len(cases) >= 30


# --------------------------------------------------------------------------- YAML configs
def set_value(base: str, key: str, value: str) -> str:
    """`base` with the value of its one `key:` line replaced (fails loudly if the base YAML changed shape)."""
    out, n = re.subn(rf"^(\s*{key}:) .*$", lambda m: f"{m.group(1)} {value}", base, flags=re.M)
    assert n == 1, f"base config has {n} '{key}:' lines, expected 1"
    return out


def yaml_cases(rng, base: str, marker: Path) -> list[tuple[str, bytes, object]]:
    """(name, content, REJECT = ConfigError expected, or ANY)."""
    cases: list[tuple[str, bytes, object]] = []

    def add(kind: str, data, expect=REJECT) -> None:
        cases.append((f"y{len(cases):03d}_{kind}", data if isinstance(data, bytes) else data.encode(), expect))

    cmd = f"touch {marker}"
    tags = [f"!!python/object/apply:os.system ['{cmd}']", f"!!python/object/apply:subprocess.call [['touch', '{marker}']]",
            f"!!python/object/new:os.system ['{cmd}']", "!!python/name:os.system", "!!python/module:os",
            f"!!python/object/apply:builtins.exec ['open(\"{marker}\", \"w\")']", "!!python/tuple [1, 2]",
            f"!<tag:yaml.org,2002:python/object/apply:os.system> ['{cmd}']", "!!python/object:__main__.X {a: 1}",
            "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!timestamp 2001-12-14", "!custom {x: 1}"]
    for tag in tags:  # object-constructing tags at the top, as a value, as a key
        add("tag_top", f"{tag}\n")
        add("tag_value", set_value(base, "lr", tag))
        add("tag_key", f"training:\n  ? {tag}\n  : 1\n")
    for v in (".nan", ".inf", "-.inf", "1e999", "-1e999", "nan", "NaN", "1" + "0" * 400):
        for name in ("lr", "ema_decay", "max_length", "num_epochs", "warmup", "batch_size"):
            # a 400-digit integer is a (silly) int, but never a float
            expect = ANY if len(v) > 100 and name in ("max_length", "num_epochs", "batch_size") else REJECT
            add(f"number_{name}", set_value(base, name, v), expect)
    for v in ("-5", "0", "4.5", "true", "'12'", "[1]", "{a: 1}", "~", "1e300", "123456789012345678901234567890"):
        for name in ("num_epochs", "max_length"):
            add(f"int_{name}", set_value(base, name, v), ANY if v in ("1e300", "123456789012345678901234567890") else REJECT)
    for _ in range(15):
        add("random_bytes", rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes())
    for _ in range(15):
        b = base.encode()
        add("truncated", b[: int(rng.integers(1, len(b)))], ANY)
    for enc in ("utf-16", "utf-16-le", "utf-32", "cp500", "latin-1"):
        add(f"enc_{enc}", base.replace("outputs", "outpüts").encode(enc))
    add("nul_byte", base.replace("task: rna", "task: r\x00na"))
    add("list_aliases", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)))
    add("dict_aliases_2_25", "l0: &l0 {x: 1}\n" + "".join(
        f"l{i + 1}: &l{i + 1} {{a: *l{i}, b: *l{i}}}\n" for i in range(25)) + "training: *l25\n")
    add("deep_nesting", "a: " + "[" * 1100 + "]" * 1100 + "\n")
    add("deep_mapping", "training: " + "{a: " * 1100 + "1" + "}" * 1100 + "\n")
    add("huge_key", "x" * 100_000 + ": 1\n")
    add("huge_string", "logging:\n  run_name: " + "x" * 100_000 + "\n", ANY)
    add("list_top", "- a\n- b\n")
    add("scalar_top", "42\n")
    add("int_key", "1: 2\n")
    add("null_key", "~: 2\n")
    add("section_scalar", "training: 5\n")
    add("merge_key", "base: &b {lr: 1}\ntraining:\n  optimizer:\n    <<: *b\n")
    add("duplicate_section", base + "\ntraining:\n  num_epochs: 1\n", ANY)
    add("fault_spec_shell", base + "\nhealth:\n  inject_faults: 'kill@1; rm -rf /'\n")
    add("tabs", base.replace("  ", "\t"))
    add("bom", "\ufeff" + base, ANY)
    return cases


def test_fuzzed_yaml_configs(tmp_path):
    marker = tmp_path / "pwned"
    cases = yaml_cases(np.random.default_rng(3), (ROOT / "configs" / "smoke.yaml").read_text(), marker)
    outcome = {"ConfigError": 0, "valid": 0}
    for name, data, expect in cases:
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(data)
        try:
            with deadline(30):
                cfg = load_config(path, env={})
        except ConfigError as e:
            assert one_line(str(e)), f"{name}: {e!r}"
            outcome["ConfigError"] += 1
            continue
        assert expect is not REJECT, f"{name}: accepted although it should be rejected"
        assert isinstance(cfg, Config)
        outcome["valid"] += 1
    assert not marker.exists(), "a YAML tag executed code"
    COUNTS["yaml configs"] = len(cases)
    print(f"{len(cases)} fuzzed YAML configs: {outcome}")
    assert len(cases) >= 100


def test_fuzz_case_count():
    """The brief: >= 200 generated broken inputs (counted by the tests above in this module)."""
    if len(COUNTS) < 4:
        pytest.skip(f"counts come from the other fuzz tests of this module (ran: {sorted(COUNTS)})")
    print(COUNTS, sum(COUNTS.values()))
    assert sum(COUNTS.values()) >= 200


# --------------------------------------------------------------------------- one real run
@pytest.mark.slow
def test_training_survives_a_fuzzed_directory(bases, runs, helpers, tmp_path):
    """train_full.py over a directory of good chains + 40 fuzzed files: exit 0, every skip in data_report.json."""
    d = helpers.write_helices(tmp_path / "data")
    cases = [c for c in structure_cases(np.random.default_rng(5), bases) if c[2] is REJECT][:40]
    for name, data, _ in cases:
        (d / name).write_bytes(data)
    out = tmp_path / "run"
    args = [a.replace(f"data.train_path={runs.data}", f"data.train_path={d}") for a in runs.args(epochs=1)]
    r = subprocess.run([sys.executable, str(ROOT / "train_full.py"), *args, "--output_dir", str(out),
                        f"data.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=helpers.ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text())
    sources = {i["source"] for i in report["train"]["skipped_items"]}
    assert {name for name, _, _ in cases} <= sources
    assert report["train"]["chains_used"] + report["val"]["chains_used"] == 14
    assert sum(report["train"]["skipped"].values()) == len(cases)
