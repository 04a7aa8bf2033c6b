"""benchmarks/gpu_check.sh end to end in its --dry-run (CPU) form: every stage runs tiny and lands in the
table. The GPU numbers themselves need a lent GPU (BENCHMARKS.md, "GPU")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import ENV, ROOT

STAGES = ["a_simple_train", "b_default_200", "c_longest_crop", "d_compile", "e_fsdp_resume", "f_kill_resume"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "gc")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = {rec["stage"]: rec for rec in map(json.loads, (tmp_path / "gc/results.jsonl").read_text().splitlines())}
    assert list(recs) == STAGES, list(recs)  # all six, in order, no deterministic repeat needed on the CPU
    assert all(rec["status"] == "ok" for rec in recs.values()), recs
    assert "simple_train: OK" in recs["a_simple_train"]["note"]
    b = recs["b_default_200"]
    assert b["steps"] == 6 and b["steps_per_s"] > 0 and b["flops_per_step"] > 0 and 0 < b["mfu_measured_peak"] < 1
    assert recs["c_longest_crop"]["plain"]["longest"] == 64 and recs["c_longest_crop"]["checkpointing"]["capped"]
    assert recs["d_compile"]["ratio"] > 0
    assert recs["e_fsdp_resume"]["identical"] is True and recs["e_fsdp_resume"]["tensors"] > 0
    assert "1 passed" in recs["f_kill_resume"]["note"]
    table = (tmp_path / "gc/gpu_check.md").read_text()
    assert table.count("| ok |") == 6 and "dry run on the CPU" in table
    assert table.split("| check |")[1] in r.stdout  # the same table on stdout
