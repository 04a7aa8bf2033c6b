"""Physically absurd chains: placeholder coordinates, impossible jumps between residues, collapse.

A chain that passes the parser can still be nonsense a model must not be trained on (it drives the
loss to 1e10): a PDB placeholder coordinate (9999.999 for a missing atom), a segment moved
thousands of Angstrom away, or every atom collapsed onto one point. Genuine chain breaks (gaps in
the residue numbering) are not nonsense: they are allowed proportionally longer jumps, and the
featurized residue_index keeps the gap so the model and the bond loss see the break.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GeometryLimits:
    """Thresholds from DataConfig (max_abs_coordinate, max_consecutive_distance, min_radius_of_gyration)."""

    max_abs_coordinate: float = 5000.0      # A; PDB placeholders are 9999.999, real structures < ~1500
    max_consecutive_distance: float = 50.0  # A per step of residue numbering (shipped real max: 25.5)
    min_radius_of_gyration: float = 1.0     # A; two real residues alone are >= 1.35 A from their centre

    @classmethod
    def from_config(cls, data_cfg) -> GeometryLimits:
        return cls(float(data_cfg.max_abs_coordinate), float(data_cfg.max_consecutive_distance),
                   float(data_cfg.min_radius_of_gyration))


def geometry_problem(coords: np.ndarray, mask: np.ndarray, numbers: np.ndarray, limits: GeometryLimits) -> str:
    """Why the chain's geometry is absurd ('' if it is not); coords [L, A, 3], mask [L, A], numbers [L]."""
    xyz = coords[mask]                                                  # [N, 3] present atoms
    if len(xyz) == 0:
        return ""
    worst = np.abs(xyz).max()
    if worst >= limits.max_abs_coordinate:
        return (f"absurd coordinates: |x| = {worst:.1f} A (>= data.max_abs_coordinate={limits.max_abs_coordinate:g}; "
                "PDB placeholders for missing atoms are 9999.999)")
    jump = _worst_jump(coords, mask, np.asarray(numbers, dtype=np.int64), limits.max_consecutive_distance)
    if jump:
        return jump
    if len(xyz) > 1:
        rg = float(np.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=1).mean()))
        if rg < limits.min_radius_of_gyration:
            return (f"degenerate coordinates: all atoms within {rg:.3f} A of their centre "
                    f"(radius of gyration < data.min_radius_of_gyration={limits.min_radius_of_gyration:g})")
    return ""


def _worst_jump(coords: np.ndarray, mask: np.ndarray, numbers: np.ndarray, limit: float) -> str:
    """The largest over-limit distance between the same atom of consecutive observed residues, as a reason.

    Residues numbered g apart (g - 1 missing) may be g * limit apart; insertion codes (step 0) and
    restarts count by their absolute step, at least 1.
    """
    worst, where = 0.0, None
    for j in range(mask.shape[1]):
        present = np.flatnonzero(mask[:, j])                            # [n] residues with atom j
        if len(present) < 2:
            continue
        d = np.linalg.norm(np.diff(coords[present, j], axis=0), axis=1)  # [n - 1]
        steps = np.maximum(np.abs(np.diff(numbers[present])), 1)        # [n - 1]
        excess = d / (limit * steps)
        k = int(np.argmax(excess))
        if excess[k] > 1.0 and excess[k] > worst:
            worst, where = float(excess[k]), (float(d[k]), int(numbers[present[k]]), int(numbers[present[k + 1]]))
    if where is None:
        return ""
    d, a, b = where
    return (f"absurd geometry: {d:.1f} A between residues {a} and {b} "
            f"(> data.max_consecutive_distance={limit:g} A per residue of numbering)")
