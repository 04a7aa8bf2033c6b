#!/usr/bin/env python
"""Results of benchmarks/gpu_check.sh: one JSON record per stage, checkpoint comparison, the table.

    python benchmarks/gpu_report.py record RESULTS --stage S --rc N --seconds T [--json FILE] [--note TEXT]
    python benchmarks/gpu_report.py train RUN_DIR [--flops FILE] [--peak-tflops P]   -> JSON on stdout
    python benchmarks/gpu_report.py compare RUN_A RUN_B                               -> JSON on stdout
    python benchmarks/gpu_report.py table RESULTS OUT.md                              -> table on stdout + file

`train` reads metrics.jsonl: step time = median of the logged per-interval mean step times after the
first interval (warm-up), i.e. training steps only (checkpoint writes and validation excluded);
samples/s = effective batch / step time; peak memory = max of mem/device_gb (torch max allocated);
MFU = FLOPs per step (benchmarks/flops.py) / step time / peak FLOP/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

H100_SXM_BF16_TFLOPS = 989.0  # dense bf16, NVIDIA spec; H200 has the same tensor cores (~790 measured on an H200)


def record(results: Path, stage: str, rc: int, seconds: float, data: dict, note: str) -> None:
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else f"failed (exit {rc})"
    with open(results, "a") as f:
        f.write(json.dumps({"stage": stage, "status": status, "seconds": round(seconds, 1), "note": note, **data}) + "\n")


def train_summary(run: Path, flops: dict | None, peak_tflops: float) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["event"] == "train"]
    start = next(r for r in recs if r["event"] == "start")
    steps = [r["time/step_s"] for r in train[1:]] or [r["time/step_s"] for r in train]
    step_s = statistics.median(steps)
    mem = [r.get("mem/device_gb") for r in train if r.get("mem/device_gb") is not None]
    out = {"steps": train[-1]["step"] if train else 0, "step_ms": 1e3 * step_s, "steps_per_s": 1 / step_s,
           "samples_per_s": start["effective_batch_size"] / step_s, "peak_mem_gb": max(mem) if mem else None}
    if flops:
        achieved = flops["flops_per_step"] / step_s / 1e12
        out.update({"tflops": achieved, "mfu_spec": achieved / peak_tflops,
                    "mfu_measured_peak": achieved / flops["matmul_tflops"], "matmul_tflops": flops["matmul_tflops"],
                    "flops_per_step": flops["flops_per_step"]})
    return out


def _tensors(ckpt: Path) -> dict:
    """Every tensor of a checkpoint directory: safetensors, torch .bin, and FSDP sharded (DCP) folders."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for p in sorted(ckpt.rglob("*")):
        rel = str(p.relative_to(ckpt))
        if p.suffix == ".safetensors":
            out.update({f"{rel}:{k}": v for k, v in load_file(str(p)).items()})
        elif p.suffix == ".bin":
            out.update(_flatten(rel, torch.load(p, map_location="cpu", weights_only=True)))
        elif p.is_dir() and any(p.glob("*.distcp")):
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            tmp = ckpt.parent / f".{ckpt.name}-{p.name}.pt"
            dcp_to_torch_save(str(p), str(tmp))
            out.update(_flatten(rel, torch.load(tmp, map_location="cpu", weights_only=False)))
            tmp.unlink()
    return out


def _flatten(prefix: str, obj) -> dict:
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(f"{prefix}.{key}", val).items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(f"{prefix}.{i}", val).items()}
    return {}


def compare(a: Path, b: Path) -> dict:
    """Bit-identity of the `latest` checkpoints of two runs, else the largest absolute difference."""
    ca, cb = (a / "checkpoints" / "latest").resolve(), (b / "checkpoints" / "latest").resolve()
    ta, tb = _tensors(ca), _tensors(cb)
    common = sorted(set(ta) & set(tb))
    diff = [k for k in common if not (ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all()))]
    worst = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in diff if ta[k].shape == tb[k].shape),
                default=0.0)
    return {"checkpoint": [ca.name, cb.name], "tensors": len(common), "identical": not diff and ca.name == cb.name,
            "differing": len(diff), "max_abs_diff": worst, "only_in_one": len(set(ta) ^ set(tb))}


