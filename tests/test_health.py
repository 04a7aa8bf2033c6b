"""Health monitor checks, recovery policy, fault-injection spec, cross-rank flags, memory stats."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest

from diffold.config import HealthConfig, load_config
from diffold.faults import Fault, FaultInjector
from diffold.health import Action, HealthMonitor, HealthReport, RecoveryPolicy, sync_flag, sync_flags
from diffold.memory import memory_stats

NAN, INF = float("nan"), float("inf")
HEALTH_KEYS = {"time", "step", "status", "check", "message", "suggestion", "action"}


def monitor(warmup: int = 0, context: dict | None = None, **overrides) -> HealthMonitor:
    return HealthMonitor(HealthConfig(**overrides), warmup_steps=warmup, total_steps=10_000,
                         context=context, clock=lambda: 123.0)


def feed(mon: HealthMonitor, losses, start: int = 0, grad: float = 1.0, lr: float = 1e-4,
         step_time: float = 0.01, data_time: float = 0.0, memory=None) -> list[HealthReport]:
    return [mon.update(start + i, {"total": x}, grad, lr, step_time, data_time, memory) for i, x in enumerate(losses)]


def noisy(n: int, seed: int = 0, level: float = 1.0, rel: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rel * rng.gauss(0, 1)) for _ in range(n)]


def checks(reports) -> list[str]:
    return [e.check for r in reports for e in r.events]


# ---------------------------------------------------------------------------------------------- healthy run
def test_healthy_noisy_decaying_run_raises_nothing():
    cfg = load_config(None, overrides=["training.max_steps=500"])
    mon = HealthMonitor.from_config(cfg, total_steps=500)
    assert mon.warmup_steps == 25  # scheduler.warmup=0.05 of 500 optimizer steps
    rng = random.Random(1)
    for step in range(500):
        loss = 2.0 * math.exp(-step / 150) + 0.3
        lr = 3e-4 * min(1.0, (step + 1) / 25) * (0.5 * (1 + math.cos(math.pi * step / 500)))
        rep = mon.update(step, {"total": loss * (1 + 0.1 * rng.gauss(0, 1)), "diffusion": loss},
                         grad_norm=math.exp(rng.gauss(0, 0.5)), lr=lr,
                         step_time=0.009 * (1 + 0.2 * rng.random()), data_time=0.001 * rng.random(),
                         memory={"device_share": None, "host_share": 0.4})
        assert rep.overall_status == "healthy" and rep.events == [] and rep.status_code == 0, (step, rep)
    assert mon.counts == {}
    assert abs(mon.loss_zscore) < 6


# ---------------------------------------------------------------------------------------------- loss checks
def test_nonfinite_loss_is_critical_and_excluded_from_statistics():
    clean, dirty = monitor(), monitor()
    values = noisy(40)
    feed(clean, values)
    feed(dirty, values[:20])
    rep = dirty.update(20, {"total": NAN, "diffusion": 0.5}, 1.0, 1e-4)
    assert rep.overall_status == "critical" and rep.bad_step and rep.status_code == 2
    assert [e.check for e in rep.events] == ["nonfinite_loss"]
    assert "training.optimizer.lr" in rep.suggestions[0] and "--preset safety" in rep.suggestions[0]
    assert rep.loss_zscore == 0.0
    assert dirty.update(21, {"total": INF}, 1.0, 1e-4).bad_step
    feed(dirty, values[20:], start=22)
    assert dirty.state_dict()["loss"] == clean.state_dict()["loss"]  # NaN/inf never entered the window
    assert math.isfinite(dirty.loss_zscore)


def test_nonfinite_component_loss_names_the_component():
    rep = monitor().update(0, {"total": 1.0, "structure": INF}, 1.0, 1e-4)
    assert rep.bad_step and "structure=inf" in rep.warnings[0]


def test_loss_above_cap_is_critical():
    mon = monitor(loss_cap=100.0)
    feed(mon, noisy(20))
    window = mon.state_dict()["loss"]["values"]
    rep = mon.update(20, {"total": 150.0}, 1.0, 1e-4)
    # above the user's cap: a bad step (its update is not applied), not yet a confirmed spike
    assert rep.overall_status == "critical" and rep.bad_step and not rep.spike_confirmed
    assert rep.events[0].check == "loss_explosion" and "health.loss_cap" in rep.suggestions[0]
    assert mon.update(21, {"total": 150.0}, 1.0, 1e-4).spike_confirmed  # two in a row: a confirmed spike
    assert mon.state_dict()["loss"]["values"] == window
    mon.update(22, {"total": 1e300}, 1.0, 1e-4)
    assert math.isfinite(mon.loss_zscore) and json.dumps(mon.state_dict(), allow_nan=False)


@pytest.mark.parametrize("rollback_on_spike", [False, True])
def test_spike_warns_then_confirms_on_second_consecutive(rollback_on_spike):
    mon = monitor(rollback_on_spike=rollback_on_spike, context={"training.optimizer.lr": 3e-4})
    feed(mon, noisy(100))
    window_before = mon.state_dict()["loss"]["values"]
    first = mon.update(100, {"total": 5.0}, 1.0, 3e-4)
    assert first.overall_status == "warning" and not first.bad_step and not first.spike_confirmed
    assert first.events[0].check == "loss_spike" and first.loss_zscore > 6 and mon.loss_zscore == first.loss_zscore
    assert "lower training.optimizer.lr to 1e-04 (now 0.0003; adamw usually between 1e-04 and 3e-03)" in first.suggestions[0]
    assert mon.state_dict()["loss"]["values"] == window_before  # an isolated spike is held out
    second = mon.update(101, {"total": 5.0}, 1.0, 3e-4)
    assert second.spike_confirmed and not second.bad_step
    assert second.overall_status == ("critical" if rollback_on_spike else "warning")
    assert mon.update(102, {"total": 1.0}, 1.0, 3e-4).overall_status == "healthy"


def test_spike_below_threshold_and_lasting_shift_adapts():
    # the z-score's adaptation alone: a loss held at 3x the first steps' is also judged by health.start_factor
    # (test_divergence_in_the_warmup_is_judged_against_the_untrained_models_loss), off here
    mon = monitor(window=20, start_factor=0.0)
    feed(mon, noisy(40))
    assert mon.update(40, {"total": 1.15}, 1.0, 1e-4).overall_status == "healthy"  # ~3 sigma < 6
    reports = feed(mon, noisy(40, seed=3, level=3.0), start=41)
    assert reports[1].spike_confirmed and sum(r.spike_confirmed for r in reports) == 1
    assert reports[-1].overall_status == "healthy"  # statistics re-baselined on the new level


def test_stagnation_only_after_warmup_and_full_window():
    flat = [1.0] * 60
    assert checks(feed(monitor(warmup=1000, stagnation_window=50), flat)) == []
    assert checks(feed(monitor(stagnation_window=100), flat)) == []  # window never filled
    reports = feed(monitor(warmup=10, stagnation_window=50), flat)
    assert [i for i, r in enumerate(reports) if r.events] == [49]
    assert "health.stagnation_eps" in reports[49].suggestions[0]
    assert checks(feed(monitor(stagnation_window=50), noisy(200))) == []


# ---------------------------------------------------------------------------------------------- other checks
def test_grad_norm_checks():
    ctx = {"training.max_grad_norm": 1.0}
    rep = monitor(context=ctx).update(0, {"total": 1.0}, 5e3, 1e-4)
    assert rep.overall_status == "warning" and not rep.bad_step and rep.events[0].check == "grad_explosion"
    assert "training.max_grad_norm (now 1.0)" in rep.suggestions[0]
    assert monitor().update(0, {"total": 1.0}, 0.0, 1e-4).events[0].check == "grad_vanishing"
    rep = monitor().update(0, {"total": 1.0}, NAN, 1e-4)
    assert rep.bad_step and rep.overall_status == "critical" and rep.events[0].check == "nonfinite_grad"
    assert monitor().update(0, {"total": 1.0}, None, 1e-4).overall_status == "healthy"


def test_lr_range_lower_bound_only_after_warmup():
    mon = monitor(warmup=10, lr_min=1e-6, lr_max=1e-2)
    assert mon.update(0, {"total": 1.0}, 1.0, 1e-8).overall_status == "healthy"  # warming up
    rep = mon.update(10, {"total": 1.0}, 1.0, 1e-8)
    assert rep.events[0].check == "lr_range" and "training.optimizer.lr" in rep.suggestions[0]
    assert monitor(lr_max=1e-2).update(0, {"total": 1.0}, 1.0, 0.1).events[0].check == "lr_range"


def test_slow_batch_against_running_median():
    mon = monitor(slow_batch_factor=3.0, context={"data.max_length": 128})
    feed(mon, noisy(20), step_time=0.01)
    assert mon.update(20, {"total": 1.0}, 1.0, 1e-4, step_time=0.025).overall_status == "healthy"
    rep = mon.update(21, {"total": 1.0}, 1.0, 1e-4, step_time=0.05)
    assert rep.events[0].check == "slow_batch" and "data.max_length (now 128)" in rep.suggestions[0]


def test_data_wait_share_is_averaged_over_the_window():
    cfg = load_config(None, overrides=["health.window=20"])
    mon = HealthMonitor.from_config(cfg, total_steps=1000)
    feed(mon, noisy(30), step_time=0.01, data_time=0.001)
    assert mon.update(30, {"total": 1.0}, 1.0, 1e-4, 0.025, 0.024).overall_status == "healthy"  # one slow load
    reports = feed(mon, noisy(20, seed=2), start=31, step_time=0.01, data_time=0.008)
    hits = [r for r in reports if r.events and r.events[0].check == "data_wait"]
    assert hits and "increase data.num_workers (now 0)" in hits[0].suggestions[0]


def test_memory_share():
    mon = monitor(memory_share=0.9, context={"data.max_length": 256})
    rep = mon.update(0, {"total": 1.0}, 1.0, 1e-4, memory={"device_share": 0.95, "host_share": 0.97})
    assert [e.check for e in rep.events] == ["memory_device", "memory_host"]
    assert "model.activation_checkpointing" in rep.suggestions[0] and "data.max_length (now 256)" in rep.suggestions[0]
    assert "data.num_workers" in rep.suggestions[1]
    assert mon.update(1, {"total": 1.0}, 1.0, 1e-4, memory={"device_share": None, "host_share": 0.5}).events == []


def test_repeated_warnings_are_rate_limited_but_counted():
    mon = monitor(window=50)
    reports = feed(mon, [1.0] * 120, grad=5e3)
    emitted = [i for i, r in enumerate(reports) if r.events]
    assert emitted == [0, 50, 100]
    assert all(r.overall_status == "warning" for r in reports)  # status still reflects every step
    assert mon.counts["grad_explosion"] == 120
    assert "(49 more since step 0)" in reports[50].events[0].message
    crit = feed(monitor(), [NAN] * 5)
    assert all(len(r.events) == 1 for r in crit)  # critical events carry actions: never suppressed


def test_disabled_monitor_keeps_only_nonfinite_checks():
    mon = monitor(enabled=False)
    assert feed(mon, [1.0] * 300, grad=5e3, memory={"device_share": 0.99})[-1].overall_status == "healthy"
    rep = mon.update(300, {"total": NAN}, 1.0, 1e-4)
    assert rep.bad_step and rep.overall_status == "critical" and rep.events[0].check == "nonfinite_loss"


def test_event_schema_and_report_annotation():
    rep = monitor().update(7, {"total": NAN}, 1.0, 1e-4)
    rep.annotate(Action.SKIP)
    d = rep.events[0].to_dict()
    assert set(d) == HEALTH_KEYS and d["action"] == "skip" and d["status"] == "critical" and d["step"] == 7
    json.dumps(d, allow_nan=False)


# ---------------------------------------------------------------------------------------------- resume
def test_state_dict_round_trip_gives_identical_reports():
    def tail(mon):
        rng = random.Random(5)
        out = []
        for i in range(300, 500):
            loss = NAN if i == 320 else (8.0 if i in (400, 401) else 1 + 0.05 * rng.gauss(0, 1))
            step_time = 0.1 if i == 350 else 0.01 * (1 + 0.1 * rng.random())
            rep = mon.update(i, {"total": loss}, 5e3 if i % 7 == 0 else 1.0, 1e-4, step_time, 0.001)
            out.append((rep.overall_status, rep.loss_zscore, [e.to_dict() for e in rep.events]))
        return out

    original = monitor(window=30)
    feed(original, noisy(300, seed=4), grad=2e3)  # warnings in flight at the snapshot
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    restored = monitor(window=30)
    restored.load_state_dict(state)
    expected = tail(original)
    assert tail(restored) == expected
    assert any(events for _, _, events in expected)


# ---------------------------------------------------------------------------------------------- recovery
def test_policy_skip_then_rollback_then_give_up():
    pol = RecoveryPolicy(HealthConfig(max_bad_steps=3, max_rollbacks=2, lr_backoff=0.5))
    assert [pol.decide(True, False) for _ in range(3)] == [Action.SKIP, Action.SKIP, Action.ROLLBACK]
    assert (pol.skipped_steps, pol.rollbacks, pol.lr_scale) == (2, 1, 0.5)
    assert pol.decide(True, False) == Action.SKIP
    assert pol.decide(False, False) == Action.NONE and pol.consecutive_bad == 0  # a good step resets
    assert [pol.decide(True, False) for _ in range(3)][-1] == Action.ROLLBACK
    assert (pol.rollbacks, pol.lr_scale) == (2, 0.25)
    assert [pol.decide(True, False) for _ in range(3)][-1] == Action.GIVE_UP
    assert pol.gave_up and pol.rollbacks == 2 and pol.skipped_steps == 7


def test_policy_spike_rollback_and_no_skip():
    pol = RecoveryPolicy(HealthConfig(rollback_on_spike=True, skip_nonfinite=False, max_rollbacks=0))
    assert pol.decide(True, False) == Action.NONE and pol.skipped_steps == 0
    assert pol.decide(False, True) == Action.GIVE_UP  # no rollbacks allowed at all
    pol = RecoveryPolicy(HealthConfig(rollback_on_spike=False))
    assert pol.decide(False, True) == Action.NONE


def test_policy_records_events_and_final_report():
    mon, pol = monitor(), RecoveryPolicy(HealthConfig(max_bad_steps=1, max_rollbacks=1))
    rep = mon.update(3, {"total": NAN}, 1.0, 1e-4)
    assert pol.decide(rep.bad_step, rep.spike_confirmed, report=rep) == Action.ROLLBACK
    assert rep.events[0].action == "rollback"
    rep = mon.update(4, {"total": NAN}, 1.0, 1e-4)
    assert pol.decide(rep.bad_step, rep.spike_confirmed, report=rep) == Action.GIVE_UP
    text = pol.final_report()
    assert "1 rollback(s)" in text and "step 4 nonfinite_loss (give_up)" in text
    assert "health.max_rollbacks (now 1)" in text and "--preset safety" in text
    assert text.rstrip().endswith("{resume_command}")
    assert "accelerate launch train_full.py --resume latest" in pol.final_report("accelerate launch train_full.py --resume latest")


def test_oom_counter_and_permission():
    pol = RecoveryPolicy(HealthConfig(oom_recovery=True))
    assert pol.on_oom(step=7) and pol.on_oom(step=7) and pol.oom_retries == 2
    assert pol.recent[-1]["action"] == "oom_retry" and set(pol.recent[-1]) == HEALTH_KEYS
    denied = RecoveryPolicy(HealthConfig(oom_recovery=False))
    assert not denied.on_oom(step=1) and denied.recent[-1]["action"] == "give_up"


def test_policy_state_dict_round_trip():
    pol = RecoveryPolicy(HealthConfig(max_bad_steps=2))
    rep = monitor().update(1, {"total": NAN}, 1.0, 1e-4)
    pol.decide(True, False, report=rep)
    pol.on_oom(2)
    state = json.loads(json.dumps(pol.state_dict()))
    copy = RecoveryPolicy(HealthConfig(max_bad_steps=2))
    copy.load_state_dict(state)
    assert copy.state_dict() == pol.state_dict()
    assert copy.decide(True, False) == pol.decide(True, False) == Action.ROLLBACK


# ---------------------------------------------------------------------------------------------- faults
def test_fault_spec_parsing_and_activity():
    inj = FaultInjector.from_spec("nan_loss@5, nan_loss@10-12,oom@7:rank1,grad_explode@20,kill@55,")
    assert inj.enabled and Fault("oom", 7, 7, 1) in inj.faults
    assert [s for s in range(15) if inj.active("nan_loss", s)] == [5, 10, 11, 12]
    assert inj.active("oom", 7, rank=1) and not inj.active("oom", 7, rank=0)
    assert not inj.active("slow", 5)
    assert inj.consume("oom", 7, 1) and not inj.consume("oom", 7, 1)  # a retried step succeeds
    empty = FaultInjector.from_spec("")
    assert not empty.enabled and not empty.active("nan_loss", 5)


@pytest.mark.parametrize("bad", ["nan_loss5", "nan_loss@", "boom@3", "nan_loss@9-3", "oom@7:gpu1", "nan_loss@-1"])
def test_fault_spec_errors_name_the_item(bad):
    with pytest.raises(ValueError) as err:
        FaultInjector.from_spec(f"slow@1,{bad}")
    msg = str(err.value)
    assert "\n" not in msg and "health.inject_faults" in msg and bad in msg


# ---------------------------------------------------------------------------------------------- cross-rank
class FakeAccelerator:
    """Two ranks: reduce(max) merges this rank's flags with the other rank's."""

    def __init__(self, other: list[int]):
        import torch

        self.num_processes, self.device, self.other, self.calls = 2, torch.device("cpu"), other, 0

    def reduce(self, tensor, reduction="sum"):
        import torch

        assert reduction == "max"
        self.calls += 1
        return torch.maximum(tensor, torch.tensor(self.other, dtype=tensor.dtype))


def test_sync_flags_with_fake_two_rank_accelerator():
    acc = FakeAccelerator(other=[0, 1, 0])
    assert sync_flags(acc, [True, False, False]) == [True, True, False] and acc.calls == 1
    assert sync_flag(FakeAccelerator(other=[1]), False) is True
    assert sync_flag(FakeAccelerator(other=[0]), False) is False


def test_sync_flag_with_real_single_process_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        acc = Accelerator(cpu=True)
        assert sync_flag(acc, True) is True and sync_flag(acc, False) is False
        assert sync_flags(acc, [False, True]) == [False, True]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_sync_flag_across_two_real_processes(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        from accelerate import Accelerator
        from diffold.health import sync_flag, sync_flags
        acc = Accelerator(cpu=True)
        r = acc.process_index
        assert acc.num_processes == 2
        assert sync_flag(acc, r == 1) is True
        assert sync_flag(acc, False) is False
        assert sync_flags(acc, [r == 0, False, r == 1]) == [True, False, True]
        print(f"rank {r} ok", flush=True)
        acc.end_training()  # without it gloo may abort at interpreter exit ("terminate called ...")
    """))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout


