"""monitor_training.py + diffold.runinfo / diffold.plots on synthetic run directories."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fixtures_runs as fx
import pytest

from diffold import runstatus
from diffold.runinfo import load_run
from diffold.runstatus import NO_METRICS, summarize

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the script lives at the repo root, outside the package
    sys.path.insert(0, str(REPO))
monitor_training = importlib.import_module("monitor_training")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def status(run_dir: Path, capsys: pytest.CaptureFixture, expect_rc: int = 0) -> dict:
    """Run `--mode status --json` in-process; the stdout must be exactly one strict JSON object."""
    rc = monitor_training.main(["--output_dir", str(run_dir), "--mode", "status", "--json"])
    out = capsys.readouterr().out
    assert rc == expect_rc
    assert out.count("\n") == 1

    def strict(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")
    return json.loads(out, parse_constant=strict)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "monitor_training.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)


# --------------------------------------------------------------------------- status
def test_status_is_torch_and_matplotlib_free(tmp_path: Path) -> None:
    run = fx.running_run(tmp_path)
    code = ("import sys, monitor_training; rc = monitor_training.main(['--output_dir', sys.argv[1], '--json']); "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "alive"


def test_status_of_running_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fx.running_run(tmp_path)
    s = status(run.path, capsys)
    assert (s["run_name"], s["state"], s["step"], s["total_steps"], s["epoch"], s["num_epochs"]) == \
        ("running_run", "alive", 120, 1000, 1, 10)
    assert s["progress"] == pytest.approx(0.12)
    assert s["steps_per_s"] == pytest.approx(2.0)            # 10 steps per 5 s log interval
    assert s["eta_s"] == pytest.approx((1000 - 120) / 2.0)
    assert s["train"]["loss/total"] == pytest.approx(2.0 * 2.718281828 ** (-120 / 300) + 0.1, rel=1e-6)
    assert set(s["val"]) >= {"val/loss", "val/rmsd", "val/tm", "val/gdt_ts", "val/lddt"} and s["val"]["step"] == 100
    assert s["best"] == {"metric": "val/loss", "value": pytest.approx(s["val"]["val/loss"]), "step": 100,
                         "checkpoint": {"name": "best", "step": 100}}
    assert [(c["name"], c["step"], c["valid"]) for c in s["checkpoints"]] == \
        [("latest", 100, True), ("best", 100, True), ("step_000000100", 100, True)]
    assert s["checkpoints"][0]["target"] == "step_000000100"
    assert s["data"]["splits"]["train"]["chains_used"] == 10 and s["data"]["splits"]["train"]["skipped_total"] == 2
    assert "skipped_items" not in s["data"]["splits"]["train"]
    assert s["resume_command"].endswith(f"--output_dir {run.path} --resume auto")
    assert s["health"]["status"] == "healthy" and s["notes"] == []


def test_table_output_shows_sections(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fx.health_run(tmp_path)
    assert monitor_training.main(["--output_dir", str(run.path)]) == 0
    out = capsys.readouterr().out
    for text in ("ALIVE", "step 130/1000", "ETA", "CRITICAL", "2 warnings, 2 critical (last: nonfinite_loss at step 128)", "rollbacks 1",
                 "checkpoints/best @ step 100", "latest -> step_000000100", "nonfinite_loss", "--resume auto",
                 "too_short 1"):
        assert text in out, text


@pytest.mark.parametrize("maker, state, why", [
    (fx.finished_run, "finished", "end event"),
    (fx.crashed_run, "crashed", "is gone"),
    (fx.stalled_run, "stalled", "is alive but its heartbeat"),
])
def test_end_and_dead_states(tmp_path: Path, capsys: pytest.CaptureFixture, maker, state, why) -> None:
    s = status(maker(tmp_path).path, capsys)
    assert s["state"] == state and why in s["state_reason"]
    assert s["eta_s"] is None or state == "stalled"


def test_heartbeat_rules(tmp_path: Path) -> None:
    now = time.time()
    b = fx.trained(fx.RunBuilder(tmp_path), 60, now - 400)
    cases = [
        (dict(t=now - 3, host="other-node", pid=1), "alive", "heartbeat 3s ago"),
        (dict(t=now - 3600, host="other-node", pid=1), "stalled", "cannot check"),
        (dict(t=now - 3, pid=fx.dead_pid()), "crashed", "is gone"),        # fresh heartbeat, process died
        (dict(t=now - 60, status="failed"), "failed", "heartbeat status 'failed'"),
        (dict(t=now - 60, status="gave_up"), "gave_up", ""),
        (dict(t=now - 60, status="early_stopped"), "early_stopped", ""),
    ]
    for kw, state, why in cases:
        b.heartbeat(kw.pop("t"), 60, **kw)
        got = runstatus.run_state(load_run(b.path), now)
        assert got[0] == state and why in got[1], (kw, got)
    # a finished run resumed for more steps: the new start event outranks the old 'finished' heartbeat
    b.heartbeat(now - 100, 60, status="finished").start(now - 10, step=60)
    assert runstatus.run_state(load_run(b.path), now)[0] == "alive"
    # the end event wins over a heartbeat that was not rewritten after it
    b.heartbeat(now - 3, 60)
    for end_status, state in [("max_steps", "max_steps"), ("early_stopped", "early_stopped"), ("gave_up", "gave_up"),
                              ("finished", "finished")]:
        b.end(now - 1, 60, status=end_status, reason="why")
        assert runstatus.run_state(load_run(b.path), now) == (state, "end event: why")


def test_crash_at_startup_from_log_traceback(tmp_path: Path) -> None:
    b = fx.empty_run(tmp_path).log("Traceback (most recent call last):", "ValueError: bad data")
    old = time.time() - 3600
    for p in (b.path / "config.yaml", *(b.path / "logs").iterdir()):
        os.utime(p, (old, old))
    state, why = runstatus.run_state(load_run(b.path), time.time())
    assert state == "crashed" and "traceback" in why


def test_health_events_and_counters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = status(fx.health_run(tmp_path).path, capsys)
    h = s["health"]
    assert (h["status"], h["warnings"], h["critical"], h["skipped_steps"], h["rollbacks"], h["oom_retries"]) == \
        ("critical", 2, 2, 2, 1, 1)
    assert [e["step"] for e in h["latest"]] == [40, 80, 125, 128] and h["latest"][-1]["action"] == "rollback"
    assert s["train"]["loss/total"] == "NaN"                  # strict JSON keeps the non-finite loss visible


def test_counters_fall_back_to_health_actions(tmp_path: Path) -> None:
    b = fx.trained(fx.RunBuilder(tmp_path), 20, time.time() - 100)
    b.health(time.time(), 15, "critical", "nonfinite_loss", "skip").health(time.time(), 16, "critical", "oom", "oom_retry")
    b.train(20, time.time(), **{"health/skipped_steps": None, "health/oom_retries": None})
    h = summarize(load_run(b.path))["health"]
    assert (h["skipped_steps"], h["oom_retries"], h["rollbacks"]) == (1, 1, 0)


def test_resume_command_fallback(tmp_path: Path) -> None:
    b = fx.RunBuilder(tmp_path).config()
    b.train(10, time.time())
    s = summarize(load_run(b.path))
    assert s["resume_command"] == (f"accelerate launch train_full.py --config {b.path.resolve()}/config.yaml "
                                   f"--output_dir {b.path.resolve()} --resume auto")


def test_incomplete_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    b = fx.running_run(tmp_path)
    b.checkpoint("step_000000110", 110, time.time(), complete=False)
    b.checkpoint("step_000000120.tmp", 120, time.time())           # meta.json written, rename not done
    b.link_latest("step_000000999")                                 # dangling
    cks = {c["name"]: c for c in status(b.path, capsys)["checkpoints"]}
    assert not cks["step_000000110"]["valid"] and cks["step_000000110"]["note"] == "INCOMPLETE (no meta.json)"
    assert not cks["step_000000120.tmp"]["valid"] and cks["step_000000120.tmp"]["note"].startswith("INCOMPLETE (.tmp")
    assert cks["latest"]["note"] == "INCOMPLETE (dangling link)" and cks["step_000000100"]["valid"]
    monitor_training.main(["--output_dir", str(b.path)])
    assert capsys.readouterr().out.count("INCOMPLETE") == 3


# --------------------------------------------------------------------------- malformed inputs
def test_truncated_last_line_is_ignored_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    b = fx.running_run(tmp_path).raw("metrics.jsonl", '{"event": "train", "time": 1, "step": 13')
    s = status(b.path, capsys)
    assert s["notes"] == ["ignored 1 truncated line at the end of metrics.jsonl"] and s["step"] == 120
    r = cli("--output_dir", str(b.path))
    assert r.returncode == 0 and r.stderr == ""
    assert "ignored 1 truncated line at the end of metrics.jsonl" in r.stdout


def test_garbage_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    b = fx.trained(fx.RunBuilder(tmp_path), 20, time.time() - 100)    # 4 lines: start, train, train, ... (no val)
    b.raw("metrics.jsonl", "not json\n[1, 2]\n{\"no_event\": 1}\n").train(30, time.time())
    b.raw("health.jsonl", "\x00\x00garbage\n")
    s = summarize(load_run(b.path))
    assert s["notes"] == ["skipped 3 malformed lines in metrics.jsonl (line 4, 5, 6)",
                          "skipped 1 malformed line in health.jsonl (line 1)"]
    assert s["step"] == 30 and s["train"]["step"] == 30


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "error: run directory not found: "),
    (lambda p: p, "is not a run directory (no config.yaml, metrics.jsonl or heartbeat.json)"),
    (lambda p: (p / "f.txt", (p / "f.txt").write_text("x"))[0], "is not a run directory"),
])
def test_bad_directories_give_one_line_errors(tmp_path: Path, setup, message) -> None:
    r = cli("--output_dir", str(setup(tmp_path)), "--mode", "status")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_empty_run_status_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fx.empty_run(tmp_path)
    s = status(run.path, capsys, expect_rc=2)                 # status still prints what it knows
    assert s["state"] == "alive" and s["step"] is None and NO_METRICS in s["notes"]
    assert monitor_training.main(["--output_dir", str(run.path), "--mode", "plot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and NO_METRICS in err
    assert not (run.path / "training_curves.png").exists()


# --------------------------------------------------------------------------- monitor
def test_changes_between_refreshes(tmp_path: Path) -> None:
    now = time.time()
    b = fx.running_run(tmp_path, now)
    before = summarize(load_run(b.path), now)
    for step in range(130, 250, 10):
        b.train(step, now + step / 10, loss=0.98 if step == 240 else None)
    b.checkpoint("step_000000240", 240, now + 24).link_latest("step_000000240").health(now + 20, 200)
    after = summarize(load_run(b.path), now + 25)
    diff = monitor_training.changes(before, after)
    assert diff[:2] == ["+120 steps", f"loss {monitor_training._g(before['train']['loss/total'])} -> 0.98"]
    assert "latest -> step 240" in diff and "new checkpoint step_000000240" in diff and "1 new warning" in diff
    assert monitor_training.changes(after, after) == ["no change"]


def test_monitor_refreshes_until_bound_or_end(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    b = fx.running_run(tmp_path)
    grow = iter(range(130, 1000, 10))
    monkeypatch.setattr(monitor_training.time, "sleep", lambda s: b.train(next(grow), time.time()))
    assert monitor_training.main(["--output_dir", str(b.path), "--mode", "monitor", "--interval", "5",
                                  "--json", "--max_refreshes", "3"]) == 0
    frames = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["step"] for f in frames] == [120, 130, 140]
    assert "changes" not in frames[0] and frames[1]["changes"][0] == "+10 steps"
    # a finished run ends the monitor after one refresh, whatever the bound
    done = fx.finished_run(tmp_path)
    assert monitor_training.main(["--output_dir", str(done.path), "--mode", "monitor", "--max_refreshes", "5"]) == 0
    assert capsys.readouterr().out.count("FINISHED") == 1


# --------------------------------------------------------------------------- plot
def _texts(fig) -> list[list[str]]:
    return [[t.get_text() for t in ax.texts] for ax in fig.axes]


def test_plot_panels_png_and_health_marks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffold import plots

    b = fx.health_run(tmp_path).raw("metrics.jsonl", '{"event": "tr')
    assert monitor_training.main(["--output_dir", str(b.path), "--mode", "plot"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "note: ignored 1 truncated line at the end of metrics.jsonl\n"
    assert "(8 panels)" in cap.out
    assert (b.path / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    fig, titles = plots.make_figure(load_run(b.path))
    assert len(titles) == 8 and titles[0].startswith("Loss") and titles[-1].startswith("Health")
    main_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main_axes] == titles
    assert all("no data yet" not in t for t in _texts(fig))
    loss_ax = main_axes[0]
    assert {"total", "diffusion", "structure", "val loss"} <= set(loss_ax.get_legend_handles_labels()[1])
    marks = [c for c in loss_ax.collections if c.get_colors().size and len(c.get_segments()) == 2]
    assert len(marks) == 2                                   # one vline collection per status (2 warn, 2 crit)
    assert len(main_axes[6].get_lines()) == 4                # one line per noise-level bin


def test_plot_one_point_and_many_points(tmp_path: Path) -> None:
    from diffold import plots

    one = fx.RunBuilder(tmp_path, "one").config()
    one.train(10, time.time())
    fig, _ = plots.make_figure(load_run(one.path))
    texts = _texts(fig)
    assert sum("no data yet" in t for t in texts) == 1       # only the validation panel lacks data
    assert fig.axes[0].get_lines()[0].get_marker() == "o"    # a single point is drawn as a marker
    many = fx.RunBuilder(tmp_path, "many", total_steps=50_000).config()
    t0 = time.time() - 60_000
    with (many.path / "metrics.jsonl").open("w") as f:
        for step in range(1, 5001):
            f.write(json.dumps({"event": "train", "time": t0 + step, "step": step, "epoch": 0,
                                "loss/total": 1.0 / step ** 0.5, "lr": 1e-4}) + "\n")
    t = time.perf_counter()
    out = tmp_path / "sub" / "curves.png"
    titles = plots.plot_run(load_run(many.path), out)
    assert time.perf_counter() - t < 10 and out.read_bytes()[:8] == PNG_MAGIC and len(titles) == 8
    assert not out.with_name("curves.png.tmp").exists()
    fig, _ = plots.make_figure(load_run(many.path))
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == plots.MAX_POINTS   # bucket-averaged
    assert fig.axes[0].get_yscale() == "linear" and fig.axes[0].get_lines()[0].get_marker() in ("None", None, "")


def test_plot_rejects_unknown_format(tmp_path: Path) -> None:
    r = cli("--output_dir", str(fx.running_run(tmp_path).path), "--mode", "plot", "--save_plot", "x.gif")
    assert r.returncode == 2 and "--save_plot must end in one of" in r.stderr


def test_plot_hides_loss_components_that_are_zero_throughout(tmp_path: Path) -> None:
    from diffold import plots

    b = fx.RunBuilder(tmp_path).config()
    for step in (10, 20, 30):
        b.train(step, time.time(), **{"loss/moe_aux": 0.0, "loss/structure": 0.0 if step < 30 else 0.1})
    fig, _ = plots.make_figure(load_run(b.path))
    labels = set(fig.axes[0].get_legend_handles_labels()[1])
    assert {"total", "diffusion", "structure"} <= labels and "moe_aux" not in labels


# --------------------------------------------------------------------------- end statuses (exit-code contract)
def test_failed_start_up_shows_failed_with_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An end event before any start event, no heartbeat, no train step: FAILED with the reason, not ALIVE/HEALTHY."""
    run = fx.failed_start_run(tmp_path)
    s = status(run.path, capsys)                               # the status is final: exit 0
    assert s["state"] == "failed" and s["ok"] is False
    assert "the run ended before its first logged training step" in s["notes"]
    assert "no usable training chain in data/empty" in s["state_reason"] and "(exit code 2)" in s["state_reason"]
    assert s["end"] == {"status": "failed", "reason": s["end"]["reason"], "exit_code": 2}
    assert s["health"]["status"] == "unknown" and s["health"]["words"] == "no training step logged yet"
    monitor_training.main(["--output_dir", str(run.path)])
    out = capsys.readouterr().out
    assert "FAILED" in out and "no usable training chain" in out
    assert "ALIVE" not in out and "HEALTHY" not in out and "--resume" not in out   # nothing to resume
    # the monitor stops at once instead of watching a dead run
    assert monitor_training.main(["--output_dir", str(run.path), "--mode", "monitor", "--max_refreshes", "5"]) == 0
    assert capsys.readouterr().out.count("FAILED") == 1


