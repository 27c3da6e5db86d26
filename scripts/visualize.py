#!/usr/bin/env python
"""Thin wrapper: same as the `sslkit-visualize` console script."""
from sslkit.cli import visualize_main

if __name__ == "__main__":
    visualize_main()
