"""diffold.structure: parsing, atom selection, skips, broken inputs, write/parse round trips."""
from __future__ import annotations

import gzip
from pathlib import Path

import gemmi
import numpy as np
import pytest

from diffold import structure
from diffold.structure import StructureError, chain_from_coords, parse_structure, write_structure

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


def _atom(serial: int, name: str, res: str, chain: str, num: int, xyz, het: bool = False, elem: str = "") -> str:
    """One PDB ATOM/HETATM line (columns per the PDB v3.3 format)."""
    rec = "HETATM" if het else "ATOM  "
    padded = name if len(name) == 4 else f" {name:<3}"
    el = elem or name.lstrip("0123456789")[0]
    return (f"{rec}{serial:5d} {padded} {res:>3} {chain}{num:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00 20.00          {el:>2}")


def _pdb(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines + ["END"]) + "\n")
    return path


def _protein_lines(chain: str = "A", skip_o_of: int = 2, mse_at: int = 3) -> list[str]:
    """4 residues GLY ALA MSE LYS along x; residue `skip_o_of` lacks its O; MSE is a HETATM."""
    lines, serial = [], 1
    for i, res in enumerate(["GLY", "ALA", "MSE", "LYS"], start=1):
        for k, atom in enumerate(["N", "CA", "C", "O"]):
            if atom == "O" and i == skip_o_of:
                continue
            lines.append(_atom(serial, atom, res, chain, i, (3.8 * i + 0.5 * k, 1.0 * k, 0.0), het=(i == mse_at)))
            serial += 1
    return lines


def _rna_lines(chain: str = "B", names=("G", "C", "PSU", "A")) -> list[str]:
    """Nucleotides with P, C4', N1, N9 (purines) so N1/N9 selection is checkable; PSU is a HETATM."""
    lines, serial = [], 1
    for i, res in enumerate(names, start=1):
        purine = res in ("A", "G")
        atoms = ["P", "C4'", "O2'", "N1"] + (["N9"] if purine else [])
        for k, atom in enumerate(atoms):
            lines.append(_atom(serial, atom, res, chain, 10 + i, (6.0 * i, 2.0 * k, 1.0 + k), het=(res == "PSU")))
            serial += 1
    return lines


# ------------------------------------------------------------------ parsing real example files
def test_parse_real_rna_and_modified_residues_via_modres():
    chains, skipped = parse_structure(EXAMPLES / "rna" / "1ehz.pdb.gz")
    assert skipped == []
    (ch,) = chains
    assert ch.id == "1ehz_A" and ch.kind == "rna" and ch.chain_name == "A" and len(ch.sequence) == 76
    # YYG (wybutosine, unknown to gemmi's table) maps to G through MODRES; 5MC -> C; PSU -> U
    assert ch.sequence[36] == "G" and ch.sequence[39] == "C" and ch.sequence[38] == "U"
    assert "N" not in ch.sequence
    assert ch.coords.shape == (76, 1, 3) and ch.coords.dtype == np.float32 and ch.mask.all()
    assert ch.residue_numbers[0] == 1 and ch.residue_numbers[-1] == 76
    # consecutive C4' atoms are ~6 A apart in real RNA
    d = np.linalg.norm(np.diff(ch.coords[:, 0], axis=0), axis=-1)
    assert 4.0 < np.median(d) < 7.5


def test_old_style_star_atom_names(tmp_path):
    """404D spells sugar atoms C4*; the C4' request still finds them."""
    (ch,), _ = parse_structure(EXAMPLES / "rna" / "404d.pdb.gz")
    assert ch.mask.all() and ch.sequence == "GAAGAGAAGC"


def test_n1_n9_alternatives_and_missing_mask(tmp_path):
    path = _pdb(tmp_path, "rna.pdb", _rna_lines())
    (ch,), _ = parse_structure(path, atoms={"rna": ("P", "C4'", "N1/N9")})
    assert ch.sequence == "GCUA" and ch.atoms == ("P", "C4'", "N1/N9")
    st = gemmi.read_structure(str(path))
    for i, res in enumerate(st[0]["B"]):
        want = "N9" if res.name in ("A", "G") else "N1"   # purines N9, pyrimidines (incl. PSU) N1
        pos = res.find_atom(want, "*").pos
        np.testing.assert_allclose(ch.coords[i, 2], [pos.x, pos.y, pos.z], atol=1e-3)
    # a purine without N9 falls back to N1 ("first alternative present"); an atom absent -> masked
    lines = [ln for ln in _rna_lines(names=("G", "C")) if " N9 " not in ln]
    (ch,), _ = parse_structure(_pdb(tmp_path, "nonine.pdb", lines), atoms={"rna": ("N1/N9", "C1'")})
    assert ch.mask[:, 0].all() and not ch.mask[:, 1].any() and (ch.coords[:, 1] == 0).all()


