"""Shared helpers of the parity fixture scripts: the reference's commit, importing it from a path, and
writing / reading fixture files (safetensors: tensors + string metadata, deterministic bytes)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def commit_of(repo: Path) -> str:
    """The checked-out commit of a reference repository (a git work tree)."""
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def on_path(repo: Path) -> Iterator[None]:
    """Import the reference's modules from ``repo`` (prepended to sys.path) for the duration."""
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))


def write_fixture(path: Path, tensors: dict[str, torch.Tensor], *, reference: str, commit: str,
                  **meta: Any) -> Path:
    """Write ``tensors`` (contiguous, detached, CPU) with metadata: the reference repo, its commit, and
    ``meta``, all in ONE metadata entry ``"meta"`` (sorted JSON): safetensors writes several entries in a
    random order, one entry keeps the bytes reproducible. Same inputs -> the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    md = {"meta": json.dumps({"reference": reference, "commit": commit, **meta}, sort_keys=True)}
    save_file(data, str(path), metadata=md)
    return path


def read_fixture(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a fixture (the metadata: the decoded ``"meta"`` entry)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = dict(f.metadata() or {})
    return load_file(str(path)), json.loads(md["meta"])
