"""Structure metrics on representative atoms: RMSD, TM-score, GDT-TS/HA, lDDT (numpy) + batched torch RMSD/lDDT.

Definitions and reference values: shared docs metrics.md. Rows are corresponding residues (same
order); `mask` marks rows present in both structures and masked rows are dropped, never zero-filled.
TM/GDT are normalised by `ref_length` (default: the number of masked-in rows); pass the number of
reference residues when the prediction lacks some of them, so missing residues count 0.
CLI: `python -m diffold.metrics pred.pdb ref.pdb` (see diffold/metrics_cli.py).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from diffold.geometry import kabsch_align

MOLECULES = ("protein", "rna")
GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)
GDT_HA_CUTOFFS = (0.5, 1.0, 2.0, 4.0)
_GDT_CUTOFFS = (0.5, 1.0, 2.0, 4.0, 8.0)     # union; each gets its own superposition search
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
N_ITER = 20              # extension iterations per seed (TMscore program's n_it)
TM_OFFSETS = 64          # seed offsets per fragment length (TMscore tries all L - l + 1; see _seeds)
GDT_OFFSETS = 24         # per GDT cutoff: more offsets barely move GDT (measured), they only cost time


# ----------------------------------------------------------------------------- input checks
def _prepare(pred, ref, mask, min_atoms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 (pred[mask], ref[mask], mask); one-line ValueError on bad input."""
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[-1] != 3 or pred.shape != ref.shape:
        raise ValueError(f"pred and ref must both be [N, 3] arrays with the same N; got {pred.shape} and {ref.shape}")
    if mask is None:
        mask = np.ones(len(pred), dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != (len(pred),):
            raise ValueError(f"mask must have shape ({len(pred)},) like pred's rows; got {mask.shape}")
        if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean (True = atom present in both structures)")
        mask = mask.astype(bool)
    x, y = pred[mask], ref[mask]  # [n, 3]
    if len(x) < min_atoms:
        raise ValueError(f"need at least {min_atoms} atoms present in both structures after masking; got {len(x)}")
    bad = ~(np.isfinite(x).all(1) & np.isfinite(y).all(1))
    if bad.any():
        first = int(np.flatnonzero(mask)[np.argmax(bad)])
        raise ValueError(f"{int(bad.sum())} unmasked atoms have NaN/inf coordinates (first: row {first}); "
                         "mask them out or fix the input")
    return x, y, mask


def _ref_length(ref_length: Optional[int], n: int) -> int:
    if ref_length is None:
        return n
    if int(ref_length) != ref_length or ref_length < n:
        raise ValueError(f"ref_length must be an integer >= the {n} atoms present in both structures; got {ref_length}")
    return int(ref_length)


def d0(length: int, molecule: str = "protein") -> float:
    """TM-score distance scale d0(L) in Angstrom (Zhang & Skolnick 2004; RNA: Gong et al. 2019, US-align)."""
    if molecule not in MOLECULES:
        raise ValueError(f"molecule must be one of {MOLECULES}; got {molecule!r}")
    if molecule == "protein":
        return max(0.5, 1.24 * (length - 15) ** (1 / 3) - 1.8) if length > 21 else 0.5
    if length >= 30:
        return 0.6 * math.sqrt(length - 0.5) - 2.5
    for upper, value in ((11, 0.3), (15, 0.4), (19, 0.5), (23, 0.6)):
        if length <= upper:
            return value
    return 0.7  # 24 <= L <= 29


# ----------------------------------------------------------------------------- superposition
def _fit_features(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-atom [x, y, vec(x y^T)] [n, 15]: a weighted fit needs only their weighted sums, and
    the squared distance after any superposition is linear in them (see _search)."""
    return np.concatenate([x, y, (x[:, :, None] * y[:, None, :]).reshape(len(x), 9)], 1)


def _kabsch_batch(w: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations R [S, 3, 3] and translations t [S, 3] with y ~ R x + t, fitted on rows w [S, n] (0/1).

    einsum, not `@`: multithreaded BLAS on these thin products is 10-50x slower on a busy machine.
    """
    sums = np.einsum("sn,nk->sk", w, feats)                   # [S, 15] one pass for all candidates
    cnt = w.sum(1)[:, None]                                   # [S, 1]
    cx, cy = sums[:, 0:3] / cnt, sums[:, 3:6] / cnt           # [S, 3]
    h = sums[:, 6:].reshape(-1, 3, 3) - cnt[:, :, None] * cx[:, :, None] * cy[:, None, :]  # [S, 3, 3]
    u, _, vt = np.linalg.svd(h)
    # Reflection fix: det(V U^T) = -1 would be a mirror image, flip the weakest axis instead.
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    vt[:, 2, :] *= np.where(d == 0, 1.0, d)[:, None]
    rot = np.einsum("sji,skj->sik", vt, u)                    # [S, 3, 3] = V diag(1,1,d) U^T
    return rot, cy - np.einsum("sij,sj->si", rot, cx)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Kabsch fit of all rows, centred first so far-from-origin inputs lose no precision."""
    mx, my = x.mean(0), y.mean(0)
    rot, _ = _kabsch_batch(np.ones((1, len(x))), _fit_features(x - mx, y - my))
    return rot[0], my - rot[0] @ mx


def kabsch(mobile, target) -> tuple[np.ndarray, np.ndarray]:
    """Proper rotation R [3, 3] and translation t [3] minimising sum |R mobile_i + t - target_i|^2."""
    x, y, _ = _prepare(mobile, target, None, 3)
    return _fit(x, y)


def rmsd(pred, ref, mask=None) -> float:
    """RMSD (Angstrom) over masked atoms after optimal proper-rotation superposition."""
    x, y, _ = _prepare(pred, ref, mask, 3)
    rot, t = _fit(x, y)
    return float(np.sqrt(((x @ rot.T + t - y) ** 2).sum(1).mean()))


def _seeds(n: int, max_offsets: int) -> np.ndarray:
    """Seed fragments [S, n] bool: lengths n, n/2, ... (at most 6, last = 4) as in the TMscore program.

    TMscore tries every offset; we take <= max_offsets evenly spaced ones (ends included): the
    extension step makes neighbouring seeds converge to the same superposition, so little is lost
    (tests/test_metrics.py compares against the every-offset search).
    """
    lmin, lengths = min(n, 4), []
    for i in range(5):
        if n >> i <= lmin:
            break
        lengths.append(n >> i)
    lengths.append(lmin)
    idx, masks = np.arange(n), []
    for frag in lengths:
        span = n - frag + 1
        starts = np.arange(span) if span <= max_offsets else np.unique(np.linspace(0, span - 1, max_offsets).round())
        masks.append((idx >= starts[:, None]) & (idx < starts[:, None] + frag))
    return np.concatenate(masks)


def _search(x: np.ndarray, y: np.ndarray, d0_tm: float, radii: list[tuple[float, float]], offsets: list[int],
            cutoffs=_GDT_CUTOFFS, n_iter: int = N_ITER) -> tuple[float, np.ndarray]:
    """Best TM sum (over class-0 candidates) and best counts of d < cutoff (over all candidates).

    Class k extends each of its seeds as the TMscore program does (Zhang & Skolnick 2004):
    superpose on the selection, select residues with d < radii[k][0] (first step) or radii[k][1]
    (later steps), repeat until the selection repeats or n_iter. All live candidates share one
    batched SVD per step, and (class, selection) states already visited are dropped, so the
    batch shrinks fast.
    """
    x, y = x - x.mean(0), y - y.mean(0)  # smaller magnitudes -> less cancellation in the d^2 expansion
    seeds = [_seeds(len(x), k) for k in offsets]
    sel = np.concatenate(seeds)                                                  # [S, n] bool
    cls = np.concatenate([np.full(len(s), k) for k, s in enumerate(seeds)])     # [S]
    first, later = np.array([r[0] for r in radii]), np.array([r[1] for r in radii])
    fit = _fit_features(x, y)                                                    # [n, 15]
    norms = (x ** 2).sum(1) + (y ** 2).sum(1)                                    # [n]
    cut2 = np.square(np.asarray(cutoffs, dtype=np.float64))                      # [C]
    seen = {bytes([k]) + row.tobytes() for k, row in zip(cls.tolist(), np.packbits(sel, axis=1), strict=True)}
    best_tm, best_counts = 0.0, np.zeros(len(cut2), dtype=np.int64)
    for it in range(n_iter + 1):
        rot, t = _kabsch_batch(sel.astype(np.float64), fit)
        # |R x + t - y|^2 = |x|^2 + |y|^2 + |t|^2 + 2 (R^T t).x - 2 t.y - 2 sum_ij R_ij y_i x_j: linear in `fit`
        coef = np.concatenate([2 * np.einsum("sji,sj->si", rot, t), -2 * t,
                               -2 * np.swapaxes(rot, 1, 2).reshape(-1, 9)], 1)   # [S, 15]
        dist2 = np.maximum(np.einsum("sk,nk->sn", coef, fit) + norms + (t ** 2).sum(1)[:, None], 0.0)  # [S, n]
        if (cls == 0).any():
            best_tm = max(best_tm, float((1.0 / (1.0 + dist2[cls == 0] / d0_tm ** 2)).sum(1).max()))
        for c, c2 in enumerate(cut2):
            best_counts[c] = max(best_counts[c], int(np.count_nonzero(dist2 < c2, axis=1).max()))
        if it == n_iter:
            break
        radius = (first if it == 0 else later)[cls]                              # [S]
        new = dist2 < radius[:, None] ** 2
        few = np.count_nonzero(new, axis=1) < 3
        if few.any():  # TMscore: widen the radius in 0.5 A steps until >= 3 residues are selected
            third = np.sqrt(np.partition(dist2[few], 2, axis=1)[:, 2])
            wider = radius[few] + 0.5 * (np.floor((third - radius[few]) / 0.5) + 1)
            new[few] = dist2[few] < wider[:, None] ** 2
        keep = []
        for i, (k, row) in enumerate(zip(cls.tolist(), np.packbits(new, axis=1), strict=True)):
            key = bytes([k]) + row.tobytes()
            if key not in seen:
                seen.add(key)
                keep.append(i)
        if not keep:
            break
        sel, cls = new[keep], cls[keep]
    return best_tm, best_counts


def _tm_radii(d0_tm: float) -> tuple[float, float]:
    d0_search = min(max(d0_tm, 4.5), 8.0)  # TMscore program clamps the search scale to [4.5, 8]
    return d0_search - 1.0, d0_search + 1.0


def _tm_and_gdt(x: np.ndarray, y: np.ndarray, length: int, molecule: str) -> tuple[float, dict[float, float]]:
    """TM-score (TM search only) and P_c for every GDT cutoff (TM search + one search per cutoff)."""
    scale = d0(length, molecule)
    # class 0 = the TM search, whose candidates the TMscore program also reports GDT from
    radii = [_tm_radii(scale)] + [(c, c) for c in _GDT_CUTOFFS]
    tm, counts = _search(x, y, scale, radii, [TM_OFFSETS] + [GDT_OFFSETS] * len(_GDT_CUTOFFS))
    return tm / length, {c: int(k) / length for c, k in zip(_GDT_CUTOFFS, counts, strict=True)}


def tm_score(pred, ref, molecule: str = "protein", mask=None, ref_length: Optional[int] = None) -> float:
    """TM-score in [0, 1], normalised by the reference length, maximised over a TMscore-style search."""
    x, y, _ = _prepare(pred, ref, mask, 3)
    length = _ref_length(ref_length, len(x))
    scale = d0(length, molecule)
    best, _ = _search(x, y, scale, [_tm_radii(scale)], [TM_OFFSETS], cutoffs=())
    return best / length


def gdt_fractions(pred, ref, mask=None, ref_length: Optional[int] = None,
                  molecule: str = "protein") -> dict[float, float]:
    """P_c for c in 0.5/1/2/4/8 A: largest fraction of reference residues with d < c, per-cutoff search."""
    x, y, _ = _prepare(pred, ref, mask, 3)
    return _tm_and_gdt(x, y, _ref_length(ref_length, len(x)), molecule)[1]


def gdt_ts(pred, ref, mask=None, ref_length: Optional[int] = None, molecule: str = "protein") -> float:
    """GDT-TS = mean of P_1, P_2, P_4, P_8 (Zemla 2003)."""
    p = gdt_fractions(pred, ref, mask, ref_length, molecule)
    return float(np.mean([p[c] for c in GDT_TS_CUTOFFS]))


def gdt_ha(pred, ref, mask=None, ref_length: Optional[int] = None, molecule: str = "protein") -> float:
    """GDT-HA = mean of P_0.5, P_1, P_2, P_4."""
    p = gdt_fractions(pred, ref, mask, ref_length, molecule)
    return float(np.mean([p[c] for c in GDT_HA_CUTOFFS]))


# ----------------------------------------------------------------------------- lDDT
def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(sum((a[:, None, k] - b[None, :, k]) ** 2 for k in range(3)))  # [len(a), len(b)]


def lddt(pred, ref, inclusion_radius: float = 15.0, per_residue: bool = False, mask=None, block: int = 512):
    """Superposition-free lDDT (Mariani et al. 2013) over masked atoms; per_residue -> [N] array (NaN = masked)."""
    x, y, mask = _prepare(pred, ref, mask, 1)
    n = len(x)
    kept, total = np.zeros(n), np.zeros(n)                               # per residue: preserved, 4 x pairs
    for lo in range(0, n, block):                                        # row blocks: memory O(block * n)
        rows = np.arange(lo, min(lo + block, n))
        dref = _dist(y[rows], y)                                         # [b, n]
        pairs = dref < inclusion_radius
        pairs[np.arange(len(rows)), rows] = False                        # i != j
        err = np.abs(_dist(x[rows], x) - dref)
        kept[rows] = sum(np.count_nonzero((err < t) & pairs, axis=1) for t in LDDT_THRESHOLDS)
        total[rows] = 4 * np.count_nonzero(pairs, axis=1)
    if not per_residue:
        return float(kept.sum() / total.sum()) if total.sum() else 1.0  # no pairs -> 1 (AlphaFold)
    out = np.full(len(mask), np.nan)
    out[mask] = np.where(total > 0, kept / np.maximum(total, 1), 1.0)
    return out


def all_metrics(pred, ref, molecule: str = "protein", mask=None, ref_length: Optional[int] = None) -> dict[str, float]:
    """{rmsd, tm, gdt_ts, gdt_ha, lddt} (+ lddt_15 for RNA, whose lddt uses the 30 A radius)."""
    x, y, _ = _prepare(pred, ref, mask, 3)
    length = _ref_length(ref_length, len(x))
    tm, p = _tm_and_gdt(x, y, length, molecule)
    out = {
        "rmsd": rmsd(x, y),
        "tm": tm,
        "gdt_ts": float(np.mean([p[c] for c in GDT_TS_CUTOFFS])),
        "gdt_ha": float(np.mean([p[c] for c in GDT_HA_CUTOFFS])),
        "lddt": lddt(x, y, inclusion_radius=30.0 if molecule == "rna" else 15.0),
    }
    if molecule == "rna":
        out["lddt_15"] = lddt(x, y, inclusion_radius=15.0)
    return out


# ----------------------------------------------------------------------------- batched torch
def _check_batch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    if pred.ndim != 3 or pred.shape[-1] != 3 or pred.shape != ref.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"expected pred, ref [B, N, 3] and mask [B, N]; got {tuple(pred.shape)}, "
                         f"{tuple(ref.shape)}, {tuple(mask.shape)}")


def batched_rmsd_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example RMSD [B] after Kabsch (rotation detached; gradient exact at the optimum); NaN if no atoms."""
    _check_batch(pred, ref, mask)
    m = mask.bool()
    p = torch.where(m[..., None], pred, 0.0)  # masked rows may hold NaN: keep them out of every sum
    r = torch.where(m[..., None], ref, 0.0)
    w = m.to(p.dtype)
    sq = ((kabsch_align(p, r, w) - r) ** 2).sum(-1)          # [B, N]
    msd = (sq * w).sum(-1) / w.sum(-1).clamp_min(1.0)         # [B]
    return torch.where(m.any(-1), msd.clamp_min(1e-12).sqrt(), torch.nan)  # clamp: finite grad at 0


def _cdist_safe(a: torch.Tensor) -> torch.Tensor:
    d2 = ((a[:, :, None, :] - a[:, None, :, :]) ** 2).sum(-1)  # [B, N, N]
    return d2.clamp_min(1e-10).sqrt()                           # sqrt'(0) = inf would poison gradients


def lddt_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, radius: float = 15.0,
               smooth: bool = False) -> torch.Tensor:
    """Per-example lDDT [B] over masked atoms; smooth=True uses sigmoids (AF3 Algorithm 27) for gradients."""
    _check_batch(pred, ref, mask)
    m = mask.bool()
    n = m.shape[1]
    dref = _cdist_safe(torch.where(m[..., None], ref, 0.0).detach())
    dpred = _cdist_safe(torch.where(m[..., None], pred, 0.0))
    eye = torch.eye(n, dtype=torch.bool, device=m.device)
    pairs = m[:, :, None] & m[:, None, :] & ~eye & (dref < radius)   # [B, N, N]
    err = (dpred - dref).abs()
    score = torch.zeros_like(err)
    for t in LDDT_THRESHOLDS:
        score = score + (torch.sigmoid(t - err) if smooth else (err < t).to(err.dtype))
    w = pairs.to(err.dtype)
    num, den = (score * w).sum((1, 2)), 4 * w.sum((1, 2))
    return torch.where(den > 0, num / den.clamp_min(1.0), torch.ones_like(num))


if __name__ == "__main__":
    import sys

    from diffold.metrics_cli import main

    sys.exit(main())
