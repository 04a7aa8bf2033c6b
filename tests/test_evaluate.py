"""Scoring, baselines in validation, the `python -m diffold.evaluate` CLI and `python -m diffold.predict` on a real tiny run."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import ENV, ROOT

from diffold import scoring
from diffold.evaluate import CSV_COLUMNS, SOURCES
from diffold.scoring import METRICS, BaselineScores, bond_length_error, consecutive_distance, summarize
from diffold.tasks import get_task

VAL_IDS = ("1xjr_A", "2pcw_A")  # two held-out RNA chains of data/examples (47 and 35 nt)
METRIC_NAMES = (*METRICS, "bond_length_error")


# ------------------------------------------------------------------ scoring units
def test_bond_length_error_and_consecutive_distance_skip_gaps_and_missing():
    ref = np.array([[0, 0, 0], [3.8, 0, 0], [7.6, 0, 0], [20, 0, 0], [23.8, 0, 0]], float)
    pred = ref * np.array([2.0, 1, 1])                 # every step doubled
    index = np.array([1, 2, 3, 7, 8])                  # 3 -> 7 is a numbering gap: not a bond
    mask = np.ones(5, bool)
    assert bond_length_error(pred, ref, mask, index) == pytest.approx(3.8)
    assert consecutive_distance(pred, mask, index) == pytest.approx(7.6)
    mask[1] = False                                    # residue 2 unobserved: only the 7-8 bond is left
    assert bond_length_error(pred, ref, mask, index) == pytest.approx(3.8)
    assert np.isnan(bond_length_error(pred, ref, np.array([1, 0, 1, 0, 1], bool), index))


def test_summary_keys_best_baseline_and_ratio():
    def s(rmsd, tm, gdt, lddt, bond):
        return {"rmsd": rmsd, "tm": tm, "gdt_ts": gdt, "lddt": lddt, "bond_length_error": bond}

    records = [
        {"model": s(10, 0.3, 0.4, 0.5, 1.0), "baselines": {"helix": s(20, 0.2, 0.3, 0.4, 0.3), "random_walk": s(12, 0.1, 0.2, 0.45, 0.2)}},
        {"model": s(14, 0.5, 0.6, 0.7, 3.0), "baselines": {"helix": s(30, 0.4, 0.5, 0.2, 0.3), "random_walk": s(16, 0.1, 0.2, 0.25, 0.2)}},
        {"model": {}, "baselines": {}},  # a failed chain: counted, not averaged
    ]
    out = summarize(records, "val")
    assert out["val/num_scored"] == 2 and out["val/num_failed"] == 1
    assert out["val/lddt"] == pytest.approx(0.6) and out["val/bond_length_error"] == pytest.approx(2.0)
    assert out["val_baseline_helix/lddt"] == pytest.approx(0.3) and out["val_baseline_random_walk/lddt"] == pytest.approx(0.35)
    assert out["val_baseline/lddt"] == pytest.approx(0.35)          # best = higher lDDT
    assert out["val_baseline/rmsd"] == pytest.approx(14.0)          # best = lower RMSD (random walk)
    assert out["val_baseline/tm"] == pytest.approx(0.3)             # helix
    assert out["val/lddt_over_baseline"] == pytest.approx(0.6 / 0.35)
    assert out["val/rmsd_over_baseline"] == pytest.approx(12 / 14)
    for m in METRICS:
        assert {f"val/{m}", f"val_baseline/{m}", f"val_baseline_helix/{m}", f"val_baseline_random_walk/{m}",
                f"val/{m}_over_baseline"} <= set(out)


def test_baseline_scores_are_computed_once_per_chain(monkeypatch):
    calls = []
    real = scoring.baseline_structures
    monkeypatch.setattr(scoring, "baseline_structures", lambda *a: calls.append(a) or real(*a))
    task, cache = get_task("protein"), BaselineScores()
    ref = np.cumsum(np.random.default_rng(0).normal(size=(30, 3)) * 2.2, 0)
    mask, index = np.ones(30, bool), np.arange(30)
    first = cache.get(task, "c1", ref, mask, index)
    assert cache.get(task, "c1", ref, mask, index) is first and len(calls) == 1
    cache.get(task, "c2", ref, mask, index)
    assert len(calls) == 2 and set(first) == {"helix", "random_walk"}


# ------------------------------------------------------------------ a real tiny run
def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """4 training steps of the smoke recipe on the example RNA; validation on 2 held-out chains at step 4."""
    tmp = tmp_path_factory.mktemp("evaluate")
    rows = [r for r in csv.DictReader(open(ROOT / "data/examples/val.csv")) if r["id"] in VAL_IDS]
    for r in rows:
        r["structure_path"] = str(ROOT / "data/examples" / r["structure_path"])
    manifest = tmp / "val2.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = run(["train_full.py", "--config", "configs/smoke.yaml", "--output_dir", str(tmp / "run"), f"data.val_path={manifest}",
             f"data.cache_dir={tmp / 'cache'}", "training.max_steps=4", "training.validate_every_steps=4",
             "validation.num_samples=2", "validation.sampling_steps=3", "logging.log_with=[]"])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run", manifest


@pytest.mark.slow
def test_validation_logs_model_and_baseline_keys_on_whole_chains(tiny_run):
    run_dir, _ = tiny_run
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "val"' in line][-1]
    for m in METRICS:
        for key in (f"val/{m}", f"val_baseline/{m}", f"val_baseline_helix/{m}", f"val_baseline_random_walk/{m}",
                    f"val/{m}_over_baseline"):
            assert np.isfinite(val[key]), key
    assert np.isfinite(val["val/bond_length_error"]) and val["val/num_scored"] == 2
    log = next((run_dir / "logs").glob("training_*.log")).read_text()
    assert "validation sample 1/2: 1xjr_A, 47 residues" in log  # whole chain, not the 48-residue... crop of it


@pytest.mark.slow
def test_evaluate_cli_writes_table_csv_json_with_validation_numbers(tiny_run, tmp_path):
    run_dir, manifest = tiny_run
    r = run(["-m", "diffold.evaluate", "--checkpoint", str(run_dir / "export"), "--input", str(manifest),
             "--num_samples", "1", "--steps", "3", "--seed", "42", "--out", str(tmp_path / "ev1")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model mean of 1" in r.stdout and "helix" in r.stdout and "random_walk" in r.stdout
    with open(tmp_path / "ev1" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(x["chain"], x["source"]) for x in rows] == [(c, s) for c in VAL_IDS for s in SOURCES]
    assert all(x["cropped"] == "False" for x in rows) and {x["length"] for x in rows} == {"47", "35"}
    res = json.loads((tmp_path / "ev1" / "results.json").read_text())
    assert res["summary"]["chains_scored"] == 2 and res["steps"] == 3 and res["atom"] == "C4'"
    # same seed, steps, weights (EMA at step 4 = the export) and chains: exactly what validation logged
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "val"' in line][-1]
    for key in (*[f"val/{m}" for m in METRIC_NAMES], "val_baseline/lddt", "val/tm_over_baseline"):
        assert res["summary"]["validation_keys"][key] == pytest.approx(val[key], rel=1e-9, abs=1e-12), key

    r = run(["-m", "diffold.evaluate", "--checkpoint", str(run_dir / "export"), "--input", str(manifest),
             "--num_samples", "3", "--steps", "3", "--out", str(tmp_path / "ev3")])
    assert r.returncode == 0, r.stderr[-3000:]
    chains = json.loads((tmp_path / "ev3" / "results.json").read_text())["chains"]
    for c in chains:
        assert len(c["samples"]) == 3
        assert c["model_best"]["lddt"] == max(s["lddt"] for s in c["samples"]) >= c["model_mean"]["lddt"]
        assert c["model_best"]["rmsd"] == min(s["rmsd"] for s in c["samples"])


@pytest.mark.slow
@pytest.mark.parametrize("bad,message", [
    ("missing_input", "no such file or directory"),
    ("run_dir", "is a run directory: pass --checkpoint"),
    ("protein_only", "no usable rna chain"),
])
def test_evaluate_bad_input_is_one_line_exit_2(tiny_run, tmp_path, bad, message):
    run_dir, manifest = tiny_run
    ckpt, inp = run_dir / "export", manifest
    if bad == "missing_input":
        inp = tmp_path / "nope.csv"
    elif bad == "run_dir":
        ckpt = run_dir
    else:
        inp = ROOT / "data/examples/protein/1ubi.pdb.gz"
    r = run(["-m", "diffold.evaluate", "--checkpoint", str(ckpt), "--input", str(inp), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_predict_wrong_molecule_run_dir_progress_and_failed_samples(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">ubq\nMQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAG\n")
    base = ["-m", "diffold.predict", "--steps", "3", "--input", str(fasta)]
    r = run([*base, "--checkpoint", str(run_dir / "export"), "--out", str(tmp_path / "a")])
    assert r.returncode == 2 and "this is an RNA model" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run([*base, "--checkpoint", str(run_dir), "--out", str(tmp_path / "b")])
    assert r.returncode == 2 and f"pass --checkpoint {run_dir / 'export'}" in r.stderr, r.stderr

    fasta.write_text(">hairpin\nGGGAAACUUCGGUUUCCC\n>two\nACGUACGUACGU\n")
    r = run([*base, "--checkpoint", str(run_dir / "export"), "--num_samples", "2", "--out", str(tmp_path / "c")])
    assert r.returncode == 0 and "chain 1/2 hairpin (18 residues): 2 sample(s)" in r.stderr, r.stderr[-2000:]
    assert len(list((tmp_path / "c").glob("*.pdb"))) == 4

    # a model whose weights went non-finite: every sample fails; reported per chain, nothing written, exit 1
    broken = tmp_path / "broken"
    broken.mkdir()
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run_dir / "export" / "model.safetensors"))
    key = next(k for k in weights if k.startswith("head.") and k.endswith("weight"))
    weights[key] = weights[key] * float("nan")
    save_file(weights, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((run_dir / "export" / "config.json").read_text())
    r = run([*base, "--checkpoint", str(broken), "--num_samples", "2", "--out", str(tmp_path / "d")])
    assert r.returncode == 1, r.stderr[-2000:]
    assert "NOT finite, not written: samples [0, 1]" in r.stderr and "4 of 4 sample(s) were not finite" in r.stderr
    assert not list((tmp_path / "d").glob("*.pdb"))


@pytest.mark.parametrize("config,task", [("cpu_10min.yaml", "rna"), ("cpu_10min.yaml", "protein"), ("default.yaml", "rna")])
def test_recipes_load_with_the_measured_settings(config, task):
    from diffold.config import load_config

    cfg = load_config(ROOT / "configs" / config, overrides=[f"task={task}"], env={})
    d = cfg.diffusion
    step_scale = 2.0 if config == "cpu_10min.yaml" else 1.5  # measured on the tiny model (BENCHMARKS.md, "Learning")
    assert (d.sigma_data, d.bond_loss_weight, d.smooth_lddt_weight, d.sampling_step_scale) == (8.0, 0.1, 1.0, step_scale)


@pytest.mark.slow
def test_predict_numbers_residues_with_their_gaps_like_training(tiny_run, tmp_path, monkeypatch):
    # training numbers residues by sources.residue_positions (a gap of 4 missing residues stays a gap);
    # predict used 0..L-1, so the model saw a different chain than it was trained on
    from diffold import predict
    from diffold.diffusion import EDM
    from diffold.structure import chain_from_coords, parse_structure, write_structure

    run_dir, _ = tiny_run
    numbers = np.r_[np.arange(1, 11), np.arange(15, 25)]
    xyz = np.cumsum(np.random.default_rng(0).normal(size=(20, 3)) * 3.5, 0)
    write_structure(tmp_path / "gap.pdb", [chain_from_coords("gap", "rna", "GGGAAACUUCGGUUUCCCAA", xyz, ("C4'",),
                                                             residue_numbers=numbers)])
    seen = []
    real = EDM.sample
    monkeypatch.setattr(EDM, "sample", lambda self, model, batch, *a: seen.append(batch.residue_index) or real(self, model, batch, *a))
    assert predict.main(["--checkpoint", str(run_dir / "export"), "--input", str(tmp_path / "gap.pdb"),
                         "--out", str(tmp_path / "out"), "--steps", "2"]) == 0
    assert seen[0][0].tolist() == [*range(10), *range(14, 24)]
    written = parse_structure(tmp_path / "out" / "gap_A_sample0.pdb")[0][0]
    assert written.residue_numbers.tolist() == numbers.tolist()  # the reference's numbering in the output
