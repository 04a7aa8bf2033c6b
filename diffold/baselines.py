"""Trivial structures every model must beat: an ideal helix and a random walk of the right geometry.

Both need no training and know only the chain's length (and its numbering gaps), so a model
that scores below them on held-out chains has learned nothing about folds yet. Geometry per
task (textbook values, checked in tests/test_baselines.py):
- RNA, C4': right-handed A-form, rise 2.8 A and twist 32.7 deg per nucleotide (11 per turn), C4'
  radius 9.4 A, which reproduces the native C4'(i)-C4'(i+1) 6.0 A and C4'(i)-C4'(i+2) 11.6 A.
- protein, CA: right-handed alpha-helix, rise 1.5 A and twist 100 deg per residue (3.6 per turn),
  CA radius 2.3 A: CA-CA 3.8 A, pitch 5.4 A.
- random walk: fixed step (task.bond_length: 6.0 / 3.8 A) and fixed bend angle between
  consecutive steps (task.bend_angle: the median over data/examples, 143 / 99 deg), dihedral
  uniform at random; seeded by the chain id, so every run scores the same walk.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

BASELINES = ("helix", "random_walk")
RANDOM_WALK_DRAWS = 5  # a walk's score varies a lot from draw to draw: its baseline is the mean of 5


@dataclass(frozen=True)
class Helix:
    """Points on a helix about z: radius (A), rise (A) and twist (deg) per residue, handedness."""

    radius: float
    rise: float
    twist: float
    right_handed: bool = True

    def points(self, positions: np.ndarray) -> np.ndarray:
        """[L, 3] points at (gap-aware) residue positions [L]."""
        t = np.asarray(positions, dtype=np.float64)
        angle = np.radians(self.twist) * t * (1 if self.right_handed else -1)
        return np.stack([self.radius * np.cos(angle), self.radius * np.sin(angle), self.rise * t], axis=-1)


HELICES = {
    "rna": Helix(radius=9.4, rise=2.8, twist=360.0 / 11),     # A-form, C4'
    "protein": Helix(radius=2.3, rise=1.5, twist=100.0),      # alpha-helix, CA
}


def positions(residue_index: np.ndarray) -> np.ndarray:
    """Positions along the chain [L] from residue numbering: gaps count as missing residues."""
    r = np.asarray(residue_index, dtype=np.int64)
    return r - r[0] if len(r) else r


def chain_seed(chain_id: str, draw: int = 0) -> int:
    """Stable seed from the chain id (crc32, not hash(): Python salts str hashes per process)."""
    return zlib.crc32(f"{chain_id}#{draw}".encode())


def random_walk(n: int, step: float, bend_angle: float, seed: int) -> np.ndarray:
    """[n, 3] chain with |x_{i+1} - x_i| = step, angle(x_{i-1}, x_i, x_{i+1}) = bend_angle (deg)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((max(n, 0), 3))
    if n < 2:
        return out
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    turn = math.pi - math.radians(bend_angle)  # angle between consecutive step vectors
    for i in range(1, n):
        if i > 1:
            # rotate the direction by `turn` about a random axis perpendicular to it (uniform dihedral)
            perp = np.cross(direction, rng.normal(size=3))
            perp /= np.linalg.norm(perp)
            direction = math.cos(turn) * direction + math.sin(turn) * perp
        out[i] = out[i - 1] + step * direction
    return out


def baseline_structures(task, chain_id: str, residue_index: np.ndarray) -> dict[str, list[np.ndarray]]:
    """{baseline name: [structure [L, 3], ...]} for one chain (RANDOM_WALK_DRAWS walks)."""
    pos = positions(residue_index)
    helix = HELICES[task.name].points(pos)
    walks = []
    for k in range(RANDOM_WALK_DRAWS):
        full = random_walk(int(pos[-1]) + 1 if len(pos) else 0, task.bond_length, task.bend_angle, chain_seed(chain_id, k))
        walks.append(full[pos])
    return {"helix": [helix], "random_walk": walks}
