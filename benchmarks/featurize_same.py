"""Featurized rows of this checkout vs another git revision: every row of every file must be identical.

    python benchmarks/featurize_same.py [--ref main] [--synthetic 1000] [--work DIR]

Featurizes data/examples (as a directory and through train.csv / val.csv) and a synthetic collection made
by benchmarks/data_scale.py, for the protein and the RNA task, once with this checkout's diffold and once
with the diffold of --ref (extracted with `git archive`), and compares every row: ids, reasons, sequences
and the bytes of every array. Prints the counts; exit code 1 if any row differs.
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "examples"


def dump(out: str, sources: list[str]) -> None:
    """Featurize every file of sources for both tasks with the diffold on sys.path; pickle the rows."""
    import numpy as np

    from diffold.config import load_config
    from diffold.featurize import featurize_file
    from diffold.pipeline import feature_spec
    from diffold.report import SplitReport
    from diffold.sources import collect, group_by_file
    from diffold.tasks import get_task

    rows = {}
    for src in sources:
        for task in ("protein", "rna"):
            cfg = load_config(None, overrides=[f"task={task}", f"data.train_path={src}", "data.val_path=null"], env={})
            spec = feature_spec(cfg, get_task(task))
            for it in group_by_file(collect(src, task, SplitReport())):
                rows[(src, task, it["path"])] = [
                    {k: (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v for k, v in r.items()}
                    for r in featurize_file(it["path"], it["display"], it["entries"], spec)]
    with open(out, "wb") as f:
        pickle.dump(rows, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", default="main", help="git revision to compare with (default: main)")
    p.add_argument("--synthetic", type=int, default=1000, help="files in the synthetic collection (0: none)")
    p.add_argument("--work", default=None, help="where the collection and the old code go (default: a temp dir)")
    p.add_argument("--dump", nargs="+", help=argparse.SUPPRESS)   # internal: OUT SOURCE...
    args = p.parse_args()
    if args.dump:
        dump(args.dump[0], args.dump[1:])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="diffold_same_"))
    sources = [str(EXAMPLES), str(EXAMPLES / "train.csv"), str(EXAMPLES / "val.csv")]
    if args.synthetic:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from data_scale import make_collection
        sources.append(str(make_collection(work / f"c{args.synthetic}", args.synthetic)))
    old = work / "ref"
    archive = subprocess.run(["git", "archive", args.ref, "diffold"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    dumps = {}
    for name, path in (("ref", old), ("here", ROOT)):
        dumps[name] = str(work / f"{name}.pkl")
        env = {**os.environ, "PYTHONPATH": str(path)}
        subprocess.run([sys.executable, __file__, "--dump", dumps[name], *sources], env=env, check=True, cwd=work)
    with open(dumps["ref"], "rb") as f:
        a = pickle.load(f)
    with open(dumps["here"], "rb") as f:
        b = pickle.load(f)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(f"{len(a)} (source, task, file) featurizations, {sum(map(len, a.values()))} rows vs {args.ref}: "
          f"{len(differ)} differ")
    for k in differ[:10]:
        print("  differs:", k)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
