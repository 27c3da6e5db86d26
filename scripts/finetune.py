#!/usr/bin/env python
"""Thin wrapper: same as the `sslkit-finetune` console script."""
from sslkit.cli import finetune_main

if __name__ == "__main__":
    finetune_main()