@pytest.mark.parametrize("end_status, reason", [
    ("finished", "reached num_epochs"), ("early_stopped", "val/loss did not improve for 5 validations"),
    ("max_steps", "reached training.max_steps=100"), ("finished_unhealthy", "non-finite weights in the last window"),
    ("gave_up", "health.max_rollbacks=3 exhausted"), ("failed", "final checkpoint could not be written (ENOSPC)"),
    ("interrupted", "SIGTERM: checkpoint written at step 100"),
])
def test_every_end_status_is_its_own_state(tmp_path: Path, capsys: pytest.CaptureFixture, end_status, reason) -> None:
    run = fx.ended_run(tmp_path, end_status, reason)
    s = status(run.path, capsys)
    assert s["state"] == end_status and s["state_reason"] == f"end event: {reason} (exit code {fx.EXIT_CODES[end_status]})"
    assert s["ok"] is (end_status in ("finished", "early_stopped", "max_steps")) and s["eta_s"] is None
    rows = dict(monitor_training._section_rows(s))
    state_text = rows["State"]
    assert state_text.plain.startswith(end_status.upper()) and reason in state_text.plain
    labels = [label for label, _ in monitor_training._section_rows(s)]
    if end_status == "interrupted":  # how to resume, right under the state, in bold
        assert labels[labels.index("State") + 1] == "Resume with"
        assert rows["Resume with"].plain == s["resume_command"] and "bold" in str(rows["Resume with"].style)
    if end_status in ("finished_unhealthy", "failed", "gave_up"):  # the reason in red, not only the word
        assert any("red" in str(span.style) and reason in state_text.plain[span.start:span.end]
                   for span in state_text.spans)


