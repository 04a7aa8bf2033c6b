"""Featurization worker processes: one shard per job, per-file timeouts, a progress line with files/s and ETA.

Workers are plain `python -m diffold.workers` subprocesses (not forks of a process that may hold
threads, CUDA or a process group, and not re-imports of the training script): they import numpy,
gemmi and pyarrow only and start in well under a second. The parent sends one job per shard as a
JSON line on stdin; the worker answers one line per file done and one when the shard's Arrow file is
written. A worker silent for `timeout_s` on one file (or killed by it: a parser crash, the OOM killer)
is killed and replaced; that file is reported as skipped and the shard's other files are redone.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
WRITE_TIMEOUT_S = 600.0  # writing one shard's Arrow file
PROGRESS_EVERY_S = 10.0


@dataclass
class Job:
    """One shard: work items (path, display, entries, key) and items decided without parsing (index -> reason)."""

    items: list[dict]
    out: str                                         # Arrow file the worker writes
    skip: dict[int, str] = field(default_factory=dict)
    result: dict | None = None                       # {"files": [[key, rows], ...], "cpu_s": float}
    done: int = 0                                    # items finished (counted once for progress)
    crashes: int = 0                                 # worker deaths outside any file (e.g. writing the shard)


class Progress:
    """Files done / total with files/s and ETA, logged every PROGRESS_EVERY_S seconds and at the end."""

    def __init__(self, total: int, workers: int) -> None:
        self.total, self.workers, self.done = total, workers, 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info("featurizing: %d/%d files (%.1f files/s, ETA %s, %d worker(s))",
                        self.done, self.total, rate, _hms(eta), self.workers)

    def finish(self) -> float:
        dt = time.monotonic() - self.t0
        logger.info("featurized %d files in %.1f s (%.1f files/s, %d worker(s))",
                    self.total, dt, self.total / dt if dt > 0 else 0.0, self.workers)
        return dt


def _hms(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the diffold this process imported, not another install
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "diffold.workers"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.buf, self.err = {"out": b"", "err": b""}, deque(maxlen=20)
        self.ready, self.job, self.pos = False, None, -1       # pos: index of the last item reported done
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def send(self, job: Job, timeout_s: float) -> None:
        self.job, self.pos, self.deadline = job, -1, time.monotonic() + timeout_s
        msg = {"items": job.items, "out": job.out, "skip": {str(k): v for k, v in job.skip.items()}}
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_jobs(jobs: list[Job], spec: dict, num_proc: int, timeout_s: float, progress: Progress,
             on_done: Callable[[Job], None]) -> None:
    """Run every job in up to num_proc workers; on_done(job) as each finishes (job.result; job.skip holds
    the files that timed out or crashed a worker)."""
    queue = deque(jobs)
    sel = selectors.DefaultSelector()
    workers: list[_Worker] = []

    def start() -> None:
        w = _Worker()
        w.proc.stdin.write((json.dumps(spec) + "\n").encode())
        w.proc.stdin.flush()
        sel.register(w.proc.stdout, selectors.EVENT_READ, (w, "out"))
        sel.register(w.proc.stderr, selectors.EVENT_READ, (w, "err"))
        workers.append(w)

    def retire(w: _Worker, why: str) -> None:
        """Kill w; the file it was on is skipped with `why` and its job goes back to the front of the queue."""
        for f in (w.proc.stdout, w.proc.stderr):
            sel.unregister(f)
        w.kill()
        workers.remove(w)
        if not w.ready:
            raise RuntimeError(f"a featurization worker failed to start (exit {w.proc.returncode}): "
                               f"{' | '.join(w.err) or 'no output'}")
        if w.job is not None:
            bad = next((i for i in range(w.pos + 1, len(w.job.items)) if i not in w.job.skip), None)
            if bad is None:  # it died after its last file, writing the shard: a real fault, not a bad file
                w.job.crashes += 1
                if w.job.crashes > 2:
                    raise RuntimeError(f"featurization worker died 3 times writing {w.job.out}: {' | '.join(w.err)}")
            else:
                w.job.skip[bad] = why
                logger.warning("featurizing %s: %s", w.job.items[bad]["display"], why)
            queue.appendleft(w.job)

    try:
        for _ in range(min(num_proc, len(jobs))):
            start()
        while queue or any(w.job for w in workers):
            for w in workers:
                if w.ready and w.job is None and queue:
                    w.send(queue.popleft(), timeout_s)
            wait = min((w.deadline for w in workers), default=time.monotonic() + 1.0) - time.monotonic()
            for key, _ in sel.select(timeout=max(0.05, min(1.0, wait))):
                w, stream = key.data
                if w not in workers:
                    continue
                data = os.read(key.fileobj.fileno(), 1 << 16)
                if not data:  # the worker died (a parser crash, the OOM killer)
                    if stream == "out":
                        code = w.proc.wait()
                        retire(w, f"parser crashed: the worker process died (exit {code}) on this file; "
                                  "not cached, retried on the next run")
                        start()
                    continue
                w.buf[stream] += data
                *lines, w.buf[stream] = w.buf[stream].split(b"\n")
                for line in lines:
                    if stream == "err":
                        w.err.append(line.decode(errors="replace"))
                        logger.warning("featurization worker: %s", line.decode(errors="replace"))
                    elif (job := _on_message(w, json.loads(line), timeout_s, progress)) is not None:
                        on_done(job)
            now = time.monotonic()
            for w in [w for w in workers if now > w.deadline]:
                if not w.ready:
                    retire(w, "")
                retire(w, f"timeout: parsing took over data.file_timeout_s={timeout_s:g} s; "
                          "not cached, retried on the next run (raise the limit or remove the file)")
                start()
    finally:
        for w in workers:
            w.proc.stdin.close()
            w.kill()


def _on_message(w: _Worker, msg: dict, timeout_s: float, progress: Progress) -> Job | None:
    """Apply one worker message; the job if it just finished."""
    if msg["event"] == "ready":
        w.ready, w.deadline = True, float("inf")
        return None
    job = w.job
    if msg["event"] == "file":
        w.pos = msg["i"]
        if w.pos >= job.done:  # a redone job reports its first files again: count each once
            progress.add(w.pos + 1 - job.done)
            job.done = w.pos + 1
        last = w.pos == len(job.items) - 1  # next: writing the shard, which no per-file limit applies to
        w.deadline = time.monotonic() + (max(timeout_s, WRITE_TIMEOUT_S) if last else timeout_s)
    elif msg["event"] == "done":
        job.result = {"files": msg["files"], "cpu_s": msg["cpu_s"]}
        w.job, w.deadline = None, float("inf")
        return job
    return None


# --------------------------------------------------------------------------- worker side
def work(spec_dict: dict, job: dict, emit) -> dict:
    """Featurize one job's items and write its Arrow file (shared by the worker process and the in-process path)."""
    from diffold.featurize import FeatureSpec, featurize_file, rows_to_table, write_table

    spec = FeatureSpec.from_dict(spec_dict)
    rows, files = [], []
    t0 = time.process_time()
    for i, it in enumerate(job["items"]):
        if str(i) not in job["skip"]:
            r = featurize_file(it["path"], it["display"], it["entries"], spec)
            rows += r
            files.append([it["key"], len(r)])
        emit({"event": "file", "i": i})
    write_table(rows_to_table(rows), Path(job["out"]))
    return {"event": "done", "files": files, "cpu_s": time.process_time() - t0}


def main() -> None:
    """Worker loop: a spec line, then one job line per shard; replies on the original stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops and kills its workers
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")

    spec = json.loads(sys.stdin.readline())
    import diffold.featurize  # noqa: F401  (imported before 'ready': start-up failures surface as such)

    emit({"event": "ready"})
    for line in sys.stdin:
        emit(work(spec, json.loads(line), emit))


if __name__ == "__main__":
    main()
