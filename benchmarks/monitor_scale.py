"""Time and peak memory of `monitor_training.py --mode status --json` against the size of metrics.jsonl.

    python benchmarks/monitor_scale.py [--sizes 1MB,100MB,1GB] [--plot] [--compare REV] [--keep DIR]

Each size is a synthetic run directory of realistic records (the keys a train record carries, ~600
bytes; a val event every 500 train events; one resume half-way; health events), i.e. a 1 GB file is
about a month of logging every 10 steps at 10 steps/s. Each measurement is one fresh Python process
running the monitor (imports included) that reports its own peak RSS (ru_maxrss); the figure is the
median of --repeats runs. --plot also measures `--mode plot` (it must read the whole history).
--compare REV measures the monitor of a git revision the same way (e.g. the pre-fix one), on the
sizes up to --compare_max. Target (issue 19): flat, < 1 s and < 200 MB at 1 GB.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30}
CHILD = """
import resource, sys, time, runpy, io, contextlib
sys.argv = ["monitor_training.py"] + sys.argv[1:]
sys.path.insert(0, ".")
t = time.perf_counter()
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        runpy.run_path("monitor_training.py", run_name="__main__")
except SystemExit as e:
    rc = e.code
dt = time.perf_counter() - t
print(f"{dt} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024} {rc}", file=sys.stderr)
"""


def size_bytes(text: str) -> int:
    return int(float(text[:-2]) * UNITS[text[-2:].upper()])


def make_run(root: Path, nbytes: int) -> Path:
    """A run directory whose metrics.jsonl is about nbytes long (streamed to disk, constant memory)."""
    run = root / f"run_{nbytes}"
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text("task: rna\ntraining:\n  num_epochs: 1000\n  log_every: 10\n")
    t0 = time.time() - 30 * 86400
    step, written, n = 0, 0, 0
    resume_cmd = f"accelerate launch train_full.py --config {run}/config.yaml --output_dir {run} --resume auto"
    start = {"event": "start", "run_name": "month", "total_steps": 10 ** 8, "num_processes": 8,
             "effective_batch_size": 64, "resume_command": resume_cmd, "resumed_from": None}
    with (run / "metrics.jsonl").open("w") as f, (run / "health.jsonl").open("w") as h:
        def put(rec: dict) -> None:
            nonlocal written
            line = json.dumps(rec) + "\n"
            f.write(line)
            written += len(line)
        put({**start, "time": t0, "step": 0, "epoch": 0})
        resumed = False
        while written < nbytes:
            step += 10
            n += 1
            t = t0 + step * 0.1
            loss = 2.0 * math.exp(-step / 1e6) + 0.1 + 0.01 * math.sin(step)
            put({"event": "train", "time": t, "step": step, "epoch": step // 100_000, "loss/total": loss,
                 "loss/diffusion": 0.8 * loss, "loss/structure": 0.2 * loss, "lr": 3e-4, "grad_norm": 1.5,
                 "grad_norm_max": 2.5, "time/step_s": 0.1, "time/data_share": 0.05, "samples_per_s": 640.0,
                 "residues_per_s": 40960.0, "mem/device_gb": 61.2, "mem/host_gb": 12.5, "health/status": 0,
                 "health/loss_zscore": 0.3, "health/grad_norm_preclip": 1.4, "health/skipped_steps": 0,
                 "health/rollbacks": 0, "health/oom_retries": 0, "loss_bin/0-0.25": 0.5 * loss,
                 "loss_bin/0.25-1": loss, "loss_bin/1-4": 1.2 * loss, "loss_bin/4-16": 1.5 * loss,
                 "loss_bin/16-64": 2 * loss})
            if n % 500 == 0:
                put({"event": "val", "time": t + 1, "step": step, "epoch": step // 100_000, "val/loss": loss,
                     "val/rmsd": 8.0, "val/tm": 0.3, "val/gdt_ts": 0.35, "val/lddt": 0.5,
                     "val_baseline/lddt": 0.49, "val_baseline/tm": 0.17, "val_baseline/rmsd": 9.8,
                     "val_baseline/gdt_ts": 0.25, "best_metric": "val/loss", "best_value": loss, "best_step": step})
            if n % 5000 == 0:
                h.write(json.dumps({"time": t, "step": step, "status": "warning", "check": "slow_batch",
                                    "message": "step time 0.4 s above 3 x the running median",
                                    "suggestion": "check disk/CPU contention", "action": "none"}) + "\n")
            if not resumed and written > nbytes / 2:
                put({**start, "time": t + 60, "step": step, "epoch": step // 100_000, "resumed_from": "latest"})
                resumed = True
    (run / "heartbeat.json").write_text(json.dumps({
        "time": time.time(), "pid": 1, "host": "gpu-node-17", "step": step, "epoch": step // 100_000,
        "total_steps": 10 ** 8, "phase": "train", "status": "running", "resume_command": resume_cmd}))
    (run / "logs" / "training_20250101_000000.log").write_text(f"INFO step {step} | healthy\n")
    return run


def measure(monitor_dir: Path, run: Path, mode: str, repeats: int, tmp: Path) -> tuple[float, float]:
    """Median (seconds, peak MB) of `repeats` fresh processes."""
    out = []
    for _ in range(repeats):
        args = ["--output_dir", str(run), "--mode", mode] + (["--json"] if mode == "status" else
                                                             ["--save_plot", str(tmp / "p.png")])
        r = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=monitor_dir, capture_output=True, text=True,
                           timeout=3600)
        dt, mb, rc = r.stderr.strip().splitlines()[-1].split()
        if rc not in ("0", "None"):
            raise SystemExit(f"monitor exited {rc}: {r.stderr[-2000:]}")
        out.append((float(dt), float(mb)))
    return statistics.median(t for t, _ in out), statistics.median(m for _, m in out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1MB,100MB,1GB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", action="store_true", help="also time --mode plot (whole history)")
    ap.add_argument("--compare", default=None, help="git revision whose monitor is measured too")
    ap.add_argument("--compare_max", default="100MB", help="largest size measured for --compare")
    ap.add_argument("--keep", default=None, help="directory for the generated runs (kept); default: a temp dir")
    args = ap.parse_args(argv)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="monitor_scale_"))
    tmp.mkdir(parents=True, exist_ok=True)
    monitors = {"this tree": ROOT}
    if args.compare:
        old = tmp / "compare"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.compare, "monitor_training.py", "diffold"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        monitors[f"{args.compare}"] = old
    try:
        print("| metrics.jsonl | monitor | status time (s) | status peak RSS (MB) |"
              + (" plot time (s) | plot peak RSS (MB) |" if args.plot else ""))
        print("|---|---|---|---|" + ("---|---|" if args.plot else ""))
        for text in args.sizes.split(","):
            nbytes = size_bytes(text)
            run = next(iter(tmp.glob(f"run_{nbytes}")), None) or make_run(tmp, nbytes)
            real = (run / "metrics.jsonl").stat().st_size
            for name, mdir in monitors.items():
                if mdir is not ROOT and nbytes > size_bytes(args.compare_max):
                    continue
                t, mb = measure(mdir, run, "status", args.repeats, tmp)
                row = f"| {real / 2**20:,.0f} MB | {name} | {t:.2f} | {mb:.0f} |"
                if args.plot:
                    pt, pmb = measure(mdir, run, "plot", 1, tmp)
                    row += f" {pt:.1f} | {pmb:.0f} |"
                print(row, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
