"""Multi-process and multi-node start-up and shutdown around Accelerate.

`form_process_group` starts the process group and stops a launch that did not form (asked for N
processes, got fewer) with one line; `claim_run_dir` locks the run directory (diffold/runlock.py);
`cache_context` picks who builds the data cache (shared file system: the global main process;
node-local disks: each node's local main process); `on_peer_failure` turns a dead or silent peer
into one error line, an `end` event and exit code 5; `exit_process` leaves without the interpreter
teardown that races with gloo's worker threads. Decisions are logged once by `log_launch`.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shlex
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable, ContextManager

from diffold.config import ConfigError
from diffold.launchinfo import LaunchRequest, launch_request
from diffold.runlock import RunDirBusy, RunLock

log = logging.getLogger("diffold.distributed")
PEER_FAILURE_EXIT = 5


class LaunchError(ConfigError):
    """A launch that did not form, or a run directory that belongs to another job (exit code 2)."""


class _Session:
    """What this process learnt at start-up (one per process)."""

    def __init__(self) -> None:
        self.request: LaunchRequest | None = None
        self.notes: list[tuple[int, str]] = []  # (logging level, message), logged once logging is set up
        self.run_dir: Path | None = None
        self.lock: RunLock | None = None
        self.multi = False  # a process group of more than one process was formed
        self.watching = False  # the launcher watch thread runs


_SESSION = _Session()


def _note(level: int, msg: str) -> None:
    _SESSION.notes.append((level, msg))


# --------------------------------------------------------------------------- formation
def _has_accelerator() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def _say_once(msg: str) -> None:
    """Raise LaunchError on the first launched process; the others exit 2 quietly (one line, not N)."""
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        raise SystemExit(2)
    raise LaunchError(msg)


def form_process_group(timeout_s: float):
    """PartialState for this launch; LaunchError if fewer processes joined than the launcher was asked for."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    req = launch_request()
    _SESSION.request = req
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    if not cpu and req is not None and req.use_cpu and world_env > 1:
        cpu = True
        _note(logging.INFO, f"{req.config or 'launcher'} says use_cpu: the {world_env} processes form a gloo group on the CPU")
    elif not cpu and world_env > 1 and not _has_accelerator():
        cpu = True
        _note(logging.WARNING, f"no GPU on this machine: the {world_env} launched processes form a gloo group on the CPU")
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # AcceleratorState (the Accelerator) reads it, PartialState does not
    ps = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    asked = max(world_env, req.processes if req else 1)
    if ps.num_processes < asked:
        what = req.describe() if req else f"WORLD_SIZE={world_env}"
        hint = req.hint if req else "the launched processes did not join one process group"
        _say_once(f"the launch did not form: {what}, but the process group has {ps.num_processes} "
                  f"(each process would train alone): {hint}")
    _SESSION.multi = ps.num_processes > 1
    if _SESSION.multi:
        _watch_launcher()
        nodes = num_nodes(ps)
        _note(logging.INFO, f"process group: {ps.num_processes} processes on {nodes} machine(s) "
                            f"({ps.num_processes // max(nodes, 1)} per machine), backend {ps.backend}, "
                            f"timeout {timeout_s:g} s")
    return ps


def num_nodes(ps) -> int:
    """Machines in the process group (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ps.num_processes) or ps.num_processes)
    return max(1, ps.num_processes // max(local, 1))


def _watch_launcher(poll_s: float = 1.0) -> None:
    """A worker whose launcher died (kill -9 of `accelerate launch`) stops instead of training on as an
    orphan nobody can stop or resume; its peers then see a dead peer (exit 5 there too)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or _SESSION.watching:
        return
    _SESSION.watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        msg = (f"the launcher of this process (pid {parent}) died: rank {os.environ.get('RANK', '?')} "
               f"stops (exit {PEER_FAILURE_EXIT})")
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if _SESSION.run_dir is not None and os.environ.get("RANK", "0") == "0":
            _record_end(_SESSION.run_dir, msg)
        release_run_dir()
        os._exit(PEER_FAILURE_EXIT)

    threading.Thread(target=watch, name="diffold-launcher-watch", daemon=True).start()


