"""Per-residue conditioning from a local protein language model (ESM-2, transformers EsmModel), cached per chain.

<data.feature_dir>/<chain id>.pt holds the [L, F] hidden states of layer model.structure_encoder.plm_layer
(BOS/EOS dropped; float16 unless that overflows), <id>.sha the sha256 of the sequence they came from,
and plm_model.json which model/layer made the directory. The data pipeline loads <id>.pt as
Batch.features; the model reads them through model.feature_dim (= the PLM hidden size).
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffold.esm import (
    PLM_MARKER,
    barrier,
    half_dtype,
    inference_device,
    load_pretrained,
    owner,
    plm_identity,
    rank_world,
    read_marker,
    write_atomic,
)
from diffold.paths import safe_filename

logger = logging.getLogger(__name__)

WINDOW = 1022  # ESM-2 was trained on crops of 1022 residues (+ BOS/EOS): longer chains are embedded in pieces
EMBED_ERRORS = (RuntimeError, ValueError, IndexError)  # what a failing forward raises (OOM included)


@dataclass
class FeatureStats:
    """What the PLM pass did (data_report.json: preprocessing.plm_features)."""

    model: str = ""
    layer: int = -1
    chains: int = 0       # distinct chains that need features
    computed: int = 0     # ... not cached yet (computed by all ranks together)
    reused: int = 0       # ... served from the cache
    failed: int = 0       # ... without features (the data pipeline then skips them: "no feature file")

    def to_dict(self) -> dict:
        return asdict(self)


def sequence_hash(sequence: str) -> str:
    return hashlib.sha256(sequence.encode()).hexdigest()


def is_cached(feature_dir: Path, chain_id: str, sequence: str) -> bool:
    """Features exist and were computed from this very sequence (a reused id with a new sequence is redone)."""
    sha, pt = feature_dir / safe_filename(chain_id, ".sha"), feature_dir / safe_filename(chain_id, ".pt")
    return pt.is_file() and sha.is_file() and sha.read_text(encoding="utf-8").strip() == sequence_hash(sequence)


def precompute_features(cfg, chains: list[tuple[str, str]], tokens_per_batch: int = 8192) -> FeatureStats:
    """Write <feature_dir>/<id>.pt for every (id, sequence) without cached features; sharded over ranks."""
    se, fdir = cfg.model.structure_encoder, Path(cfg.data.feature_dir)
    ident = plm_identity(se.plm_path, se.plm_layer)
    stats = FeatureStats(model=ident["model"], layer=ident["layer"])
    unique = dict(chains)  # id -> sequence (ids are unique per split; train/val overlaps were dropped)
    stats.chains = len(unique)
    todo = [(cid, s) for cid, s in unique.items() if not is_cached(fdir, cid, s)]
    stats.computed, stats.reused = len(todo), len(unique) - len(todo)
    rank, world = rank_world()
    mine = [(cid, s) for cid, s in todo if owner(cid, world) == rank]
    if rank == 0 and read_marker(fdir) is None:
        write_atomic(fdir / PLM_MARKER, json.dumps(ident).encode())
    logger.info("PLM features: %d chains, %d to compute (%d here), cache %s", len(unique), len(todo), len(mine), fdir)
    for cid, _ in mine:  # stale files of a changed sequence must not survive a failed recomputation
        (fdir / safe_filename(cid, ".sha")).unlink(missing_ok=True)
        (fdir / safe_filename(cid, ".pt")).unlink(missing_ok=True)
    if mine:
        embedder = Embedder(se.plm_path, ident["layer"])
        for batch in _batches(mine, tokens_per_batch):
            embedder.embed_and_save(batch, fdir)
        embedder.close()
    if chains:
        barrier()  # every rank sees every shard's files (chains are the same on all ranks)
    stats.failed = sum(not is_cached(fdir, cid, s) for cid, s in todo)
    return stats


def _batches(items: list[tuple[str, str]], tokens: int) -> list[list[tuple[str, str]]]:
    """Length-sorted groups with padded B * L <= tokens (at least one chain each)."""
    batches: list[list[tuple[str, str]]] = []
    for item in sorted(items, key=lambda kv: (len(kv[1]), kv[0])):
        cur = batches[-1] if batches else None
        if cur is not None and (len(cur) + 1) * min(len(item[1]), WINDOW) <= tokens:
            cur.append(item)
        else:
            batches.append([item])
    return batches


def pieces(sequence: str, window: int) -> list[str]:
    """Near-equal consecutive pieces of at most `window` residues (one piece when it fits)."""
    k = -(-len(sequence) // window)
    bounds = [round(i * len(sequence) / k) for i in range(k + 1)]
    return [sequence[a:b] for a, b in zip(bounds, bounds[1:])]


class Embedder:
    """One ESM-2 (EsmModel + tokenizer from a local directory) on this process's device."""

    def __init__(self, path: str, layer: int) -> None:
        from transformers import AutoTokenizer, EsmModel  # heavy import, only when features must be computed

        self.device, self.layer = inference_device(), layer
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
        model = load_pretrained(EsmModel, path, add_pooling_layer=False).to(self.device)
        self.model = model.to(half_dtype(self.device) or torch.float32)
        conf = model.config
        absolute = getattr(conf, "position_embedding_type", "absolute") == "absolute"
        # absolute positions start after padding_idx (ESM-1b: 1026 slots -> 1022 residues + BOS/EOS)
        self.window = min(WINDOW, conf.max_position_embeddings - conf.pad_token_id - 3) if absolute else WINDOW

    @torch.no_grad()
    def embed(self, sequences: list[str]) -> list[torch.Tensor]:
        """[L, F] float32 hidden states of self.layer per sequence (long ones embedded piecewise)."""
        parts = [pieces(s, self.window) for s in sequences]
        flat = [p for ps in parts for p in ps]
        enc = self.tokenizer(flat, padding=True, return_tensors="pt").to(self.device)
        if enc["attention_mask"].sum(1).tolist() != [len(p) + 2 for p in flat]:  # BOS + one token/residue + EOS
            raise ValueError("the tokenizer did not give one token per residue (not an ESM tokenizer?)")
        hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.layer].float()  # [P, T, F]
        rows = [hidden[j, 1 : 1 + len(p)] for j, p in enumerate(flat)]  # drop BOS (and EOS/padding)
        out, j = [], 0
        for ps in parts:
            out.append(torch.cat(rows[j : j + len(ps)]).cpu())
            j += len(ps)
        return out

    def embed_and_save(self, batch: list[tuple[str, str]], feature_dir: Path) -> None:
        """Embed a batch; if it raises, embed its chains one by one so one bad chain fails alone."""
        try:
            feats = self.embed([s for _, s in batch])
        except EMBED_ERRORS as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        else:
            self._save(batch, feats, feature_dir)
            return
        # retried outside the except block: its traceback would keep the failed forward's tensors alive
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) > 1:
            for item in batch:
                self.embed_and_save([item], feature_dir)
        else:
            logger.warning("PLM failed on chain %s: %s (skipped: no feature file)", batch[0][0], error)

    @staticmethod
    def _save(batch: list[tuple[str, str]], feats: list[torch.Tensor], feature_dir: Path) -> None:
        for (cid, seq), x in zip(batch, feats, strict=True):
            if not torch.isfinite(x).all():
                logger.warning("PLM failed on chain %s: non-finite hidden states (skipped: no feature file)", cid)
            else:
                half = x.half()  # half the disk; ESM-2 activations fit fp16 (checked, else kept fp32)
                buf = io.BytesIO()
                torch.save((half if torch.isfinite(half).all() else x).contiguous().clone(), buf)
                write_atomic(feature_dir / safe_filename(cid, ".pt"), buf.getvalue())
                write_atomic(feature_dir / safe_filename(cid, ".sha"), sequence_hash(seq).encode())  # last: entry complete

    def close(self) -> None:
        """Free the model before training starts."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
