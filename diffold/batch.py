"""The batch contract shared by data.py (producer) and model/diffusion (consumers)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Batch:
    """Padded chains. B = batch, L = longest crop in the batch, A = atoms per residue, F = features."""

    ids: list[str]                      # chain ids, len B
    tokens: torch.Tensor                # [B, L] long, task vocabulary (pad = 0 under residue_mask False)
    coords: torch.Tensor                # [B, L, A, 3] float, centred on real atoms, 0 where masked
    atom_mask: torch.Tensor             # [B, L, A] bool, True = atom observed
    residue_mask: torch.Tensor          # [B, L] bool, True = real residue (not padding)
    residue_index: torch.Tensor         # [B, L] long, position in the full chain (relpos after cropping)
    weights: torch.Tensor               # [B] float, per-chain sampling/loss weight
    features: Optional[torch.Tensor] = None  # [B, L, F] float, optional precomputed per-residue features

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_residues(self) -> int:
        """Real (unpadded) residues in the batch; a host sync, call at log time only."""
        return int(self.residue_mask.sum())

    def select(self, index) -> "Batch":
        """Sub-batch of rows `index` (slice or list), used by OOM recovery to halve a batch."""
        idx = list(range(len(self.ids)))[index] if isinstance(index, slice) else list(index)
        t = torch.as_tensor(idx, dtype=torch.long)
        moved = {
            f.name: getattr(self, f.name).index_select(0, t.to(getattr(self, f.name).device))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, ids=[self.ids[i] for i in idx], **moved)
