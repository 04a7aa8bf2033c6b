#!/usr/bin/env python
"""Smoke test: the tiny model on the shipped example chains, on CPU, in about 15 seconds.

    python simple_train.py [--output_dir D] [key=value ...]

Runs the same `train()` as train_full.py on configs/smoke.yaml, then checks for itself that
(1) the training loss fell (same chains, same seeded noise: untrained vs trained model), (2) the
last checkpoint reloads bit-identically, and (3) a sampled structure was written and parses. Exit code 0 only if all three hold.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent


def fixed_noise_loss(model, result: dict) -> float:
    """Loss over the training chains with the same seeded noise for every model: comparable values
    (the per-interval training loss mostly reflects which noise levels were drawn)."""
    import torch

    from diffold.validation import validation_loss

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return validation_loss(result["accelerator"], model.eval(), result["diffusion"], result["train_loader"])


def untrained_model(result: dict):
    import torch

    from diffold.model import build_model

    torch.manual_seed(result["cfg"].training.seed)
    return build_model(result["cfg"], num_atoms=result["model"].num_atoms)


def check_run(result: dict) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for the three promises of the smoke test."""
    from safetensors.torch import load_file

    from diffold.structure import parse_structure

    run_dir, checks = Path(result["run_dir"]), []
    before, after = fixed_noise_loss(untrained_model(result), result), fixed_noise_loss(result["model"], result)
    checks.append(("loss fell", after < 0.9 * before,
                   f"fixed-noise training loss {before:.4f} (untrained) -> {after:.4f} (trained), needs < 0.9x"))

    latest = (run_dir / "checkpoints" / "latest").resolve()
    saved = load_file(str(latest / "model.safetensors"))
    live = {k: v.detach().cpu() for k, v in result["model"].state_dict().items()}
    ema_saved = load_file(str(latest / "ema.safetensors"))
    same = saved.keys() == live.keys() and all(saved[k].equal(live[k]) for k in live)
    same_ema = all(ema_saved[k].equal(v) for k, v in result["ema"].state_dict().items())
    checks.append(("checkpoint reloads bit-identically", same and same_ema, f"{latest.name}: {len(saved)} tensors"))

    samples = sorted((run_dir / "samples").rglob("*.pdb"))
    parsed = parse_structure(samples[-1])[0] if samples else []
    checks.append(("sampled structure written", bool(parsed), f"{samples[-1]} ({len(parsed[0].sequence)} residues)"
                   if parsed else "no samples/*.pdb"))
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    os.chdir(ROOT)  # the smoke config names data/examples relative to the repository

    from diffold.config import ConfigError, load_config
    from train_full import train

    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    result = train(cfg, args.output_dir or f"outputs/simple_train_{time.strftime('%Y%m%d_%H%M%S')}", resume=None)
    checks = check_run(result)
    print(f"\nsimple_train: {result['status']} after {result['step']} steps in {time.time() - t0:.1f} s  ({result['run_dir']})")
    for name, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    ok = result["status"] == "finished" and all(c[1] for c in checks)
    print(f"simple_train: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
