import random

import numpy as np
import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.errors import CheckpointError


def test_atomic_save_and_weights_only_load(tmp_path):
    p = tmp_path / "c" / "last.pt"
    ck.save_training_state(p, step=3, model={"w": torch.ones(2)}, rng=ck.rng_state(), config={"a": [1, 2]})
    out = ck.load(p)
    assert out["format_version"] == ck.FORMAT_VERSION and out["step"] == 3
    assert torch.load(p, weights_only=True)["config"] == {"a": [1, 2]}
    assert [f.name for f in p.parent.iterdir()] == ["last.pt"]  # no temp files left behind


def test_rng_roundtrip():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    s = ck.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(s)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_corrupt_and_foreign_files_fail_with_fix(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ck.load(bad)
    foreign = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(1)}, foreign)
    with pytest.raises(CheckpointError, match="not an sslkit checkpoint"):
        ck.load(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 999}, future)
    with pytest.raises(CheckpointError, match="format_version 999"):
        ck.load(future)
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load(tmp_path / "missing.pt")


def test_find_resume_falls_back_to_newest_readable(tmp_path):
    d = tmp_path / "checkpoints"
    ck.save_training_state(d / "step_2.pt", step=2)
    ck.save_training_state(d / "step_4.pt", step=4)
    (d / "last.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        got = ck.find_resume(tmp_path, "auto")
    assert got["step"] == 4
    assert ck.find_resume(tmp_path, "never") is None
    assert ck.find_resume(tmp_path / "empty", "auto") is None


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 10):
        ck.save_training_state(tmp_path / f"step_{s}.pt", step=s)
    ck.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10.pt", "step_3.pt"]


def test_unwrap_compiled_like_wrappers():
    m = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert ck.unwrap(Wrap(Wrap(m))) is m
