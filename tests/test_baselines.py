"""Baselines have textbook geometry: A-form / alpha-helix rise, radius, twist, handedness; random-walk step and angle."""
from pathlib import Path

import numpy as np
import pytest

from diffold.baselines import HELICES, RANDOM_WALK_DRAWS, baseline_structures, positions, random_walk
from diffold.structure import parse_structure
from diffold.tasks import get_task

DATA = Path(__file__).resolve().parents[1] / "data" / "examples"


def dihedral(p: np.ndarray) -> np.ndarray:
    """IUPAC dihedral (deg) of every 4 consecutive points [L, 3] -> [L-3]; positive = clockwise seen along b2."""
    b1, b2, b3 = p[1:-2] - p[:-3], p[2:-1] - p[1:-2], p[3:] - p[2:-1]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    y = (np.cross(n1, n2) * b2 / np.linalg.norm(b2, axis=1, keepdims=True)).sum(1)
    return np.degrees(np.arctan2(y, (n1 * n2).sum(1)))


def angle(p: np.ndarray) -> np.ndarray:
    """Angle (deg) at every middle point of 3 consecutive points [L, 3] -> [L-2]."""
    a, b = p[:-2] - p[1:-1], p[2:] - p[1:-1]
    return np.degrees(np.arccos((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def helix_geometry(p: np.ndarray) -> dict:
    """Rise, radius and twist of points on a helix about z (the baselines' axis)."""
    phi = np.unwrap(np.arctan2(p[:, 1], p[:, 0]))
    return {"rise": np.diff(p[:, 2]).mean(), "radius": np.hypot(p[:, 0], p[:, 1]).mean(),
            "twist": np.degrees(np.diff(phi)).mean()}


def native_points(file: str, atom: str, kind: str, residues: slice) -> np.ndarray:
    chain = parse_structure(DATA / file, atoms={kind: (atom,)})[0][0]
    assert chain.mask[residues, 0].all()
    return chain.coords[residues, 0].astype(np.float64)


def test_alpha_helix_has_textbook_geometry_and_native_handedness():
    p = baseline_structures(get_task("protein"), "x", np.arange(40))["helix"][0]
    g = helix_geometry(p)
    # Pauling: 1.5 A rise, 3.6 residues per turn (100 deg), CA radius 2.3 A, pitch 5.4 A
    assert g["rise"] == pytest.approx(1.5) and g["radius"] == pytest.approx(2.3) and g["twist"] == pytest.approx(100.0)
    assert 3.6 * g["rise"] == pytest.approx(5.4)
    step = np.linalg.norm(np.diff(p, axis=0), axis=1)
    assert np.allclose(step, 3.8, atol=0.05)                          # CA-CA 3.80 A
    assert np.allclose(np.linalg.norm(p[4:] - p[:-4], axis=1), 6.2, atol=0.15)  # CA(i)-CA(i+4) ~6.2 A
    assert np.allclose(angle(p), 91.0, atol=3.0)                     # CA virtual bond angle ~91 deg
    tors = dihedral(p)
    assert np.allclose(tors, 50.0, atol=5.0)                         # right-handed: CA pseudo-torsion +50 deg
    # the same sign and size as a real alpha-helix: ubiquitin residues 23-34 (1ubi)
    native = dihedral(native_points("protein/1ubi.pdb.gz", "CA", "protein", slice(22, 34)))
    assert np.median(native) == pytest.approx(np.median(tors), abs=8.0)
    mirror = p * np.array([1.0, 1.0, -1.0])
    assert np.allclose(dihedral(mirror), -tors)                       # a left-handed helix would be negative


def test_a_form_helix_has_textbook_geometry_and_native_handedness():
    p = baseline_structures(get_task("rna"), "x", np.arange(40))["helix"][0]
    g = helix_geometry(p)
    # A-RNA: 2.8 A rise, 11 nucleotides per turn (32.7 deg), pitch ~30.8 A, C4' radius 9.4 A
    assert g["rise"] == pytest.approx(2.8) and g["twist"] == pytest.approx(32.73, abs=0.01)
    assert 11 * g["rise"] == pytest.approx(30.8) and g["radius"] == pytest.approx(9.4)
    step = np.linalg.norm(np.diff(p, axis=0), axis=1)
    assert np.allclose(step, 6.0, atol=0.05)                          # native C4'-C4' median 6.1 A
    assert np.allclose(np.linalg.norm(p[2:] - p[:-2], axis=1), 11.6, atol=0.2)  # native C4'(i)-C4'(i+2) 11.6 A
    tors = dihedral(p[::2])  # C4'(i, i+2, i+4, i+6): adjacent C4' torsions of A-form are ~0 deg, too flat to tell
    assert np.allclose(tors, 34.5, atol=0.1)                          # right-handed: positive
    # both strands of the tRNA-Phe acceptor stem (1ehz nucleotides 1-7 and 66-72), real A-form RNA
    for strand in (slice(0, 7), slice(65, 72)):
        native = dihedral(native_points("rna/1ehz.pdb.gz", "C4'", "rna", strand)[::2])
        assert native[0] == pytest.approx(tors[0], abs=10.0)          # 35 and 27 deg
    assert np.allclose(dihedral((p * np.array([1.0, 1.0, -1.0]))[::2]), -tors)


@pytest.mark.parametrize("molecule", ["rna", "protein"])
def test_random_walk_has_the_right_step_and_bend_and_is_seeded(molecule):
    task = get_task(molecule)
    walks = baseline_structures(task, "1abc_A", np.arange(300))["random_walk"]
    assert len(walks) == RANDOM_WALK_DRAWS
    for w in walks:
        assert np.allclose(np.linalg.norm(np.diff(w, axis=0), axis=1), task.bond_length, atol=1e-9)
        assert np.allclose(angle(w), task.bend_angle, atol=1e-6)
    tors = np.radians(dihedral(walks[0]))
    assert abs(np.cos(tors).mean()) < 0.15 and abs(np.sin(tors).mean()) < 0.15  # dihedral uniform: no handedness
    again = baseline_structures(task, "1abc_A", np.arange(300))["random_walk"]
    assert all(np.array_equal(a, b) for a, b in zip(walks, again))            # deterministic per chain
    other = baseline_structures(task, "1abd_A", np.arange(300))["random_walk"]
    assert not np.allclose(walks[0], other[0])                                # different chains, different walks
    assert not np.allclose(walks[0], walks[1])                                # draws differ


def test_numbering_gaps_are_missing_residues():
    task = get_task("protein")
    index = np.array([5, 6, 7, 9, 10])  # residue 8 unobserved
    assert positions(index).tolist() == [0, 1, 2, 4, 5]
    s = baseline_structures(task, "g", index)
    full = HELICES["protein"].points(np.arange(6))
    assert np.allclose(s["helix"][0], full[[0, 1, 2, 4, 5]])
    walk = s["random_walk"][0]
    assert np.linalg.norm(walk[3] - walk[2]) > task.bond_length  # across the gap: two steps apart
    assert random_walk(1, 3.8, 99.0, 0).shape == (1, 3)
