"""Data preparation at scale: featurization vs a plain gemmi read+extract loop, workers, warm start, memory,
clustering. Prints numbers (not a timed test).

    python benchmarks/data_scale.py [--sizes 1000 5000 20000] [--workers 1 2] [--cluster_sizes 1000 5000 20000]
                                    [--work DIR]

Collections are made from data/examples (every shipped file in turn, renamed ids, 0.05 A Gaussian noise on
every atom). Each size runs in its own process so that peak RSS is that size's. Times are wall seconds;
"cpu" columns are CPU seconds summed over the process and its workers, which shared 2-core machines blur
far less than wall time: the per-core ratio is featurization CPU / gemmi-loop CPU.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing as mp
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemmi
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "examples"


def make_collection(out: Path, n: int, seed: int = 0) -> Path:
    """n files: data/examples in turn, each copy renamed (s<i>_<id>) with 0.05 A noise on every atom."""
    if out.is_dir() and len(list(out.iterdir())) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = sorted(EXAMPLES.rglob("*.gz"))
    flats = [gemmi.FlatStructure(gemmi.read_structure(str(p))) for p in sources]
    base = [np.array(f.pos) for f in flats]
    for i in range(n):
        k = i % len(sources)
        pos = np.array(flats[k].pos, copy=False)                           # [N, 3] view into the structure
        pos[:] = base[k] + rng.normal(0.0, 0.05, base[k].shape)
        st = flats[k].generate_structure()
        cif = sources[k].name.endswith(".cif.gz")
        text = st.make_mmcif_document().as_string() if cif else st.make_pdb_string()
        name = f"s{i:06d}_{sources[k].name.split('.')[0]}.{'cif' if cif else 'pdb'}.gz"
        (out / name).write_bytes(gzip.compress(text.encode(), compresslevel=6, mtime=0))
    return out


def gemmi_loop(files: list[str]) -> float:
    """The reference: read each file with gemmi and pull each residue's representative atom; CPU seconds."""
    t0 = time.process_time()
    for f in files:
        st = gemmi.read_structure(f)
        for ch in st[0]:
            for r in ch:
                r.find_atom("CA", "*") or r.find_atom("C4'", "*")
    return time.process_time() - t0


def timed_gemmi_loop(files: list[str], workers: int) -> tuple[float, float]:
    """(wall s, cpu s) of the gemmi loop over `workers` processes (files split round-robin)."""
    t0 = time.perf_counter()
    if workers == 1:
        cpu = gemmi_loop(files)
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            cpu = sum(pool.map(gemmi_loop, [files[i::workers] for i in range(workers)]))
    return time.perf_counter() - t0, cpu


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_size(n: int, workers: int, work: Path) -> dict:
    """Cold featurization with `workers` processes, then a warm build_datasets; run in a fresh process."""
    from diffold.config import load_config
    from diffold.data import build_datasets
    from diffold.pipeline import feature_spec, featurize_cached
    from diffold.report import SplitReport
    from diffold.sources import collect, group_by_file
    from diffold.tasks import get_task

    coll = make_collection(work / f"c{n}", n)
    cache = work / f"cache{n}-w{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = load_config(None, overrides=["task=protein", f"data.train_path={coll}", "data.val_path=null",
                                       f"data.cache_dir={cache}", f"data.num_proc={workers}"], env={})
    items = group_by_file(collect(str(coll), "protein", SplitReport()))
    spec = feature_spec(cfg, get_task("protein"))
    c0, k0, t0 = time.process_time(), children_cpu(), time.perf_counter()
    _, _, stats = featurize_cached(items, spec, cache, workers, 120.0)
    cold = time.perf_counter() - t0
    cold_cpu = time.process_time() - c0 + children_cpu() - k0
    rss_cold = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    t0 = time.perf_counter()
    train, val, rep = build_datasets(cfg)  # warm: everything before the first training step
    warm = time.perf_counter() - t0
    assert rep.cache_hit[str(coll)]
    return {"n": n, "workers": workers, "cold_s": cold, "cold_cpu_s": cold_cpu, "worker_cpu_s": stats["worker_cpu_s"],
            "warm_s": warm, "chains": len(train) + len(val or []), "rss_main_mb": rss_cold,
            "rss_max_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_worker_mb": rss_workers}