# --------------------------------------------------------------------------- run directory
def claim_run_dir(run_dir: Path, ps) -> None:
    """The global main process locks run_dir (collective: every rank gets the verdict); LaunchError if busy."""
    from accelerate.utils import broadcast_object_list

    release_run_dir()  # an earlier run in this process (tests, notebooks) has ended
    _SESSION.run_dir = Path(run_dir)
    verdict: list = [None, None, False]
    if ps.is_main_process:
        try:
            _SESSION.lock, verdict[1], verdict[2] = RunLock.acquire(Path(run_dir))
        except RunDirBusy as e:
            verdict[0] = str(e)
        except OSError as e:  # unwritable: nobody else can write there either; the first write says what is wrong
            verdict[1], verdict[2] = f"run directory {run_dir} not locked ({e.strerror or e})", True
    if ps.num_processes > 1:
        broadcast_object_list(verdict)
    if verdict[0]:
        if not ps.is_main_process:
            raise SystemExit(2)  # the main process says it once
        raise LaunchError(verdict[0])
    if verdict[1]:
        _note(logging.WARNING if verdict[2] else logging.INFO, verdict[1])


def release_run_dir() -> None:
    if _SESSION.lock is not None:
        _SESSION.lock.release()
        _SESSION.lock = None


# --------------------------------------------------------------------------- data cache
def cache_context(cache_dir: str | os.PathLike | None, ps) -> Callable[[], ContextManager]:
    """Who builds data.cache_dir first: the global main process if every machine sees the same
    directory, else each machine's local main process (never all processes of a machine at once)."""
    if ps.num_processes == 1:
        return contextlib.nullcontext
    path = Path(cache_dir or ".cache/diffold")
    nodes = num_nodes(ps)
    if nodes == 1:
        log.info(f"data cache {path}: one machine, the main process builds or reuses it first")
        return ps.main_process_first
    if _cache_is_shared(path, ps):
        log.info(f"data cache {path}: shared by all {nodes} machines (every node sees the main "
                            "process's probe file): only the global main process builds it, the others reuse it")
        return ps.main_process_first
    log.info(f"data cache {path}: node-local (not every node sees the main process's probe file): "
                        f"each of the {nodes} machines builds or reuses its own, its local main process first")
    return ps.local_main_process_first


def _cache_is_shared(path: Path, ps) -> bool:
    """The global main writes a probe file; each machine's local main looks for it (collective)."""
    from accelerate.utils import broadcast_object_list, gather_object

    name = [f".diffold-probe-{uuid.uuid4().hex}" if ps.is_main_process else None]
    broadcast_object_list(name)
    probe = path / name[0]
    try:  # an unwritable cache_dir is reported by build_datasets; every rank still takes the collectives
        if ps.is_local_main_process:
            path.mkdir(parents=True, exist_ok=True)
        if ps.is_main_process:
            probe.write_text(f"{os.getpid()}\n")
    except OSError as e:
        log.warning("cannot probe data.cache_dir %s (%s): treated as shared", path, e)
    ps.wait_for_everyone()
    seen = gather_object([probe.exists() or not ps.is_local_main_process])  # by rank; [0]: the writer
    if ps.is_main_process:
        probe.unlink(missing_ok=True)
    return all(seen) or not seen[0]  # no probe written: fall back to "shared" (global main process first)


def log_launch() -> None:
    """Log the start-up decisions (call once logging is set up; main process logs INFO, all log warnings)."""
    for level, msg in _SESSION.notes:
        log.log(level, msg)
    _SESSION.notes.clear()


