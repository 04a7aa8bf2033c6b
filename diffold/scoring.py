"""Per-chain scores of a structure (RMSD/TM/GDT/lDDT + bond-length error) and model-vs-baseline summaries.

Validation (diffold/validation.py) and `python -m diffold.evaluate` both score through here, so
they report the same numbers under the same names:
  <prefix>/<metric>                     the model (mean over chains)
  <prefix>_baseline_<name>/<metric>     each baseline (helix, random_walk), same chains
  <prefix>_baseline/<metric>            the best baseline per metric (mean over chains, best of the means)
  <prefix>/<metric>_over_baseline       model / best baseline (> 1 beats it, except RMSD: < 1 beats it)
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from diffold.baselines import BASELINES, baseline_structures
from diffold.metrics import all_metrics

log = logging.getLogger(__name__)
METRICS = ("rmsd", "tm", "gdt_ts", "lddt")
LOWER_IS_BETTER = frozenset({"rmsd", "bond_length_error"})


def consecutive(mask: np.ndarray, residue_index: np.ndarray) -> np.ndarray:
    """[L-1] bool: residues i and i+1 both observed and adjacent in the numbering."""
    m, r = np.asarray(mask, dtype=bool), np.asarray(residue_index)
    return m[1:] & m[:-1] & (np.diff(r) == 1)


def _steps(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(np.asarray(x, dtype=np.float64), axis=0), axis=-1)  # [L-1]


def bond_length_error(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, residue_index: np.ndarray) -> float:
    """Mean |d_pred(i, i+1) - d_ref(i, i+1)| (A) over consecutive observed residues; NaN if none."""
    pair = consecutive(mask, residue_index)
    return float(np.abs(_steps(pred) - _steps(ref))[pair].mean()) if pair.any() else float("nan")


def consecutive_distance(x: np.ndarray, mask: np.ndarray, residue_index: np.ndarray) -> float:
    """Median |x_{i+1} - x_i| (A) over consecutive observed residues; NaN if none."""
    pair = consecutive(mask, residue_index)
    return float(np.median(_steps(x)[pair])) if pair.any() else float("nan")


def score_chain(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, residue_index: np.ndarray, task) -> dict:
    """all_metrics (+ lddt_15 for RNA) + bond_length_error + consecutive_distance of pred [L, 3] vs ref [L, 3]."""
    out = all_metrics(pred, ref, molecule=task.tm_molecule, mask=mask)
    out["bond_length_error"] = bond_length_error(pred, ref, mask, residue_index)
    out["consecutive_distance"] = consecutive_distance(pred, mask, residue_index)
    return out


def _mean(values: list[float]) -> float:
    """Mean over the finite values (e.g. a chain without consecutive pairs has no bond error); NaN if none."""
    v = np.asarray(values, dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def mean_scores(scores: list[dict]) -> dict:
    """Per-key mean of several score dicts (keys of the first)."""
    return {k: _mean([s[k] for s in scores]) for k in scores[0]}


def best_scores(scores: list[dict]) -> dict:
    """Per-key best of several samples' scores (min for RMSD/bond error, max otherwise; NaNs ignored)."""
    out = {}
    for k in scores[0]:
        v = np.asarray([s[k] for s in scores], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = float(v.min() if k in LOWER_IS_BETTER else v.max()) if len(v) else float("nan")
    return out


class BaselineScores:
    """Baseline scores per chain, computed once and cached (validation scores the same chains again and again)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, dict[str, dict]] = {}

    def get(self, task, chain_id: str, ref: np.ndarray, mask: np.ndarray, residue_index: np.ndarray) -> dict[str, dict]:
        """{baseline name: scores (mean over its draws)} for one chain; ref [L, 3], mask/residue_index [L]."""
        key = (task.name, chain_id, len(ref), np.asarray(ref, dtype=np.float32).tobytes(), np.asarray(mask).tobytes())
        if key not in self._cache:
            structures = baseline_structures(task, chain_id, residue_index)
            self._cache[key] = {name: mean_scores([score_chain(x, ref, mask, residue_index, task) for x in xs])
                                for name, xs in structures.items()}
        return self._cache[key]


def summarize(records: list[dict], prefix: str = "val", metrics: Optional[tuple[str, ...]] = None) -> dict[str, float]:
    """Logged means over scored chains: model, each baseline, best baseline, model / best baseline.

    records: [{"model": scores, "baselines": {name: scores}}]; chains without scores are skipped.
    metrics: keys to report per model/baseline (default: METRICS + bond_length_error).
    """
    scored = [r for r in records if r.get("model")]
    out = {f"{prefix}/num_scored": float(len(scored)), f"{prefix}/num_failed": float(len(records) - len(scored))}
    if not scored:
        return out
    keys = metrics or (*METRICS, "bond_length_error")
    for k in keys:
        out[f"{prefix}/{k}"] = _mean([r["model"][k] for r in scored])
    for name in BASELINES:
        for k in keys:
            out[f"{prefix}_baseline_{name}/{k}"] = _mean([r["baselines"][name][k] for r in scored])
    for k in METRICS:
        values = [out[f"{prefix}_baseline_{name}/{k}"] for name in BASELINES]
        best = min(values) if k in LOWER_IS_BETTER else max(values)
        out[f"{prefix}_baseline/{k}"] = best
        out[f"{prefix}/{k}_over_baseline"] = out[f"{prefix}/{k}"] / best if best > 0 else float("nan")
    return out
