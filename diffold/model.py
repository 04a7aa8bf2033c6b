"""Denoiser network: pair-biased transformer trunk + equivariant (or AF3-style) coordinate head.

The default head is SE(3)-equivariant (rotations + translations) but deliberately NOT mirror
symmetric: a fully E(3) (reflection-equivariant) denoiser samples the mirror image of a fold
half of the time, because Gaussian noise is mirror symmetric. Chirality enters via dihedral
sines, signed volumes and a cross-product displacement term.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffold.geometry import (
    chain_tangent,
    dihedral_features,
    gather_neighbours,
    neighbour_index,
    pair_chirality,
)
from diffold.tasks import get_task
from diffold.trunk import DenoiserBlock, FourierEmbedding  # noqa: F401 (DenoiserBlock re-exported)

# Size registry (cf. DiT_models). Per block ~18 d^2 parameters (attention 4, FFN 8, adaLN 6).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "num_layers": 3, "num_heads": 4, "d_pair": 16},
    "small": {"d_model": 256, "num_layers": 8, "num_heads": 8, "d_pair": 32},
    "base": {"d_model": 640, "num_layers": 13, "num_heads": 10, "d_pair": 64},
}
NUM_RBF = 32
RBF_MAX = 3.0  # distances are in c_in-scaled units (~ A / sigma_data at low noise)
DIHEDRAL_SCALES = (1, 2, 4, 8)  # chain dihedrals over residues i-k, i, i+k, i+2k
SEQ_NEIGHBOURS = 4     # head neighbours: i-4..i+4 along the chain ...
SPACE_NEIGHBOURS = 16  # ... + the 16 nearest other residues in space
OUTPUT_BOUND = 10.0    # soft bound on |F| per atom (the EDM target F has unit variance per coordinate)


class Neighbours(NamedTuple):
    idx: torch.Tensor    # [B, L, K] long, neighbour residue of each residue
    valid: torch.Tensor  # [B, L, K] bool


def unit(v: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """v / |v| with a smooth floor (finite gradient at v = 0): [..., 3]."""
    return v / v.square().sum(-1, keepdim=True).add(eps ** 2).sqrt()


def resolve_size(mcfg) -> dict[str, int]:
    """Size registry entry with the explicit d_model/num_layers/num_heads/d_pair overrides applied."""
    if mcfg.size == "custom":
        dims = {}
    elif mcfg.size in MODEL_SIZES:
        dims = dict(MODEL_SIZES[mcfg.size])
    else:
        raise ValueError(f"model.size={mcfg.size!r} is unknown; use one of {sorted(MODEL_SIZES)} or 'custom'")
    for key in ("d_model", "num_layers", "num_heads", "d_pair"):
        if getattr(mcfg, key) is not None:
            dims[key] = getattr(mcfg, key)
    missing = [k for k in ("d_model", "num_layers", "num_heads", "d_pair") if k not in dims]
    if missing:
        raise ValueError(f"model.size=custom needs model.{missing[0]} (and all of d_model/num_layers/num_heads/d_pair)")
    if dims["d_model"] % dims["num_heads"]:
        raise ValueError(f"model.d_model={dims['d_model']} must be divisible by model.num_heads={dims['num_heads']}")
    return dims


RBF_CUTOFF = 30.0  # exp(-30) = 9e-14: a normal float32; exp(-z) for z > 87 is subnormal, slow on CPUs


def rbf(d: torch.Tensor, num: int = NUM_RBF, d_max: float = RBF_MAX) -> torch.Tensor:
    """Gaussian radial basis of distances [...] -> [..., num], exactly 0 beyond ~5.5 widths of a centre.

    Evaluated far in its tails a Gaussian yields subnormal floats (3-4% of the values, which made CPU
    steps ~2x slower); every value below exp(-30) = 9e-14 is set to 0 instead.
    """
    centres = torch.linspace(0.0, d_max, num, device=d.device, dtype=d.dtype)
    width = d_max / (num - 1)
    z = ((d[..., None] - centres) / width) ** 2
    return torch.where(z < RBF_CUTOFF, torch.exp(-z.clamp(max=RBF_CUTOFF)), 0.0)


def representative(x: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
    """Per-residue point [B, L, 3]: mean of observed atoms (all atoms where none is observed)."""
    w = atom_mask.to(x.dtype)  # [B, L, A]
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    return (x * w[..., None]).sum(-2) / w.sum(-1)[..., None]


class GlobalAttention(nn.Module):
    """Equivariant global term: atom a of residue i moves toward H attention-weighted centroids,
    dx_ia = sum_h g_iah (sum_j alpha_hij x_j - x_ia), alpha = softmax_j(q_i . k_j + pair bias). A convex
    combination of positions, so bounded by the chain's extent and independent of its length."""

    def __init__(self, d_model: int, d_pair: int, num_atoms: int, heads: int = 4, dim: int = 16):
        super().__init__()
        self.heads, self.num_atoms = heads, num_atoms
        self.qk = nn.Linear(d_model, 2 * heads * dim, bias=False)
        self.bias = nn.Linear(d_pair, heads, bias=False)
        self.gate = nn.Linear(d_model, heads * num_atoms)
        nn.init.zeros_(self.gate.weight)  # starts as a pure local head
        nn.init.zeros_(self.gate.bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor, z: torch.Tensor, key_bias: torch.Tensor,
                atom_mask: torch.Tensor) -> torch.Tensor:
        """h [B, L, d], x [B, L, A, 3], z [B, L, L, dp], key_bias [B, 1, 1, L] -> displacement [B, L, A, 3]."""
        q, k = rearrange(self.qk(h), "b l (two h e) -> two b h l e", two=2, h=self.heads)
        logits = torch.einsum("bhie,bhje->bhij", q, k) * q.shape[-1] ** -0.5
        alpha = (logits + rearrange(self.bias(z), "b i j h -> b h i j") + key_bias).softmax(-1)  # [B, H, L, L]
        centres = torch.einsum("bhij,bjc->bihc", alpha, representative(x, atom_mask))          # [B, L, H, 3]
        gate = torch.tanh(rearrange(self.gate(h), "b l (h a) -> b l a h", h=self.heads))       # [B, L, A, H]
        return (gate[..., None] * (centres[:, :, None] - x[:, :, :, None])).sum(3)            # [B, L, A, 3]


