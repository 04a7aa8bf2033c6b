"""Run directory, rank-aware logging, metrics.jsonl / health.jsonl / heartbeat, W&B + TensorBoard.

Only the main process writes files. Scalars reach every sink through `RunLog.log()` once per
log interval (the loop buffers per-step values on the device and syncs once per interval).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from diffold.atomic import write_json_atomic

log = logging.getLogger("diffold")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _ConsoleHandler(logging.StreamHandler):
    """Console lines go through tqdm.write: with a progress bar on screen, a log line gets its own
    line instead of being glued to the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: a handler never raises
            self.handleError(record)


class _FileHandler(logging.FileHandler):
    """The run's log file; a failing disk (full, read-only) is said once on the console, not as a
    traceback per line (logging's default), and the console keeps every line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            sys.stderr.write(f"warning: cannot write the log file {self.baseFilename} ({err}); "
                             "log lines go to the console only\n")


def setup_logging(run_dir: Path, accelerator, level: str = "INFO") -> Path:
    """Main process: console + logs/training_<ts>.log at `level`; other ranks: WARNING+ to stderr."""
    rank = accelerator.process_index
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = _ConsoleHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(_RankFilter(rank))
    handlers: list[logging.Handler] = [console]
    path = run_dir / "logs" / f"training_{time.strftime('%Y%m%d_%H%M%S')}.log"
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = _FileHandler(path, encoding="utf-8")
        fh.setFormatter(fmt)
        fh.addFilter(_RankFilter(rank))
        handlers.append(fh)
        root.setLevel(level)
    else:
        root.setLevel("WARNING")
    for h in handlers:
        root.addHandler(h)
    for noisy in ("datasets", "urllib3", "filelock", "wandb", "fsspec", "torch", "accelerate"):
        logging.getLogger(noisy).setLevel("WARNING")
    return path


def wandb_mode(configured: Optional[str]) -> str:
    """Config wins, then WANDB_MODE, then online only if an API key is configured, else offline."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (
        Path.home() / ".netrc"
    ).read_text(errors="ignore")
    return "online" if has_key else "offline"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible rather than dropping it
    return value


