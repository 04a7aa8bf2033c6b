"""Watch a training run from its directory alone: status table, live monitor, or a PNG of the curves.

    python monitor_training.py --output_dir outputs/my_run --mode status [--json]
    python monitor_training.py --output_dir outputs/my_run --mode monitor --interval 30
    python monitor_training.py --output_dir outputs/my_run --mode plot [--save_plot curves.png]

Never imports torch (works on a login node next to a running job); matplotlib only for plots.
Exit codes: 0 ok; 2 bad input (one line on stderr), or nothing logged yet (status of a run that has not
logged its first step and has not ended; plot of a run without a training step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from diffold.runinfo import RunData, RunDirError, fmt_duration, load_run, num
from diffold.runstatus import ENDED, ENDED_EARLY, NO_METRICS, summarize

STATE_STYLE = {"alive": "bold green", "finished": "bold cyan", "early_stopped": "bold cyan", "max_steps": "bold cyan",
               "finished_unhealthy": "bold red", "gave_up": "bold red", "failed": "bold red",
               "interrupted": "bold magenta", "crashed": "bold red", "stalled": "bold yellow"}
HEALTH_STYLE = {"healthy": "green", "warning": "yellow", "critical": "bold red", "unknown": "dim"}
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", "")  # no suffix -> PNG


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _g(x: Any, fmt: str = ".4g") -> str:
    """Format a number for the table; '—' when missing."""
    v = num(x)
    if v is None:
        return "—" if x is None else str(x)  # keep NaN/inf visible as text
    return format(v, fmt)


def _kv(d: dict | None, items: list[tuple[str, str, str]]) -> str:
    """'label value' pairs for the keys present in d."""
    d = d or {}
    return "  ".join(f"{label} {_g(d[key], fmt)}" for key, label, fmt in items if key in d)


def _section_rows(s: dict) -> list[tuple[str, Text | str]]:
    rows: list[tuple[str, Text | str]] = [("Run", f"{s['run_name']}  ({s['run_dir']})")]
    style = STATE_STYLE.get(s["state"], "")
    reason_style = style if s["state"] in ("failed", "finished_unhealthy", "gave_up", "crashed") else ""
    rows.append(("State", Text.assemble((s["state"].upper(), style), "  ", (s["state_reason"], reason_style))))
    if s["state"] in ("interrupted", "crashed", "gave_up", "stalled"):  # what to type next, right under the state
        rows.append(("Resume with", Text(s["resume_command"], style="bold")))
    prog = f"epoch {_g(s['epoch'])}/{_g(s['num_epochs'])}  step {_g(s['step'])}/{_g(s['total_steps'])}"
    if s["progress"] is not None:
        prog += f" ({s['progress']:.1%})"
    if s["steps_per_s"]:
        prog += f"  {s['steps_per_s']:.3g} steps/s"
    if s["eta_s"] is not None:
        prog += f"  ETA {fmt_duration(s['eta_s'])}"
    if s["restarts"]:
        times = f"{s['restarts']}x" if s["restarts_complete"] else f">= {s['restarts']}x"
        prog += f"  (resumed {times}" + (f", last from {s['resumed_from']})" if s["resumed_from"] else ")")
    rows.append(("Progress", prog))
    t = s["train"] or {}
    parts = [f"{k.removeprefix('loss/')} {_g(v)}" for k, v in t.items() if k.startswith("loss/") and k != "loss/total"]
    loss = f"loss {_g(t.get('loss/total'))}" + (f" ({', '.join(parts)})" if parts else "")
    rows.append(("Train", f"{loss}  " + _kv(t, [("lr", "lr", ".3e"), ("grad_norm", "grad norm (pre-clip)", ".4g")])
                 if t else "—"))
    v = s["val"]
    rows.append(("Validation", _kv(v, [("val/loss", "loss", ".4g"), ("val/rmsd", "RMSD/Å", ".3g"), ("val/tm", "TM", ".3f"),
                                     ("val/gdt_ts", "GDT-TS", ".3f"), ("val/lddt", "lDDT", ".3f"),
                                     ("val/bond_length_error", "bond-length error/Å", ".3g")])
                 + f"  @ step {_g(v.get('step'))}" if v else "—"))
    if s["baseline"]:
        b = s["baseline"]
        per = "  ".join(f"{r['label']} {_g(r['model'], '.3g')} vs {_g(r['best_baseline'], '.3g')}"
                        + (f" ({r['best_baseline_name'].replace('_', '-')})" if r["best_baseline_name"] else "")
                        for r in b["metrics"].values())
        rows.append(("Baselines", Text.assemble(("model " + b["verdict"], "bold green" if b["beats_all"] else "bold yellow"),
                                                f"   [model vs best baseline: {per}]")))
    b = s["best"]
    if b["metric"]:
        ck = f"checkpoints/best @ step {_g(b['checkpoint']['step'])}" if b["checkpoint"] else "no best checkpoint yet"
        rows.append(("Best", f"{b['metric']} = {_g(b['value'])} at step {_g(b['step'])}; {ck}"))
    rows.append(("Throughput", _kv(t, [("samples_per_s", "samples/s", ".4g"), ("residues_per_s", "residues/s", ".4g"),
                                       ("time/data_share", "data-wait share", ".0%")]) or "—"))
    rows.append(("Memory", _kv(t, [("mem/device_gb", "device GB", ".3g"), ("mem/host_gb", "host GB", ".3g")]) or "—"))
    h = s["health"]
    last = h["latest"][-1] if h["latest"] else None
    since = f" (last: {last['check']} at step {_g(last['step'])})" if last else ""
    scope = "since start" if h["counts_complete"] else "in the newest part of health.jsonl"
    rows.append(("Health", Text.assemble((h["status"].upper(), HEALTH_STYLE.get(h["status"], "")), " " + h["words"])))
    rows.append(("Events", f"{scope}: {_n(h['warnings'], 'warning')}, {h['critical']} critical{since}; "
                           f"skipped steps {h['skipped_steps']}, rollbacks {h['rollbacks']}, "
                           f"OOM retries {h['oom_retries']}"))
    for name, d in ((s["data"] or {}).get("splits") or {}).items():
        kinds = ", ".join(f"{k} {n}" for k, n in (d.get("by_kind") or {}).items())
        skipped = ", ".join(f"{r} {n}" for r, n in (d.get("skipped") or {}).items())
        rows.append((f"Data {name}", f"{_g(d.get('chains_used'))} chains" + (f" ({kinds})" if kinds else "")
                     + f" from {_g(d.get('files_seen'))} files; skipped {d['skipped_total']}"
                     + (f" ({skipped})" if skipped else "") + f"; cropped {_g(d.get('cropped'))}"))
    trained = s["step"] or any(c["valid"] for c in s["checkpoints"])
    if s["state"] not in ("interrupted", "crashed", "gave_up", "stalled") and (trained or s["state"] not in ENDED):
        rows.append(("Resume", s["resume_command"]))  # nothing to resume after a failed start-up
    if s["last_log_line"]:
        rows.append(("Last log", s["last_log_line"]))
    for note in s["notes"]:
        rows.append(("Note", Text(note, style="yellow")))
    return rows


def render(s: dict, changes: list[str] | None = None) -> Group:
    """Rich renderable of a status summary (plus the changes since the previous refresh)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    if changes is not None:
        grid.add_row("Changes", Text(", ".join(changes), style="magenta"))
    for label, value in _section_rows(s):
        grid.add_row(label, value if isinstance(value, Text) else Text(value))  # Text: no markup parsing
    parts: list[Any] = [grid]
    if s["checkpoints"]:
        ck = Table("checkpoint", "step", "epoch", "age", "status", title="Checkpoints", title_justify="left")
        for c in s["checkpoints"]:
            status = Text("ok", "green") if c["valid"] else Text(c["note"], "bold red")
            name = c["name"] + (f" -> {c['target']}" if c["target"] else "")
            ck.add_row(name, _g(c["step"]), _g(c["epoch"]), fmt_duration(c["age_s"]) if c["age_s"] else "—", status)
        parts.append(ck)
    if s["health"]["latest"]:
        ht = Table("step", "status", "check", "message", "suggestion", "action", title="Latest health events",
                   title_justify="left")
        for e in s["health"]["latest"]:
            ht.add_row(*(Text(str(e.get(k) if e.get(k) is not None else "—"),
                              HEALTH_STYLE.get(e.get("status"), "") if k == "status" else "")
                         for k in ("step", "status", "check", "message", "suggestion", "action")))
        parts.append(ht)
    return Group(*parts)