def last_json(path: Path | None) -> dict:
    """The last line of a stage log that is a JSON object ({} if none: the stage failed before printing it)."""
    if path is None or not path.is_file():
        return {}
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def row(rec: dict) -> tuple[str, str]:
    """(what, result) for one stage record."""
    s = rec["stage"]
    if s == "a_simple_train":
        return "(a) simple_train.py on the GPU", rec.get("note") or ""
    if s == "b_default_200" and "steps_per_s" in rec:
        mfu = (f"; {_fmt(rec.get('tflops'))} TFLOP/s = MFU {_fmt(100 * rec['mfu_spec'], '.1f')} % of "
               f"{H100_SXM_BF16_TFLOPS:g} (spec), {_fmt(100 * rec['mfu_measured_peak'], '.1f')} % of "
               f"{_fmt(rec['matmul_tflops'])} measured matmul peak") if "mfu_spec" in rec else ""
        return ("(b) configs/default.yaml, 200 steps bf16",
                f"{_fmt(rec['steps_per_s'])} steps/s, {_fmt(rec['samples_per_s'])} samples/s, "
                f"peak {_fmt(rec['peak_mem_gb'])} GB{mfu}")
    if s == "c_longest_crop" and "plain" in rec:
        f = lambda r: f"{'>= ' if r['capped'] else ''}{r['longest']} ({_fmt(r['peak_gb'])} GB)"  # noqa: E731
        return (f"(c) longest crop, batch 1, {rec.get('precision')}",
                f"{f(rec['plain'])} plain, {f(rec['checkpointing'])} with activation checkpointing")
    if s == "d_compile" and "ratio" in rec:
        return ("(d) model.compile on vs off", f"step {_fmt(rec['compiled_step_ms'])} vs {_fmt(rec['eager_step_ms'])} ms "
                f"(ratio {_fmt(rec['ratio'])}, range {_fmt(rec['ratio_min'])}-{_fmt(rec['ratio_max'])}), "
                f"compile {_fmt(rec['compile_s'])} s, {rec['backend']}, B x L = {rec['shape']}")
    if s.startswith("e_fsdp") and "identical" in rec:
        res = "bit-identical" if rec["identical"] else f"{rec['differing']}/{rec['tensors']} tensors differ, max |diff| {_fmt(rec['max_abs_diff'])}"
        return (f"(e) 1-GPU FSDP save + --resume auto{' (deterministic algorithms)' if 'determ' in s else ''}", res)
    if s == "f_kill_resume":
        return "(f) kill-and-resume test on the GPU", rec.get("note") or ""
    return s, rec.get("note") or ""


def table(results: Path, out: Path) -> str:
    recs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = ["| check | result | status | seconds |", "|---|---|---|---|"]
    for rec in recs:
        what, res = row(rec)
        lines.append(f"| {what} | {res} | {rec['status']} | {rec['seconds']:g} |")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("results", type=Path)
    r.add_argument("--stage", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--json", type=Path)
    r.add_argument("--note", default="")
    t = sub.add_parser("train")
    t.add_argument("run", type=Path)
    t.add_argument("--flops", type=Path)
    t.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    tb = sub.add_parser("table")
    tb.add_argument("results", type=Path)
    tb.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "record":
        record(a.results, a.stage, a.rc, a.seconds, last_json(a.json), a.note)
    elif a.cmd == "train":
        print(json.dumps(train_summary(a.run, last_json(a.flops) or None, a.peak_tflops)))
    elif a.cmd == "compare":
        print(json.dumps(compare(a.a, a.b)))
    else:
        print(table(a.results, a.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
