"""Test-wide setup. Its presence puts tests/ on sys.path (pytest's default import mode), so every test
module, including those in tests/reliability/, can `import synthetic` (shared data and helpers)."""
