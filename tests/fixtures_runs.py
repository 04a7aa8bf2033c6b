"""Build synthetic run directories that follow docs/run_directory.md, for monitor tests."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

LOG_INTERVAL_S = 5.0   # seconds between synthetic train log events


def dead_pid() -> int:
    """A pid that belonged to a process which has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class RunBuilder:
    """Writes the files of one run directory, event by event, with explicit timestamps."""

    def __init__(self, root: Path, name: str = "demo_run", total_steps: int = 1000, num_epochs: int = 10):
        self.path = root / name
        self.path.mkdir(parents=True, exist_ok=True)
        self.name, self.total_steps, self.num_epochs = name, total_steps, num_epochs

    def config(self) -> RunBuilder:
        cfg = {"task": "rna", "data": {"atoms": None, "max_length": 64},
               "training": {"num_epochs": self.num_epochs, "log_every": 10},
               "validation": {"best_metric": "val/loss", "best_mode": "min"}}
        (self.path / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return self

    def _append(self, file: str, record: dict[str, Any]) -> None:
        with (self.path / file).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def raw(self, file: str, text: str) -> RunBuilder:
        """Append text verbatim (garbage lines, a truncated last line)."""
        with (self.path / file).open("a", encoding="utf-8") as f:
            f.write(text)
        return self

    def start(self, t: float, step: int = 0, resumed_from: str | None = None) -> RunBuilder:
        self._append("metrics.jsonl", {
            "event": "start", "time": t, "step": step, "epoch": 0, "run_name": self.name,
            "total_steps": self.total_steps, "num_processes": 1, "effective_batch_size": 8,
            "resume_command": f"accelerate launch train_full.py --config {self.path}/config.yaml "
                              f"--output_dir {self.path} --resume auto",
            "resumed_from": resumed_from})
        return self

    def train(self, step: int, t: float, loss: float | None = None, **extra: Any) -> RunBuilder:
        loss = 2.0 * math.exp(-step / 300) + 0.1 if loss is None else loss
        rec = {"event": "train", "time": t, "step": step, "epoch": step * self.num_epochs // self.total_steps,
               "loss/total": loss, "loss/diffusion": 0.8 * loss, "loss/structure": 0.2 * loss,
               "lr": 3e-4, "grad_norm": 1.5, "samples_per_s": 12.5, "residues_per_s": 800.0,
               "mem/device_gb": 0.0, "mem/host_gb": 2.5, "time/data_share": 0.05, "health/status": 0,
               "health/loss_zscore": 0.3, "health/skipped_steps": 0, "health/rollbacks": 0,
               "health/oom_retries": 0, "loss_bin/0.002-0.1": 0.5 * loss, "loss_bin/0.1-1": loss,
               "loss_bin/1-10": 1.5 * loss, "loss_bin/10-160": 2 * loss}
        rec.update(extra)
        self._append("metrics.jsonl", rec)
        return self

    def val(self, step: int, t: float, loss: float, best_step: int, best_value: float, **extra: Any) -> RunBuilder:
        self._append("metrics.jsonl", {
            "event": "val", "time": t, "step": step, "epoch": step * self.num_epochs // self.total_steps,
            "val/loss": loss, "val/rmsd": 8.0 * loss, "val/tm": 0.3, "val/gdt_ts": 0.35, "val/lddt": 0.5,
            "best_metric": "val/loss", "best_value": best_value, "best_step": best_step, **extra})
        return self

    def end(self, t: float, step: int, status: str = "finished", reason: str = "reached max_steps",
            exit_code: int | None = None) -> RunBuilder:
        rec = {"event": "end", "time": t, "step": step, "epoch": 0, "status": status, "reason": reason}
        if exit_code is not None:
            rec["exit_code"] = exit_code
        self._append("metrics.jsonl", rec)
        return self

    def health(self, t: float, step: int, status: str = "warning", check: str = "loss_spike",
               action: str = "none") -> RunBuilder:
        self._append("health.jsonl", {
            "time": t, "step": step, "status": status, "check": check, "message": f"{check} at step {step}",
            "suggestion": "lower training.optimizer.lr", "action": action})
        return self

    def heartbeat(self, t: float, step: int, status: str = "running", pid: int | None = None,
                  host: str | None = None, phase: str = "train") -> RunBuilder:
        hb = {"time": t, "pid": os.getpid() if pid is None else pid, "host": host or socket.gethostname(),
              "step": step, "epoch": step * self.num_epochs // self.total_steps, "total_steps": self.total_steps,
              "phase": phase, "status": status,
              "resume_command": f"accelerate launch train_full.py --config {self.path}/config.yaml "
                                f"--output_dir {self.path} --resume auto"}
        (self.path / "heartbeat.json").write_text(json.dumps(hb), encoding="utf-8")
        return self

    def checkpoint(self, name: str, step: int, t: float, complete: bool = True) -> RunBuilder:
        d = self.path / "checkpoints" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(b"\0" * 16)
        if complete:
            meta = {"name": name, "step": step, "epoch": step * self.num_epochs // self.total_steps,
                    "batch_in_epoch": 0, "timestamp": t, "num_processes": 1, "config": {},
                    "versions": {}, "files": {}, "metrics": {}, "wandb_run_id": None}
            (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        return self

    def link_latest(self, target: str) -> RunBuilder:
        link = self.path / "checkpoints" / "latest"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
        return self

    def data_report(self) -> RunBuilder:
        split = {"files_seen": 12, "chains_used": 10, "by_kind": {"rna": 8, "protein": 2},
                 "skipped": {"too_short": 1, "parse_error": 1},
                 "skipped_items": [{"source": "a.cif", "chain": "B", "reason": "too_short"}], "cropped": 3}
        report = {"split_method": "cluster", "train": {"split": "train", **split},
                  "val": {"split": "val", **split, "chains_used": 2}}
        (self.path / "data_report.json").write_text(json.dumps(report), encoding="utf-8")
        return self

    def log(self, *lines: str) -> RunBuilder:
        (self.path / "logs").mkdir(exist_ok=True)
        with (self.path / "logs" / "training_20250101_000000.log").open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return self


def trained(b: RunBuilder, steps: int, t0: float, every: int = 10, val_every: int = 50) -> RunBuilder:
    """start + train events every `every` steps (LOG_INTERVAL_S apart) + val events, from time t0."""
    b.config().data_report().start(t0).log("INFO start")
    best = (math.inf, 0)
    for step in range(every, steps + 1, every):
        t = t0 + LOG_INTERVAL_S * step / every
        b.train(step, t)
        if step % val_every == 0:
            loss = 1.0 + 0.5 * math.cos(step / 40)
            best = min(best, (loss, step))
            b.val(step, t + 0.5, loss, best[1], best[0])
    return b


def running_run(root: Path, now: float | None = None, steps: int = 120) -> RunBuilder:
    """A live run: recent heartbeat from this (alive) process, checkpoints, data report."""
    now = time.time() if now is None else now
    t0 = now - LOG_INTERVAL_S * steps / 10 - 1
    b = trained(RunBuilder(root, "running_run"), steps, t0)
    b.checkpoint("step_000000100", 100, t0 + 50).checkpoint("best", 100, t0 + 50).link_latest("step_000000100")
    return b.heartbeat(now - 2, steps).log(f"INFO step {steps}")


def finished_run(root: Path, now: float | None = None) -> RunBuilder:
    now = time.time() if now is None else now
    b = trained(RunBuilder(root, "finished_run", total_steps=200), 200, now - 200)
    b.checkpoint("step_000000200", 200, now - 60).checkpoint("best", 150, now - 80).link_latest("step_000000200")
    return b.end(now - 50, 200).heartbeat(now - 50, 200, status="finished", pid=dead_pid())


def crashed_run(root: Path, now: float | None = None) -> RunBuilder:
    """Heartbeat still says running, but it is old and its process is gone."""
    now = time.time() if now is None else now
    b = trained(RunBuilder(root, "crashed_run"), 60, now - 4000)
    return b.heartbeat(now - 3600, 60, pid=dead_pid()).log("RuntimeError: CUDA error: an illegal memory access")


def stalled_run(root: Path, now: float | None = None) -> RunBuilder:
    """Process alive (this test process) but no heartbeat for an hour: a hang (e.g. a stuck collective)."""
    now = time.time() if now is None else now
    b = trained(RunBuilder(root, "stalled_run"), 60, now - 4000)
    return b.heartbeat(now - 3600, 60, phase="validate")


def empty_run(root: Path) -> RunBuilder:
    """Just started: config.yaml only (data still loading)."""
    return RunBuilder(root, "empty_run").config()


def health_run(root: Path, now: float | None = None) -> RunBuilder:
    """A live run with warnings, a critical non-finite loss, skips and a rollback."""
    now = time.time() if now is None else now
    b = running_run(root, now)
    b.train(130, now - 1, **{"health/status": 2, "health/skipped_steps": 2, "health/rollbacks": 1,
                             "health/oom_retries": 1, "loss/total": float("nan")})
    b.health(now - 30, 40).health(now - 20, 80, check="grad_norm_explosion")
    b.health(now - 10, 125, "critical", "nonfinite_loss", "skip").health(now - 5, 128, "critical", "nonfinite_loss",
                                                                          "rollback")
    return b


# --------------------------------------------------------------------------- end statuses (PREAMBLE contract)
EXIT_CODES = {"finished": 0, "early_stopped": 0, "max_steps": 0, "finished_unhealthy": 4, "gave_up": 3,
              "failed": 3, "interrupted": 75}


def ended_run(root: Path, status: str, reason: str, now: float | None = None) -> RunBuilder:
    """A run that trained 100 steps and wrote an end event with this status, reason and exit code."""
    now = time.time() if now is None else now
    b = trained(RunBuilder(root, f"{status}_run", total_steps=200), 100, now - 200)
    b.checkpoint("step_000000100", 100, now - 60).link_latest("step_000000100")
    b.heartbeat(now - 50, 100, status=status, pid=dead_pid())
    return b.end(now - 50, 100, status=status, reason=reason, exit_code=EXIT_CODES[status])


def failed_start_run(root: Path, now: float | None = None) -> RunBuilder:
    """Start-up failed (no usable chain): config, an empty checkpoints/ and an end event; no start, no heartbeat."""
    now = time.time() if now is None else now
    b = RunBuilder(root, "failed_start").config()
    (b.path / "checkpoints").mkdir()
    b.log("ERROR no usable chain in data/empty (see data_report.json)")
    return b.end(now - 5, 0, status="failed", reason="no usable training chain in data/empty: 3 files, all skipped "
                                                     "(see data_report.json)", exit_code=2)


# --------------------------------------------------------------------------- validation with baselines
def baseline_keys(model: dict[str, float], helix: dict[str, float], walk: dict[str, float]) -> dict[str, float]:
    """The val record keys of the baseline contract for metrics rmsd/tm/gdt_ts/lddt."""
    out: dict[str, float] = {}
    for m, v in model.items():
        best = (min if m == "rmsd" else max)(helix[m], walk[m])
        out |= {f"val/{m}": v, f"val_baseline/{m}": best, f"val_baseline_helix/{m}": helix[m],
                f"val_baseline_random_walk/{m}": walk[m], f"val/{m}_over_baseline": v / best}
    return out


HELIX = {"rmsd": 9.8, "tm": 0.17, "gdt_ts": 0.25, "lddt": 0.43}
WALK = {"rmsd": 11.5, "tm": 0.13, "gdt_ts": 0.2, "lddt": 0.49}


def baseline_run(root: Path, model: dict[str, float], name: str = "baseline_run", now: float | None = None,
                 vals: int = 3) -> RunBuilder:
    """A live run whose validations carry baseline keys; the last one has `model`'s values."""
    now = time.time() if now is None else now
    b = trained(RunBuilder(root, name), 120, now - 80, val_every=1000).heartbeat(now - 2, 120)
    for i in range(vals):
        scale = (i + 1) / vals
        vals_i = {m: v * scale if m != "rmsd" else v / scale for m, v in model.items()}
        b.val(40 * (i + 1), now - 60 + 10 * i, 1.0, 40, 1.0, **baseline_keys(vals_i, HELIX, WALK),
              **{"val/bond_length_error": 0.4})
    return b
