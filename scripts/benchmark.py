#!/usr/bin/env python
"""Benchmarks, side by side in one run: ``python scripts/benchmark.py NAME [--out results.json]``.

Rows: ``{"benchmark", "model", "variant", "metric", "value", "unit"}`` (a JSON list), plus a printed
table with the machine, torch version, threads and batch. Times are medians after warm-up.
"""
from sslkit.bench import main

if __name__ == "__main__":
    main()
