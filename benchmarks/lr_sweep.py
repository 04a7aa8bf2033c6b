#!/usr/bin/env python
"""Recovery from real divergence: the LR sweep of tests/test_real_divergence.py as a table.

    OMP_NUM_THREADS=1 python benchmarks/lr_sweep.py [--steps_epochs 3] [--out /tmp/lr_sweep]

Each row is a real run of train_full.py on configs/smoke.yaml with only the optimizer and LR changed
(nothing injected): how it ended, the exit code, what the health system did, the final training loss and
the final validation loss (of the exported EMA weights; the run's health verdict is only worth something
if a "finished" run's val/loss is a healthy one's).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [("adamw", 3e-3), ("adamw", 0.05), ("adamw", 0.2), ("adamw", 1), ("adamw", 10), ("adamw", 1000),
         ("lion", 0.1), ("lion", 1), ("lion", 100)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="8 steps each on the smoke data (the test uses 3)")
    p.add_argument("--out", default="/tmp/lr_sweep")
    args = p.parse_args()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    print("| optimizer | lr | exit | end status | rollbacks | skipped | checks (action) | last loss | final val/loss | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for opt, lr in SWEEP:
        run = Path(args.out) / f"{opt}_{lr:g}"
        t0 = time.time()
        r = subprocess.run([sys.executable, str(ROOT / "train_full.py"), "--config", str(ROOT / "configs/smoke.yaml"),
                            "--output_dir", str(run), f"data.cache_dir={Path(args.out) / 'cache'}",
                            f"training.optimizer.name={opt}", f"training.optimizer.lr={lr}",
                            f"training.num_epochs={args.epochs}", f"training.validate_every={args.epochs}",
                            "training.log_every=1", "checkpoint.save_every_steps=4", "validation.num_samples=1",
                            "validation.sampling_steps=3", "logging.log_with=[]"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        end = next((x for x in recs if x["event"] == "end"), {})
        train = [x for x in recs if x["event"] == "train"]
        health = [json.loads(x) for x in (run / "health.jsonl").read_text().splitlines()] \
            if (run / "health.jsonl").exists() else []
        acts = collections.Counter((e["check"], e["action"]) for e in health if e["status"] == "critical")
        shown = ", ".join(f"{c} ({a}) x{n}" for (c, a), n in sorted(acts.items()))
        last = train[-1] if train else {}
        val = [x["val/loss"] for x in recs if x["event"] == "val" and "val/loss" in x]
        val_s = f"{val[-1]:.3g}" if val and end.get("status") != "gave_up" else "-"
        traceback = " TRACEBACK" if "Traceback" in r.stderr else ""
        print(f"| {opt} | {lr:g} | {r.returncode}{traceback} | {end.get('status')} | {last.get('health/rollbacks')} | "
              f"{last.get('health/skipped_steps')} | {shown or '-'} | {last.get('loss/total', float('nan')):.3g} | "
              f"{val_s} | {time.time() - t0:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
