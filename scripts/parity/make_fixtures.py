#!/usr/bin/env python
"""Parity fixtures: run the reference implementations on seeded inputs and record inputs and outputs.

    python scripts/parity/make_fixtures.py --dinov2 /path/to/facebookresearch/dinov2 --umae /path/to/implus/UM-MAE

imports the reference modules from those checkouts (nothing of them is copied into this repository),
feeds them seeded inputs and writes small fixture files (tensors + the reference commit) under
``tests/fixtures/``. ``tests/test_parity_*.py`` compare sslkit against those numbers with no reference
code present. Re-running this script reproduces the fixtures bit for bit (``--check`` verifies that
without writing). See docs/parity.md.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's modules

from common import FIXTURES  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dinov2", type=Path, help="a checkout of facebookresearch/dinov2")
    p.add_argument("--umae", type=Path, help="a checkout of implus/UM-MAE")
    p.add_argument("--out", type=Path, default=FIXTURES, help=f"where the fixtures go (default {FIXTURES})")
    p.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare byte for byte")
    args = p.parse_args(argv)
    if not (args.dinov2 or args.umae):
        p.error("give --dinov2 and / or --umae")
    out = Path(tempfile.mkdtemp()) if args.check else args.out
    written: list[Path] = []
    if args.dinov2:
        import dinov2_fixtures

        written += dinov2_fixtures.make(args.dinov2.resolve(), out)
        written += __import__("dinov2_checkpoints").make(args.dinov2.resolve(), out)  # tiny DINOv2 checkpoints
    if args.umae:
        import umae_fixtures

        written += umae_fixtures.make(args.umae.resolve(), out)
    total = sum(f.stat().st_size for f in written)
    print(f"{len(written)} fixture files, {total / 1024:.0f} KiB in {out}")
    if args.check:
        bad = [f.name for f in written if not filecmp.cmp(f, args.out / f.name, shallow=False)]
        shutil.rmtree(out)
        if bad:
            raise SystemExit(f"not reproduced bit for bit: {bad}")
        print("every fixture reproduced bit for bit")


if __name__ == "__main__":
    main()