def test_unknown_end_status_is_not_read_as_success(tmp_path: Path) -> None:
    b = fx.trained(fx.RunBuilder(tmp_path), 20, time.time() - 100).end(time.time(), 20, status="weird", reason="?")
    state, why = runstatus.run_state(load_run(b.path), time.time())
    assert state == "failed" and "unknown end status 'weird'" in why


# --------------------------------------------------------------------------- health line wording
def test_health_line_names_the_interval_not_the_latest_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """health/status is the worst step of the log interval; the log line names the last step. Say which is which."""
    now = time.time()
    b = fx.running_run(tmp_path, now)
    b.health(now - 1.5, 126, "warning", "grad_explosion").train(130, now - 1, **{"health/status": 1})
    b.log("INFO step 130 | train loss - total: 0.9 | lr 3e-4 | grad 1.5 | healthy")
    s = status(b.path, capsys)
    h = s["health"]
    assert (h["status"], h["interval"], h["latest_step_status"]) == ("warning", [121, 130], None)
    assert h["words"] == "in the last log interval (steps 121-130): grad_explosion at step 126"
    monitor_training.main(["--output_dir", str(b.path)])
    out = capsys.readouterr().out
    assert "WARNING in the last log interval (steps 121-130): grad_explosion at step 126" in out
    assert "at the latest step" not in out
    # where the trainer logs the last step's own status, the line says it too
    b.train(140, now, **{"health/status": 1, "health/status_last": 0})
    b.health(now, 133, "warning", "loss_spike")
    assert summarize(load_run(b.path))["health"]["words"] == (
        "in the last log interval (steps 131-140): loss_spike at step 133; the latest step (140) is healthy")
    b.train(150, now + 1)
    assert summarize(load_run(b.path), now + 2)["health"]["words"] == \
        "over the last log interval (steps 141-150): no warning"