def family_sequences(n: int, kind: str, seed: int = 0) -> list[str]:
    """n distinct sequences: shipped ones with 1-30 % random substitutions (families of related chains)."""
    import csv

    rows = [r for s in ("train", "val") for r in csv.DictReader(open(EXAMPLES / f"{s}.csv", newline=""))]
    bases = [r["sequence"] for r in rows if r["molecule"] == kind and len(r["sequence"]) < 1000]
    letters = np.array(list("ACGU" if kind == "rna" else "ACDEFGHIKLMNPQRSTVWY"))
    rng = np.random.default_rng(seed)
    out = set()
    while len(out) < n:
        s = np.array(list(bases[rng.integers(len(bases))]))
        hit = rng.random(len(s)) < rng.uniform(0.01, 0.3)
        s[hit] = rng.choice(letters, hit.sum())
        out.add("".join(s))
    return sorted(out)


def clustering_times(n: int, kind: str, work: Path) -> dict:
    from diffold.clustering import ClusterSettings, cluster_labels, find_mmseqs

    seqs = family_sequences(n, kind)
    out = {"n": n, "kind": kind}
    for method in ("builtin", "mmseqs") if find_mmseqs() else ("builtin",):
        t0 = time.perf_counter()
        _, rec = cluster_labels(seqs, ClusterSettings(method, 0.9, 0.8, kind, 4 if kind == "rna" else 20, 2), work)
        out[method] = {"s": time.perf_counter() - t0, "clusters": rec["clusters"]}
        shutil.rmtree(work / "clusters", ignore_errors=True)
    return out


def subprocess_json(args: list[str]) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000])
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--cluster_sizes", type=int, nargs="*", default=[1000, 5000, 20000])
    p.add_argument("--work", default=None, help="where collections and caches go (default: a temp dir)")
    p.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)       # internal: one size, one worker count
    p.add_argument("--gemmi", nargs=2, type=int, help=argparse.SUPPRESS)     # internal: gemmi loop
    p.add_argument("--cluster", nargs=2, help=argparse.SUPPRESS)             # internal: clustering
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="diffold_data_scale_"))
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print(json.dumps(one_size(args.one[0], args.one[1], work)))
        return
    if args.gemmi:
        files = sorted(str(f) for f in make_collection(work / f"c{args.gemmi[0]}", args.gemmi[0]).iterdir())
        wall, cpu = timed_gemmi_loop(files, args.gemmi[1])
        print(json.dumps({"wall_s": wall, "cpu_s": cpu}))
        return
    if args.cluster:
        print(json.dumps(clustering_times(int(args.cluster[0]), args.cluster[1], work)))
        return
    print(f"work dir: {work}")
    print(f"{'files':>6} {'workers':>7} {'gemmi s':>8} {'feat s':>7} {'wall x':>6} {'gemmi cpu':>9} {'feat cpu':>8} "
          f"{'cpu x':>6} {'warm s':>7} {'warm %':>6} {'RSS main MB':>11} {'RSS worker MB':>13} {'chains':>6}")
    for n in args.sizes:
        make_collection(work / f"c{n}", n)
        for w in args.workers:
            g = subprocess_json(["--work", str(work), "--gemmi", str(n), str(w)])
            r = subprocess_json(["--work", str(work), "--one", str(n), str(w)])
            print(f"{n:6d} {w:7d} {g['wall_s']:8.1f} {r['cold_s']:7.1f} {r['cold_s'] / g['wall_s']:6.2f} "
                  f"{g['cpu_s']:9.1f} {r['cold_cpu_s']:8.1f} {r['cold_cpu_s'] / g['cpu_s']:6.2f} {r['warm_s']:7.2f} "
                  f"{100 * r['warm_s'] / r['cold_s']:6.1f} {r['rss_max_mb']:11.0f} {r['rss_worker_mb']:13.0f} "
                  f"{r['chains']:6d}", flush=True)
    print(f"\n{'clustering':>10} {'kind':>7} {'built-in s':>10} {'clusters':>8} {'mmseqs2 s':>9} {'clusters':>8}")
    for n in args.cluster_sizes:
        for kind in ("protein", "rna"):
            c = subprocess_json(["--work", str(work), "--cluster", str(n), kind])
            mm = c.get("mmseqs", {"s": float("nan"), "clusters": 0})
            print(f"{n:10d} {kind:>7} {c['builtin']['s']:10.2f} {c['builtin']['clusters']:8d} {mm['s']:9.2f} "
                  f"{mm['clusters']:8d}", flush=True)


if __name__ == "__main__":
    main()
