"""The benchmark of issue 5: `python3 bench/run.py [--quick]` (see bench/README.md)."""
