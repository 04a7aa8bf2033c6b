"""Broken structure files, manifest rows, manifests and feature files: never a crash, never silent."""
from __future__ import annotations

import gzip
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import make_cfg, make_chain, random_seq, write, write_csv

from diffold.data import DataError, build_datasets
from diffold.sources import NO_STRUCTURE


def atom_line(i: int, name: str, res: str, chain: str, num: int, xyz, het: bool = False) -> str:
    rec = "HETATM" if het else "ATOM  "
    name = f" {name:<3}" if len(name) < 4 else name
    return f"{rec}{i:5d} {name} {res:>3} {chain}{num:4d}    {xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00 20.00           C"


def pdb_text(n: int, res=lambda k: "GAUC"[k % 4], atoms=("C4'", "P"), xyz=None, chain="A", het=False) -> str:
    """PDB text of n residues on a helix; `atoms` may be a function of the residue index."""
    lines = []
    for k in range(n):
        p = xyz(k) if xyz else (9 * np.cos(0.6 * k), 9 * np.sin(0.6 * k), 2.8 * k)
        for j, a in enumerate(atoms(k) if callable(atoms) else atoms):
            lines.append(atom_line(len(lines) + 1, a, res(k), chain, k + 1, (p[0] + j, p[1], p[2]), het))
    return "\n".join(lines) + "\nTER\n"


