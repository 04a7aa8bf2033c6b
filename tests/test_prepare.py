"""The sharded featurization cache and `python -m diffold.prepare`: resume after an interruption, reuse per
file, worker timeouts, and training that reuses a prepared cache without parsing."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synthetic import ENV, ROOT
from test_data import make_cfg, make_chain, random_seq, write

from diffold import featurize, shards, structure
from diffold.data import build_datasets

EXAMPLES = ROOT / "data" / "examples"


def real_collection(d: Path, n: int | None = None, kind: str = "*") -> Path:
    """Copies of the shipped real structure files (kind rna / protein / * for both), optionally the first n."""
    d.mkdir(parents=True, exist_ok=True)
    for src in sorted(EXAMPLES.glob(f"{kind}/*.gz"))[:n]:
        shutil.copy(src, d / f"{src.parent.name}_{src.name}")
    return d


def shard_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "shards").iterdir()) if not p.name.startswith(".tmp")}


def count_parses(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = structure.parse_structure

    def counting(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(structure, "parse_structure", counting)
    return seen


def test_interrupted_featurization_resumes_to_the_same_cache(tmp_path, monkeypatch):
    """In-process path: the run dies after its first shard; the rerun parses only the rest and ends with the
    byte-identical shards an uninterrupted run writes, and the same dataset."""
    d = real_collection(tmp_path / "in", 40)  # < 64 files: featurized in this process, 3 shards of <= 16
    calls = {"n": 0}
    real_publish = shards.ShardIndex.publish

    def dies_after_first(self, tmp, files):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("Ctrl-C")
        return real_publish(self, tmp, files)

    monkeypatch.setattr(shards.ShardIndex, "publish", dies_after_first)
    cfg = make_cfg(tmp_path / "a", d, task="protein")
    with pytest.raises(KeyboardInterrupt):
        build_datasets(cfg)
    assert len(shard_files(tmp_path / "a" / "cache")) == 2  # the first shard survived, nothing half-written
    monkeypatch.setattr(shards.ShardIndex, "publish", real_publish)
    parsed = count_parses(monkeypatch)
    tr, va, rep = build_datasets(cfg)
    assert len(parsed) == 40 - 16 and rep.featurization[str(d)]["reused"] == 16
    tr2, va2, rep2 = build_datasets(make_cfg(tmp_path / "b", d, task="protein"))  # uninterrupted
    assert shard_files(tmp_path / "a" / "cache") == shard_files(tmp_path / "b" / "cache")
    assert tr.ids == tr2.ids and va.ids == va2.ids and rep.train.to_dict() == rep2.train.to_dict()
    assert all(torch.equal(tr[i]["coords"], tr2[i]["coords"]) for i in range(len(tr)))


def test_adding_files_featurizes_only_them(tmp_path, monkeypatch, caplog):
    d = real_collection(tmp_path / "in", 30)
    cfg = make_cfg(tmp_path, d, task="protein")
    tr, va, rep = build_datasets(cfg)
    assert rep.featurization[str(d)]["featurized"] == 30
    new = sorted(EXAMPLES.rglob("*.gz"))[30:33]
    for src in new:
        shutil.copy(src, d / f"{src.parent.name}_{src.name}")
    parsed = count_parses(monkeypatch)
    with caplog.at_level(logging.INFO):
        tr2, va2, rep2 = build_datasets(cfg)
    assert sorted(parsed) == sorted(f"{s.parent.name}_{s.name}" for s in new)
    assert rep2.featurization[str(d)]["featurized"] == 3 and rep2.featurization[str(d)]["reused"] == 30
    assert "featurizing 3 of 33 files (30 reused" in caplog.text
    assert set(tr.ids) | set(va.ids) < set(tr2.ids) | set(va2.ids)
    parsed.clear()
    with caplog.at_level(logging.INFO):
        build_datasets(cfg)  # warm: nothing parsed, and the log says where the rows came from
    assert parsed == [] and "all 33 files reused from the featurized cache" in caplog.text


def big_pdb(path: Path, chains: int = 30, n: int = 9999) -> Path:
    """~24 MB of C4' atoms in 30 chains: a real parse of ~1.5 s (far over a 0.5 s per-file limit)."""
    lines, k = [], 0
    for c in range(chains):
        for i in range(1, n + 1):
            k += 1
            x, y, z = (i * 0.37) % 900, (i * 0.11) % 90 + c, (i % 7) * 1.1
            lines.append(f"ATOM  {k % 100000:5d}  C4'   G {chr(65 + c)}{i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00           C  ")
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def test_a_file_over_the_time_limit_is_skipped_not_cached(tmp_path, caplog):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(20):  # small files (a few ms each, far under the limit even on a loaded machine)
        write(d / f"h{i:02d}.pdb", make_chain(random_seq(30 + i, seed=i), seed=i))
    big_pdb(d / "zz_huge.pdb")
    cfg = make_cfg(tmp_path, d, task="rna", num_proc=2, file_timeout_s=0.5)
    with caplog.at_level(logging.INFO):
        tr, _, rep = build_datasets(cfg)
    items = [i for i in rep.train.skipped_items if i["source"] == "zz_huge.pdb"]
    assert len(items) == 1 and items[0]["reason"].startswith("timeout: parsing took over data.file_timeout_s=0.5 s")
    assert rep.featurization[str(d)]["skipped_transient"] == 1 and rep.featurization[str(d)]["workers"] == 2
    assert "zz_huge.pdb: timeout" in caplog.text and "featurized 21 files" in caplog.text
    assert len(tr) > 5  # every other file was featurized
    # not cached: with a longer limit the next run parses that file (only) and reports what it is
    tr2, _, rep2 = build_datasets(make_cfg(tmp_path, d, task="rna", num_proc=2, file_timeout_s=120))
    assert rep2.featurization[str(d)]["featurized"] == 1 and rep2.featurization[str(d)]["skipped_transient"] == 0
    assert [i["reason"].split(":")[0] for i in rep2.train.skipped_items if i["source"] == "zz_huge.pdb"] == \
        ["absurd geometry"] * 30


