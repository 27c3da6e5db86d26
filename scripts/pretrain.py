#!/usr/bin/env python
"""Thin wrapper: same as the `sslkit-pretrain` console script."""
from sslkit.cli import pretrain_main

if __name__ == "__main__":
    pretrain_main()
