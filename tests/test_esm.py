"""Predicted structures (ESMFold) and PLM features (ESM-2) from tiny random local checkpoints, on CPU.

The checkpoints are real transformers models (EsmForProteinFolding / EsmModel from small configs,
save_pretrained to a temp dir), so the real local loading and inference code runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import ENV, ROOT

from diffold.config import ConfigError, load_config
from diffold.data import build_datasets, collate
from diffold.structure import chain_from_coords, parse_structure, write_structure

AA = "ACDEFGHIKLMNPQRSTVWY"
PLM_HIDDEN = 24
HIGH_PLDDT_BIN = 45  # the tiny ESMFold's pLDDT head is biased to this of 50 bins: pLDDT ~ 91 (0-100)


def seq(rng, n: int) -> str:
    return "".join(rng.choice(list(AA), n))


@pytest.fixture(scope="module")
def esm_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny EsmForProteinFolding and a tiny ESM-2 (EsmModel + tokenizer), saved like Hub downloads."""
    from transformers import EsmConfig, EsmForProteinFolding, EsmModel, EsmTokenizer
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    root = tmp_path_factory.mktemp("esm")
    torch.manual_seed(0)
    vocab = list(get_default_vocab_list())
    small = {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32, "token_dropout": True,
             "emb_layer_norm_before": False, "num_attention_heads": 2}
    fold_cfg = EsmConfig(**small, hidden_size=32, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=1026,
                         position_embedding_type="rotary", is_folding_model=True, vocab_list=vocab, esmfold_config={
                             "fp16_esm": True, "lddt_head_hid_dim": 16,  # fp16 LM like facebook/esmfold_v1
                             "trunk": {"num_blocks": 1, "sequence_state_dim": 32, "pairwise_state_dim": 16,
                                       "sequence_head_width": 16, "pairwise_head_width": 8, "position_bins": 8,
                                       "max_recycles": 1, "chunk_size": None,
                                       "structure_module": {"sequence_dim": 32, "pairwise_dim": 16, "ipa_dim": 8,
                                                            "resnet_dim": 16, "num_heads_ipa": 2, "num_qk_points": 2,
                                                            "num_v_points": 2, "num_blocks": 2}}})
    fold = EsmForProteinFolding(fold_cfg)
    with torch.no_grad():  # confident pLDDT so the default data.min_plddt=70 keeps the chains
        head = fold.lddt_head[-1]
        head.weight.zero_()
        bias = torch.zeros(37, 50)
        bias[:, HIGH_PLDDT_BIN] = 12.0
        head.bias.copy_(bias.flatten())
    fold.save_pretrained(root / "esmfold")
    # absolute positions with 36 slots: chains longer than 32 residues are embedded piecewise
    plm_cfg = EsmConfig(**small, hidden_size=PLM_HIDDEN, num_hidden_layers=2, intermediate_size=48,
                        max_position_embeddings=36, position_embedding_type="absolute")
    EsmModel(plm_cfg, add_pooling_layer=False).save_pretrained(root / "esm2")
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    EsmTokenizer(str(root / "vocab.txt")).save_pretrained(root / "esm2")
    return {"esmfold": root / "esmfold", "plm": root / "esm2"}


def protein_cfg(tmp_path: Path, train, *extra: str):
    over = ["task=protein", f"data.train_path={train}", "data.val_path=null", "data.val_fraction=0",
            f"data.cache_dir={tmp_path / 'cache'}", "training.batch_size=2", *extra]
    return load_config(None, overrides=over, env={})


def predict_args(esm_dirs) -> list[str]:
    return ["data.use_predicted_structures=true", "model.structure_encoder.use_esmfold=true",
            f"model.structure_encoder.esmfold_path={esm_dirs['esmfold']}"]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    cols = ["id", "sequence", "structure_path"]
    path.write_text("\n".join([",".join(cols)] + [",".join(r.get(c, "") for c in cols) for r in rows]) + "\n")
    return path