def changes(prev: dict, cur: dict) -> list[str]:
    """What moved between two summaries, e.g. ['+120 steps', 'loss 1.23 -> 0.98', '1 new warning']."""
    out = []
    if cur["state"] != prev["state"]:
        out.append(f"state {prev['state']} -> {cur['state']}")
    if cur["step"] is not None and cur["step"] != prev["step"]:
        out.append(f"{cur['step'] - prev['step']:+d} steps" if prev["step"] is not None else f"now at step {cur['step']}")
    for label, sec, key in (("loss", "train", "loss/total"), ("val/loss", "val", "val/loss")):
        a, b = prev[sec] or {}, cur[sec] or {}
        if b and b.get("time") != a.get("time"):
            out.append(f"{label} {_g(a.get(key))} -> {_g(b.get(key))}")
    before = {c["name"]: c["step"] for c in prev["checkpoints"] if c["valid"]}
    for c in cur["checkpoints"]:
        if c["valid"] and c["name"] in ("latest", "best") and before.get(c["name"], -1) != c["step"]:
            out.append(f"{c['name']} -> step {_g(c['step'])}")
        elif c["valid"] and c["name"] not in before:
            out.append(f"new checkpoint {c['name']}")
    for kind in ("warnings", "critical"):
        n = cur["health"][kind] - prev["health"][kind]
        if n > 0:
            out.append(f"{n} new {kind.rstrip('s') if n == 1 else kind}")
    out += [n for n in cur["notes"] if n not in prev["notes"]]
    return out or ["no change"]


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become the strings 'NaN' / 'Infinity' / '-Infinity'."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _emit(console: Console, s: dict, as_json: bool, diff: list[str] | None = None) -> None:
    if as_json:
        payload = s if diff is None else {**s, "changes": diff}
        sys.stdout.write(json.dumps(_jsonable(payload), allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        console.print(render(s, diff))


def _plot(run: RunData, save: str | None) -> tuple[Path, list[str]]:
    """Write the curves PNG; returns (path, panel titles)."""
    from diffold.plots import plot_run  # matplotlib only in plot mode

    out = Path(save) if save else run.path / "training_curves.png"
    return out, plot_run(run, out)


def monitor(args: argparse.Namespace, console: Console) -> int:
    """Refresh until the run ends, Ctrl-C, or --max_refreshes."""
    prev, n = None, 0
    try:
        while True:
            run = load_run(args.output_dir)
            s = summarize(run)
            if console.is_terminal and not args.json:
                console.clear()
            elif n and not args.json:
                console.print(Rule(time.strftime("%H:%M:%S")))
            _emit(console, s, args.json, changes(prev, s) if prev else None)
            if args.save_plot:
                _plot(run, args.save_plot)
            n, prev = n + 1, s
            if s["state"] in ENDED or (args.max_refreshes and n >= args.max_refreshes):
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True, help="the run directory (train_full.py --output_dir)")
    p.add_argument("--mode", choices=["status", "monitor", "plot"], default="status")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between monitor refreshes")
    p.add_argument("--save_plot", default=None, help="plot path (default <output_dir>/training_curves.png)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout (one object per refresh)")
    p.add_argument("--max_refreshes", type=int, default=0, help=argparse.SUPPRESS)  # tests: bounded monitor
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be > 0 seconds")
    if args.save_plot and Path(args.save_plot).suffix.lower() not in PLOT_SUFFIXES:
        p.error(f"--save_plot must end in one of {', '.join(s for s in PLOT_SUFFIXES if s)} (got {args.save_plot})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a terminal (or $COLUMNS) sets the width; piped output gets 160 columns instead of rich's 80
    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
    try:
        if args.mode == "monitor":
            return monitor(args, console)
        run = load_run(args.output_dir)
        s = summarize(run)
        no_metrics = NO_METRICS in s["notes"]  # still running, nothing logged yet (an ended run: status is final)
        if args.mode == "status":
            _emit(console, s, args.json)
        elif no_metrics or ENDED_EARLY in s["notes"]:
            raise RunDirError(f"{NO_METRICS if no_metrics else ENDED_EARLY} (nothing to plot)")
        else:
            for note in s["notes"]:
                print(f"note: {note}", file=sys.stderr)
            out, titles = _plot(run, args.save_plot)
            if args.json:
                _emit(console, {"plot": str(out), "panels": titles}, True)
            else:
                print(f"wrote {out} ({len(titles)} panels)")
        if no_metrics:
            print(f"error: {NO_METRICS}", file=sys.stderr)
            return 2
        return 0
    except (RunDirError, OSError) as e:  # OSError: unreadable run files, unwritable plot path
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
