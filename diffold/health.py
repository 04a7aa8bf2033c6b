"""Training health: per-step checks -> HealthReport (detection; the response lives in recovery.py).

The loop calls `HealthMonitor.update` once per optimizer step with host floats. Running statistics
are deques with running sums (O(1) per step, no numpy). Non-finite values and unconfirmed spikes
never enter them. A report's `bad_step` / `spike_confirmed` flags go through `sync_flags` (one
all-reduce) into `RecoveryPolicy.decide`, so every rank takes the same branch.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from diffold.config import Config, HealthConfig
from diffold.loss_level import LossLevel
from diffold.recovery import Action, RecoveryPolicy, sync_flag, sync_flags  # noqa: F401 (re-exported)
from diffold.running_stats import WeightCheck, _Median, _Window  # noqa: F401 (WeightCheck re-exported)

SPIKE_CONFIRM = 2       # consecutive k-sigma spikes that make a spike "confirmed"
MIN_HISTORY = 10        # samples before z-scores, medians and shares are trusted (capped at window)
REL_STD_FLOOR = 1e-2    # std floor as a share of |mean|: a flat loss must not turn noise into 1e9 sigma
STATUS_CODES = {"healthy": 0, "warning": 1, "critical": 2}
TYPICAL_LR = {"adamw": (1e-4, 3e-3), "lion": (1e-5, 3e-4)}  # structure-diffusion practice; Lion ~3-10x lower
_STATUS = ("healthy", "warning", "critical")


@dataclass
class HealthEvent:
    """One warning/critical finding; `to_dict()` is one health.jsonl line."""

    time: float
    step: int
    status: str
    check: str
    message: str
    suggestion: str
    action: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class HealthReport:
    """Result of one update: status, the (rate-limited) events, and the flags recovery needs."""

    overall_status: str = "healthy"
    warnings: list[str] = field(default_factory=list)      # messages of this step's events
    suggestions: list[str] = field(default_factory=list)   # one per warning
    events: list[HealthEvent] = field(default_factory=list)
    bad_step: bool = False          # non-finite loss or grad norm: this update must not be applied
    spike_confirmed: bool = False   # the SPIKE_CONFIRM-th consecutive spike (k sigma or above health.loss_cap)
    broken_weights: bool = False    # the applied update left weights/optimizer state non-finite or exploded
    level_diverged: bool = False    # the loss level is diverged: the divergence began up to LEVEL_WINDOW steps ago
    loss_zscore: float = 0.0

    @property
    def status_code(self) -> int:
        return STATUS_CODES[self.overall_status]

    def annotate(self, action: Action | str) -> None:
        """Record the recovery action taken on this step's critical events."""
        for e in self.events:
            if e.status == "critical":
                e.action = Action(action).value


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class HealthMonitor:
    """Running statistics over recent optimizer steps; `update` returns this step's HealthReport."""

    def __init__(self, cfg_health: HealthConfig, warmup_steps: int, total_steps: int,
                 context: Optional[Mapping[str, Any]] = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.warmup_steps, self.total_steps = cfg_health, int(warmup_steps), int(total_steps)
        self.context = dict(context or {})  # dotted key -> current value, quoted in suggestions
        self.clock = clock
        w = max(int(cfg_health.window), 2)
        self.window, self.min_history = w, min(MIN_HISTORY, w)
        self._loss, self._stag = _Window(w), _Window(max(int(cfg_health.stagnation_window), 2))
        self._step_med, self._step_mean, self._data_mean = _Median(w), _Window(w), _Window(w)
        self.loss_zscore = 0.0
        self.counts: dict[str, int] = {}       # occurrences per check, rate-limited ones included
        self._last_emit: dict[str, int] = {}   # step of the last written event per check
        self._suppressed: dict[str, int] = {}  # occurrences not written since then
        self._spike_run = 0
        self._level = LossLevel(cfg_health.divergence_factor, cfg_health.start_factor, cfg_health.loss_cap)

    @classmethod
    def from_config(cls, cfg: Config, total_steps: int) -> HealthMonitor:
        """Monitor for a run: warmup from training.scheduler.warmup, current values for suggestions."""
        from diffold.optim import warmup_steps  # the scheduler's own rounding; lazy: pulls in torch

        t, d = cfg.training, cfg.data
        context = {"training.optimizer.lr": t.optimizer.lr, "training.optimizer.name": t.optimizer.name,
                   "training.max_grad_norm": t.max_grad_norm,
                   "training.batch_size": t.batch_size, "training.mixed_precision": t.mixed_precision,
                   "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
                   "data.num_workers": d.num_workers, "data.max_length": d.max_length,
                   "model.activation_checkpointing": cfg.model.activation_checkpointing}
        return cls(cfg.health, warmup_steps(t.scheduler, total_steps), total_steps, context)

    # ------------------------------------------------------------------ suggestions
    def _now(self, key: str) -> str:
        return f"{key} (now {self.context[key]})" if key in self.context else key

    def _lower_lr(self, lr: Optional[float]) -> str:
        """A concrete LR to try: a third of the configured one, but never above the usual range."""
        base = self.context.get("training.optimizer.lr", lr)
        opt = self.context.get("training.optimizer.name", "adamw")
        usual = TYPICAL_LR.get(opt, TYPICAL_LR["adamw"])
        target = ""
        if base is not None and _positive(base):
            target = f"to {min(base / 3, usual[1]):.0e} (now {_fmt(base)}; {opt} usually between {usual[0]:.0e} and {usual[1]:.0e}) "
        return f"lower training.optimizer.lr {target}or enable the safety preset (--preset safety)"

    # ------------------------------------------------------------------ the checks
    def update(self, step: int, losses: Mapping[str, float], grad_norm: Optional[float], lr: Optional[float],
               step_time: Optional[float] = None, data_time: Optional[float] = None,
               memory: Optional[Mapping[str, Any]] = None, weights: Optional[WeightCheck] = None) -> HealthReport:
        """Check one optimizer step (step_time includes data_time; memory as from memory_stats;
        weights: the state after the update, when one was applied).

        With health.enabled=false only the non-finite checks run: recovery (skip/rollback) needs them.
        """
        c, isfinite = self.cfg, math.isfinite
        if not c.enabled:
            return self._nonfinite_only(step, losses, grad_norm, weights)
        hits: list[tuple[str, bool, Callable[[], tuple[str, str]]]] = []  # check, critical, -> (msg, hint)
        bad_step = confirmed = False
        hits += self._weight_hits(weights, lr)
        z = 0.0
        total = losses.get("total")
        nonfinite = [k for k, v in losses.items() if not isfinite(v)]
        if nonfinite:
            bad_step = True
            hits.append(("nonfinite_loss", True, lambda: (
                "non-finite loss: " + ", ".join(f"{k}={losses[k]}" for k in nonfinite),
                f"{self._lower_lr(lr)}; with {self._now('training.mixed_precision')} prefer bf16 over fp16; "
                "check the training data for corrupt coordinates (data_report.json)")))
        elif total is not None:
            win, above_cap = self._loss, total > c.loss_cap
            if len(win.values) >= self.min_history:
                mean = win.mean()
                z = (total - mean) / max(math.sqrt(win.var()), REL_STD_FLOOR * abs(mean), 1e-12)
                z = min(z, 1e9)  # stays finite (JSON-safe) even for a 1e300 loss
            diverged = self._level.update(total, above_cap)
            spike = above_cap or z > c.spike_sigma or diverged  # an explosion also counts toward confirmation
            self._spike_run = self._spike_run + 1 if spike else 0
            confirmed = self._spike_run == SPIKE_CONFIRM  # once per run of spikes (a rollback resets the run)
            if above_cap:
                bad_step = True  # the user's cap: an update from a loss this large is not applied
                hits.append(("loss_explosion", True, lambda: (
                    f"loss {_fmt(total)} above health.loss_cap={_fmt(c.loss_cap)}"
                    + (" (confirmed: consecutive steps)" if confirmed else ""),
                    f"{self._lower_lr(lr)}; raise health.loss_cap if losses this large are expected")))
            elif diverged:
                hits.append(("loss_divergence", True, lambda: (
                    self._level.describe() + (" (confirmed)" if confirmed else ""),
                    f"{self._lower_lr(lr)}; the run rolls back to the last healthy checkpoint")))
            elif spike:
                hits.append(("loss_spike", confirmed and c.rollback_on_spike, lambda: (
                    f"loss {_fmt(total)} is {z:.1f} sigma above the {self.window}-step mean {_fmt(mean)}"
                    + (" (confirmed: consecutive spikes)" if confirmed else ""),
                    f"{self._lower_lr(lr)}, which also rolls back on confirmed spikes "
                    f"(health.rollback_on_spike); raise health.spike_sigma (now {_fmt(c.spike_sigma)}) "
                    "if the loss is naturally heavy-tailed")))
            # An isolated spike stays out of the statistics; a lasting shift is admitted so they adapt.
            if not above_cap and (self._spike_run == 0 or self._spike_run > SPIKE_CONFIRM):
                win.push(total)
                self._stag.push(total)
            stag = self._stag
            if step >= self.warmup_steps and stag.full and stag.var() < c.stagnation_eps:
                hits.append(("loss_stagnation", False, lambda: (
                    f"loss variance {stag.var():.2e} over the last {stag.maxlen} steps is below "
                    f"health.stagnation_eps={c.stagnation_eps:.0e}",
                    f"check that batches change (data pipeline) and that the LR is not ~0; raise "
                    f"{self._now('training.optimizer.lr')} or lower health.stagnation_eps")))
        self.loss_zscore = z

        if grad_norm is not None:
            if not isfinite(grad_norm):
                bad_step = True
                hits.append(("nonfinite_grad", True, lambda: (
                    f"non-finite gradient norm {grad_norm}",
                    f"{self._lower_lr(lr)}; lower {self._now('training.max_grad_norm')}; with fp16 use bf16")))
            elif grad_norm > c.grad_norm_max:
                hits.append(("grad_explosion", False, lambda: (
                    f"gradient norm {_fmt(grad_norm)} (pre-clip) above health.grad_norm_max={_fmt(c.grad_norm_max)}",
                    f"lower {self._now('training.max_grad_norm')}; {self._lower_lr(lr)}")))
            elif grad_norm < c.grad_norm_min:
                hits.append(("grad_vanishing", False, lambda: (
                    f"gradient norm {grad_norm:.2e} below health.grad_norm_min={c.grad_norm_min:.0e}",
                    f"check for frozen or disconnected parameters; raise {self._now('training.optimizer.lr')}; "
                    f"with {self._now('training.mixed_precision')} fp16 underflows, use bf16")))

        if lr is not None and (not isfinite(lr) or lr > c.lr_max or (step >= self.warmup_steps and lr < c.lr_min)):
            hits.append(("lr_range", False, lambda: (
                f"learning rate {_fmt(lr)} outside [health.lr_min={_fmt(c.lr_min)}, health.lr_max={_fmt(c.lr_max)}]",
                f"check {self._now('training.optimizer.lr')}, training.scheduler.name and "
                "training.scheduler.min_lr, or widen health.lr_min/health.lr_max")))

        if step_time is not None and isfinite(step_time) and step_time >= 0:
            med_win = self._step_med
            if len(med_win.values) >= self.min_history and step_time > c.slow_batch_factor * med_win.median():
                med = med_win.median()
                hits.append(("slow_batch", False, lambda: (
                    f"step took {step_time:.3g} s, {step_time / med:.1f}x the running median {med:.3g} s",
                    f"if it recurs: lower {self._now('data.max_length')} or set data.max_tokens to cap long "
                    f"batches; check disk/CPU contention; raise health.slow_batch_factor to silence")))
            med_win.push(step_time)
            self._step_mean.push(step_time)
            dt = data_time if data_time is not None and isfinite(data_time) else 0.0
            self._data_mean.push(min(max(dt, 0.0), step_time))
            if len(self._data_mean.values) >= self.min_history:
                share = self._data_mean.mean() / max(self._step_mean.mean(), 1e-12)
                if share > c.data_wait_share:
                    hits.append(("data_wait", False, lambda: (
                        f"{share:.0%} of step time is spent waiting for data "
                        f"(over {len(self._data_mean.values)} steps; limit health.data_wait_share={c.data_wait_share:.0%})",
                        f"increase {self._now('data.num_workers')}; put data.cache_dir on a fast local disk")))

        if memory:
            for key, check, what in (("device_share", "memory_device", "device"), ("host_share", "memory_host", "host")):
                share_m = memory.get(key)
                if share_m is not None and share_m > c.memory_share:
                    hits.append((check, False, self._memory_hint(what, share_m)))

        if not hits:
            return HealthReport(loss_zscore=z)
        return self._report(step, hits, bad_step, confirmed, z)

    def _weight_hits(self, w: Optional[WeightCheck], lr: Optional[float]) -> list:
        """Critical hits for an update that broke the weights: a skip cannot undo it, a rollback must."""
        if w is None:
            return []
        hint = f"{self._lower_lr(lr)}; the run rolls back to the last healthy checkpoint with a lower LR"
        if not w.finite:
            return [("nonfinite_weights", True, lambda: (
                "weights or optimizer state became non-finite after the update", hint))]
        if w.growth > self.cfg.weight_growth_max:
            return [("weight_explosion", True, lambda: (
                f"weight norm grew {w.growth:.3g}x in one update (to {w.norm:.3g}; limit "
                f"health.weight_growth_max={_fmt(self.cfg.weight_growth_max)})", hint))]
        return []

    def reset_spikes(self) -> None:
        """After a rollback the spike run starts again (the state that produced it is gone)."""
        self._spike_run = 0

    def level_suspect(self) -> Optional[str]:
        """Why the loss level says the state held now is diverged (None: it does not)."""
        return self._level.describe() if self._level.suspect() else None

    def restore_statistics(self, state: Mapping[str, Any]) -> None:
        """Running statistics of a checkpoint (at a rollback): the loss windows a divergence polluted go
        back to what they were; event counts are kept (they describe the whole run)."""
        counts, last, suppressed = self.counts, self._last_emit, self._suppressed
        earlier = self._level
        self._level = LossLevel(earlier.divergence_factor, earlier.start_factor, earlier.loss_cap)
        self.load_state_dict(state)
        self.counts, self._last_emit, self._suppressed = counts, last, suppressed
        self._level.keep_yardsticks(earlier)  # the lowest level the run reached and its start stay the yardsticks
        self._spike_run = 0

    def _nonfinite_only(self, step: int, losses: Mapping[str, float], grad_norm: Optional[float],
                        weights: Optional[WeightCheck] = None) -> HealthReport:
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append("grad_norm")
        hits = self._weight_hits(weights, None)
        hint = "lower training.optimizer.lr or enable the safety preset (--preset safety); set health.enabled=true"
        check = "nonfinite_grad" if bad == ["grad_norm"] else "nonfinite_loss"
        if bad:
            hits.append((check, True, lambda: ("non-finite " + ", ".join(bad), hint)))
        if not hits:
            return HealthReport()
        return self._report(step, hits, bool(bad), False, 0.0)

    def _memory_hint(self, what: str, share: float) -> Callable[[], tuple[str, str]]:
        limit = f"health.memory_share={self.cfg.memory_share:.0%}"
        if what == "device":
            hint = (f"enable model.activation_checkpointing or lower {self._now('data.max_length')}; or lower "
                    f"{self._now('training.batch_size')} and raise training.gradient_accumulation_steps "
                    "(--preset memory does both)")
        else:
            hint = (f"lower {self._now('data.num_workers')} and data.num_proc; lower "
                    f"{self._now('training.batch_size')}; close other jobs on this host")
        return lambda: (f"{what} memory {share:.0%} used (limit {limit})", hint)

    def _report(self, step: int, hits: list, bad_step: bool, confirmed: bool, z: float) -> HealthReport:
        """Count every hit; write critical events always, a repeated warning at most once per window."""
        level = max(2 if critical else 1 for _, critical, _ in hits)
        broken = any(check in ("nonfinite_weights", "weight_explosion") for check, _, _ in hits)
        report = HealthReport(_STATUS[level], bad_step=bad_step, spike_confirmed=confirmed, loss_zscore=z,
                              broken_weights=broken, level_diverged=any(check == "loss_divergence" for check, _, _ in hits))
        now = None
        for check, critical, describe in hits:
            self.counts[check] = self.counts.get(check, 0) + 1
            last = self._last_emit.get(check)
            if not critical and last is not None and 0 <= step - last < self.window:
                self._suppressed[check] = self._suppressed.get(check, 0) + 1
                continue
            message, suggestion = describe()
            hidden = self._suppressed.pop(check, 0)
            if hidden:
                message += f" ({hidden} more since step {last})"
            self._last_emit[check] = step
            now = self.clock() if now is None else now
            status = "critical" if critical else "warning"
            report.events.append(HealthEvent(now, step, status, check, message, suggestion))
            report.warnings.append(f"{check}: {message}")
            report.suggestions.append(suggestion)
        return report

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state for exact resume."""
        return {"version": 1, "loss": self._loss.state(), "stagnation": self._stag.state(),
                "step_times": list(self._step_med.values), "step_mean": self._step_mean.state(),
                "data_mean": self._data_mean.state(), "loss_zscore": self.loss_zscore,
                "spike_run": self._spike_run, "counts": dict(self.counts),
                "level": self._level.state(),
                "last_emit": dict(self._last_emit), "suppressed": dict(self._suppressed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loss.load(state["loss"])
        self._stag.load(state["stagnation"])
        self._step_med.load(state["step_times"])
        self._step_mean.load(state["step_mean"])
        self._data_mean.load(state["data_mean"])
        self.loss_zscore, self._spike_run = float(state["loss_zscore"]), int(state["spike_run"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self._last_emit = {k: int(v) for k, v in state["last_emit"].items()}
        self._suppressed = {k: int(v) for k, v in state["suppressed"].items()}
        self._level.load(state.get("level"))  # absent in checkpoints of earlier versions