class EGNNLayer(nn.Module):
    """One EGNN update (Satorras et al. 2021, eqs. 3-6) over a FIXED number of neighbours per residue,
    made chirality-aware (a pseudo-scalar edge feature and a cross-product displacement term keep
    rotation/translation equivariance but not mirror symmetry).

    Length-independent by construction: residue i averages bounded messages (|w| <= 1) over its
    K neighbours (chain neighbours + nearest in space), never over all L residues, so a chain
    longer than any training crop sees the same kind of neighbourhood (model-findings cause 1)."""

    def __init__(self, d_model: int, d_pair: int, hidden: int, num_atoms: int, update_nodes: bool = True):
        super().__init__()
        self.glob = GlobalAttention(d_model, d_pair, num_atoms)
        self.src, self.dst = nn.Linear(d_model, hidden), nn.Linear(d_model, hidden, bias=False)
        self.pair, self.dist = nn.Linear(d_pair, hidden, bias=False), nn.Linear(NUM_RBF, hidden, bias=False)
        self.chiral = nn.Linear(1, hidden, bias=False)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.weight = nn.Linear(hidden, 2)
        # The last layer's node update would be unused (and break DDP's unused-parameter check).
        self.node = nn.Linear(hidden, d_model) if update_nodes else None

    def forward(self, h: torch.Tensor, x: torch.Tensor, z: torch.Tensor, nbr: Neighbours, m: torch.Tensor,
                atom_mask: torch.Tensor, z_full: torch.Tensor, key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, L, d], x [B, L, A, 3], z [B, L, K, dp] (pair features of the neighbours), m [B, L] -> (h, x)."""
        glob = self.glob(h, x, z_full, key_bias, atom_mask)               # [B, L, A, 3]
        valid = nbr.valid.to(h.dtype)                                     # [B, L, K]
        count = valid.sum(-1).clamp_min(1.0)[:, :, None, None]            # [B, L, 1, 1] real neighbours
        rep = representative(x, atom_mask)                                # [B, L, 3]
        tangent = unit(chain_tangent(rep, m))                             # [B, L, 3]
        rep_j, tan_j = gather_neighbours(rep, nbr.idx), gather_neighbours(tangent, nbr.idx)  # [B, L, K, 3]
        rel = rep[:, :, None] - rep_j                                     # [B, L, K, 3]
        chirality = (rel * torch.linalg.cross(tangent[:, :, None].expand_as(tan_j), tan_j)).sum(-1)
        chirality = chirality / (rel.norm(dim=-1) + 1e-6)                 # [B, L, K] in [-1, 1]
        diff = x[:, :, :, None, :] - rep_j[:, :, None, :, :]              # [B, L, A, K, 3]
        dist = diff.square().sum(-1).add(1e-8).sqrt()                     # [B, L, A, K]; eps: finite grad at 0
        edge = self.src(h)[:, :, None] + gather_neighbours(self.dst(h), nbr.idx) + self.pair(z) + self.chiral(chirality[..., None])
        msg = self.mlp(edge[:, :, None] + self.dist(rbf(dist))) * valid[:, :, None, :, None]  # [B, L, A, K, hid]
        w_radial, w_cross = torch.tanh(self.weight(msg)).unbind(-1)      # [B, L, A, K] each, bounded
        w_radial, w_cross = w_radial * valid[:, :, None], w_cross * valid[:, :, None]
        cross = torch.linalg.cross(diff, tangent[:, :, None, None, :].expand_as(diff))  # [B, L, A, K, 3]
        x = x + (w_radial[..., None] * diff + w_cross[..., None] * cross).sum(3) / count + glob  # mean over neighbours
        if self.node is not None:
            h = h + self.node(msg.sum(3).mean(2) / count[..., 0])
        return h, x


class EquivariantHead(nn.Module):
    """EGNN-style head: atom a of residue i moves by mean_k [w (x_ia - x_k) + u (x_ia - x_k) x t_i] over
    its neighbours k, plus a global term g (x_ia - centroid); w, u, g are bounded functions of
    invariants, so rotating the input rotates the output and a translation leaves it unchanged. The
    output norm is softly bounded by OUTPUT_BOUND (a bounded F keeps the sampler finite)."""

    def __init__(self, d_model: int, d_pair: int, num_atoms: int, num_layers: int = 2, hidden: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(
            EGNNLayer(d_model, d_pair, hidden, num_atoms, update_nodes=i < num_layers - 1) for i in range(num_layers)
        )

    def forward(self, h: torch.Tensor, x: torch.Tensor, z: torch.Tensor, nbr: Neighbours, mask: torch.Tensor,
                atom_mask: torch.Tensor, key_bias: torch.Tensor, run=lambda fn, *a: fn(*a)) -> torch.Tensor:
        """h [B, L, d], x [B, L, A, 3], z [B, L, L, dp], mask [B, L], key_bias [B, 1, 1, L] -> displacement [B, L, A, 3].
        run(layer, *args) calls each layer (the Denoiser passes its activation checkpointing)."""
        m = mask.to(h.dtype)
        x0 = x
        z_nbr = torch.gather(z, 2, nbr.idx[..., None].expand(-1, -1, -1, z.shape[-1]))  # [B, L, K, dp]
        for layer in self.layers:
            h, x = run(layer, h, x, z_nbr, nbr, m, atom_mask, z, key_bias)
        out = x - x0
        norm = out.square().sum(-1, keepdim=True).add(1e-12).sqrt()
        return out / (1 + norm / OUTPUT_BOUND) * m[..., None, None]


class Denoiser(nn.Module):
    """F_theta(c_in x, c_noise): residue tokens + noisy coordinates -> update [B, L, A, 3]."""

    def __init__(self, mcfg, vocab_size: int, num_atoms: int):
        super().__init__()
        dims = resolve_size(mcfg)
        d, dp = dims["d_model"], dims["d_pair"]
        self.num_atoms, self.max_relpos = num_atoms, mcfg.max_relpos
        self.head_type, self.checkpointing = mcfg.head, mcfg.activation_checkpointing
        self.pair_chunk_size = mcfg.pair_chunk_size
        self.token_emb = nn.Embedding(vocab_size, d, padding_idx=0)
        self.feature_proj = nn.Linear(mcfg.feature_dim, d) if mcfg.feature_dim > 0 else None
        # The AF3 head may see raw coordinates; the equivariant trunk sees only distances.
        self.coord_proj = nn.Linear(num_atoms * 3, d) if mcfg.head == "af3" else None
        self.noise_emb = nn.Sequential(FourierEmbedding(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.relpos_emb = nn.Embedding(2 * mcfg.max_relpos + 1, dp)
        self.dist_proj = nn.Linear(NUM_RBF, dp)
        # Chirality-aware invariants (dihedral sines, signed volumes): an E(3)-invariant trunk
        # could not tell a fold from its mirror image.
        self.dihedral_proj = nn.Linear(2 * len(DIHEDRAL_SCALES), d)
        self.chirality_proj = nn.Linear(1, dp, bias=False)
        self.pair_norm = nn.LayerNorm(dp)
        self.blocks = nn.ModuleList(DenoiserBlock(d, dims["num_heads"], dp, mcfg) for _ in range(dims["num_layers"]))
        self.final_norm = nn.LayerNorm(d)
        if mcfg.head == "equivariant":
            self.head = EquivariantHead(d, dp, num_atoms, hidden=2 * dp)
        else:
            self.head = nn.Linear(d, num_atoms * 3)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        tokens: torch.Tensor,
        residue_mask: torch.Tensor,
        residue_index: torch.Tensor,
        atom_mask: Optional[torch.Tensor] = None,
        features: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, A, 3] (c_in-scaled), c_noise [B] -> (F [B, L, A, 3], MoE aux loss [B], 0 without MoE)."""
        mask = residue_mask.bool()
        if atom_mask is None:
            atom_mask = mask[..., None].expand(x.shape[:-1])
        atom_mask = atom_mask & mask[..., None]  # [B, L, A]
        x = x * mask[..., None, None].to(x.dtype)

        cond = self.noise_emb(c_noise.to(x.dtype))  # [B, d]
        h = self.token_emb(tokens) + cond[:, None]  # [B, L, d]
        if self.feature_proj is not None:
            if features is None:
                raise ValueError("model.feature_dim > 0 but the batch has no features; set model.feature_dim=0")
            h = h + self.feature_proj(features.to(x.dtype))
        if self.coord_proj is not None:
            h = h + self.coord_proj(rearrange(x, "b l a c -> b l (a c)"))

        rep = representative(x, atom_mask)  # [B, L, 3]
        h = h + self.dihedral_proj(dihedral_features(rep, mask, DIHEDRAL_SCALES))
        z = self.pair_features(rep, mask, residue_index)  # [B, L, L, dp]
        # Padding keys get -inf; an all-padding row keeps its keys so softmax stays finite.
        keep = mask | ~mask.any(-1, keepdim=True)
        key_bias = torch.zeros_like(rep[:, None, None, :, 0]).masked_fill(~keep[:, None, None, :], float("-inf"))

        aux = h.new_zeros(h.shape[0])
        for block in self.blocks:
            h, a = self.maybe_checkpoint(block, h, z, cond, key_bias, mask)
            aux = aux + a
        h = self.final_norm(h)
        aux = aux / len(self.blocks)

        if self.head_type == "equivariant":
            nbr = Neighbours(*neighbour_index(rep, mask, SEQ_NEIGHBOURS, SPACE_NEIGHBOURS))
            out = self.head(h, x, z, nbr, mask, atom_mask, key_bias, self.maybe_checkpoint)
        else:
            out = rearrange(self.head(h), "b l (a c) -> b l a c", a=self.num_atoms, c=3)
        return out * mask[..., None, None].to(out.dtype), aux


    def maybe_checkpoint(self, fn, *args):
        """fn(*args), under activation checkpointing when it is on and the model trains."""
        if self.checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def pair_features(self, rep: torch.Tensor, mask: torch.Tensor, residue_index: torch.Tensor) -> torch.Tensor:
        """Pair representation z [B, L, L, dp] from distances, relative positions and chirality.

        Built model.pair_chunk_size rows at a time (each row is independent, so the result is the same),
        each chunk under activation checkpointing when it is on: the ~5 intermediate [rows, L, >= dp]
        tensors per chunk (RBF, embeddings, LayerNorm input) are then neither all alive at once nor kept
        for the backward pass; only z itself is."""
        tangent = chain_tangent(rep, mask)  # [B, L, 3]
        n = rep.shape[1]
        step = self.pair_chunk_size or n
        chunks = [self.maybe_checkpoint(self.pair_rows, rep, tangent, residue_index, i, min(i + step, n))
                  for i in range(0, n, step)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def pair_rows(self, rep: torch.Tensor, tangent: torch.Tensor, residue_index: torch.Tensor, i0: int,
                  i1: int) -> torch.Tensor:
        """Rows i0:i1 of the pair representation: [B, i1 - i0, L, dp]."""
        dist = (rep[:, i0:i1, None] - rep[:, None, :]).square().sum(-1).add(1e-8).sqrt()  # [B, r, L]
        chirality = pair_chirality(rep, tangent, rows=slice(i0, i1))[..., None]         # [B, r, L, 1]
        rel = (residue_index[:, None, :] - residue_index[:, i0:i1, None]).clamp(-self.max_relpos, self.max_relpos)
        z = self.relpos_emb(rel + self.max_relpos) + self.dist_proj(rbf(dist)) + self.chirality_proj(chirality)
        return self.pair_norm(z)


def build_model(cfg, num_atoms: int) -> Denoiser:
    """Denoiser for cfg.task's vocabulary with `num_atoms` representative atoms per residue."""
    return Denoiser(cfg.model, get_task(cfg.task).vocab_size, num_atoms)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
