#!/usr/bin/env python
"""train_full.py with torch.use_deterministic_algorithms(True) (benchmarks/gpu_check.sh, stage e).

    CUBLAS_WORKSPACE_CONFIG=:4096:8 accelerate launch ... benchmarks/deterministic_train.py <train_full.py arguments>
warn_only: an op without a deterministic CUDA kernel warns (in the log) instead of failing the run.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.use_deterministic_algorithms(True, warn_only=True)

from diffold import distributed  # noqa: E402
from train_full import main  # noqa: E402

if __name__ == "__main__":
    distributed.exit_process(main())
