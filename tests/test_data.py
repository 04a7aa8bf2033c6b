"""Data pipeline: inputs -> cached featurization -> split -> crops -> padded Batches -> loaders."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffold import structure
from diffold.batch import Batch
from diffold.clustering import cluster, kmer_size
from diffold.config import load_config
from diffold.data import DataError, build_datasets, build_loader, collate
from diffold.featurize import residue_positions
from diffold.sampler import BucketBatchSampler

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


# --------------------------------------------------------------------------- helpers (also used by test_bad_inputs)
def random_seq(n: int, kind: str = "rna", seed: int = 0) -> str:
    alphabet = "ACGU" if kind == "rna" else "ACDEFGHIKLMNPQRSTVWY"
    return "".join(np.random.default_rng(seed).choice(list(alphabet), n))


def make_chain(seq: str, kind: str = "rna", name: str = "A", seed: int = 0, missing=(), numbers=None):
    """A chain on a noisy helix (consecutive atoms ~6 A apart); residues in `missing` lack the default atom
    but keep a second one, so the parser still reports them (mask False)."""
    t = np.arange(len(seq)) * 0.6
    xyz = np.stack([9 * np.cos(t), 9 * np.sin(t), 2.8 * np.arange(len(seq))], axis=1)  # [L, 3]
    xyz += np.random.default_rng(seed).normal(0, 0.3, xyz.shape)
    atoms = structure.DEFAULT_ATOMS[kind] + (("P",) if kind == "rna" else ("N",))
    coords = np.stack([xyz, xyz + 1.5], axis=1)  # [L, 2, 3]
    mask = np.ones((len(seq), 2), bool)
    mask[list(missing), 0] = False
    return structure.chain_from_coords(f"x_{name}", kind, seq, coords, atoms, mask=mask, residue_numbers=numbers,
                                       chain_name=name)


def write(path: Path, *chains) -> Path:
    structure.write_structure(path, list(chains))
    return path


def make_cfg(tmp_path: Path, train, val=None, task: str = "rna", **data) -> object:
    over = [f"task={task}", f"data.train_path={train}", f"data.val_path={'null' if val is None else val}",
            f"data.cache_dir={tmp_path / 'cache'}", "training.batch_size=2"]
    over += [f"data.{k}={'null' if v is None else v}" for k, v in data.items()]
    return load_config(None, overrides=over, env={})


def write_csv(path: Path, rows: list[dict]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def rna_dir(tmp_path: Path) -> Path:
    d = tmp_path / "structs"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        write(d / f"r{i}.pdb", make_chain(random_seq(30 + 10 * i, seed=i), seed=i))
    write(d / "sub" / "mixed.cif.gz", make_chain(random_seq(40, seed=9)),
          make_chain(random_seq(50, "protein", seed=9), "protein", "B"))
    return d


# --------------------------------------------------------------------------- cache
def test_directory_input_and_cache_reuse(tmp_path, rna_dir, monkeypatch):
    cfg = make_cfg(tmp_path, rna_dir, val_fraction=0.2)
    train, val, rep = build_datasets(cfg)
    assert rep.cache_hit == {str(rna_dir): False}
    assert len(train) + len(val) == 6 and len(val) >= 1
    d = rep.to_dict()
    assert d["train"]["files_seen"] == 6 and d["train"]["by_kind"] == {"rna": 6, "protein": 1}
    assert d["train"]["skipped"] == {"molecule is protein, task is rna": 1}
    assert sorted(d["train"]["ids"] + d["val"]["ids"]) == sorted([f"r{i}_A" for i in range(5)] + ["mixed_A"])

    def no_parsing(*a, **k):
        raise AssertionError("second run must not parse")

    monkeypatch.setattr(structure, "parse_structure", no_parsing)
    train2, val2, rep2 = build_datasets(cfg)
    assert rep2.cache_hit == {str(rna_dir): True} and rep2.featurization[str(rna_dir)]["featurized"] == 0
    assert rep2.clustering["reused"] and rep2.clustering["clusters"] == d["clustering"]["clusters"]
    volatile = {"cache_hit": None, "featurization": None, "clustering": None}
    assert {**rep2.to_dict(), **volatile} == {**d, **volatile}
    assert train2.ids == train.ids and torch.equal(train2[0]["coords"], train[0]["coords"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["clusters", "filehash.json", "shards"]
    assert not [p for p in (tmp_path / "cache" / "shards").iterdir() if p.name.startswith(".tmp")]  # no leftovers


def test_cache_key_follows_file_content_not_mtime(tmp_path, rna_dir):
    cfg = make_cfg(tmp_path, rna_dir)
    assert not build_datasets(cfg)[2].cache_hit[str(rna_dir)]
    (rna_dir / "r0.pdb").touch()
    assert build_datasets(cfg)[2].cache_hit[str(rna_dir)]
    write(rna_dir / "r0.pdb", make_chain(random_seq(30, seed=0), seed=99))  # same sequence, new coordinates
    assert not build_datasets(cfg)[2].cache_hit[str(rna_dir)]
    assert not build_datasets(make_cfg(tmp_path, rna_dir, min_length=12))[2].cache_hit[str(rna_dir)]


def test_parallel_featurization_matches_serial(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(40):  # > 16 files per shard: several shards, so two workers really run
        write(d / f"r{i:02d}.pdb", make_chain(random_seq(30 + i, seed=i), seed=i))
    one = build_datasets(make_cfg(tmp_path / "a", d, val_fraction=0.2))
    two = build_datasets(make_cfg(tmp_path / "b", d, val_fraction=0.2, num_proc=2))
    assert one[2].featurization[str(d)]["workers"] == 0 and two[2].featurization[str(d)]["workers"] == 2
    assert one[2].to_dict()["train"] == two[2].to_dict()["train"] and one[1].ids == two[1].ids
    assert all(torch.equal(one[0][i]["coords"], two[0][i]["coords"]) for i in range(len(one[0])))
    shards = [sorted(p.name for p in (t / "cache" / "shards").iterdir()) for t in (tmp_path / "a", tmp_path / "b")]
    assert shards[0] == shards[1] and len(shards[0]) == 2 * 3  # the same content-addressed shards (.arrow + .json)


def test_main_process_first_wraps_each_source(tmp_path, rna_dir):
    entered = []

    @contextlib.contextmanager
    def main_first():
        entered.append(1)
        yield

    val = write(tmp_path / "v.pdb", make_chain(random_seq(30, seed=42)))
    build_datasets(make_cfg(tmp_path, rna_dir, val), main_process_first=main_first)
    assert len(entered) == 2


# --------------------------------------------------------------------------- manifests and splits
def test_csv_manifests(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    write(d / "a.pdb", make_chain(random_seq(40, seed=1)), make_chain(random_seq(30, "protein", seed=1), "protein", "B"))
    write(d / "b.cif", make_chain(random_seq(35, seed=2), seed=2))
    write(d / "c.pdb", make_chain(random_seq(45, seed=3), seed=3))
    train = write_csv(d / "train.csv", [
        {"id": "a_rna", "structure_path": "a.pdb", "chain": "A", "molecule": "rna", "weight": 2.5},
        {"id": "a_prot", "structure_path": "a.pdb", "chain": "B", "molecule": "protein"},
        {"id": "b", "structure_path": "b.cif", "sequence": random_seq(35, seed=2), "weight": ""},
    ])
    val = write_csv(d / "val.csv", [{"id": "c", "structure_path": "c.pdb"}, {"id": "b", "structure_path": "b.cif"}])
    tr, va, rep = build_datasets(make_cfg(tmp_path, train, val))
    assert tr.ids == ["a_rna", "b"] and va.ids == ["c"]
    assert tr.weights == [2.5, 1.0]
    assert rep.train.skipped == {"molecule is protein, task is rna": 1}
    assert rep.val.skipped == {"id also in the train set": 1}
    assert rep.split_method == "separate files" and rep.train.files_seen == 2 and rep.val.files_seen == 2


def test_manifest_split_column(tmp_path):
    rows = []
    for i, split in enumerate(["train", "train", "val", "test", "", "validation", "trian"]):
        write(tmp_path / f"s{i}.pdb", make_chain(random_seq(30, seed=i), seed=i))
        rows.append({"id": f"s{i}", "structure_path": f"s{i}.pdb", "split": split})
    tr, va, rep = build_datasets(make_cfg(tmp_path, write_csv(tmp_path / "all.csv", rows)))
    assert tr.ids == ["s0", "s1", "s4"] and va.ids == ["s2", "s5"]
    assert rep.train.skipped == {"held-out split": 1, "unknown split": 1} and rep.split_method == "manifest split column"
    # no val rows: the cluster split runs over train/unlabelled rows only, test rows stay out
    no_val = [r for r in rows if r["split"] not in ("val", "validation")]
    tr, va, rep = build_datasets(make_cfg(tmp_path, write_csv(tmp_path / "nv.csv", no_val), val_fraction=0.3))
    assert sorted(tr.ids + va.ids) == ["s0", "s1", "s4"] and "sequence clusters" in rep.split_method
    assert rep.train.skipped == {"held-out split": 1, "unknown split": 1}


def test_split_column_holds_when_val_path_is_set(tmp_path):
    """A manifest's val/test rows are never trained on, also when data.val_path gives the validation set."""
    rows = []
    for i, split in enumerate(["train", "", "val", "test", "holdout"]):
        write(tmp_path / f"s{i}.pdb", make_chain(random_seq(30, seed=i), seed=i))
        rows.append({"id": f"s{i}", "structure_path": f"s{i}.pdb", "split": split})
    write(tmp_path / "v.pdb", make_chain(random_seq(40, seed=9), seed=9))
    val = write_csv(tmp_path / "val.csv", [{"id": "v", "structure_path": "v.pdb", "split": "val"},
                                            {"id": "s3", "structure_path": "s3.pdb", "split": "test"}])
    tr, va, rep = build_datasets(make_cfg(tmp_path, write_csv(tmp_path / "all.csv", rows), val))
    assert tr.ids == ["s0", "s1"] and va.ids == ["v"]
    assert rep.train.skipped == {"held-out split": 3} and rep.val.skipped == {"held-out split": 1}
    reasons = sorted(i["reason"] for i in rep.train.skipped_items)
    assert "data.val_path gives the validation set" in reasons[-1] and "never trained" in reasons[0]
    # the same manifest as both sources: each takes its own rows
    both = write_csv(tmp_path / "both.csv", rows)
    tr, va, rep = build_datasets(make_cfg(tmp_path, both, both))
    assert tr.ids == ["s0", "s1"] and va.ids == ["s2"]