# --------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("model, helix_lddt, verdict, beats_all", [
    ({"lddt": 0.31, "tm": 0.12}, 0.43, "below the helix baseline on lDDT (0.31 vs 0.43) and TM (0.12 vs 0.17)", False),
    ({"lddt": 0.6, "tm": 0.3, "gdt_ts": 0.4, "rmsd": 5.0}, 0.43,
     "beats the best baseline on lDDT, TM, GDT-TS and RMSD", True),
    ({"lddt": 0.45, "tm": 0.2, "rmsd": 12.0}, 0.48,
     "below the helix baseline on lDDT (0.45 vs 0.48) and RMSD (12 Å vs 9.8 Å; lower is better); "
     "beats the best baseline on TM", False),
])
def test_status_says_whether_the_model_beats_the_best_baseline(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               model, helix_lddt, verdict, beats_all) -> None:
    b = fx.baseline_run(tmp_path, model, vals=1)             # the helix is the best lDDT baseline here:
    b.val(120, time.time() - 1, 1.0, 40, 1.0,
          **fx.baseline_keys(model, dict(fx.HELIX, lddt=helix_lddt), dict(fx.WALK, lddt=0.40)))
    s = status(b.path, capsys)
    base = s["baseline"]
    assert base["verdict"] == verdict and base["beats_all"] is beats_all
    lddt = base["metrics"]["lddt"]
    assert lddt["model"] == model["lddt"] and lddt["best_baseline_name"] == "helix"
    assert set(lddt["baselines"]) == {"helix", "random_walk"} and lddt["over_baseline"] == pytest.approx(
        model["lddt"] / lddt["best_baseline"])
    monitor_training.main(["--output_dir", str(b.path)])
    out = capsys.readouterr().out
    assert "Baselines" in out and f"model {verdict}" in " ".join(out.split())