# ---------------------------------------------------------------------------------------------- memory
def test_memory_stats_cpu():
    stats = memory_stats("cpu")
    assert stats["device_share"] is None and stats["device_gb"] is None
    if sys.platform.startswith("linux"):
        assert 0 < stats["host_gb"] < stats["host_total_gb"] and 0 < stats["host_share"] < 1
    rep = monitor().update(0, {"total": 1.0}, 1.0, 1e-4, memory=stats)
    assert rep.overall_status in ("healthy", "warning")



def test_lr_suggestion_is_a_usable_value_even_for_an_absurd_lr():
    """lr=1000 diverged: 'lower it to 3e+02' would diverge too; the suggestion stays in the usual range."""
    mon = HealthMonitor(HealthConfig(), 0, 100, context={"training.optimizer.lr": 1000.0,
                                                         "training.optimizer.name": "lion"})
    rep = mon.update(1, {"total": float("nan")}, 1.0, 1000.0)
    assert "lower training.optimizer.lr to 3e-04 (now 1e+03; lion usually between 1e-05 and 3e-04)" in rep.suggestions[0]


# ---------------------------------------------------------------------------------------------- loss level
def test_divergence_in_the_warmup_is_judged_against_the_untrained_models_loss():
    """Real lr=0.2 shape (tests/test_real_divergence.py): the loss jumps 0.7 -> 3-13 on the 4th step, before the
    run had a low level of its own; its level is compared with the first 3 steps' (the untrained model's)."""
    real = [0.97, 0.69, 0.64, 13.3, 5.18, 3.91, 5.52, 2.88, 3.19, 4.08, 6.11, 4.55]
    mon = monitor(divergence_factor=10.0, start_factor=3.0)
    reports = feed(mon, real)
    hits = [i for i, r in enumerate(reports) if any(e.check == "loss_divergence" for e in r.events)]
    assert hits and hits[0] == 8  # the 9th step: the first full level window
    (ev,) = [e for e in reports[8].events if e.check == "loss_divergence"]
    assert "the untrained model's (0.69" in ev.message and "health.start_factor=3" in ev.message
    assert any(r.spike_confirmed for r in reports[8:])
    assert mon.level_suspect() is not None
    off = monitor(divergence_factor=10.0, start_factor=0.0)
    assert "loss_divergence" not in checks(feed(off, real))  # 0 turns the yardstick off: the run-minimum one is blind here


