#!/usr/bin/env python
"""Final metrics of every point of a sweep: `scripts/sweep_summary.py runs/multirun/<date>` (sslkit.sweep)."""
from sslkit.sweep import main

if __name__ == "__main__":
    main()
