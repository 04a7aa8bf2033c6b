"""Model vs the trivial baselines of a validation record, in plain words (torch-free).

Validation logs `val/<m>` (the model), `val_baseline/<m>` (the best baseline: an ideal helix or a
random walk of the right step), `val_baseline_<name>/<m>` (each baseline) and `val/<m>_over_baseline`,
for m in lddt, tm, gdt_ts (higher is better) and rmsd (lower is better).
"""
from __future__ import annotations

import math
from typing import Any

from diffold.runinfo import num

METRICS = (("lddt", "lDDT", True), ("tm", "TM", True), ("gdt_ts", "GDT-TS", True), ("rmsd", "RMSD", False))
PREFIX = "val_baseline_"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _named(val: dict, metric: str) -> dict[str, float]:
    """{baseline name: value} from the val_baseline_<name>/<metric> keys."""
    out = {}
    for key, value in val.items():
        if key.startswith(PREFIX) and key.endswith("/" + metric) and (v := num(value)) is not None:
            out[key[len(PREFIX):-len(metric) - 1]] = v
    return out


def compare(val: dict | None) -> dict[str, Any] | None:
    """Per metric: model, best baseline (value and name), each baseline, beats; plus a one-line verdict."""
    rows: dict[str, dict] = {}
    for metric, label, higher in METRICS if val else ():
        model, best, named = num(val.get(f"val/{metric}")), num(val.get(f"val_baseline/{metric}")), _named(val, metric)
        if best is None and named:
            best = (max if higher else min)(named.values())
        if model is None or best is None:
            continue
        name = next((n for n, v in named.items() if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-12)), None)
        rows[metric] = {"label": label, "model": model, "best_baseline": best, "best_baseline_name": name,
                        "baselines": named, "over_baseline": num(val.get(f"val/{metric}_over_baseline")),
                        "higher_is_better": higher,
                        "beats": model > best if higher else model < best, "level": model == best}
    if not rows:
        return None
    return {"metrics": rows, "beats_all": all(r["beats"] for r in rows.values()), "verdict": verdict(rows)}


def _pair(r: dict) -> str:
    unit = " Å" if not r["higher_is_better"] else ""
    tail = "; lower is better" if not r["higher_is_better"] else ""
    return f"{r['label']} ({r['model']:.3g}{unit} vs {r['best_baseline']:.3g}{unit}{tail})"


def verdict(rows: dict[str, dict]) -> str:
    """'beats the best baseline on lDDT and TM' / 'below the helix baseline on lDDT (0.31 vs 0.43)' ..."""
    parts = []
    for word, pick in (("below", lambda r: not r["beats"] and not r["level"]), ("level with", lambda r: r["level"])):
        groups: dict[str | None, list[dict]] = {}
        for r in rows.values():
            if pick(r):
                groups.setdefault(r["best_baseline_name"], []).append(r)
        for name, rs in groups.items():
            who = f"the {name.replace('_', '-')} baseline" if name else "the best baseline"
            parts.append(f"{word} {who} on {_join([_pair(r) for r in rs])}")
    wins = [r["label"] for r in rows.values() if r["beats"]]
    if wins:
        parts.append(f"beats the best baseline on {_join(wins)}")
    return "; ".join(parts)
