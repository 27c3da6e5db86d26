#!/usr/bin/env python
"""Benchmarks, side by side in one run: ``python scripts/benchmark.py NAME [--out results.json]``.

Rows: ``{"benchmark", "model", "variant", "metric", "value", "unit"}`` (a JSON list), plus a printed
table with the machine, torch version, threads and batch. Times are medians after warm-up. The code
is in ``scripts/benchmarks/`` (not part of the installed package); run this file from any directory.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks package (spawned workers inherit it)
from benchmarks import main  # noqa: E402

if __name__ == "__main__":
    main()