def test_no_baseline_keys_no_baseline_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = status(fx.running_run(tmp_path).path, capsys)
    assert s["baseline"] is None
    monitor_training.main(["--output_dir", str(fx.running_run(tmp_path / "b").path)])
    assert "Baselines" not in capsys.readouterr().out


def test_plot_draws_baselines_dashed_on_the_val_panel(tmp_path: Path) -> None:
    from diffold import plots

    b = fx.baseline_run(tmp_path, {"lddt": 0.31, "tm": 0.12, "gdt_ts": 0.2, "rmsd": 14.0})
    fig, titles = plots.make_figure(load_run(b.path))
    i = next(i for i, t in enumerate(titles) if t.startswith("Validation"))
    axes = [ax for ax in fig.axes if ax.get_title() == titles[i]]
    val_axes = [ax for ax in fig.axes if ax.bbox.bounds == axes[0].bbox.bounds]   # the panel and its twin
    dashed = {ln.get_label(): ln for ax in val_axes for ln in ax.get_lines() if ln.get_linestyle() == "--"}
    assert set(dashed) == {"RMSD (Å) best baseline", "TM best baseline", "GDT-TS best baseline", "lDDT best baseline"}
    assert list(dashed["lDDT best baseline"].get_ydata()) == pytest.approx([0.49] * 3)
    solid = {ln.get_label(): ln for ax in val_axes for ln in ax.get_lines() if ln.get_linestyle() == "-"}
    assert solid["lDDT"].get_color() == dashed["lDDT best baseline"].get_color()