def test_backbone_set_with_missing_atom_and_mse(tmp_path):
    path = _pdb(tmp_path, "prot.pdb", _protein_lines())
    (ch,), skipped = parse_structure(path, atoms={"protein": ("N", "CA", "C", "O")})
    assert skipped == []
    assert ch.kind == "protein" and ch.sequence == "GAMK"   # MSE (selenomethionine) -> M
    assert ch.coords.shape == (4, 4, 3)
    expected = np.ones((4, 4), bool)
    expected[1, 3] = False
    np.testing.assert_array_equal(ch.mask, expected)
    assert (ch.coords[1, 3] == 0).all()
    np.testing.assert_allclose(ch.coords[2, 1], [3.8 * 3 + 0.5, 1.0, 0.0], atol=1e-3)


def test_unknown_residue_letters(tmp_path):
    lines = _protein_lines()
    lines = [ln.replace("LYS", "XYZ") for ln in lines]
    (ch,), _ = parse_structure(_pdb(tmp_path, "unk.pdb", lines))
    assert ch.sequence == "GAMX"
    assert structure.residue_letter("PSU", "rna") == "U"
    assert structure.residue_letter("ZZZ", "rna") == "N"
    assert structure.residue_letter("ZZZ", "rna", {"ZZZ": "G"}) == "G"


def test_dna_chain_and_ligand_chain_skipped_with_reason(tmp_path):
    lines = _protein_lines("A")
    for i, res in enumerate(["DA", "DC", "DG", "DT"], start=1):
        for k, atom in enumerate(["P", "C4'", "N1"]):
            lines.append(_atom(100 + 3 * i + k, atom, res, "D", i, (6.0 * i, 10.0 + k, 0.0)))
    lines.append("TER")
    lines.append(_atom(200, "O", "HOH", "W", 1, (0, 0, 30.0), het=True))
    chains, skipped = parse_structure(_pdb(tmp_path, "mix.pdb", lines))
    assert [c.id for c in chains] == ["mix_A"]
    reasons = {s.chain: s.reason for s in skipped}
    assert reasons["D"] == "DNA chain"
    assert "no polymer" in reasons["W"]
    assert all(s.source.endswith("mix.pdb") for s in skipped)


def test_min_length_and_all_atoms_missing(tmp_path):
    path = _pdb(tmp_path, "p.pdb", _protein_lines())
    chains, skipped = parse_structure(path, min_length=5)
    assert chains == [] and "too short" in skipped[0].reason
    chains, skipped = parse_structure(path, atoms={"protein": ("CB",)})   # GLY..: no CB in this toy chain
    assert chains == [] and "none of the atoms CB" in skipped[0].reason


@pytest.mark.parametrize("value, reason", [("nan", "non-finite"), ("inf", "non-finite"), ("20000.0", "absurd")])
def test_bad_coordinates_skip_the_chain(tmp_path, value, reason):
    st = gemmi.read_structure(str(_pdb(tmp_path, "p.pdb", _protein_lines())))
    st.setup_entities()
    lines = st.make_mmcif_document().as_string().splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("ATOM") and " CA " in ln)
    parts = lines[i].split()
    parts[10] = value   # Cartn_x
    lines[i] = " ".join(parts)
    path = tmp_path / "bad.cif"
    path.write_text("\n".join(lines) + "\n")
    chains, skipped = parse_structure(path)
    assert chains == [] and reason in skipped[0].reason


