"""One owner per run directory: `<run_dir>/run.lock` names the job writing it (host, pid, job, start).

The global main process takes the lock before anything is written. A lock whose job is alive stops a
second, unrelated launch with one line; a stale one (same host: the pid is gone; another host: its
heartbeat is older than STALE_AFTER_S) is taken over with a warning; a requeued SLURM job (same
SLURM_JOB_ID) takes its own lock back. The holder refreshes the heartbeat from a daemon thread and
removes the lock at exit; a `kill -9` leaves it behind, which the next launch recognises as stale.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # another host's lock without a heartbeat for 10 min belongs to a dead job

log = logging.getLogger("diffold.runlock")


class RunDirBusy(RuntimeError):
    """The run directory belongs to a live job."""


@dataclass(frozen=True)
class Owner:
    """Who holds a run directory."""

    host: str
    pid: int
    job_id: str | None
    start_time: float
    heartbeat: float

    @classmethod
    def me(cls) -> Owner:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), now, now)

    def describe(self) -> str:
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on host {self.host}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.start_time))}"


def _pid_alive(pid: int, since: float) -> bool:
    """True if `pid` runs on this host and was started no later than `since` (a reused pid is not alive)."""
    try:
        import psutil

        return psutil.Process(pid).create_time() <= since + 2.0
    except ImportError:  # psutil ships with accelerate; without it only existence can be checked
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except psutil.Error:  # NoSuchProcess, ZombieProcess, AccessDenied
        return False


def takeover_reason(held: Owner, me: Owner, now: float | None = None) -> tuple[str | None, bool]:
    """Why `me` may take `held`'s lock (None: it may not) and whether that deserves a warning."""
    now = time.time() if now is None else now
    if held.job_id and held.job_id == me.job_id:
        return f"SLURM job {held.job_id} restarted (requeued): taking its run-directory lock back", False
    if held.host == me.host:
        if held.pid == me.pid:
            return "this process held the lock for an earlier run: taking it again", False
        if not _pid_alive(held.pid, held.start_time):
            return f"stale run.lock of a dead job ({held.describe()}: that process is gone): taking it over", True
        return None, False
    age = now - held.heartbeat
    if age > STALE_AFTER_S:
        return (f"stale run.lock of a dead job ({held.describe()}: no heartbeat for {age:.0f} s > "
                f"{STALE_AFTER_S:.0f} s): taking it over"), True
    return None, False


class RunLock:
    """The lock file of one run directory, held by this process."""

    def __init__(self, run_dir: Path, owner: Owner) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: Path) -> tuple[RunLock, str | None, bool]:
        """Take the lock; returns (lock, takeover note or None, note is a warning). RunDirBusy if held."""
        lock = cls(run_dir, Owner.me())
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        note, warn = None, False
        for _ in range(3):  # a racing launch may create or remove the file between our steps
            if lock._create():
                break
            held = lock.read()
            if held is None:  # unreadable (half-written by a racing launch, or not ours): look again
                time.sleep(0.2)
                held = lock.read()
                if held is None:
                    raise RunDirBusy(f"{lock.path} exists but is not a diffold lock: remove it if no job uses "
                                     f"{run_dir}, or choose another --output_dir")
            note, warn = takeover_reason(held, lock.owner)
            if note is None:
                raise RunDirBusy(f"run directory {run_dir} is in use by {held.describe()} (heartbeat "
                                 f"{time.time() - held.heartbeat:.0f} s ago): wait for it to end, choose another "
                                 f"--output_dir, or delete {lock.path} if that job is gone")
            try:  # only one of two racing launches wins this rename; the loser sees the winner's lock next
                os.replace(lock.path, lock.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                os.unlink(lock.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
            except FileNotFoundError:
                pass
        else:
            raise RunDirBusy(f"could not take {lock.path} (other launches keep racing for it): launch once")
        lock._start_heartbeat()
        atexit.register(lock.release)
        return lock, note, warn

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.owner), f)
        return True

    def read(self) -> Owner | None:
        try:
            d = json.loads(self.path.read_text())
            return Owner(str(d["host"]), int(d["pid"]), d.get("job_id"), float(d["start_time"]), float(d["heartbeat"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _mine(self) -> bool:
        held = self.read()
        return held is not None and (held.host, held.pid, held.start_time) == \
            (self.owner.host, self.owner.pid, self.owner.start_time)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                if not self._mine():
                    log.error("%s was taken over by another launch: two jobs now write into %s",
                              self.path, self.path.parent)
                    return
                tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
                try:
                    tmp.write_text(json.dumps({**asdict(self.owner), "heartbeat": time.time()}))
                    os.replace(tmp, self.path)
                except OSError as e:  # a full disk must not stop training; the lock just ages
                    log.warning("could not refresh %s (%s)", self.path, e)

        self._thread = threading.Thread(target=beat, name="diffold-runlock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        self._stop.set()
        if self._mine():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