class RunLog:
    """Sinks for one run: metrics.jsonl, health.jsonl, heartbeat.json, trackers, W&B alerts."""

    def __init__(self, run_dir: Path, accelerator, total_steps: int, resume_command: str):
        self.dir = Path(run_dir)
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.total_steps = total_steps
        self.resume_command = resume_command
        self.wandb_run = None
        self.trackers_ok = False
        self.dropped_writes = 0  # records lost to a failing disk (ENOSPC, EIO, ...): counted, never fatal

    def init_trackers(self, cfg, run_name: str, wandb_run_id: Optional[str]) -> Optional[str]:
        """Start TensorBoard/W&B through Accelerate; returns the W&B run id to checkpoint."""
        log_with = list(cfg.logging.log_with)
        if "wandb" in log_with:
            mode = wandb_mode(cfg.logging.wandb_mode)
            os.environ["WANDB_MODE"] = mode
            if mode == "disabled":
                log_with.remove("wandb")
        if not log_with:
            return wandb_run_id
        init = {"wandb": {"name": run_name, "dir": str(self.dir), "resume": "allow", "id": wandb_run_id}}
        try:
            self.acc.init_trackers(cfg.logging.wandb_project, config=_flat(cfg.to_dict()), init_kwargs=init)
        except Exception as e:  # W&B raises many types (UsageError, CommError, ...): training must go on
            log.warning("trackers unavailable (%s: %s); metrics still go to metrics.jsonl", type(e).__name__, e)
            return wandb_run_id
        self.trackers_ok = True
        if self.main and "wandb" in log_with:
            self.wandb_run = self.acc.get_tracker("wandb", unwrap=True)
            self.wandb_run.define_metric("train/global_step")
            self.wandb_run.define_metric("*", step_metric="train/global_step")
            return self.wandb_run.id
        return wandb_run_id

    def _append(self, name: str, record: dict) -> None:
        try:
            with open(self.dir / name, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        except OSError as e:
            self._dropped(name, e)

    def _dropped(self, name: str, error: OSError) -> None:
        """A lost metrics/heartbeat record must not kill a run whose checkpoints may still fit: warn on
        the first loss and every 100th after, with the count (monitor_training.py tolerates the gap)."""
        self.dropped_writes += 1
        if self.dropped_writes == 1 or self.dropped_writes % 100 == 0:
            log.warning("could not write %s (%s: %s); %d record(s) lost so far, training continues. "
                        "Free space in %s", name, type(error).__name__, error, self.dropped_writes, self.dir)

    def log(self, event: str, step: int, epoch: int, scalars: dict[str, Any]) -> None:
        """One record to metrics.jsonl and (train/val) to the trackers."""
        if not self.main:
            return
        self._append("metrics.jsonl", {"event": event, "time": time.time(), "step": step, "epoch": epoch, **scalars})
        if self.trackers_ok and event in ("train", "val"):
            values = {tracker_key(event, k): v for k, v in scalars.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self.acc.trackers:
                if tracker.name == "wandb":  # W&B keys on train/global_step (re-logged steps after a resume are kept)
                    tracker.log({**values, "train/global_step": step})
                else:
                    tracker.log(values, step=step)

    def failed_start(self, reason: str, report: Any = None, status: str = "failed", exit_code: int = 2) -> None:
        """A start that did not reach training still leaves its trace: data_report.json (when there is one),
        the error in the log, an `end` event with the reason, and a heartbeat that is not 'running'."""
        if not self.main:
            return
        if report is not None:
            try:
                write_json_atomic(self.dir / "data_report.json", report.to_dict())
            except OSError as e:
                self._dropped("data_report.json", e)
        log.error("run did not start (%s): %s", status, reason)
        self._append("metrics.jsonl", {"event": "end", "time": time.time(), "step": 0, "epoch": 0, "status": status,
                                       "reason": reason, "exit_code": exit_code})
        self.heartbeat(0, 0, "start", status)

    def health_event(self, event: dict) -> None:
        """health.jsonl + log line + W&B alert for critical events."""
        if not self.main:
            return
        self._append("health.jsonl", event)
        text = f"[health step {event['step']}] {event['check']}: {event['message']} -> {event['suggestion']}"
        (log.error if event["status"] == "critical" else log.warning)(text)
        self._tensorboard_text(event, text)
        if event["status"] == "critical":
            self.alert(f"diffold: {event['check']}", text)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (e-mail/Slack where the user configured them); never stops training."""
        if self.wandb_run is None:
            return
        try:
            import wandb

            self.wandb_run.alert(title=title, text=text, level=wandb.AlertLevel.ERROR)
        except Exception as e:  # W&B raises many types; an alert must never stop training
            log.warning("W&B alert failed (%s)", e)

    def _tensorboard_text(self, event: dict, text: str) -> None:
        """Health events as text in TensorBoard (tab TEXT, tag health/events), next to the scalars."""
        if not self.trackers_ok:
            return
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                try:
                    tracker.writer.add_text("health/events", f"**{event['status']}** ({event.get('action', 'none')}): "
                                            f"{text}", global_step=int(event["step"]))
                except (OSError, AttributeError, ValueError) as e:  # a full disk must not stop training
                    self._dropped("tensorboard", OSError(str(e)))

    def log_structures(self, step: int, paths: list[Path]) -> int:
        """Sampled validation structures to the W&B run page (`val/samples` 3D panel); returns how many."""
        if self.wandb_run is None or not paths:
            return 0
        try:
            import wandb

            molecules = [wandb.Molecule(str(p), caption=f"{Path(p).stem} (step {step})") for p in paths]
            self.wandb_run.log({"val/samples": molecules, "train/global_step": step})
        except Exception as e:  # media are a convenience: the PDB files stay in samples/, training goes on
            log.warning("W&B structure upload failed for %d file(s) (%s: %s); they stay in %s",
                        len(paths), type(e).__name__, e, Path(paths[0]).parent)
            return 0
        return len(paths)

    def heartbeat(self, step: int, epoch: int, phase: str, status: str = "running") -> None:
        if not self.main:
            return
        try:
            self._write_heartbeat(step, epoch, phase, status)
        except OSError as e:
            self._dropped("heartbeat.json", e)

    def _write_heartbeat(self, step: int, epoch: int, phase: str, status: str) -> None:
        write_json_atomic(
            self.dir / "heartbeat.json",
            {
                "time": time.time(), "pid": os.getpid(), "host": socket.gethostname(), "step": step,
                "epoch": epoch, "total_steps": self.total_steps, "phase": phase, "status": status,
                "resume_command": self.resume_command,
            },
            durable=False,  # advisory, rewritten every interval: no fsync on the hot path
        )

    def finish(self) -> None:
        """Close trackers and the process group (without it gloo can abort at exit)."""
        try:
            self.acc.end_training()
        except Exception as e:  # closing an offline W&B run can fail on a full disk; data is in jsonl
            log.warning("closing trackers failed (%s)", e)


def tracker_key(event: str, key: str) -> str:
    """Every tracker tag in a group: ungrouped train keys go to train/, ungrouped val keys to val/
    (metrics.jsonl keeps the plain names the monitor reads)."""
    if "/" in key:
        return key
    if key in ("samples_per_s", "residues_per_s"):
        return f"speed/{key}"
    return f"{'val' if event == 'val' else 'train'}/{key}"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else str(v)
    return out
