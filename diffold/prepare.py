"""Featurize a structure collection ahead of training, so that training starts in seconds.

    python -m diffold.prepare --input DIR|GLOB|CSV --out CACHE [--val DIR|CSV] [--num_proc N]
                              [--config C.yaml] [key=value ...]

Writes CACHE/shards/ (featurized Arrow shards), CACHE/clusters/ (the cluster assignment that makes
the train/val split), CACHE/data_report.json (what was used and skipped, and why). Interrupted
(Ctrl-C, a crash), the same command resumes: finished shards are kept. Files added to the collection
later are the only ones featurized the next time. Train on it with the same featurization settings
(task, data.atoms, data.min_length, the absurd-geometry limits) and `data.cache_dir=CACHE`:
    python train_full.py --config C.yaml data.train_path=DIR data.cache_dir=CACHE
Exit codes: 0 done, 2 bad input or config (one `error:` line), 75 interrupted (shards kept; rerun to resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from diffold.config import ConfigError, load_config
from diffold.pipeline import prepare_tables
from diffold.shards import write_atomic
from diffold.sources import DataError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffold.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="directory, glob or CSV manifest (becomes data.train_path)")
    p.add_argument("--out", required=True, help="cache directory (becomes data.cache_dir)")
    p.add_argument("--val", default=None, help="separate validation input (data.val_path); default: split by cluster")
    p.add_argument("--num_proc", type=int, default=None,
                   help="worker processes (default: the CPUs this process may use)")
    p.add_argument("--config", default=None, help="YAML config whose featurization settings training will use")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. task=protein data.min_length=20")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    num_proc = args.num_proc if args.num_proc is not None else len(os.sched_getaffinity(0))
    over = [f"data.train_path={args.input}", f"data.val_path={args.val or 'null'}", f"data.cache_dir={args.out}",
            f"data.num_proc={num_proc}", *args.overrides]
    cfg = load_config(args.config, overrides=over)
    t0 = time.perf_counter()
    t = prepare_tables(cfg)
    rep = t.report
    for split, table, rows in ((rep.train, t.train_table, t.train_rows), (rep.val, t.val_table, t.val_rows)):
        split.chains_used = len(rows)
        split.ids = table.select(rows).select_columns(["id"]).to_dict()["id"] if rows else []
    out = Path(args.out)
    write_atomic(out / "data_report.json", json.dumps(rep.to_dict(), indent=1).encode())
    feat = rep.featurization.get(args.input, {})
    print(f"prepared {args.input}: {feat.get('files', 0)} files ({feat.get('featurized', 0)} featurized, "
          f"{feat.get('reused', 0)} reused) in {time.perf_counter() - t0:.1f} s with {num_proc} process(es)")
    print(f"chains: {len(t.train_rows)} train / {len(t.val_rows)} val; skipped "
          f"{sum(rep.train.skipped.values())} ({rep.train.top_reasons()})")
    print(f"split: {rep.split_method}")
    print(f"cache: {out} (shards/, clusters/, data_report.json)")
    print(f"train: python train_full.py {'--config ' + args.config + ' ' if args.config else ''}"
          f"data.train_path={args.input} data.cache_dir={args.out}"
          f"{' data.val_path=' + args.val if args.val else ''} {' '.join(args.overrides)}".rstrip())
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished shards are kept in {args.out}; the same command resumes", file=sys.stderr)
        return 75


if __name__ == "__main__":
    sys.exit(main())
