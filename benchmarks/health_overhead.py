#!/usr/bin/env python
"""Step time with health monitoring (+ its log flushes) on vs off, same model/batches, in one process.

    python benchmarks/health_overhead.py [--blocks 16] [--steps 20]     target <= 1.01
"""
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--health", "compare", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("overhead.py")), run_name="__main__")
