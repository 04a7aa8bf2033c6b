"""SIGKILL at many points of a tiny run -> `--resume auto` -> final state bit-identical to the uninterrupted run.

After every kill: whatever `--resume auto` would pick verifies AND loads (no checkpoint dir is ever left
that auto would load but cannot), the next launch says it resumed from exactly that one, and exits 0 at the end.
Fast subset: two deterministic kills (inside validation, inside a checkpoint write). Full set: a chain of
9 deterministic kill points plus >= 10 external SIGKILLs at random times / in checkpoint writes / in validation.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def check_after_kill(helpers, run, r_or_rc) -> object:
    """Invariants after a kill; returns what `--resume auto` will load (None = fresh start)."""
    rc = r_or_rc if isinstance(r_or_rc, int) else r_or_rc.returncode
    assert rc == -9, f"expected SIGKILL, got {rc}: {getattr(r_or_rc, 'stderr', '')[-2000:]}"
    helpers.assert_every_valid_checkpoint_loads(run)
    pick = helpers.auto_pick(run)
    if pick is not None:
        from diffold.checkpoint import verify

        assert verify(pick) == (True, "ok")
    return pick


def assert_resumed_from(log: str, pick) -> None:
    if pick is None:
        assert "resumed from" not in log  # nothing valid yet: a fresh start
    else:
        assert f"resumed from {pick} " in log, log[-3000:]


def test_kill_in_validation_then_in_checkpoint_write_then_resume_is_bit_identical(runs, reference, helpers, tmp_path):
    run = tmp_path / "run"
    base = [*runs.args(), "--output_dir", str(run)]
    r = runs.run([*base, "health.inject_faults=kill_in_val@6"])
    pick = check_after_kill(helpers, run, r)
    assert helpers.heartbeat(run)["phase"] == "validate"
    assert list((run / "samples" / "step_000000006").glob("*.pdb"))  # died after sampling, before the val event
    assert [e["step"] for e in helpers.events(run) if e["event"] == "val"] == [3]
    assert pick is not None and pick.name == "step_000000006"  # saved just before that validation

    r = runs.run([*base, "--resume", "auto", "health.inject_faults=kill_in_save@9"])
    assert_resumed_from(r.stderr, pick)
    pick = check_after_kill(helpers, run, r)
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1, left  # the interrupted write (no meta.json): ignored by auto
    assert pick.name == "step_000000008"

    r = runs.run([*base, "--resume", "auto", "health.inject_faults="])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_from(r.stderr, pick)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
    helpers.assert_bit_identical(reference, run)


# Full set -----------------------------------------------------------------------------------------
# A chain over one run: each launch resumes (auto) and dies at the next point. Steps: 12 (3 per epoch,
# validation at 3/6/9/12, checkpoints every 2 steps); kill@N dies mid-accumulation of step N.
CHAIN = ["kill@1",            # before the first checkpoint: auto starts fresh
         "kill_in_save@2",    # inside the very first checkpoint write: still nothing valid
         "kill_in_val@3",     # inside the first validation
         "kill@5",            # mid-accumulation
         "kill_in_save@8",    # inside a periodic save
         "kill_in_val@9",
         "kill@11",
         "kill_in_val@12",    # inside the last validation
         "kill_in_save@12"]   # inside the `best` save after it (the final save comes after)


@pytest.mark.reliability_full
def test_chain_of_deterministic_kill_points(runs, reference, helpers, tmp_path):
    run = tmp_path / "run"
    base = [*runs.args(), "--output_dir", str(run)]
    pick, log = None, ""
    for i, fault in enumerate(CHAIN):
        r = runs.run([*base, *(["--resume", "auto"] if i else []), f"health.inject_faults={fault}"])
        if i:
            assert_resumed_from(r.stderr, pick)
        pick = check_after_kill(helpers, run, r)
        log += f"{fault}: auto -> {pick.name if pick else 'fresh'}\n"
    print(log)
    assert [p.name if p else None for p in [pick]] == ["step_000000012"]
    r = runs.run([*base, "--resume", "auto", "health.inject_faults="])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_from(r.stderr, pick)
    helpers.assert_bit_identical(reference, run)


MODES = ("random", "checkpoint", "validate", "random", "checkpoint", "startup")


def tmp_dirs(run) -> dict[str, int]:
    """Interrupted checkpoint writes present now: name -> mtime (a new save re-creates its tmp dir)."""
    return {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("*.tmp")}


@pytest.mark.reliability_full
def test_random_external_sigkills(runs, reference, helpers, tmp_path):
    """>= 10 SIGKILLs from outside at random moments (seeded), some aimed at checkpoint writes / validation.

    `slow@0-99` adds 0.5 s per step (no effect on the numbers) so that random times spread over the run.
    A run that finishes before the next kill is compared with the reference and a new one is started."""
    rng = np.random.default_rng(2024)
    kills: list[tuple[str, str, int, bool]] = []  # (mode, phase at the kill, step, partial write left)
    finished_runs = 0
    attempt = 0
    while len(kills) < 10 or finished_runs == 0:
        run = tmp_path / f"run{finished_runs}"
        args = [*runs.args(), "--output_dir", str(run), "health.inject_faults=slow@0-99"]
        resumed = (run / "checkpoints").exists()
        pick = helpers.auto_pick(run) if resumed else None
        n_start = sum(e["event"] == "start" for e in helpers.events(run))
        tmp_before = tmp_dirs(run)
        mode = MODES[attempt % len(MODES)] if len(kills) < 10 else "none"
        attempt += 1
        assert attempt < 40, f"no progress: {kills}"
        proc = runs.popen([*args, *(["--resume", "auto"] if resumed else [])], tmp_path / f"log{attempt}.txt")
        def started(run=run, n_start=n_start) -> bool:  # this launch has logged its start event
            return sum(e["event"] == "start" for e in helpers.events(run)) > n_start

        if mode == "startup":
            time.sleep(float(rng.uniform(0.5, 6.0)))  # imports, data cache, model build, prepare
        elif mode != "none" and helpers.wait_for(started, proc):
            if mode == "random":
                time.sleep(float(rng.uniform(0.0, 3.0)))
            else:
                def entered(run=run, mode=mode, t0=time.time()) -> bool:  # a fresh heartbeat: the phase just began
                    hb = helpers.heartbeat(run)
                    return hb.get("phase") == mode and hb.get("time", 0) > t0

                helpers.wait_for(entered, proc, 60)
                time.sleep(float(rng.uniform(0.0, 0.02)))  # still inside that phase (it lasts >= 0.05 s)
        if proc.poll() is None and mode != "none":
            hb = helpers.heartbeat(run)
            helpers.kill(proc)
            partial = bool(set(tmp_dirs(run).items()) - set(tmp_before.items()))  # this launch's write cut short
            kills.append((mode, hb.get("phase", "startup") if mode != "startup" else "startup", hb.get("step", 0),
                          partial))
            check_after_kill(helpers, run, proc.returncode)
        else:
            assert proc.wait(timeout=300) == 0, (tmp_path / f"log{attempt}.txt").read_text()[-3000:]
            finished_runs += 1
            helpers.assert_bit_identical(reference, run)
        log = (tmp_path / f"log{attempt}.txt").read_text()
        if resumed and (pick is not None) and "resumed from" in log:
            assert f"resumed from {pick} " in log
    print("kills (mode, last heartbeat phase, step, partial checkpoint write left):", kills)
    assert len(kills) >= 10
    assert {p for _, p, _, _ in kills} >= {"checkpoint", "validate"}
    assert any(partial for *_, partial in kills)  # at least one kill landed inside a checkpoint write