# ------------------------------------------------------------------ broken inputs
def _broken_inputs(tmp_path: Path) -> dict[str, Path]:
    good = "\n".join(_protein_lines()) + "\n"
    files = {
        "empty": b"",
        "blank": b"\n\n  \n",
        "binary": bytes(range(256)) * 40,
        "gzip_garbage": b"\x1f\x8b\x08\x00" + b"\xff" * 64,
        "truncated_gzip": gzip.compress(good.encode())[:-30],
        "truncated_pdb": good[: good.index("MSE") + 25].encode(),
        "truncated_cif": None,
        "zero_chains_pdb": b"HEADER    NOTHING HERE\nREMARK   1 no coordinates\nEND\n",
        "zero_chains_cif": b"data_x\n_entry.id x\n",
        "text_garbage": b"hello, this is not a structure\n",
    }
    st = gemmi.read_structure(str(_pdb(tmp_path, "g.pdb", _protein_lines())))
    st.setup_entities()
    cif = st.make_mmcif_document().as_string()
    files["truncated_cif"] = cif[: cif.index("ATOM", cif.index("ATOM") + 200) + 20].encode()
    out = {}
    for name, data in files.items():
        ext = ".cif" if "cif" in name else (".pdb.gz" if "gzip" in name else ".pdb")
        out[name] = tmp_path / f"{name}{ext}"
        out[name].write_bytes(data)
    out["missing"] = tmp_path / "does_not_exist.pdb"
    out["directory"] = tmp_path
    return out


EXPECTED = {
    "empty": "empty file", "blank": "empty file", "binary": "binary content", "gzip_garbage": "broken or truncated gzip",
    "truncated_gzip": "broken or truncated gzip", "truncated_pdb": "truncated", "truncated_cif": "unparsable",
    "zero_chains_pdb": "no chains", "zero_chains_cif": "no chains", "text_garbage": "no chains",
    "missing": "no such file", "directory": "no such file",
}


def test_broken_inputs_raise_structure_error_with_one_line_message(tmp_path):
    inputs = _broken_inputs(tmp_path)
    assert set(inputs) == set(EXPECTED)
    for name, path in inputs.items():
        with pytest.raises(StructureError) as info:
            parse_structure(path)
        msg = str(info.value)
        assert EXPECTED[name] in msg and "\n" not in msg and msg.startswith(str(path)), (name, msg)


def test_oversized_file_rejected_before_parsing(tmp_path, monkeypatch):
    path = _pdb(tmp_path, "p.pdb", _protein_lines())
    monkeypatch.setattr(structure, "MAX_FILE_BYTES", 100)
    with pytest.raises(StructureError, match="over the"):
        parse_structure(path)


def test_gzip_detected_by_magic_not_extension(tmp_path):
    path = tmp_path / "actually_gzipped.pdb"
    path.write_bytes(gzip.compress(("\n".join(_protein_lines()) + "\n").encode()))
    (ch,), _ = parse_structure(path)
    assert ch.id == "actually_gzipped_A" and ch.sequence == "GAMK"


# ------------------------------------------------------------------ writing
@pytest.mark.parametrize("ext", [".pdb", ".cif", ".pdb.gz", ".cif.gz"])
def test_round_trip_real_chains(tmp_path, ext):
    rna_atoms = {"rna": ("P", "C4'", "N1/N9")}
    (rna,), _ = parse_structure(EXAMPLES / "rna" / "1ehz.pdb.gz", atoms=rna_atoms)
    (prot,), _ = parse_structure(EXAMPLES / "protein" / "1ubi.pdb.gz", atoms={"protein": ("N", "CA", "C", "O")})
    prot.mask[5, 3] = False                     # a missing atom must stay missing
    prot.coords[5, 3] = 0.0
    prot.b_factors = np.linspace(10, 95, len(prot.sequence)).astype(np.float32)   # pLDDT-like
    path = tmp_path / f"out{ext}"
    write_structure(path, [rna, prot])
    assert gemmi.read_structure(str(path))[0].count_atom_sites() == int(rna.mask.sum() + prot.mask.sum())
    back, skipped = parse_structure(path, atoms={**rna_atoms, "protein": ("N", "CA", "C", "O")})
    assert skipped == [] and [c.kind for c in back] == ["rna", "protein"]
    assert [c.chain_name for c in back] == ["A", "B"]   # both were "A": the clash is renamed
    for before, after in zip([rna, prot], back, strict=True):
        assert after.sequence == before.sequence
        np.testing.assert_array_equal(after.mask, before.mask)
        np.testing.assert_allclose(after.coords, before.coords, atol=1.1e-3)
        np.testing.assert_array_equal(after.residue_numbers, before.residue_numbers)
        np.testing.assert_allclose(after.b_factors, before.b_factors, atol=0.01)


