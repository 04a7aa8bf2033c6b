"""Training-curve figure of a run directory: one PNG, headless (Agg), readable at 1 or 1e5 points."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from diffold.runinfo import RunData, num

MAX_POINTS = 2000      # longer series are bucket-averaged (mean line + min/max band keeps spikes visible)
SMOOTH_FROM = 200      # from this many points: faint raw line + moving average
FEW_POINTS = 30        # up to this many points: markers, so a single logged step is visible
EVENT_COLORS = {"warning": "tab:orange", "critical": "tab:red"}


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [N], values [N]) of one metric in file order; missing and non-finite values dropped."""
    pts = [(num(r.get("step")), num(r.get(key))) for r in records]
    arr = np.array([p for p in pts if None not in p], dtype=float).reshape(-1, 2)  # [N, 2]
    return arr[:, 0], arr[:, 1]


def _draw(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, color: str | None = None) -> bool:
    """Plot one series with a style that suits its length; False if it has no points."""
    n = len(x)
    if n == 0:
        return False
    if n > MAX_POINTS:
        idx = np.linspace(0, n, MAX_POINTS + 1).astype(int)[:-1]   # bucket starts
        count = np.diff(np.append(idx, n))
        xm, ym = np.add.reduceat(x, idx) / count, np.add.reduceat(y, idx) / count
        (line,) = ax.plot(xm, ym, color=color, lw=1.2, label=label)
        ax.fill_between(xm, np.minimum.reduceat(y, idx), np.maximum.reduceat(y, idx),
                        color=line.get_color(), alpha=0.2, lw=0)
    elif n >= SMOOTH_FROM:
        (line,) = ax.plot(x, y, color=color, lw=0.6, alpha=0.3)
        w = max(n // 50, 5)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")           # [n - w + 1]
        start = (w - 1) // 2
        ax.plot(x[start:start + len(smooth)], smooth, color=line.get_color(), lw=1.4, label=f"{label} (smoothed)")
    else:
        ax.plot(x, y, color=color, lw=1.2, marker="o" if n <= FEW_POINTS else None, ms=3, label=label)
    return True


def _auto_log(ax: Axes) -> None:
    """Log y axis when the plotted values are positive and span more than two decades."""
    ys = [line.get_ydata() for line in ax.get_lines()]
    ys = np.concatenate(ys) if ys else np.zeros(0)
    if len(ys) and ys.min() > 0 and ys.max() / ys.min() > 100:
        ax.set_yscale("log")


def _twin(ax: Axes, left: list[tuple[str, str]], right: list[tuple[str, str]], records: list[dict],
          right_label: str) -> bool:
    """Metrics on two y axes (different units) with one legend."""
    drew = any([_draw(ax, *series(records, key), label) for key, label in left])
    ax2 = ax.twinx()
    colors = iter(["tab:purple", "tab:brown", "tab:olive", "tab:cyan"])
    drew_right = any([_draw(ax2, *series(records, key), label, next(colors)) for key, label in right])
    if drew_right:
        ax2.set_ylabel(right_label)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="best")
    else:
        ax2.set_axis_off()
    return drew or drew_right


def _loss(ax: Axes, train: list[dict], val: list[dict]) -> bool:
    keys = sorted({k for r in train for k in r if k.startswith("loss/")}, key=lambda k: (k != "loss/total", k))
    # a component that is 0 throughout (structure loss off, no MoE) only squashes the axis
    keys = [k for k in keys if k == "loss/total" or any(r.get(k) not in (None, 0, 0.0) for r in train)]
    drew = any([_draw(ax, *series(train, k), k.removeprefix("loss/")) for k in keys])
    drew = _draw(ax, *series(val, "val/loss"), "val loss", "black") or drew
    _auto_log(ax)
    return drew


