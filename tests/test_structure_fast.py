"""diffold.structure fast paths give what the plain per-line / per-atom code gives (issue 20: CPU per file)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from diffold import structure
from diffold.structure import parse_structure, read_gemmi

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
GOOD = "ATOM      1  CA  GLY A   1      11.104   6.134  -6.504  1.00  0.00           C"


def _variants() -> list[bytes]:
    """PDB texts with a bad x/y/z field at the first/middle/last line, short lines, CRLF, no final newline."""
    hetatm = GOOD.replace("ATOM  ", "HETATM")
    lines = [b"HEADER    X", GOOD.encode(), hetatm.encode(), GOOD.encode(), b"TER", GOOD.encode()]
    out = []
    for at in range(len(lines)):
        for col, char in ((30, b"*"), (45, b"x"), (53, b"?"), (29, b"*"), (54, b"*"), (31, b"\r")):
            bad = list(lines)
            bad[at] = bad[at][:col] + char + bad[at][col + 1:]
            for sep in (b"\n", b"\r\n"):
                text = sep.join(bad)
                out += [text, text + sep, text[:-10], text + sep + b"ATOM   " + b"1" * 40]
    out += [b"", b"ATOM  ", GOOD.encode()[:54], GOOD.encode()[:53], GOOD.encode()[:54].replace(b"6", b"#"),
            b"\n" + GOOD.encode().replace(b"1", b"a") + b"\n", b"HETATM" + b"!" * 60, b"ATOM" + b"?" * 60]
    return out


def test_vectorised_xyz_check_matches_the_regex_scan():
    texts = _variants()
    answers = [structure._bad_xyz_line_scan(t) for t in texts]
    assert any(answers) and not all(answers)            # both outcomes, at several lines, are exercised
    assert len({a for a in answers if a}) >= 4
    assert [structure._bad_xyz_line(t) for t in texts] == answers


def _reference_chain(gchain, atoms: tuple[str, ...], kind: str, parents: dict):
    """The per-atom extraction the fast loop replaced: sequence, coords [L, A, 3], mask [L, A], numbers, B."""
    span = gchain.get_polymer()
    seq = "".join(structure.residue_letter(r.name, kind, parents) for r in span)
    coords, mask = np.zeros((len(span), len(atoms), 3)), np.zeros((len(span), len(atoms)), bool)
    bfac = []
    for i, (res, letter) in enumerate(zip(span, seq, strict=True)):
        first = None
        for j, spec in enumerate(atoms):
            for spelling in structure._spellings(spec, letter, kind):
                atom = res.find_atom(spelling, "*")
                if atom is not None and not (atom.occ == 0 and atom.pos.length() == 0):
                    coords[i, j], mask[i, j] = (atom.pos.x, atom.pos.y, atom.pos.z), True
                    first = atom if first is None else first
                    break
        bfac.append((first if first is not None else res[0]).b_iso)
    return seq, coords.astype(np.float32), mask, np.array([r.seqid.num for r in span]), np.float32(bfac)


@pytest.mark.parametrize("atoms", [None, {"rna": ("P", "C4'", "N1/N9"), "protein": ("N", "CA", "C", "CB")}])
def test_extractor_matches_the_per_atom_reference_on_every_shipped_file(atoms, tmp_path):
    placeholder = tmp_path / "placeholder.pdb"   # occupancy 0 at the origin = unobserved: must stay masked
    placeholder.write_text(GOOD + "\n" + GOOD.replace("   1 ", "   2 ").replace(
        "  11.104   6.134  -6.504  1.00", "   0.000   0.000   0.000  0.00") + "\n")
    files = sorted(EXAMPLES.rglob("*.gz")) + [placeholder]
    compared = 0
    for path in files:
        chains, _ = parse_structure(path, atoms=atoms)
        st = read_gemmi(path)
        parents = {m.res_id.name: m.parent_comp_id for m in st.mod_residues if m.parent_comp_id}
        by_name = {g.name: g for g in st[0]}
        for ch in chains:
            seq, coords, mask, nums, bfac = _reference_chain(by_name[ch.chain_name], ch.atoms, ch.kind, parents)
            assert ch.sequence == seq, path
            assert coords.tobytes() == ch.coords.tobytes() and (mask == ch.mask).all(), path
            assert (nums == ch.residue_numbers).all() and bfac.tobytes() == ch.b_factors.tobytes(), path
            compared += 1
    assert compared >= 90 and len(files) > 90
    assert not parse_structure(placeholder)[0][0].mask[1].any()


def test_gzipped_crlf_pdb_with_a_bad_field_is_still_caught(tmp_path):
    text = ("\r\n".join([GOOD] * 50 + [GOOD[:40] + "abc" + GOOD[43:]] + [GOOD] * 5) + "\r\n").encode()
    path = tmp_path / "bad.pdb.gz"
    path.write_bytes(gzip.compress(text))
    with pytest.raises(structure.StructureError, match="line 51: the x/y/z columns are not numbers"):
        read_gemmi(path)
