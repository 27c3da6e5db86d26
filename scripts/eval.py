#!/usr/bin/env python
"""Thin wrapper: same as the `sslkit-eval` console script."""
from sslkit.cli import eval_main

if __name__ == "__main__":
    eval_main()
