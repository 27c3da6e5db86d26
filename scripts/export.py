#!/usr/bin/env python
"""Thin wrapper: same as the `sslkit-export` console script."""
from sslkit.cli import export_main

if __name__ == "__main__":
    export_main()
