"""Nothing a run writes leaves its run directory, whatever the manifest's ids say.

Validation writes one sampled structure per chain, named from the chain id. Ids crafted to escape
(`../` chains of every depth, absolute paths, 300 characters, separators, a NUL-free mix of odd
bytes) must all land inside `<run>/samples/`; before this fix `../../../../tmp/x` wrote `/tmp/x.pdb`.
"""
from __future__ import annotations

import csv
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from synthetic import ENV, ROOT, write_helices

pytestmark = pytest.mark.slow


def hostile_ids(tag: str) -> list[str]:
    ids = ["../" * k + f"escape_{tag}_{k}" for k in range(1, 14)]
    ids += [f"/tmp/escape_{tag}_abs", f"..\\..\\escape_{tag}_bs", f"a/b/../../../escape_{tag}_mix",
            f"escape_{tag}_" + "x" * 300, f".escape_{tag}_hidden", f"sp ace;rm -rf escape_{tag}", "..", "."]
    return ids


def test_validation_sample_files_stay_inside_the_run_directory(tmp_path):
    tag = uuid.uuid4().hex[:10]
    helices = write_helices(tmp_path / "helices", n=30)
    ids = hostile_ids(tag)
    val = tmp_path / "val.csv"
    with open(val, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "structure_path", "split"])
        for i, cid in enumerate(ids):
            w.writerow([cid, str(helices / f"h{i}.pdb"), "val"])
    train = tmp_path / "train"
    train.mkdir()
    for i in range(len(ids), 30):
        (train / f"h{i}.pdb").write_bytes((helices / f"h{i}.pdb").read_bytes())
    run = tmp_path / "deep" / "a" / "b" / "run"  # deep enough that every ../ chain stays inside tmp_path
    r = subprocess.run([sys.executable, str(ROOT / "train_full.py"), "--config", str(ROOT / "configs/smoke.yaml"),
                        "--output_dir", str(run), f"data.train_path={train}", f"data.val_path={val}",
                        f"data.cache_dir={run / 'cache'}", "data.max_length=32", "training.max_steps=2",
                        "training.batch_size=2", f"validation.num_samples={len(ids)}", "validation.sampling_steps=2",
                        "training.validate_every_steps=2", "logging.log_with=[]"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    samples = list((run / "samples").rglob("*.pdb"))
    assert len(samples) >= len(ids) - 2, [p.name for p in samples]  # '..' and '.' may be refused as ids
    assert all(p.resolve().is_relative_to(run.resolve()) and len(p.name) < 255 for p in samples)
    escaped = [p for base in (Path("/tmp"), tmp_path, ROOT) for p in base.rglob(f"*escape_{tag}*")
               if not p.resolve().is_relative_to(run.resolve()) and p.resolve() != val.resolve()]
    assert not escaped, escaped