GOOD = pdb_text(30)
RNG = np.random.default_rng(0)
# file name -> (content, words of the expected reason); every entry is a distinct way a structure file breaks
BROKEN_FILES: dict[str, tuple[bytes | str | None, str]] = {
    "empty.pdb": ("", "empty file"),
    "blank.pdb": ("  \n\n   \n", "empty file"),
    "binary.pdb": (RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes(), "binary content"),
    "latin1.cif": (("data_x caf\xe9\xff\xfe " * 40).encode("latin-1"), "binary content"),
    "nul_inside.pdb": (GOOD[:500] + "\x00" * 50 + GOOD[500:], "binary content"),
    "truncated.pdb": (GOOD[: GOOD.index("\n", 900) + 40], "truncated"),
    "truncated.pdb.gz": (gzip.compress(GOOD.encode())[:200], "gzip"),
    "empty_inside.cif.gz": (gzip.compress(b""), "empty file"),
    "garbage_inside.pdb.gz": (gzip.compress(RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
                              "binary content"),
    "water_only.pdb": (pdb_text(5, res=lambda k: "HOH", atoms=("O",), het=True), "no polymer chain"),
    "header_only.pdb": ("HEADER    NOTHING HERE\nREMARK   1 no coordinates\nEND\n", "no chains"),
    "poem.pdb": ("Roses are red,\nviolets are blue,\n", "no chains"),
    "error_page.ent": ("<html><body><h1>404 Not Found</h1></body></html>\n", "no chains"),
    "bad_loop.cif": ("data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1 2\n'unterminated\n", "unparsable"),
    "no_atom_site.cif": ("data_x\n_cell.length_a 10.0\n", "no chains"),
    "nan_coords.pdb": (pdb_text(30, xyz=lambda k: (float("nan"), 0.0, 2.8 * k)), "non-finite coordinates"),
    "absurd_coords.cif": (None, "absurd coordinates"),  # written below with write_structure
    "one_point.pdb": (pdb_text(30, xyz=lambda k: (1.0, 1.0, 1.0)), "degenerate coordinates"),
    "dna.pdb": (pdb_text(30, res=lambda k: ["DA", "DC", "DG", "DT"][k % 4]), "DNA"),
    "no_c4.pdb": (pdb_text(30, atoms=("P", "C1'")), "none of the atoms"),
    "too_short.pdb": (pdb_text(5), "too short"),
    "sparse.pdb": (pdb_text(30, atoms=lambda k: ("C4'", "P") if k % 5 == 0 else ("P",)), "too few observed residues"),
    "protein.pdb": (pdb_text(30, res=lambda k: "ALA", atoms=("N", "CA", "C", "O")), "molecule is protein, task is rna"),
    "unknown_polymer.pdb": (pdb_text(30, res=lambda k: "XYZ", atoms=("C1", "C2")), "not RNA or protein"),
    "notes.txt": ("this is not a structure\n", "not a structure file"),
    "dangling.pdb": (None, "file not found"),  # a broken symlink
    "zz_copy/good0.pdb": (None, "duplicate id"),  # same name (-> same id) as a good one, found later
    "a_folder.pdb": (None, "not a file"),  # a directory with a structure-file name
}
N_GOOD_FILES = 3


def make_bad_dir(root: Path) -> Path:
    d = root / "bad"
    (d / "zz_copy").mkdir(parents=True)
    for i in range(N_GOOD_FILES):
        write(d / f"good{i}.pdb", make_chain(random_seq(30 + i, seed=i), seed=i))
    (d / "zz_copy" / "good0.pdb").write_bytes((d / "good0.pdb").read_bytes())
    (d / "a_folder.pdb").mkdir()
    os.symlink(d / "missing_target.pdb", d / "dangling.pdb")
    huge = make_chain(random_seq(30, seed=7))
    huge.coords[3, 0] = [1e6, 0.0, 0.0]
    write(d / "absurd_coords.cif", huge)
    mixed = pdb_text(30) + pdb_text(30, chain="B", xyz=lambda k: (float("inf"), 0.0, 0.0))
    (d / "mixed_good_and_nan.pdb").write_text(mixed)  # chain A used, chain B skipped
    for name, (content, _) in BROKEN_FILES.items():
        if content is not None:
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def category(reason: str) -> str:
    return reason.split(": ", 1)[0]


def test_broken_structure_files(tmp_path):
    d = make_bad_dir(tmp_path)
    val = write(tmp_path / "val.pdb", make_chain(random_seq(40, seed=50)))
    tr, va, rep = build_datasets(make_cfg(tmp_path, f"{d}/**/*", val))  # recursive glob: sees notes.txt too
    assert sorted(tr.ids) == ["good0_A", "good1_A", "good2_A", "mixed_good_and_nan_A"]
    by_source: dict[str, list[dict]] = {}
    for item in rep.train.skipped_items:
        by_source.setdefault(Path(item["source"]).relative_to(d).as_posix(), []).append(item)
    for name, (_, want) in BROKEN_FILES.items():
        got = [i["reason"] for i in by_source.get(name, [])]
        assert len(got) == 1 and want in got[0], f"{name}: {got}"  # one item, with the right reason
    assert [category(i["reason"]) for i in by_source["mixed_good_and_nan.pdb"]] == ["non-finite coordinates"]
    assert by_source["mixed_good_and_nan.pdb"][0]["chain"] == "B"
    assert sum(rep.train.skipped.values()) == len(BROKEN_FILES) + 1
    assert rep.train.skipped["empty file"] == 3 and rep.train.skipped["no chains"] == 4  # counted per category
    assert all(i["reason"] and "\n" not in i["reason"] for i in rep.train.skipped_items)
    for i in rep.train.skipped_items:  # 'category: detail', the category said once ("no chains: no chains (...)")
        head, _, detail = i["reason"].partition(": ")
        assert not detail.startswith(head) and detail.count(head) == 0, i["reason"]


def test_directory_named_like_a_structure_is_reported(tmp_path):
    d = tmp_path / "in"
    (d / "x.pdb").mkdir(parents=True)
    write(d / "x.pdb" / "inner.pdb", make_chain(random_seq(30, seed=1), seed=1))  # read like any folder's files
    write(d / "y.pdb", make_chain(random_seq(32, seed=2), seed=2))
    tr, _, rep = build_datasets(make_cfg(tmp_path, d, write(tmp_path / "v.pdb", make_chain(random_seq(40, seed=3)))))
    assert sorted(tr.ids) == ["inner_A", "y_A"]
    assert [(i["source"], category(i["reason"])) for i in rep.to_dict()["train"]["skipped_items"]] == [("x.pdb", "not a file")]


def test_empty_directory_is_one_clear_error_with_a_report(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        build_datasets(make_cfg(tmp_path, tmp_path / "empty"))
    assert str(info.value) == (f"{tmp_path / 'empty'}: no structure files found (.pdb .cif .mmcif .ent, optionally .gz); "
                               "check data.train_path / data.val_path")
    assert info.value.report.to_dict()["train"]["files_seen"] == 0  # the caller can write data_report.json


def test_broken_manifest_rows(tmp_path):
    d = make_bad_dir(tmp_path)
    seq0 = random_seq(30, seed=0)
    (d / "folder.pdb").mkdir()
    rows = [  # (row, expected category or None for a used row)
        ({"id": "ok", "structure_path": "bad/good1.pdb", "sequence": random_seq(31, seed=1)}, None),
        ({"id": "ok_weighted", "structure_path": "bad/good2.pdb", "weight": "0.5"}, None),
        ({"id": "missing_file", "structure_path": "bad/nope.pdb"}, "file not found"),
        ({"id": "seq_only", "sequence": "ACGUACGUACGU"}, NO_STRUCTURE),
        ({"id": "nothing"}, "no sequence and no structure_path"),
        ({"id": "ok", "structure_path": "bad/good0.pdb"}, "duplicate id"),
        ({"id": "", "structure_path": "bad/good0.pdb"}, "missing id"),
        ({"id": "w_text", "structure_path": "bad/good0.pdb", "weight": "heavy"}, "bad weight"),
        ({"id": "w_neg", "structure_path": "bad/good0.pdb", "weight": "-1"}, "bad weight"),
        ({"id": "w_nan", "structure_path": "bad/good0.pdb", "weight": "nan"}, "bad weight"),
        ({"id": "w_inf", "structure_path": "bad/good0.pdb", "weight": "inf"}, "bad weight"),
        ({"id": "w_zero", "structure_path": "bad/good0.pdb", "weight": "0"}, "bad weight"),
        ({"id": "mismatch", "structure_path": "bad/good0.pdb", "sequence": "A" + seq0[1:]}, "sequence mismatch"),
        ({"id": "prefix", "structure_path": "bad/good0.pdb", "sequence": seq0[:-1]}, "sequence mismatch"),
        ({"id": "no_chain", "structure_path": "bad/good0.pdb", "chain": "Z"}, "chain not found"),
        ({"id": "prot_row", "structure_path": "bad/good0.pdb", "molecule": "protein"}, "molecule is protein, task is rna"),
        ({"id": "dna_row", "structure_path": "bad/good0.pdb", "molecule": "DNA"}, "molecule is dna, task is rna"),
        ({"id": "bad_seq", "structure_path": "bad/good0.pdb", "sequence": "ACG1U"}, "bad sequence"),
        ({"id": "a_dir", "structure_path": "bad/folder.pdb"}, "not a file"),
        ({"id": "empty_file", "structure_path": "bad/empty.pdb"}, "empty file"),
        ({"id": "nan_chain", "structure_path": "bad/mixed_good_and_nan.pdb", "chain": "B"}, "non-finite coordinates"),
        ({"id": "train_id", "structure_path": "t.pdb"}, "id also in the train set"),
    ]
    write(tmp_path / "t.pdb", make_chain(random_seq(40, seed=60)))
    text = write_csv(tmp_path / "val.csv", [r for r, _ in rows]).read_text()
    text += "extra,bad/good0.pdb,,,,,,,surplus,fields\nshort_row\n"  # more fields than the header; an id alone
    (tmp_path / "val.csv").write_text(text)
    train = write_csv(tmp_path / "train.csv", [{"id": "train_id", "structure_path": "t.pdb"}])
    tr, va, rep = build_datasets(make_cfg(tmp_path, train, tmp_path / "val.csv"))
    assert va.ids == ["ok", "ok_weighted"] and va.weights == [1.0, 0.5]
    want = Counter(w for _, w in rows if w) + Counter(["malformed row", "no sequence and no structure_path"])
    assert rep.val.skipped == want
    assert len(rep.val.skipped_items) == sum(want.values())
    lines = [i["source"] for i in rep.val.skipped_items if category(i["reason"]) == "bad weight"]
    assert lines == ["val.csv:9", "val.csv:10", "val.csv:11", "val.csv:12", "val.csv:13"]  # row numbers point at rows


@pytest.mark.parametrize("content,match", [
    ("name,path\nx,y.pdb\n", "needs columns 'id' and 'sequence' and/or 'structure_path'"),
    ("id,chain\nx,A\n", "needs columns 'id' and 'sequence' and/or 'structure_path'"),
    ("", "no header"),
    (b"\xff\xfe\x00\x01binary\x00", "cannot read the manifest as UTF-8"),
    ("id,structure_path\n", "no usable rna chain .top skip reasons: nothing was found"),
])
def test_broken_manifests_are_one_clear_error(tmp_path, content, match):
    path = tmp_path / "m.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match) as info:
        build_datasets(make_cfg(tmp_path, path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_broken_feature_files(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    lengths = [30, 31, 32, 33, 34, 35]
    for i, n in enumerate(lengths):
        write(d / f"c{i}.pdb", make_chain(random_seq(n, seed=i), seed=i))
    write(tmp_path / "v.pdb", make_chain(random_seq(40, seed=9)))
    f = tmp_path / "feats"
    f.mkdir()
    torch.save(torch.randn(30, 4), f / "c0_A.pt")                        # good
    torch.save(torch.randn(99, 4), f / "c1_A.pt")                        # wrong length
    torch.save({"x": torch.randn(32, 4)}, f / "c2_A.pt")                 # not a tensor
    (f / "c3_A.pt").write_bytes(b"not a torch file at all")              # corrupt
    torch.save(torch.full((34, 4), float("nan")), f / "c4_A.pt")         # non-finite
    torch.save(torch.randn(40, 4), f / "v_A.pt")                         # c5 has none
    tr, va, rep = build_datasets(make_cfg(tmp_path, d, tmp_path / "v.pdb", feature_dir=f))
    assert tr.ids == ["c0_A"] and va.ids == ["v_A"]
    assert rep.train.skipped == {"bad feature file": 4, "no feature file": 1}
    reasons = {Path(i["reason"].split(": ", 1)[1].split(" (")[0]).name: i["reason"] for i in rep.train.skipped_items}
    assert reasons["c1_A.pt"].endswith("(need a float [L=31, F] tensor, got (99, 4))")
    assert reasons["c2_A.pt"].endswith("(need a float [L=32, F] tensor, got dict)")
    assert reasons["c3_A.pt"].endswith("(UnpicklingError)") and reasons["c4_A.pt"].endswith("(non-finite values)")
    assert reasons["c5_A.pt"].startswith("no feature file: ")


# --------------------------------------------------------------------------- physically absurd chains (real files)
EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


def _edited_shipped(out: Path, rel: str, edit) -> Path:
    """A shipped real entry with edit(index, residue) applied to every residue of its first chain."""
    import gemmi

    st = gemmi.read_structure(str(EXAMPLES / rel))
    for i, res in enumerate(st[0][0]):
        edit(i, res)
    st.setup_entities()
    st.make_mmcif_document().write_file(str(out))  # mmCIF: -9999.0 does not fit PDB's 8.3f columns
    return out


def _shift(at: float | None = None, by=(0.0, 0.0, 0.0), start: int = 0, scale: float | None = None, centre=None):
    def edit(i: int, res) -> None:
        import gemmi

        for atom in res:
            p = atom.pos
            if at is not None and i in range(10, 13):           # a placeholder for three residues
                atom.pos = gemmi.Position(at, at, at)
            elif scale is not None:                              # everything collapsed onto the centre
                atom.pos = gemmi.Position(*(c + (v - c) * scale for v, c in zip((p.x, p.y, p.z), centre, strict=True)))
            elif i >= start:                                     # a segment moved away
                atom.pos = gemmi.Position(p.x + by[0], p.y + by[1], p.z + by[2])
    return edit


def _centre_and_radius(rel: str) -> tuple[tuple, float]:
    """Centroid of the first chain's atoms and the largest distance of one of them from it."""
    import gemmi

    st = gemmi.read_structure(str(EXAMPLES / rel))
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[0][0] for a in r])   # [N, 3] every atom
    c = xyz.mean(0)
    return tuple(c), float(np.linalg.norm(xyz - c, axis=1).max())


def test_absurd_real_chains_are_skipped_with_counted_reasons(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    centre, radius = _centre_and_radius("rna/1ehz.pdb.gz")
    cases = {  # file -> expected reason category
        "plus9999.cif": (_shift(at=9999.999), "absurd coordinates"),
        "minus9999.cif": (_shift(at=-9999.0), "absurd coordinates"),
        "jump3000.cif": (_shift(by=(3000.0, 0.0, 0.0), start=40), "absurd geometry"),
        "collapsed.cif": (_shift(scale=0.004 / radius, centre=centre), "degenerate coordinates"),
    }
    for name, (edit, _) in cases.items():
        _edited_shipped(d / name, "rna/1ehz.pdb.gz", edit)
    (d / "intact.pdb.gz").write_bytes((EXAMPLES / "rna" / "6tna.pdb.gz").read_bytes())
    val = tmp_path / "val.pdb.gz"
    val.write_bytes((EXAMPLES / "rna" / "1evv.pdb.gz").read_bytes())
    tr, va, rep = build_datasets(make_cfg(tmp_path, d, val))
    assert tr.ids == ["intact_A"] and va.ids == ["val_A"]
    got = {i["source"]: i["reason"] for i in rep.to_dict()["train"]["skipped_items"]}
    for name, (_, want) in cases.items():
        assert category(got[name]) == want, got[name]
    assert "3000" in got["jump3000.cif"] and "residues 40 and 41" in got["jump3000.cif"]  # 1ehz numbers from 1
    assert rep.to_dict()["train"]["skipped"] == {"absurd coordinates": 2, "absurd geometry": 1, "degenerate coordinates": 1}
    # the thresholds are config keys: a looser jump limit keeps the moved chain (its other checks pass)
    tr2, _, rep2 = build_datasets(make_cfg(tmp_path / "loose", d, val, max_consecutive_distance=4000))
    assert "jump3000_A" in tr2.ids and rep2.train.skipped["absurd geometry"] == 0


def test_real_chain_breaks_still_load(tmp_path):
    """4xw7 skips residues 46-56 in its numbering (kept, residue_index shows the gap); 4qlm is renumbered
    1-108 over a physical break (25.5 A between C4' atoms of 'consecutive' residues, kept)."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("4xw7", "4qlm", "5lj3"):
        (d / f"{name}.pdb.gz").write_bytes((EXAMPLES / "rna" / f"{name}.pdb.gz").read_bytes())
    val = tmp_path / "val.pdb.gz"
    val.write_bytes((EXAMPLES / "rna" / "1evv.pdb.gz").read_bytes())
    tr, _, rep = build_datasets(make_cfg(tmp_path, d, val, max_length=512))
    assert sorted(tr.ids) == ["4qlm_A", "4xw7_A", "5lj3_E", "5lj3_I"] and not rep.train.skipped
    ri = tr[tr.ids.index("4xw7_A")]["residue_index"]
    assert len(ri) == 60 and int(ri[-1]) == 59 + 11 and int((ri[1:] - ri[:-1]).max()) == 12  # 45 -> 57