def prepare_cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffold.prepare", "--input", str(inp), "--out", str(out), "--num_proc", "2",
            "task=protein", *extra]


def test_prepare_cli_ctrl_c_resumes_and_training_reuses_it(tmp_path, monkeypatch):
    """The real CLI: Ctrl-C after the first finished shard (exit 75, shards kept), the same command resumes
    to the cache an uninterrupted run makes, and build_datasets with data.cache_dir=CACHE parses nothing."""
    d = real_collection(tmp_path / "in")  # 92 real files: 6 shards of 16 in 2 worker processes
    proc = subprocess.Popen(prepare_cmd(d, tmp_path / "a"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list((tmp_path / "a" / "shards").glob("*.json")) and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "interrupted: finished shards are kept" in err and "Traceback" not in err
    kept = len(shard_files(tmp_path / "a")) // 2
    assert 1 <= kept < 6
    run = subprocess.run(prepare_cmd(d, tmp_path / "a"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"({kept * 16} reused" in run.stderr  # only the files of unfinished shards were featurized
    full = subprocess.run(prepare_cmd(d, tmp_path / "b"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0 and shard_files(tmp_path / "a") == shard_files(tmp_path / "b")
    reports = [json.loads((tmp_path / x / "data_report.json").read_text()) for x in ("a", "b")]
    for key in ("train", "val", "split_method"):
        assert reports[0][key] == reports[1][key]
    assert "train: python train_full.py" in run.stdout and f"data.cache_dir={tmp_path / 'a'}" in run.stdout
    shutil.move(tmp_path / "a", tmp_path / "run" / "cache")  # make_cfg's data.cache_dir=<dir>/cache
    monkeypatch.setattr(structure, "parse_structure", None)  # any parse would raise
    tr, va, rep = build_datasets(make_cfg(tmp_path / "run", d, task="protein"))
    assert rep.cache_hit == {str(d): True} and rep.clustering["reused"] and len(tr) > 40


def test_featurize_module_stays_light():
    """Workers import featurize (gemmi, numpy, pyarrow) only: no torch, no datasets, so they start fast."""
    code = "import sys, diffold.featurize, diffold.workers; print('torch' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
    assert featurize.SCHEMA.names[0] == "id" and os.path.basename(featurize.__file__) == "featurize.py"


def test_a_cache_made_with_other_settings_is_named_in_the_log(tmp_path, caplog):
    d = real_collection(tmp_path / "in", 12, kind="rna")
    build_datasets(make_cfg(tmp_path, d))
    with caplog.at_level(logging.INFO):
        _, _, rep = build_datasets(make_cfg(tmp_path, d, min_length=12))  # another featurization setting
    assert rep.featurization[str(d)]["featurized"] == 12
    assert "none of the 12 files is in the cache" in caplog.text and "data.min_length" in caplog.text


def test_prepare_cli_bad_input_is_one_line_exit_2(tmp_path):
    run = subprocess.run(prepare_cmd(tmp_path / "nope", tmp_path / "c"), cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such file, directory or glob match "
                                               "(data.train_path / data.val_path)"]