def mutate(seq: str, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    s = list(seq)
    for i in rng.choice(len(s), n, replace=False):
        s[i] = "ACGU"[("ACGU".index(s[i]) + 1) % 4]
    return "".join(s)


def test_kmer_clusters():
    base = random_seq(200, seed=0)
    seqs = [base, mutate(base, 4, 1), base[50:150], random_seq(200, seed=1), mutate(base, 60, 2), base]
    labels = cluster(seqs, 0.9, kmer_size(4))
    assert labels[0] == labels[1] == labels[2] == labels[5]  # 98 % identical, fragment, exact copy
    assert len({labels[0], labels[3], labels[4]}) == 3        # unrelated, 70 % identical


def test_cluster_split_keeps_families_together(tmp_path):
    d = tmp_path / "fam"
    d.mkdir()
    family = {}
    for f in range(6):
        base = random_seq(80, seed=100 + f)
        for m in range(3):
            name = f"f{f}m{m}"
            write(d / f"{name}.pdb", make_chain(mutate(base, m * 2, m), seed=m))  # >= 95 % identical
            family[f"{name}_A"] = f
    for s in range(6):
        write(d / f"u{s}.pdb", make_chain(random_seq(60, seed=200 + s)))
        family[f"u{s}_A"] = 100 + s
    cfg = make_cfg(tmp_path, d, val_fraction=0.25, cluster_identity=0.9)
    tr, va, rep = build_datasets(cfg)
    assert set(tr.ids).isdisjoint(va.ids) and len(tr) + len(va) == 24
    assert {family[i] for i in tr.ids}.isdisjoint({family[i] for i in va.ids})  # no family straddles
    assert 4 <= len(va) <= 6  # ~25 % of 24 in whole clusters
    assert "sequence clusters" in rep.split_method
    assert rep.to_dict()["val"]["ids"] == va.ids
    assert build_datasets(cfg)[1].ids == va.ids  # deterministic


# --------------------------------------------------------------------------- crops, masks, collate
@pytest.fixture
def crop_sets(tmp_path):
    """Chains shorter than, equal to and longer than max_length=32; the longer one misses atoms 40-44."""
    chains = [make_chain(random_seq(20, seed=1), name="A"), make_chain(random_seq(32, seed=2), name="B"),
              make_chain(random_seq(100, seed=3), name="C", missing=range(40, 45))]
    for split in ("t", "v"):
        (tmp_path / split).mkdir()
        for ch in chains:
            write(tmp_path / split / f"{split}{ch.chain_name}.pdb", ch)
    cfg = make_cfg(tmp_path, tmp_path / "t", tmp_path / "v", max_length=32)
    tr, va, rep = build_datasets(cfg)
    return tr, va, rep, {c.chain_name: c for c in chains}


def check_item(item, chain, start: int):
    n = len(item["tokens"])
    ref = chain.coords[start : start + n, :1]                  # [n, 1, 3], the default atom only
    m = chain.mask[start : start + n, :1]
    assert torch.equal(item["residue_index"], torch.arange(start, start + n))
    assert torch.equal(item["atom_mask"], torch.from_numpy(m))
    present = item["coords"][item["atom_mask"]]
    assert torch.allclose(present.mean(0), torch.zeros(3), atol=1e-4)  # centred on present atoms
    assert torch.allclose(present - present[0], torch.from_numpy(ref[m] - ref[m][0]), atol=1e-3)
    assert (item["coords"][~item["atom_mask"]] == 0).all()


def test_crops_at_edges(crop_sets):
    tr, va, rep, chains = crop_sets
    assert tr.ids == ["tA_A", "tB_B", "tC_C"] and tr.lengths == [20, 32, 32] and tr.full_lengths == [20, 32, 100]
    assert rep.train.cropped == 1 and rep.val.cropped == 1
    check_item(tr[0], chains["A"], 0)
    check_item(tr[1], chains["B"], 0)
    starts = set()
    for epoch in range(12):
        tr.set_epoch(epoch)
        item = tr[2]
        start = int(item["residue_index"][0])
        check_item(item, chains["C"], start)
        assert 0 <= start <= 68 and len(item["tokens"]) == 32
        assert torch.equal(item["coords"], tr[2]["coords"])  # deterministic in (seed, epoch, index)
        starts.add(start)
    assert len(starts) > 3  # a new window most epochs
    va.set_epoch(5)
    check_item(va[2], chains["C"], 34)  # validation: the centre window, every epoch
    first, last, head = (np.zeros(100, bool) for _ in range(3))
    first[0], last[99], head[:32] = True, True, True
    assert tr.crop_start(2, first) == 0 and va.crop_start(2, first) == 0  # the window must hold atoms
    assert tr.crop_start(2, last) == 68 and va.crop_start(2, last) == 68
    starts = {tr.crop_start(2, head) for tr.epoch in range(30)}
    assert min(starts) >= 0 and max(starts) <= 16 and len(starts) > 3  # >= half the best window's atoms
    assert va.crop_start(2, head) == 16  # nearest such window to the centre


def test_collate_pads_with_zeros(crop_sets):
    tr = crop_sets[0]
    b = collate([tr[0], tr[2], tr[1]])
    assert isinstance(b, Batch) and b.ids == ["tA_A", "tC_C", "tB_B"]
    assert b.tokens.shape == (3, 32) and b.coords.shape == (3, 32, 1, 3) and b.atom_mask.shape == (3, 32, 1)
    assert b.residue_mask.sum(1).tolist() == [20, 32, 32] and b.features is None
    assert (b.tokens[0, 20:] == 0).all() and (b.tokens[0, :20] > 0).all()
    assert (b.coords[0, 20:] == 0).all() and not b.atom_mask[0, 20:].any() and (b.residue_index[0, 20:] == 0).all()
    assert torch.equal(b.weights, torch.ones(3))


def test_residue_positions_keep_numbering_gaps(tmp_path):
    numbers = list(range(1, 11)) + list(range(15, 25)) + [1000, 1001]  # a gap of 4, then a huge jump
    write(tmp_path / "g.pdb", make_chain(random_seq(22, seed=5), numbers=numbers))
    write(tmp_path / "h.pdb", make_chain(random_seq(22, seed=6)))
    tr, _, _ = build_datasets(make_cfg(tmp_path, tmp_path / "g.pdb", tmp_path / "h.pdb"))
    want = list(range(10)) + list(range(14, 24)) + [24, 25]
    assert tr[0]["residue_index"].tolist() == want
    assert residue_positions(np.array([5, 6, 6, 2, 3])).tolist() == [0, 1, 2, 3, 4]  # insertion code, restart


def test_precomputed_features(tmp_path, crop_sets):
    tr, _, _, chains = crop_sets
    fdir = tmp_path / "feats"
    fdir.mkdir()
    feats = {cid: torch.randn(n, 5) for cid, n in zip(tr.ids, tr.full_lengths, strict=True)}
    for cid in ("tA_A", "tC_C"):
        torch.save(feats[cid], fdir / f"{cid}.pt")
    cfg = make_cfg(tmp_path, tmp_path / "t", tmp_path / "v", max_length=32, feature_dir=fdir)
    with pytest.raises(DataError, match="no usable rna chain"):  # val has no feature files at all
        build_datasets(cfg)
    for cid in ("vA_A", "vB_B", "vC_C"):
        torch.save(torch.randn(100, 5) if cid == "vB_B" else feats["t" + cid[1:]], fdir / f"{cid}.pt")
    tr, va, rep = build_datasets(cfg)
    assert tr.ids == ["tA_A", "tC_C"] and va.ids == ["vA_A", "vC_C"]
    assert rep.train.skipped == {"no feature file": 1} and rep.val.skipped == {"bad feature file": 1}
    item = tr[1]
    start = int(item["residue_index"][0])
    assert torch.equal(item["features"], feats["tC_C"][start : start + 32])
    b = collate([tr[0], tr[1]])
    assert b.features.shape == (2, 32, 5) and (b.features[0, 20:] == 0).all()


def test_no_usable_chain_is_one_clear_error(tmp_path):
    write(tmp_path / "p.pdb", make_chain(random_seq(40, "protein"), "protein"))
    (tmp_path / "empty.pdb").write_text("")
    with pytest.raises(DataError) as info:
        build_datasets(make_cfg(tmp_path, tmp_path / "*.pdb"))
    msg = str(info.value)
    assert "\n" not in msg and "*.pdb" in msg and "molecule is protein, task is rna x1" in msg and "empty file x1" in msg
    assert info.value.report.train.files_seen == 2
    with pytest.raises(DataError, match="no such file, directory or glob"):
        build_datasets(make_cfg(tmp_path, tmp_path / "nope"))


# --------------------------------------------------------------------------- loaders
def test_loaders(tmp_path, rna_dir):
    cfg = make_cfg(tmp_path, rna_dir, num_workers=1, max_length=36, val_fraction=0.2)
    tr, va, _ = build_datasets(cfg)
    loaders = [build_loader(tr, cfg, train=True, num_replicas=2, rank=r, batches_multiple_of=2) for r in (0, 1)]
    for dl in loaders:
        assert isinstance(dl.batch_sampler, BucketBatchSampler) and len(dl) == 2
        dl.set_epoch(3)
        assert dl.dataset.epoch == 3 and dl.batch_sampler.epoch == 3
    batches = [b for dl in loaders for b in dl]  # through a worker process
    assert sorted(i for b in batches for i in b.ids) == sorted(tr.ids)
    first = next(iter(loaders[0]))
    assert torch.equal(first.coords, batches[0].coords)  # same epoch -> same crops, workers or not
    loaders[0].skip(1)
    assert [b.ids for b in loaders[0]] == [b.ids for b in batches[1:2]]
    val_dl = build_loader(va, cfg, train=False)
    val_ids = [i for b in val_dl for i in b.ids]
    assert sorted(val_ids) == sorted(va.ids) and val_ids == [i for b in val_dl for i in b.ids]


# --------------------------------------------------------------------------- shipped examples
@pytest.mark.parametrize("task", ["rna", "protein"])
def test_shipped_examples(tmp_path, task):
    manifest = EXAMPLES / "train.csv"
    cfg = make_cfg(tmp_path, manifest, EXAMPLES / "val.csv", task=task)
    tr, va, rep = build_datasets(cfg)
    assert len(tr) > 0 and len(va) > 0 and set(tr.ids).isdisjoint(va.ids)
    assert not rep.cache_hit[str(manifest)] and build_datasets(cfg)[2].cache_hit[str(manifest)]
    d = rep.to_dict()
    json.dumps(d)
    assert d["train"]["chains_used"] == len(tr) and all(n <= cfg.data.max_length for n in tr.lengths)
    b = next(iter(build_loader(tr, cfg, train=True)))
    assert b.residue_mask.any(1).all() and torch.isfinite(b.coords).all()
