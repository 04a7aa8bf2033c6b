"""Predicted structures: manifest rows with a sequence but no structure file -> ESMFold PDBs, once, cached.

Cache: <data.predicted_dir, default <cache_dir>/predicted>/<ESMFold id>/<sha256(sequence)[:32]>.pdb, all
heavy atoms, per-residue pLDDT on the 0-100 scale in the B-factor column (transformers' ESMFold outputs
0-1; values <= 1 are multiplied by 100, so a 0-100 model is kept as is), plus a .json (mean pLDDT,
written last: it marks the entry complete). A sequence whose prediction fails gets a .failed note
with the reason and is skipped and counted, never replaced by anything; it is retried next run.

    accelerate launch [--num_processes N] -m diffold.predicted --config C.yaml [key=value ...]

runs the prediction and PLM-feature passes (and featurization) ahead of training, sharded over ranks.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from diffold.esm import (
    barrier,
    half_dtype,
    inference_device,
    load_pretrained,
    model_identity,
    owner,
    rank_world,
    write_atomic,
)
from diffold.sources import Entry, SplitReport
from diffold.structure import build_gemmi, chain_from_coords

logger = logging.getLogger(__name__)

STANDARD = frozenset("ACDEFGHIKLMNPQRSTVWY")  # ESMFold's residue types; anything else is folded as X
FOLD_ERRORS = (RuntimeError, ValueError, IndexError, AssertionError)  # what a failing forward raises (OOM too)


@dataclass
class PredictionStats:
    """What the prediction pass did (data_report.json: preprocessing.predicted_structures)."""

    model: str = ""       # ESMFold identity (cache subdirectory)
    rows: int = 0         # manifest rows with a sequence but no structure file
    predicted: int = 0    # distinct sequences that were not cached yet (folded by all ranks together)
    folded: int = 0       # ... of which this process folded (successfully or not)
    reused: int = 0       # rows served from the cache without folding
    failed: int = 0       # rows skipped: prediction failed
    low_plddt: int = 0    # rows skipped: mean pLDDT < data.min_plddt
    too_short: int = 0    # rows skipped before folding: shorter than data.min_length

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(sequence: str) -> str:
    """Upper case, non-standard residues as X (as ESMFold folds them and the parser reads UNK back)."""
    return "".join(c if c in STANDARD else "X" for c in sequence.upper())


def sequence_key(sequence: str) -> str:
    return hashlib.sha256(sequence.encode()).hexdigest()[:32]


class StructurePredictor:
    """Serves sequence-only manifest rows from the cache, folding missing ones with one lazily loaded ESMFold."""

    def __init__(self, cfg, batch_pairs: int = 1 << 19) -> None:
        self.path = cfg.model.structure_encoder.esmfold_path
        ident = model_identity(self.path)
        root = Path(cfg.data.predicted_dir or Path(cfg.data.cache_dir or ".cache/diffold") / "predicted")
        self.dir = root / ident
        self.min_plddt, self.min_length = cfg.data.min_plddt, cfg.data.min_length
        self.batch_pairs = batch_pairs  # padded B * L^2 per forward: the pair representation dominates memory
        self.stats = PredictionStats(model=ident)
        self._model = None

    # ---------------------------------------------------------------- public
    def entries(self, rows: list[Entry], report: SplitReport) -> list[Entry]:
        """Entries of cached (or now predicted) PDBs for sequence-only rows; every other row is skipped into report."""
        self.stats.rows += len(rows)
        keep = []
        for e in rows:
            if len(e.sequence) < self.min_length:
                self.stats.too_short += 1
                report.skip(e.display, e.chain, f"too short: {len(e.sequence)} residues < data.min_length="
                                                f"{self.min_length} (not predicted)")
            else:
                keep.append((e, normalise(e.sequence)))
        seqs = {sequence_key(s): s for _, s in keep}
        todo = sorted((k for k, s in seqs.items() if self.cached(k, s) is None), key=lambda k: (len(seqs[k]), k))
        rank, world = rank_world()
        mine = {k: seqs[k] for k in todo if owner(k, world) == rank}
        logger.info("predicted structures: %d rows without a structure, %d distinct sequences to fold (%d here), "
                    "cache %s", len(rows), len(todo), len(mine), self.dir)
        self.stats.predicted += len(todo)
        self.stats.folded += len(mine)
        if mine:
            self._fold(list(mine.items()))
        if rows:
            barrier()  # every rank sees every shard's files (rows are the same on all ranks: no mismatch)
        out, new = [], set(todo)
        for e, s in keep:
            key = sequence_key(s)
            meta = self.cached(key, s)
            if meta is None:
                self.stats.failed += 1
                report.skip(e.display, e.chain, f"prediction failed: {self.failure(key)}")
            elif meta["mean_plddt"] < self.min_plddt:
                self.stats.low_plddt += 1
                report.skip(e.display, e.chain, f"low pLDDT: mean {meta['mean_plddt']:.1f} < data.min_plddt="
                                                f"{self.min_plddt:g} (predicted)")
            else:
                self.stats.reused += key not in new
                out.append(replace(e, path=str(self.dir / f"{key}.pdb"), display=f"{e.display} (predicted)",
                                   chain=None, sequence=s))
        logger.info("predicted structures: %d of %d rows usable (%s)", len(out), len(rows), report.top_reasons(5))
        return out

    def cached(self, key: str, sequence: str) -> dict | None:
        """The complete cache entry's metadata, or None (never predicted, failed, or half written)."""
        meta_path, pdb = self.dir / f"{key}.json", self.dir / f"{key}.pdb"
        if not (meta_path.is_file() and pdb.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        ok = isinstance(meta, dict) and meta.get("sequence") == sequence and \
            isinstance(meta.get("mean_plddt"), (int, float))
        return meta if ok else None

    def failure(self, key: str) -> str:
        note = self.dir / f"{key}.failed"
        return note.read_text(encoding="utf-8").strip() if note.is_file() else "no output (folding rank died?)"

    def close(self) -> None:
        """Free ESMFold before training starts."""
        if self._model is not None:
            device = next(self._model.parameters()).device
            self._model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ---------------------------------------------------------------- folding
    def _load(self):
        if self._model is None:
            from transformers import EsmForProteinFolding  # heavy import, only when something must be folded

            device = inference_device()
            model = load_pretrained(EsmForProteinFolding, self.path).to(device).float()
            if (dt := half_dtype(device)) is not None:
                model.esm.to(dt)  # the language model is most of the weights; trunk/structure module stay fp32
            else:
                logger.warning("ESMFold runs on CPU (no GPU): slow for real models; precompute on a GPU with "
                               "python -m diffold.predicted --config ...")
            self._model = model
        return self._model

    def _batches(self, items: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """Length-sorted groups with padded B * L^2 <= batch_pairs (at least one sequence each)."""
        batches: list[list[tuple[str, str]]] = []
        for item in sorted(items, key=lambda kv: (len(kv[1]), kv[0])):
            cur = batches[-1] if batches else None
            if cur is not None and (len(cur) + 1) * len(item[1]) ** 2 <= self.batch_pairs:
                cur.append(item)
            else:
                batches.append([item])
        return batches

    def _fold(self, items: list[tuple[str, str]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for batch in self._batches(items):
            self._fold_batch(batch)

    def _fold_batch(self, batch: list[tuple[str, str]]) -> None:
        """Fold a batch; if it raises, fold its sequences one by one so one bad sequence fails alone."""
        model = self._load()
        try:
            out = model.infer([s for _, s in batch])  # no_grad inside transformers' infer
            results = self._unpack(out, [s for _, s in batch])
        except FOLD_ERRORS as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        else:
            for (key, seq), res in zip(batch, results, strict=True):
                if isinstance(res, str):
                    self._fail(key, res)
                else:
                    self._write(key, seq, *res)
            return
        # retried outside the except block: its traceback would keep the failed forward's tensors alive
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) > 1:
            for item in batch:
                self._fold_batch([item])
        else:
            self._fail(batch[0][0], error)

    @staticmethod
    def _unpack(out, seqs: list[str]) -> list:
        """Per sequence: (atom37 coords [L, 37, 3], atom mask [L, 37], pLDDT per residue [L], mean) or a reason."""
        from transformers.models.esm.openfold_utils import atom14_to_atom37

        pos = atom14_to_atom37(out["positions"][-1], out).float().cpu().numpy()   # [B, L, 37, 3]
        exists = out["atom37_atom_exists"].float().cpu().numpy() > 0.5            # [B, L, 37]
        plddt = out["plddt"].float().cpu().numpy()                                 # [B, L, 37]
        scale = 100.0 if np.nanmax(plddt) <= 1.0 + 1e-6 else 1.0                   # 0-1 (transformers) -> 0-100
        results = []
        for i, s in enumerate(seqs):
            n, m = len(s), exists[i, : len(s)]
            xyz, p = pos[i, :n], plddt[i, :n] * scale
            if not m.any():
                results.append("no atoms predicted (all residues unknown?)")
            elif not (np.isfinite(xyz[m]).all() and np.isfinite(p[m]).all()):
                results.append("non-finite coordinates or pLDDT in the model output")
            else:
                per_res = np.where(m, p, 0).sum(1) / np.maximum(m.sum(1), 1)       # [L], 0 for atom-less X
                results.append((xyz, m, per_res, float(p[m].mean())))            # ESMFold's mean: over atoms
        return results

    def _write(self, key: str, seq: str, xyz: np.ndarray, mask: np.ndarray, plddt: np.ndarray, mean: float) -> None:
        from transformers.models.esm.openfold_utils.residue_constants import atom_types

        chain = chain_from_coords(key, "protein", seq, xyz, tuple(atom_types), mask=mask, b_factors=plddt)
        write_atomic(self.dir / f"{key}.pdb", build_gemmi([chain], pdb=True).make_pdb_string().encode())
        meta = {"sequence": seq, "length": len(seq), "mean_plddt": round(mean, 3), "plddt_scale": "0-100",
                "model": self.dir.name, "esmfold_path": str(self.path)}
        write_atomic(self.dir / f"{key}.json", json.dumps(meta).encode())  # last: the entry is now complete
        (self.dir / f"{key}.failed").unlink(missing_ok=True)

    def _fail(self, key: str, reason: str) -> None:
        logger.warning("ESMFold failed on sequence %s: %s (skipped; retried next run)", key, reason)
        write_atomic(self.dir / f"{key}.failed", reason.encode())


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing passes (predicted structures, PLM features, featurization) and print a summary."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from diffold.config import ConfigError, load_config
    from diffold.data import DataError, build_datasets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--preset")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.preset, args.overrides)
        # joins the process group when launched with accelerate (passes shard over ranks); like train_full.py,
        # cpu= must be passed explicitly: PartialState ignores ACCELERATE_USE_CPU
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                             timeout=timedelta(seconds=cfg.distributed.timeout_s))
        train, val, report = build_datasets(cfg, main_process_first=state.main_process_first)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state.is_main_process:
        print(json.dumps({"train_chains": len(train), "val_chains": len(val) if val else 0,
                          "train_skipped": dict(report.train.skipped), **report.preprocessing}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
