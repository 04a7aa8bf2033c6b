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

from diffold.runhistory import History, load_history
from diffold.runinfo import RunData, section

MAX_POINTS = 2000      # longer series are bucket-averaged (mean line + min/max band keeps spikes visible)
SMOOTH_FROM = 200      # from this many points: faint raw line + moving average
FEW_POINTS = 30        # up to this many points: markers, so a single logged step is visible
EVENT_COLORS = {"warning": "tab:orange", "critical": "tab:red"}


Series = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # mean x, mean y, min, max, count


def _draw(ax: Axes, s: Series, label: str, color: str | None = None, dashed: bool = False) -> bool:
    """Plot one (decimated) series with a style that suits its length; False if it has no points."""
    x, y, lo, hi, count = s
    n = len(x)
    if n == 0:
        return False
    if dashed:  # a reference level (a baseline): no markers, no band
        ax.plot(x, y, color=color, lw=1.0, ls="--", label=label)
        return True
    if n > MAX_POINTS or count.max() > 1:
        if n > MAX_POINTS:  # re-bucket to MAX_POINTS, weighting by the raw points in each bucket
            idx = np.linspace(0, n, MAX_POINTS + 1).astype(int)[:-1]   # bucket starts
            w = np.add.reduceat(count, idx)
            x, y = np.add.reduceat(x * count, idx) / w, np.add.reduceat(y * count, idx) / w
            lo, hi = np.minimum.reduceat(lo, idx), np.maximum.reduceat(hi, idx)
        (line,) = ax.plot(x, y, color=color, lw=1.2, label=label)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)  # min/max band keeps spikes visible
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


def _twin(ax: Axes, left: list[tuple[str, str]], right: list[tuple[str, str]], h: History, kind: str,
          right_label: str, baselines: bool = False) -> bool:
    """Metrics on two y axes (different units) with one legend; baselines: dashed val_baseline/<m> beside val/<m>."""
    def pair(axis: Axes, key: str, label: str, color: str) -> bool:
        drew = _draw(axis, h.get(kind, key), label, color)
        base = key.replace("val/", "val_baseline/", 1)
        if baselines and drew:
            _draw(axis, h.get(kind, base), f"{label} best baseline", color, dashed=True)
        return drew
    drew = any([pair(ax, key, label, c) for (key, label), c in zip(left, ["tab:blue", "tab:green"], strict=False)])
    ax2 = ax.twinx()
    colors = iter(["tab:purple", "tab:brown", "tab:olive", "tab:cyan"])
    drew_right = any([pair(ax2, key, label, next(colors)) for key, label in right])
    if drew_right:
        ax2.set_ylabel(right_label)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="best")
    else:
        ax2.set_axis_off()
    return drew or drew_right


def _loss(ax: Axes, h: History) -> bool:
    keys = sorted((k for k in h.keys("train") if k.startswith("loss/")), key=lambda k: (k != "loss/total", k))
    # a component that is 0 throughout (structure loss off, no MoE) only squashes the axis
    keys = [k for k in keys if k == "loss/total" or np.any(np.abs(h.get("train", k)[2:4]) > 0)]
    drew = any([_draw(ax, h.get("train", k), k.removeprefix("loss/")) for k in keys])
    drew = _draw(ax, h.get("val", "val/loss"), "val loss", "black") or drew
    _auto_log(ax)
    return drew


def _bins(ax: Axes, h: History) -> bool:
    def lower(key: str) -> float:
        lo = key.removeprefix("loss_bin/").split("-")[0]
        return float(lo) if lo.replace(".", "", 1).isdigit() else float("inf")
    keys = sorted((k for k in h.keys("train") if k.startswith("loss_bin/")), key=lambda k: (lower(k), k))
    colors = [f"C{i}" for i in range(10)] if len(keys) <= 10 else None
    drew = any([_draw(ax, h.get("train", k), "sigma " + k.removeprefix("loss_bin/"), colors[i] if colors else None)
                for i, k in enumerate(keys)])
    _auto_log(ax)
    return drew


def _single(keys: list[tuple[str, str]], log: bool = False) -> Callable[[Axes, History], bool]:
    def panel(ax: Axes, h: History) -> bool:
        drew = any([_draw(ax, h.get("train", k), label) for k, label in keys])
        if log:
            _auto_log(ax)
        return drew
    return panel


def _panels(run: RunData) -> list[tuple[str, Callable[[Axes, History], bool]]]:
    data = section(run.config, "data")
    task = run.config.get("task") if isinstance(run.config.get("task"), str) else "?"
    atoms = f"{task[:20]}, atoms: {str(data.get('atoms') or 'task default')[:40]}"
    return [
        ("Loss (train components, val)", _loss),
        ("Learning rate", _single([("lr", "lr")])),
        ("Grad norm (pre-clip)", _single([("grad_norm", "mean"), ("grad_norm_max", "max")], log=True)),
        (f"Validation metrics ({atoms}; dashed: best baseline)", lambda ax, h: _twin(
            ax, [("val/rmsd", "RMSD (Å)")], [("val/tm", "TM"), ("val/gdt_ts", "GDT-TS"), ("val/lddt", "lDDT")],
            h, "val", "score", baselines=True)),
        ("Throughput", lambda ax, h: _twin(
            ax, [("samples_per_s", "samples/s")], [("residues_per_s", "residues/s")], h, "train", "residues/s")),
        ("Memory (GB)", _single([("mem/device_gb", "device"), ("mem/host_gb", "host")])),
        ("Loss per noise-level bin", _bins),
        ("Health (loss z-score; events)", _single([("health/loss_zscore", "loss z-score")])),
    ]


def make_figure(run: RunData) -> tuple[Figure, list[str]]:
    """The training-curve figure of a run (Agg canvas) and its panel titles, in order."""
    h = load_history(run.path)
    events = {s: h.events[s] for s in EVENT_COLORS}
    panels = _panels(run)
    fig = Figure(figsize=(14, 4 * ((len(panels) + 1) // 2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots((len(panels) + 1) // 2, 2, squeeze=False, sharex=True).ravel()  # one step axis
    for ax, (title, draw) in zip(axes[:len(panels)], panels, strict=True):
        ax.set_title(title, fontsize=10)
        drew = draw(ax, h)
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
                Line2D([], [], color=EVENT_COLORS[s], label=f"{s} events ({h.event_totals[s]})") for s, v in events.items() if v]
            ax.legend(handles=handles, fontsize=7, loc="best")
        elif ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) - 2:]:  # the step axis is shared: label the bottom row only
        ax.set_xlabel("optimizer step")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    name = h.run_name or run.path.name
    fig.suptitle(f"{name} — {h.counts.get('train', 0)} train / {h.counts.get('val', 0)} val log events")
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
