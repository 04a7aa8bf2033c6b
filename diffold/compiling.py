"""torch.compile with a bounded number of graphs: batches padded to a few lengths, the count watched.

Every distinct input shape costs a compilation (tens of seconds per graph with inductor). Padding
batch lengths to a multiple of data.pad_multiple (16 by default when compiling) leaves at most
max_length / 16 lengths; after the first shape change dynamo makes the changed dimension dynamic.
The loop counts the graphs, logs each new one, and keeps compile steps out of the slow-batch check.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("diffold.train")
DEFAULT_PAD = 16


def pad_multiple(cfg, decisions) -> int:
    """The padding used for training batches (said once when the suite chose it)."""
    if cfg.data.pad_multiple or not cfg.model.compile:
        return cfg.data.pad_multiple
    n = -(-cfg.data.max_length // DEFAULT_PAD)
    decisions.note(f"model.compile=true: batch lengths padded to multiples of {DEFAULT_PAD} residues (data.pad_multiple), "
                   f"at most {n} distinct lengths to compile for")
    return DEFAULT_PAD


def compile_model(model: torch.nn.Module, cfg) -> torch.nn.Module:
    return torch.compile(model, backend=cfg.model.compile_backend) if cfg.model.compile else model


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class GraphWatch:
    """Per step: did it compile a new graph? (Then its time is compilation, not a slow batch.)"""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.count = graph_count() if enabled else 0
        self.start = self.count

    def new_graphs(self, step: int, shape: tuple[int, ...]) -> int:
        if not self.enabled:
            return 0
        now = graph_count()
        new, self.count = now - self.count, now
        if new:
            log.info("compiled %d new graph(s) at step %d (batch shape %s); %d in this run", new, step, shape,
                     now - self.start)
        return new

    @property
    def total(self) -> int | None:
        return self.count - self.start if self.enabled else None