def helix(n: int, rng) -> np.ndarray:
    t = np.arange(n) * 100 / 180 * np.pi
    return np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * np.arange(n)], -1) + rng.normal(0, 0.1, (n, 3))


# --------------------------------------------------------------------------- config
def test_config_needs_a_local_model_and_protein(esm_dirs, tmp_path):
    data = "data.train_path=x.csv"
    with pytest.raises(ConfigError, match=r"esmfold_path=None not found: download facebook/esmfold_v1 .*hf download "
                                          r"facebook/esmfold_v1 --local-dir DIR.*use_esmfold=false"):
        load_config(None, overrides=["task=protein", data, "data.use_predicted_structures=true",
                                     "model.structure_encoder.use_esmfold=true"], env={})
    with pytest.raises(ConfigError, match=f"esmfold_path={tmp_path} not found"):  # a dir without config.json
        load_config(None, overrides=["task=protein", "model.structure_encoder.use_esmfold=true",
                                     f"model.structure_encoder.esmfold_path={tmp_path}"], env={})
    with pytest.raises(ConfigError, match="is not an ESMFold"):  # an ESM-2 dir given as ESMFold
        load_config(None, overrides=["task=protein", "model.structure_encoder.use_esmfold=true",
                                     f"model.structure_encoder.esmfold_path={esm_dirs['plm']}"], env={})
    with pytest.raises(ConfigError, match="ESMFold predicts proteins only, task is rna"):
        load_config(None, overrides=predict_args(esm_dirs), env={})
    with pytest.raises(ConfigError, match="ESM-2 is a protein language model, task is rna"):
        load_config(None, overrides=[f"model.structure_encoder.plm_path={esm_dirs['plm']}"], env={})
    with pytest.raises(ConfigError, match=f"model.feature_dim=7 but the PLM .* hidden size {PLM_HIDDEN}"):
        protein_cfg(tmp_path, "x.csv", f"model.structure_encoder.plm_path={esm_dirs['plm']}", "model.feature_dim=7")
    with pytest.raises(ConfigError, match="plm_layer=5 is out of range for a 2-layer model"):
        protein_cfg(tmp_path, "x.csv", f"model.structure_encoder.plm_path={esm_dirs['plm']}",
                    "model.structure_encoder.plm_layer=5")
    cfg = protein_cfg(tmp_path, "x.csv", f"model.structure_encoder.plm_path={esm_dirs['plm']}")
    assert cfg.model.feature_dim == PLM_HIDDEN  # set from the PLM's hidden size
    assert Path(cfg.data.feature_dir).parent == tmp_path / "cache" / "plm"
    assert Path(cfg.data.feature_dir).name.endswith("-layer2")  # -1 resolved: same cache as layer 2