def test_write_prediction_unknown_letters_and_name_clash(tmp_path):
    coords = np.cumsum(np.full((6, 3), 2.2), axis=0)                    # [L, 3]
    a = chain_from_coords("1abc_A_sample0", "rna", "ACGUNA", coords, ("C4'",), b_factors=np.full(6, 80.0))
    b = chain_from_coords("x", "protein", "MKXW", coords[:4], ("CA",), mask=[True, False, True, True])
    assert a.chain_name == "A" and b.chain_name == "A" and b.coords[1].sum() == 0
    path = tmp_path / "pred.pdb"
    write_structure(path, [a, b])
    back, _ = parse_structure(path)
    assert [c.sequence for c in back] == ["ACGUNA", "MKXW"]
    assert len({c.chain_name for c in back}) == 2                        # clash renamed
    np.testing.assert_array_equal(back[1].mask[:, 0], [True, False, True, True])
    assert [r.name for r in gemmi.read_structure(str(path))[0][1]] == ["MET", "LYS", "UNK", "TRP"]


def test_write_is_deterministic_and_handles_bad_coordinates(tmp_path, caplog):
    coords = np.arange(30, dtype=np.float32).reshape(10, 3)
    coords[3] = np.nan
    coords[4] = 5e4                                                      # does not fit %8.3f
    ch = chain_from_coords("p", "protein", "ACDEFGHIKL", coords, ("CA",))
    write_structure(tmp_path / "a.pdb.gz", [ch])
    write_structure(tmp_path / "b.pdb.gz", [ch])
    assert (tmp_path / "a.pdb.gz").read_bytes() == (tmp_path / "b.pdb.gz").read_bytes()
    assert "non-finite" in caplog.text
    (back,), _ = parse_structure(tmp_path / "a.pdb.gz")
    assert not back.mask[3, 0] and back.mask[4, 0] and np.abs(back.coords).max() < 1e4


def test_chain_from_coords_validates_shapes():
    with pytest.raises(ValueError, match="does not match"):
        chain_from_coords("x", "protein", "ACD", np.zeros((4, 3)), ("CA",))
    with pytest.raises(ValueError, match="kind"):
        chain_from_coords("x", "dna", "ACG", np.zeros((3, 3)), ("C4'",))
    with pytest.raises(ValueError, match=r"\.pdb"):
        write_structure("x.txt", [chain_from_coords("x", "protein", "A", np.zeros((1, 3)), ("CA",))])


def test_file_stem():
    assert structure.file_stem("a/1ehz.cif.gz") == "1ehz"
    assert structure.file_stem("pdb1ubi.ent") == "pdb1ubi"
    assert structure.file_stem("x.mmcif") == "x"
    assert structure.file_stem("3jbv_A.pdb") == "3jbv_A"


def _inflaters() -> list:
    import zlib
    out = [zlib]
    try:
        from isal import isal_zlib
        out.append(isal_zlib)
    except ImportError:  # optional dependency: only zlib is tested then
        pass
    return out


@pytest.mark.parametrize("inflate", _inflaters(), ids=lambda m: m.__name__)
def test_gzip_members_padding_truncation_and_bombs(tmp_path, monkeypatch, inflate):
    """Multi-member gzip (bgzip) is read whole; zero padding is fine; trailing garbage, a cut stream and an
    over-limit expansion are one-line errors: with zlib and with ISA-L (if installed) alike."""
    monkeypatch.setattr(structure, "_inflate", inflate)
    monkeypatch.setattr(structure, "_INFLATE_ERRORS", (__import__("zlib").error, inflate.error))
    text = gzip.decompress((EXAMPLES / "rna" / "1ehz.pdb.gz").read_bytes())
    cut = text.index(b"\nATOM", len(text) // 2) + 1
    (tmp_path / "multi.pdb.gz").write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]) + b"\0" * 64)
    chains, _ = parse_structure(tmp_path / "multi.pdb.gz")
    assert [len(c.sequence) for c in chains] == [76]
    for name, data, words in (("junk.pdb.gz", gzip.compress(text) + b"junk", "data after the end of the gzip"),
                              ("cut.pdb.gz", gzip.compress(text)[:-500], "broken or truncated gzip")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StructureError, match=words):
            parse_structure(tmp_path / name)
    monkeypatch.setattr(structure, "MAX_TEXT_BYTES", len(text) - 1)
    with pytest.raises(StructureError, match="too large: |too large .over"):
        parse_structure(tmp_path / "multi.pdb.gz")
