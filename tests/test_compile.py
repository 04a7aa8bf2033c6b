"""torch.compile through train_full.py: a bounded number of graphs across an epoch end and a resume,
said at start, and compilation steps kept out of the slow-batch check.

The aot_eager backend makes dynamo trace and count graphs exactly as inductor would (same guards,
same recompiles) without compiling C++ kernels, which takes minutes per graph on this CPU.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from synthetic import ENV, ROOT, write_helices

pytestmark = pytest.mark.slow


def test_compiled_run_compiles_few_graphs_across_epochs_and_resume(tmp_path):
    data = write_helices(tmp_path / "helices")
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/smoke.yaml"), "--output_dir", str(run), f"data.train_path={data}",
            "data.val_path=null", "data.val_fraction=0.15", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=32", "training.batch_size=2", "training.num_epochs=3", "training.log_every=1",
            "checkpoint.save_every_steps=2", "validation.num_samples=1", "validation.sampling_steps=2",
            "logging.log_with=[]", "model.compile=true", "model.compile_backend=aot_eager"]
    first = subprocess.run([sys.executable, str(ROOT / "train_full.py"), *args, "training.max_steps=8"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batch lengths padded to multiples of 16 residues (data.pad_multiple), at most 2 distinct lengths" in first.stderr
    second = subprocess.run([sys.executable, str(ROOT / "train_full.py"), *args, "--resume", "auto"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    ends = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "end"]
    # crops of 14-32 residues: without padding 3 graphs per run (26, 32, 16 ...), with it one per padded length
    assert [e["status"] for e in ends] == ["max_steps", "finished"] and all(e["compiled_graphs"] <= 2 for e in ends), ends
    health = run / "health.jsonl"
    events = [json.loads(x) for x in health.read_text().splitlines()] if health.exists() else []
    compile_steps = {int(x.split(" at step ")[1].split()[0]) for x in (first.stderr + second.stderr).splitlines()
                     if "new graph(s) at step" in x}
    assert compile_steps and not [e for e in events if e["check"] == "slow_batch" and e["step"] in compile_steps]
