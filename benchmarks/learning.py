"""Does the model learn? Train the 10-minute recipe per molecule, score held-out WHOLE chains vs the baselines.

    OMP_NUM_THREADS=1 python benchmarks/learning.py [--molecules rna protein] [--config configs/cpu_10min.yaml]
        [--num_samples 5] [--steps N] [--step_scale ETA] [--out DIR] [--reuse] [key=value ...]

For each molecule: `python train_full.py --config CONFIG --task MOL` (a real run, in a subprocess),
then the held-out split (data.val_path) is scored with diffold.evaluate's code for the trained
model (its export bundle), the same architecture untrained, and every baseline. Prints, per
molecule, the mean over chains of lDDT (RNA: 30 A radius, and 15 A), TM-score, GDT-TS, RMSD and
the median consecutive distance of the samples next to the native's, plus steps and steps/s.
A benchmark that prints numbers, not a timed test. --reuse skips training when OUT/MOL/export exists;
with --step_scale it re-scores the same trained model with another sampler step scale (AF3's eta).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
COLUMNS = (("lddt", "lDDT"), ("lddt_15", "lDDT15"), ("tm", "TM"), ("gdt_ts", "GDT-TS"), ("rmsd", "RMSD"),
           ("consecutive_distance", "d(i,i+1)"))


def train(config: str, molecule: str, run: Path, overrides: list[str]) -> dict:
    """Run train_full.py; {"steps", "train_s", "steps_per_s"} from the run's metrics.jsonl."""
    t0 = time.time()
    with open(run.with_suffix(".train.log"), "w") as log:
        r = subprocess.run([sys.executable, str(ROOT / "train_full.py"), "--config", config, "--task", molecule,
                            "--output_dir", str(run), *overrides], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"training {molecule} failed (exit {r.returncode}): see {run.with_suffix('.train.log')}")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(e["time/step_s"] * (e["step"] - prev["step"]) for prev, e in
                  zip(events, events[1:]) if e["event"] == "train" and "time/step_s" in e)
    steps = max(e["step"] for e in events)
    return {"steps": steps, "train_s": train_s, "steps_per_s": steps / max(train_s, 1e-9), "wall_s": time.time() - t0}


def score(run: Path, num_samples: int, steps: int | None, untrained: bool = True, step_scale: float | None = None) -> dict:
    """Held-out evaluation of the trained export and of the same model untrained."""
    import dataclasses

    import torch

    from diffold.config import load_config
    from diffold.evaluate import evaluate_chains, load_chains, summary
    from diffold.model import build_model
    from diffold.predict import load_bundle

    model, diffusion, task, atoms, _ = load_bundle(run / "export")
    if step_scale is not None:
        diffusion.cfg = dataclasses.replace(diffusion.cfg, sampling_step_scale=step_scale)
    cfg = load_config(run / "config.yaml", env={})
    chains = load_chains(Path(cfg.data.val_path), task, atoms, cfg.data.min_length, cfg.validation.max_length)
    n_steps = steps or cfg.diffusion.num_sampling_steps
    trained = evaluate_chains(model, diffusion, task, atoms, chains, num_samples, n_steps, cfg.training.seed)
    before = {}
    if untrained:
        torch.manual_seed(cfg.training.seed)
        before = summary(evaluate_chains(build_model(cfg, len(atoms)).eval(), diffusion, task, atoms, chains,
                                         num_samples, n_steps, cfg.training.seed))
    return {"trained": summary(trained), "untrained": before, "chains": trained, "sampling_steps": n_steps,
            "step_scale": diffusion.cfg.sampling_step_scale}


def table(molecule: str, res: dict, stats: dict, num_samples: int) -> str:
    s, u = res["trained"], res["untrained"]
    head = f"{'':<24}" + "".join(f"{name:>9}" for _, name in COLUMNS)
    rows = [("untrained (mean of K)", u.get("model_mean", {})), (f"model, mean of {num_samples}", s["model_mean"]),
            (f"model, best of {num_samples}", s["model_best"]), ("helix", s["helix"]), ("random walk", s["random_walk"])]
    lines = [f"{molecule}: {s['chains_scored']} held-out whole chains, {stats['steps']} steps in {stats['train_s'] / 60:.1f} min "
             f"({stats['steps_per_s']:.1f} steps/s), {res['sampling_steps']} sampler steps "
             f"(step scale {res['step_scale']:g}), {s['samples_failed']} failed samples",
             head]
    for label, v in rows:
        lines.append(f"{label:<24}" + "".join(f"{v.get(k, float('nan')):>9.3f}" if k != "consecutive_distance"
                                               else f"{v.get(k, float('nan')):>9.2f}" for k, _ in COLUMNS))
    lines.append(f"{'native':<24}" + " " * 9 * (len(COLUMNS) - 1) + f"{s['native_consecutive_distance']:>9.2f}")
    best = {k: max(s["helix"][k], s["random_walk"][k]) for k in ("lddt", "tm")}
    verdict = ", ".join(f"{k} {s['model_mean'][k]:.3f} vs best baseline {best[k]:.3f} "
                        f"({'above' if s['model_mean'][k] > best[k] else 'BELOW'})" for k in best)
    gain = (f"{s['model_mean']['lddt'] - u['model_mean']['lddt']:+.3f}" if u.get("model_mean") else "not scored")
    return "\n".join(lines + [f"model (mean of K): {verdict}; lDDT gain over untrained {gain}"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", nargs="+", default=["rna", "protein"], choices=["rna", "protein"])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu_10min.yaml"))
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's diffusion.num_sampling_steps)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / f"learning_{time.strftime('%Y%m%d_%H%M%S')}")
    p.add_argument("--step_scale", type=float, default=None,
                   help="sampler step scale for scoring (default: the run's diffusion.sampling_step_scale)")
    p.add_argument("--reuse", action="store_true", help="score existing OUT/<molecule> runs instead of training")
    p.add_argument("--skip_untrained", action="store_true", help="do not score the untrained model (saves time)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for the training runs")
    args = p.parse_intermixed_args()
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for mol in args.molecules:
        run = args.out / mol
        if args.reuse and (run / "export").is_dir():
            stats = json.loads((args.out / f"{mol}.stats.json").read_text())
        else:
            stats = train(args.config, mol, run, args.overrides)
            (args.out / f"{mol}.stats.json").write_text(json.dumps(stats))
        res = score(run, args.num_samples, args.steps, not args.skip_untrained, args.step_scale)
        report[mol] = {"stats": stats, **res}
        print(table(mol, res, stats, args.num_samples), "\n", flush=True)
    (args.out / "learning.json").write_text(json.dumps(report, indent=1))
    print(f"command: {' '.join(sys.argv)}\nresults: {args.out / 'learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
