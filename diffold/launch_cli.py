"""Helpers for the shell launchers (launch_train.sh, scripts/slurm/train.sbatch); no torch import.

    python -m diffold.launch_cli run-dir --config C [--preset P] [--task T] [--output_dir D] [key=value ...]
        the run directory train_full.py will use (checks the config first: one `error:` line, exit 2)
    python -m diffold.launch_cli exit-code RUN_DIR [--since BYTES]
        train_full.py's exit code from the last `end` event written after byte BYTES of metrics.jsonl
        (`accelerate launch` turns every failure into 1); prints nothing and exits 1 if there is none
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffold.config import ConfigError, load_config

# status -> exit code, for end events written before `exit_code` was recorded (see PREAMBLE contract)
STATUS_CODES = {"finished": 0, "early_stopped": 0, "max_steps": 0, "gave_up": 3, "failed": 3,
                "finished_unhealthy": 4, "interrupted": 75}


def run_dir(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m diffold.launch_cli run-dir")
    p.add_argument("--config", required=True)
    p.add_argument("--preset")
    p.add_argument("--task")
    p.add_argument("--output_dir")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    if a.output_dir:
        print(a.output_dir)
        return 0
    try:
        cfg = load_config(a.config, a.preset, [*a.overrides, *([f"task={a.task}"] if a.task else [])])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = cfg.logging.run_name or f"{Path(a.config).stem}_{time.strftime('%Y%m%d_%H%M%S')}"
    print(Path(cfg.logging.output_dir) / name)
    return 0


def end_exit_code(run: Path, since: int = 0) -> int | None:
    """Exit code of the newest `end` event after byte `since` of run/metrics.jsonl (None: no such event)."""
    path = Path(run) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(since)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if rec.get("event") == "end":
            if isinstance(rec.get("exit_code"), int):
                return rec["exit_code"]
            return STATUS_CODES.get(rec.get("status"), 1)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run-dir"]:
        return run_dir(argv[1:])
    if argv[:1] == ["exit-code"]:
        p = argparse.ArgumentParser(prog="python -m diffold.launch_cli exit-code")
        p.add_argument("run_dir")
        p.add_argument("--since", type=int, default=0)
        a = p.parse_args(argv[1:])
        code = end_exit_code(Path(a.run_dir), a.since)
        if code is None:
            return 1
        print(code)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