# --------------------------------------------------------------------------- predicted structures
def test_predicted_structures_cached_filtered_and_failures_skipped(esm_dirs, tmp_path, monkeypatch):
    from transformers import EsmForProteinFolding

    import diffold.predicted as predicted

    rng = np.random.default_rng(1)
    seqs = {f"p{i}": seq(rng, int(rng.integers(14, 30))) for i in range(4)}
    seqs["odd"] = seq(rng, 12) + "U" + seq(rng, 5)          # selenocysteine: folded and read back as X
    seqs["dup"] = seqs["p0"]                                 # same sequence, other id: folded once
    seqs["raise"], seqs["nan"] = seq(rng, 20), seq(rng, 22)  # the model raises / returns NaN for these
    seqs["short"] = "MKV"
    real = chain_from_coords("real", "protein", seq(rng, 16), helix(16, rng), ("CA",))
    write_structure(tmp_path / "real.pdb", [real])
    rows = [{"id": k, "sequence": s} for k, s in seqs.items()] + [{"id": "real", "structure_path": "real.pdb"}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    poison = {"raise": seqs["raise"], "nan": seqs["nan"]}
    calls: list[list[str]] = []
    infer = EsmForProteinFolding.infer

    def flaky_infer(self, sequences):
        calls.append(list(sequences))
        if poison.get("raise") in sequences:
            raise RuntimeError("CUDA out of memory (simulated)")
        out = infer(self, sequences)
        if poison.get("nan") in sequences:
            out["positions"][:, sequences.index(poison["nan"])] = float("nan")
        return out

    monkeypatch.setattr(EsmForProteinFolding, "infer", flaky_infer)
    cfg = protein_cfg(tmp_path, manifest, *predict_args(esm_dirs))
    train, val, rep = build_datasets(cfg)
    assert val is None
    assert sorted(train.ids) == sorted(["p0", "p1", "p2", "p3", "odd", "dup", "real"])
    assert rep.train.skipped == {"prediction failed": 2, "too short": 1}
    reasons = {i["source"]: i["reason"] for i in rep.train.skipped_items}
    assert any("RuntimeError: CUDA out of memory (simulated)" in r for r in reasons.values())
    assert any("non-finite coordinates" in r for r in reasons.values())
    stats = rep.preprocessing["predicted_structures"]
    assert stats | {"model": ""} == {"model": "", "rows": 9, "predicted": 7, "folded": 7, "reused": 0,
                                      "failed": 2, "low_plddt": 0, "too_short": 1}
    # one batch with all 7 sequences raised -> retried one by one: the bad one fails alone
    assert len(calls) == 1 + 7 and len(calls[0]) == 7
    # cached PDBs: all atoms, pLDDT (0-100) in the B-factor column, matching the .json mean
    cache = tmp_path / "cache" / "predicted" / stats["model"]
    pdbs = sorted(cache.glob("*.pdb"))
    assert len(pdbs) == 5 and len(list(cache.glob("*.failed"))) == 2
    for pdb in pdbs:
        meta = json.loads(pdb.with_suffix(".json").read_text())
        (ca,), _ = parse_structure(pdb, atoms={"protein": ("CA",)})
        assert ca.sequence == meta["sequence"] and meta["plddt_scale"] == "0-100"
        assert 80 < meta["mean_plddt"] < 100
        b = ca.b_factors[ca.mask[:, 0]]
        assert np.allclose(b, meta["mean_plddt"], atol=0.5)  # the biased head: ~ the same everywhere
        (full,), _ = parse_structure(pdb, atoms={"protein": ("N", "CA", "C", "O", "CB")})
        assert full.mask[:, :4][ca.mask[:, 0]].all()  # backbone heavy atoms are written too
    odd = json.loads((cache / f"{predicted.sequence_key(predicted.normalise(seqs['odd']))}.json").read_text())
    assert odd["sequence"][12] == "X"
    item = train[train.ids.index("p1")]
    assert item["coords"].shape == (len(seqs["p1"]), 1, 3) and torch.isfinite(item["coords"]).all()

    # second run: the two failures are retried (now fine), everything else comes from the cache
    poison.clear()
    calls.clear()
    train, _, rep = build_datasets(cfg)
    assert len(train) == 9 and rep.train.skipped == {"too short": 1}
    stats = rep.preprocessing["predicted_structures"]
    assert (stats["predicted"], stats["reused"], stats["failed"]) == (2, 6, 0)
    assert len(calls) == 1 and sorted(calls[0]) == sorted([seqs["raise"], seqs["nan"]])
    assert not list(cache.glob("*.failed"))

    # third run: nothing to predict -> the model is never loaded; featurization cache reused too
    def no_load(*a, **k):
        raise AssertionError("ESMFold was loaded although every structure is cached")

    monkeypatch.setattr(predicted, "load_pretrained", no_load)
    train, _, rep = build_datasets(cfg)
    assert len(train) == 9 and rep.preprocessing["predicted_structures"]["predicted"] == 0
    assert all(rep.cache_hit.values())

    # a pLDDT threshold above the predictions excludes every predicted chain, counted; still no folding
    high = protein_cfg(tmp_path, manifest, *predict_args(esm_dirs), "data.min_plddt=95")
    train, _, rep = build_datasets(high)
    assert train.ids == ["real"]
    assert rep.train.skipped == {"low pLDDT": 8, "too short": 1}
    assert rep.preprocessing["predicted_structures"]["low_plddt"] == 8
    assert any("low pLDDT: mean 9" in i["reason"] and "< data.min_plddt=95" in i["reason"]
               for i in rep.train.skipped_items)


# --------------------------------------------------------------------------- PLM features
def test_plm_features_precomputed_cached_and_batched(esm_dirs, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, EsmModel

    import diffold.plm as plm

    rng = np.random.default_rng(2)
    data = tmp_path / "pdbs"
    lengths = {"a": 14, "b": 20, "c": 40}  # c > 32 residues: embedded in two pieces of 20
    chains = {}
    for name, n in lengths.items():
        chains[name] = chain_from_coords(name, "protein", seq(rng, n), helix(n, rng), ("CA",))
        write_structure(data / f"{name}.pdb", [chains[name]])
    cfg = protein_cfg(tmp_path, data, f"model.structure_encoder.plm_path={esm_dirs['plm']}")
    train, _, rep = build_datasets(cfg)
    assert sorted(train.ids) == ["a_A", "b_A", "c_A"] and not rep.train.skipped
    stats = rep.preprocessing["plm_features"]
    assert (stats["chains"], stats["computed"], stats["reused"], stats["failed"]) == (3, 3, 0, 0)
    # the stored features are EsmModel's last hidden states without BOS/EOS (stored as float16)
    tok = AutoTokenizer.from_pretrained(str(esm_dirs["plm"]), local_files_only=True)
    ref_model = EsmModel.from_pretrained(str(esm_dirs["plm"]), local_files_only=True, add_pooling_layer=False).eval()
    fdir = Path(cfg.data.feature_dir)

    def reference(s: str) -> torch.Tensor:
        with torch.no_grad():
            return ref_model(**tok([s], return_tensors="pt")).last_hidden_state[0, 1:-1]

    for name in ("a", "c"):
        stored = torch.load(fdir / f"{name}_A.pt", weights_only=True)
        s = chains[name].sequence
        ref = reference(s) if len(s) <= 32 else torch.cat([reference(s[:20]), reference(s[20:])])
        assert stored.dtype == torch.float16 and stored.shape == (len(s), PLM_HIDDEN)
        assert torch.allclose(stored.float(), ref, atol=1e-2)
    batch = collate([train[i] for i in range(3)])
    assert batch.features.shape == (3, 40, PLM_HIDDEN) and batch.features[batch.residue_mask].abs().sum() > 0

    # cached: a second run computes nothing (the model is never built)
    def no_model(*a, **k):
        raise AssertionError("the PLM was loaded although every feature is cached")

    monkeypatch.setattr(plm, "Embedder", no_model)
    _, _, rep = build_datasets(cfg)
    assert rep.preprocessing["plm_features"]["reused"] == 3
    monkeypatch.undo()
    # a chain whose sequence changed (same id) is recomputed, not served stale
    chains["a"] = chain_from_coords("a", "protein", seq(rng, 14), helix(14, rng), ("CA",))
    write_structure(data / "a.pdb", [chains["a"]])
    _, _, rep = build_datasets(cfg)
    assert rep.preprocessing["plm_features"]["computed"] == 1
    stored = torch.load(fdir / "a_A.pt", weights_only=True)
    assert torch.allclose(stored.float(), reference(chains["a"].sequence), atol=1e-2)
    # a chain the PLM fails on is skipped and counted (no feature file), never given made-up features
    chains["d"] = chain_from_coords("d", "protein", seq(rng, 18), helix(18, rng), ("CA",))
    write_structure(data / "d.pdb", [chains["d"]])
    embed = plm.Embedder.embed

    def failing_embed(self, sequences):
        if chains["d"].sequence in sequences:
            raise RuntimeError("simulated failure")
        return embed(self, sequences)

    monkeypatch.setattr(plm.Embedder, "embed", failing_embed)
    train, _, rep = build_datasets(cfg)
    assert sorted(train.ids) == ["a_A", "b_A", "c_A"] and rep.train.skipped == {"no feature file": 1}
    assert (rep.preprocessing["plm_features"]["computed"], rep.preprocessing["plm_features"]["failed"]) == (1, 1)
    assert not (fdir / "d_A.pt").exists()
    # the directory now belongs to (model, layer 2): another layer must not reuse it
    with pytest.raises(ConfigError, match="holds features of another PLM or layer"):
        protein_cfg(tmp_path, data, f"model.structure_encoder.plm_path={esm_dirs['plm']}",
                    "model.structure_encoder.plm_layer=1", f"data.feature_dir={fdir}")


def test_pieces_cover_the_sequence():
    from diffold.plm import pieces

    assert pieces("A" * 10, 32) == ["A" * 10]
    s = "".join(AA[i % 20] for i in range(2045))
    ps = pieces(s, 1022)
    assert "".join(ps) == s and len(ps) == 3 and max(map(len, ps)) <= 1022 and min(map(len, ps)) >= 681


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_precompute_cli_then_train_full_with_plm_features(esm_dirs, tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"id": f"s{i}", "sequence": seq(rng, int(rng.integers(16, 28)))} for i in range(6)]
    manifest = write_manifest(tmp_path / "seqs.csv", rows)
    common = [f"data.train_path={manifest}", "data.val_path=null", "data.val_fraction=0.2",
              f"data.cache_dir={tmp_path / 'cache'}", "data.max_length=24", "training.batch_size=2",
              *predict_args(esm_dirs), f"model.structure_encoder.plm_path={esm_dirs['plm']}"]
    # 1) the preprocessing CLI folds every sequence and computes every PLM feature file
    r = subprocess.run([sys.executable, "-m", "diffold.predicted", "--config", str(ROOT / "configs/smoke.yaml"),
                        "task=protein", *common], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["predicted_structures"]["predicted"] == 6 and summary["plm_features"]["computed"] == 6
    assert summary["train_chains"] + summary["val_chains"] == 6
    # 2) training reuses both caches and feeds the PLM features to the model
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, str(ROOT / "train_full.py"), "--config", str(ROOT / "configs/smoke.yaml"), "--task", "protein",
         "--output_dir", str(run), *common, "training.max_steps=2", "training.log_every=1", "logging.log_with=[]",
         "validation.num_samples=1", "validation.sampling_steps=2"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pre = json.loads((run / "data_report.json").read_text())["preprocessing"]
    assert (pre["predicted_structures"]["predicted"], pre["predicted_structures"]["reused"]) == (0, 6)
    assert (pre["plm_features"]["computed"], pre["plm_features"]["reused"]) == (0, 6)
    saved = load_config(run / "config.yaml", env={})
    assert saved.model.feature_dim == PLM_HIDDEN  # the model was built with the PLM feature input
    from safetensors.torch import load_file

    weights = load_file(str(run / "export" / "model.safetensors"))
    proj = [v for k, v in weights.items() if "feature_proj.weight" in k]
    assert proj and proj[0].shape[1] == PLM_HIDDEN
    assert '"event": "train"' in (run / "metrics.jsonl").read_text()
    # 3) inference computes the same PLM features for new sequences
    fasta = tmp_path / "new.fasta"
    fasta.write_text(">new\n" + seq(rng, 20) + "\n")
    r = subprocess.run([sys.executable, "-m", "diffold.predict", "--checkpoint", str(run / "export"), "--input",
                        str(fasta), "--out", str(tmp_path / "pred"), "--steps", "2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pred" / "new_sample0.pdb").is_file()