def test_checkpoint_mark_sees_a_divergence_before_the_full_window():
    mon = monitor(start_factor=3.0)
    feed(mon, [1.0, 0.9, 0.95, 1.0])
    assert mon.level_suspect() is None
    feed(mon, [9.0, 8.0, 7.0], start=4)  # level (median of 7) 1.0 -> not yet
    assert mon.level_suspect() is None
    feed(mon, [9.0, 8.5], start=7)      # median of 9: 7.0 > 3 x 0.95
    assert "untrained model's" in mon.level_suspect()


def test_healthy_noisy_run_with_heavy_tailed_losses_is_never_judged_diverged():
    """A diffusion loss is heavy-tailed (sigma sampled per step): 3x-10x single-step outliers are not a divergence."""
    rng = random.Random(3)
    losses = [max(0.05, (1.0 - 0.5 * i / 2000) * rng.lognormvariate(0, 0.5)) for i in range(2000)]
    mon = monitor(start_factor=3.0)
    assert "loss_divergence" not in checks(feed(mon, losses))
    assert mon.level_suspect() is None


def test_start_level_survives_state_round_trip_and_rollback_and_old_states_have_none():
    mon = monitor(start_factor=3.0)
    feed(mon, [1.0, 1.1, 0.9] + [0.8] * 20)
    state = mon.state_dict()
    again = monitor(start_factor=3.0)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again._level.start == mon._level.start == 1.0
    early = monitor(start_factor=3.0)
    early_state = early.state_dict()  # a step-0 checkpoint: no start level yet
    mon.restore_statistics(early_state)
    assert mon._level.start == 1.0  # a rollback keeps the run's yardsticks
    old = dict(state, level=state["level"][:4])  # checkpoints written before the start level existed
    legacy = monitor(start_factor=3.0)
    legacy.load_state_dict(old)
    assert legacy._level.start is None
    assert "loss_divergence" not in checks(feed(legacy, [5.0] * 12, start=23))
