"""Tiny on-disk datasets for the data tests (built in tmp_path, never the shared CIFAR tar)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image


def encode(rng: np.random.Generator, size: tuple[int, int], fmt: str) -> bytes:
    """Random smooth-ish RGB image (H, W) = size, encoded as ``fmt`` (JPEG / PNG)."""
    h, w = size
    small = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_tree(root: Path, classes: dict[str, int], *, size: tuple[int, int] = (24, 20), prefix: str = "",
              seed: int = 0, bad: Optional[dict[str, bytes]] = None) -> Path:
    """``root/prefix/<class>/<NNNN>.{jpg,png}`` with ``classes[c]`` images each (alternating formats).

    ``bad`` maps extra relative paths (under ``root/prefix``) to raw bytes, e.g. corrupt files.
    Also writes files that must be ignored (a README, a hidden AppleDouble file).
    """
    rng = np.random.default_rng(seed)
    base = root / prefix if prefix else root
    for c, n in classes.items():
        d = base / c
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            fmt, ext = ("JPEG", "jpg") if k % 2 == 0 else ("PNG", "png")
            (d / f"{k:04d}.{ext}").write_bytes(encode(rng, size, fmt))
        (d / "._0000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (base / "README.txt").write_text("not an image")
    for rel, data in (bad or {}).items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return root


def make_tar(src: Path, tar_path: Path, dot_prefix: bool = False) -> Path:
    """Uncompressed tar of the tree ``src`` (member names relative to it; optionally './'-prefixed)."""
    with tarfile.open(tar_path, "w") as tf:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            tf.add(p, arcname=("./" + rel) if dot_prefix else rel, recursive=False)
    return tar_path


def corrupt_files(first: str = "a", second: str = "b", seed: int = 1) -> dict[str, bytes]:
    """A garbage ``<first>/garbage.jpg`` and a truncated ``<second>/truncated.jpg``."""
    rng = np.random.default_rng(seed)
    good = encode(rng, (32, 32), "JPEG")
    return {f"{first}/garbage.jpg": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
            f"{second}/truncated.jpg": good[: len(good) // 2]}


@pytest.fixture
def tree(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tree(classes, **kw)`` -> root of a fresh tree under tmp_path."""
    counter = iter(range(1000))

    def _make(classes: dict[str, int], **kw) -> Path:
        return make_tree(tmp_path / f"tree{next(counter)}", classes, **kw)

    return _make


def assert_pretrain_resumes_exactly(data_overrides: list[str], tmp_path: Path) -> None:
    """Pretraining on ``data_overrides`` stopped after 2 steps and resumed equals 4 uninterrupted steps, bit for bit
    (model weights and data position)."""
    import torch

    from sslkit import checkpoint as ck
    from sslkit.config import compose
    from sslkit.tasks import run_pretrain

    ov = [*data_overrides, "data.batch_size=4", "data.num_workers=0", "logger.wandb.mode=disabled",
          "trainer.progress=false", "trainer.summary=false", "trainer.log_every=1", "trainer.max_steps=4",
          "trainer.ckpt_every=100"]
    run_pretrain(compose(ov + ["trainer.stop_after=2"]), tmp_path / "resumed")
    run_pretrain(compose(ov), tmp_path / "resumed")
    run_pretrain(compose(ov), tmp_path / "straight")
    a = ck.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    b = ck.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4 and a["data_state"] == b["data_state"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
