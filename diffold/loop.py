"""One optimizer step: k micro-batches under accelerator.accumulate, clip, health flag, OOM retry.

Every branch that differs between ranks (skip, OOM) is decided by one cross-rank flag, so all
ranks take it together; a rank that retried alone would hang the others in the next collective.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass

import torch

from diffold.batch import Batch
from diffold.diffusion import weighted_mean
from diffold.health import WeightCheck
from diffold.recovery import sync_flag

log = logging.getLogger(__name__)


class InjectedOOM(torch.OutOfMemoryError):
    """Raised by the test-only fault injector to exercise OOM recovery on CPU."""


@dataclass
class StepResult:
    loss: float                 # mean total loss over the step's micro-batches (this rank)
    terms: dict[str, float]     # mean named loss terms
    grad_norm: float            # PRE-clip global gradient norm
    skipped: bool               # optimizer/scheduler/EMA not updated (non-finite)
    oom_retries: int            # OOM recoveries during this step
    weights: WeightCheck | None = None  # state after the update (None when skipped)


def split_batches(batches: list[Batch], parts: int, total: int | None = None) -> list[Batch]:
    """Each micro-batch cut into up to `parts` smaller ones (OOM recovery keeps the effective batch).

    total: exactly this many pieces (<= the uncapped count), fewer cuts where pieces are smallest;
    under DDP every rank must run the same number of micro-batches or the collectives mismatch.
    """
    if parts == 1:
        return batches
    cuts = [min(parts, len(b)) for b in batches]
    while total is not None and sum(cuts) > total:
        j = min((i for i, c in enumerate(cuts) if c > 1), key=lambda i: len(batches[i]) / cuts[i])
        cuts[j] -= 1
    out = []
    for b, c in zip(batches, cuts):
        bounds = [round(i * len(b) / c) for i in range(c + 1)]
        out.extend(b.select(slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:]))
    return out


class Stepper:
    """Owns the per-step mechanics; the loop in train_full.py stays a readable recipe."""

    def __init__(self, acc, model, diffusion, optimizer, scheduler, ema, cfg, faults, loss_stats):
        self.acc, self.model, self.diffusion = acc, model, diffusion
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.cfg, self.faults, self.stats = cfg, faults, loss_stats
        self.base_accumulation = cfg.training.gradient_accumulation_steps
        self.max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else math.inf
        self.rank = acc.process_index
        self.sync_oom = cfg.health.oom_recovery and acc.num_processes > 1
        self.multiplier = 1
        self.unwrapped = acc.unwrap_model(model)  # once: unwrap_model costs ~1-2 ms per call
        self.last_norm: float | None = None  # weight norm after the previous update
        self._params: list[torch.Tensor] | None = None

    def set_multiplier(self, multiplier: int) -> None:
        self.multiplier = multiplier
        self.acc.gradient_accumulation_steps = self.base_accumulation * multiplier

    def step(self, group: list[Batch], global_step: int) -> StepResult:
        """Forward/backward every micro-batch of `group`, then one (possibly skipped) optimizer step."""
        oom_retries = 0
        while True:
            micro = self._split(group)
            self.acc.step = 0  # our groups are exact; Accelerate's counter restarts at each
            self.acc.gradient_accumulation_steps = len(micro)
            try:
                return self._run(micro, global_step, oom_retries)
            except torch.OutOfMemoryError as e:  # under DDP every rank is here (agreed flag)
                if not self.cfg.health.oom_recovery or self.multiplier >= self._agreed_max(max(len(b) for b in group)):
                    raise
                oom_retries += 1
                self._recover_from_oom(e)

    def _agreed_max(self, value: int) -> int:
        """Max of `value` over ranks (one all-reduce), so every rank takes the same branch / split."""
        if self.acc.num_processes == 1:
            return value
        return int(self.acc.reduce(torch.tensor([value], device=self.acc.device), reduction="max").item())

    def _split(self, group: list[Batch]) -> list[Batch]:
        """Micro-batches of this step; with several ranks the same count on each (costs a collective only after an OOM)."""
        if self.multiplier == 1:
            return group
        if self.acc.num_processes == 1:
            return split_batches(group, self.multiplier)
        pieces = sum(min(self.multiplier, len(b)) for b in group)
        return split_batches(group, self.multiplier, total=-self._agreed_max(-pieces))  # min over ranks

    def _recover_from_oom(self, err: Exception) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.set_multiplier(self.multiplier * 2)
        log.warning(
            "out of memory (%s): micro-batch halved, gradient accumulation x%d, same batch retried; "
            "effective batch unchanged", type(err).__name__, self.multiplier,
        )

    def _forward(self, batch: Batch, global_step: int):
        faults, rank = self.faults, self.rank
        out = self.diffusion.loss(self.model, batch)
        # injected after the forward: a real OOM strikes after DDP's pre-forward buffer broadcast, so
        # raising before it would leave the other ranks alone in that collective (a hang)
        if faults.consume("oom", global_step, rank):
            raise InjectedOOM("injected OOM (health.inject_faults)")
        loss = weighted_mean(out.total, batch.weights)  # manifest chain weights (e.g. 1 / cluster size)
        if faults.active("nan_loss", global_step, rank):
            loss = loss * float("nan")
        if faults.active("loss_spike", global_step, rank):
            loss = loss * 1e3
        return out, loss, batch.weights

    def _backward(self, out, loss: torch.Tensor, weights: torch.Tensor, global_step: int) -> None:
        try:
            self.acc.backward(loss)
        except torch.OutOfMemoryError as e:
            if self.sync_oom:  # the other ranks may be inside the gradient all-reduce: no joint retry possible
                raise RuntimeError("out of memory in backward with several processes: cannot be retried in step; "
                                   "lower training.batch_size or data.max_length, or enable "
                                   "model.activation_checkpointing") from e
            raise
        self.stats.add(out, loss.detach(), weights)
        self.faults.kill_now(global_step, self.rank)  # test hook: dies between micro-batches, like a crash

    def _inject_grad_faults(self, global_step: int) -> None:
        """Test hooks acting on the accumulated gradients before clipping."""
        scale = float("nan") if self.faults.active("nan_grad", global_step, self.rank) else (
            1e6 if self.faults.active("grad_explode", global_step, self.rank) else None)
        if scale is not None:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    def _run(self, micro: list[Batch], global_step: int, oom_retries: int) -> StepResult:
        self.stats.begin_step()
        if self.faults.active("slow", global_step, self.rank):
            time.sleep(0.5)
        for batch in micro:
            with self.acc.accumulate(self.model):
                fwd = None
                try:
                    fwd = self._forward(batch, global_step)
                except torch.OutOfMemoryError:
                    if not self.sync_oom:
                        raise
                # agreed between forward and backward: no rank has entered the gradient all-reduce yet
                if self.sync_oom and sync_flag(self.acc, fwd is None):  # every rank retries together
                    raise InjectedOOM("out of memory on at least one rank")
                self._backward(*fwd, global_step)
                if self.acc.sync_gradients:
                    self._inject_grad_faults(global_step)
                    grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.max_norm)
        loss, terms, grad_norm = self.stats.end_step(grad_norm)  # host sync 1: the step's numbers
        # a non-finite loss/gradient, or a loss above the user's cap, is not applied (the monitor reports it)
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > self.cfg.health.loss_cap
        skip = sync_flag(self.acc, bad) and self.cfg.health.skip_nonfinite
        weights = None
        if not skip:
            if self.last_norm is None:  # first update of the run or after a rollback: the norm before it
                self.last_norm = float(self._param_norm())
            self.optimizer.step()
            self.scheduler.step()
            weights = self.check_weights()  # host sync 2: never run a forward on broken weights
            if weights.finite and weights.growth <= self.cfg.health.weight_growth_max:
                self.ema.update(self.unwrapped)  # a broken update is rolled back, never averaged in
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, terms, grad_norm, skip, oom_retries, weights)

    def check_weights(self) -> WeightCheck:
        """Weights finite, their norm, and its growth over the last update (one fused pass, one sync).

        Optimizer state is checked at checkpoint time (`optimizer_state_finite`): a non-finite moment
        makes the next update non-finite, which this check then catches before any forward pass."""
        norm = float(self._param_norm())
        finite = math.isfinite(norm)
        growth = norm / self.last_norm if finite and self.last_norm and self.last_norm > 0 else 1.0
        if finite:
            self.last_norm = norm
        return WeightCheck(finite, norm, growth)

    def optimizer_state_finite(self) -> bool:
        state = [t for st in self.optimizer.state.values() for t in st.values()
                 if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0]
        return not state or math.isfinite(float(torch.stack(torch._foreach_norm(state)).float().sum()))

    def _param_norm(self) -> torch.Tensor:
        """Global L2 norm of the parameters (a 0-dim tensor; one fused foreach pass)."""
        if self._params is None:  # the same tensors for the whole run (a rollback loads into them)
            self._params = [p.detach() for p in self.model.parameters()]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._params)).float())

    def forget_weights(self) -> None:
        """After a rollback the next growth is measured from the restored weights."""
        self.last_norm = None


class LossStats:
    """Device-side accumulation of losses per interval and per noise-level bin (no per-step sync)."""

    def __init__(self, noise_bins: list[tuple[float, float]], device):
        self.bins = noise_bins
        edges = [lo for lo, _ in noise_bins] + [noise_bins[-1][1]]
        self.edges = torch.tensor(edges[1:-1], device=device)
        self.device = device
        self.reset_interval()

    def reset_interval(self) -> None:
        n = len(self.bins)
        self.bin_sum = torch.zeros(n, device=self.device)
        self.bin_count = torch.zeros(n, device=self.device)
        self.residues = torch.zeros((), device=self.device)
        self.samples = 0
        self.t0 = time.perf_counter()

    def begin_step(self) -> None:
        self.step_terms: dict[str, torch.Tensor] = {}
        self.step_loss = torch.zeros((), device=self.device)
        self.micro = 0

    def add(self, out, loss: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """`weights`: the batch's chain weights, so components reduce like the total (they sum to it)."""
        self.micro += 1
        self.step_loss += loss
        for name, value in out.terms.items():
            term = value.detach().mean() if weights is None else weighted_mean(value.detach(), weights)
            self.step_terms[name] = self.step_terms.get(name, 0) + term
        which = torch.bucketize(out.sigma.detach().float(), self.edges)
        self.bin_sum.index_add_(0, which, out.total.detach().float())
        self.bin_count.index_add_(0, which, torch.ones_like(which, dtype=torch.float))
        self.samples += out.total.shape[0]

    def add_residues(self, batch: Batch) -> None:
        self.residues += batch.residue_mask.sum()

    def end_step(self, grad_norm) -> tuple[float, dict[str, float], float]:
        names = list(self.step_terms)
        values = torch.stack(
            [self.step_loss / self.micro, *(self.step_terms[n] / self.micro for n in names),
             torch.as_tensor(grad_norm, device=self.device, dtype=torch.float).reshape(())]
        ).tolist()
        return values[0], dict(zip(names, values[1:-1])), values[-1]

    def flush(self, train_s: float | None = None) -> dict[str, float]:
        """Interval scalars: per-noise-bin losses and throughput; resets the interval. `train_s`: the
        time spent in training steps (data wait included); without it, wall time since the last flush,
        which would also count validation and checkpoint writes."""
        elapsed = max(time.perf_counter() - self.t0 if train_s is None else train_s, 1e-9)
        sums, counts = self.bin_sum.tolist(), self.bin_count.tolist()
        out = {
            f"loss_bin/{lo:.3g}-{hi:.3g}": s / c for (lo, hi), s, c in zip(self.bins, sums, counts) if c > 0
        }
        out["samples_per_s"] = self.samples / elapsed
        out["residues_per_s"] = float(self.residues) / elapsed
        self.reset_interval()
        return out