# --------------------------------------------------------------------------- resume command
def relaunch_command(run_dir: Path) -> str | None:
    """The command that resumes this run as it was launched (None: let the caller build one)."""
    if os.environ.get("DIFFOLD_RESUME_COMMAND"):  # set by launch_train.sh / scripts/slurm/train.sbatch
        return os.environ["DIFFOLD_RESUME_COMMAND"]
    req = _SESSION.request
    if req is None or req.launcher != "accelerate launch" or req.launcher_args is None:
        return None
    cmd = (f"accelerate launch {shlex.join(req.launcher_args)} {req.script} --config {run_dir}/config.yaml "
           f"--output_dir {run_dir} --resume auto")
    return f"on each of the {req.machines} machines (its own --machine_rank): {cmd}" if req.machines > 1 else cmd


# --------------------------------------------------------------------------- peer failure / exit
def is_peer_failure(exc: BaseException) -> bool:
    """An error of the process group itself (a peer died or stopped answering), not of this process."""
    if not _SESSION.multi:
        return False
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(k in text for k in (
        "/gloo/", "gloo::", "nccl", "connection reset by peer", "connection closed by peer", "broken pipe"))


def on_peer_failure(exc: BaseException, resume_command: str | None = None) -> int:
    """One error line, an `end` event (main process) and exit code 5; never a collective."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = first.split(". This is typically")[0][:300]  # gloo appends advice and an emoji
    rank = os.environ.get("RANK", "0")
    run_dir = _SESSION.run_dir
    resume = resume_command or (relaunch_command(run_dir) if run_dir else None) or "--resume auto"
    msg = (f"distributed failure on rank {rank}: a peer process or machine died or stopped answering ({first}); "
           f"this process stops. The newest valid checkpoint is kept; resume with: {resume}")
    log.error(msg)
    if not logging.getLogger().handlers:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    if run_dir is not None and rank == "0":
        _record_end(run_dir, msg)
    release_run_dir()
    return PEER_FAILURE_EXIT


def _record_end(run_dir: Path, reason: str) -> None:
    """end event + heartbeat status for monitor_training.py (best effort: the run dir may be unwritable)."""
    from diffold.atomic import write_json_atomic

    hb_path = run_dir / "heartbeat.json"
    try:
        hb = json.loads(hb_path.read_text()) if hb_path.is_file() else {}
    except (OSError, ValueError):
        hb = {}
    now = time.time()
    try:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "end", "time": now, "step": hb.get("step", 0), "epoch": hb.get("epoch", 0),
                                "status": "failed", "reason": reason, "exit_code": PEER_FAILURE_EXIT}) + "\n")
        write_json_atomic(hb_path, {**hb, "time": now, "phase": "done", "status": "failed"}, durable=False)
    except OSError as e:
        log.warning("could not record the failure in %s (%s)", run_dir, e)


def exit_process(code: int) -> None:
    """Exit with `code`. After a multi-process run: run the atexit hooks, flush, and os._exit, skipping the
    interpreter teardown, during which a gloo worker thread releasing its last collective's tensors
    needs the GIL and aborts the process (SIGABRT, 'terminate called without an active exception')."""
    if not _SESSION.multi:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def ranks_agree(acc, *modules) -> bool | None:
    """Safety check: all ranks hold the same weights (float64 sum per tensor, gathered); logs an error if not."""
    import torch
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None  # parameters may be sharded per rank: their sums are not comparable
    sums = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()])  # [P]
    every = acc.gather(sums[None]).reshape(acc.num_processes, -1)                           # [R, P]
    same = torch.isclose(every, every[:1], rtol=0, atol=0, equal_nan=True).all(0)           # [P]
    if not bool(same.all()):
        log.error("parameters differ between ranks in %d of %d tensors (ranks diverged: DDP not synchronising, "
                  "or a rank took a different branch); do not trust this run's weights", int((~same).sum()), len(same))
    return bool(same.all())