def _bins(ax: Axes, train: list[dict], val: list[dict]) -> bool:
    def lower(key: str) -> float:
        lo = key.removeprefix("loss_bin/").split("-")[0]
        return float(lo) if lo.replace(".", "", 1).isdigit() else float("inf")
    keys = sorted({k for r in train for k in r if k.startswith("loss_bin/")}, key=lambda k: (lower(k), k))
    colors = [f"C{i}" for i in range(10)] if len(keys) <= 10 else None
    drew = any([_draw(ax, *series(train, k), "sigma " + k.removeprefix("loss_bin/"), colors[i] if colors else None)
                for i, k in enumerate(keys)])
    _auto_log(ax)
    return drew


def _single(keys: list[tuple[str, str]], log: bool = False) -> Callable[[Axes, list[dict], list[dict]], bool]:
    def panel(ax: Axes, train: list[dict], val: list[dict]) -> bool:
        drew = any([_draw(ax, *series(train, k), label) for k, label in keys])
        if log:
            _auto_log(ax)
        return drew
    return panel


def _panels(run: RunData) -> list[tuple[str, Callable[[Axes, list[dict], list[dict]], bool]]]:
    data = run.config.get("data") or {}
    atoms = f"{run.config.get('task', '?')}, atoms: {data.get('atoms') or 'task default'}"
    return [
        ("Loss (train components, val)", _loss),
        ("Learning rate", _single([("lr", "lr")])),
        ("Grad norm (pre-clip)", _single([("grad_norm", "mean"), ("grad_norm_max", "max")], log=True)),
        (f"Validation metrics ({atoms})", lambda ax, t, v: _twin(
            ax, [("val/rmsd", "RMSD (Å)")], [("val/tm", "TM"), ("val/gdt_ts", "GDT-TS"), ("val/lddt", "lDDT")],
            v, "score")),
        ("Throughput", lambda ax, t, v: _twin(
            ax, [("samples_per_s", "samples/s")], [("residues_per_s", "residues/s")], t, "residues/s")),
        ("Memory (GB)", _single([("mem/device_gb", "device"), ("mem/host_gb", "host")])),
        ("Loss per noise-level bin", _bins),
        ("Health (loss z-score; events)", _single([("health/loss_zscore", "loss z-score")])),
    ]


def make_figure(run: RunData) -> tuple[Figure, list[str]]:
    """The training-curve figure of a run (Agg canvas) and its panel titles, in order."""
    train, val = run.events("train"), run.events("val")
    events = {s: [num(e.get("step")) for e in run.health if e.get("status") == s and num(e.get("step")) is not None]
              for s in EVENT_COLORS}
    panels = _panels(run)
    fig = Figure(figsize=(14, 4 * ((len(panels) + 1) // 2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots((len(panels) + 1) // 2, 2, squeeze=False, sharex=True).ravel()  # one step axis
    for ax, (title, draw) in zip(axes[:len(panels)], panels, strict=True):
        ax.set_title(title, fontsize=10)
        drew = draw(ax, train, val)
        is_health = title.startswith("Health")
        if not drew and not (is_health and any(events.values())):
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.tick_params(left=False, labelleft=False)  # not set_xticks: the x axis is shared
            continue
        for status, steps in events.items():  # health events on the shared step axis
            if steps:
                ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), colors=EVENT_COLORS[status],
                          lw=0.8, alpha=0.6, zorder=0)
        if is_health or title.startswith("Loss ("):
            handles = ax.get_legend_handles_labels()[0] + [
                Line2D([], [], color=EVENT_COLORS[s], label=f"{s} events ({len(v)})") for s, v in events.items() if v]
            ax.legend(handles=handles, fontsize=7, loc="best")
        elif ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) - 2:]:  # the step axis is shared: label the bottom row only
        ax.set_xlabel("optimizer step")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    name = next((r.get("run_name") for r in reversed(run.events("start")) if r.get("run_name")), run.path.name)
    fig.suptitle(f"{name} — {len(train)} train / {len(val)} val log events")
    return fig, [title for title, _ in panels]


def plot_run(run: RunData, path: str | os.PathLike) -> list[str]:
    """Draw every panel of a run into one image at path (written atomically); returns the panel titles."""
    fig, titles = make_figure(run)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")     # a viewer refreshing the file never sees half a PNG
    fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=90)
    os.replace(tmp, out)
    return titles
