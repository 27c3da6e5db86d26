import random

import numpy as np
import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.errors import CheckpointError


def state(step: int, **fields):
    """A complete checkpoint (every key of ``ck.Checkpoint``) with placeholder values, ``fields`` on top."""
    return {"format_version": ck.FORMAT_VERSION, "sslkit_version": "test", "method": "umae",
            "model_config": {"name": "sslkit_pvt_test", "kwargs": {}}, "model": {}, "optimizer": {}, "scaler": {},
            "step": step, "data_state": {}, "rng": {}, "config": {}, "derived": {}, "wandb_id": None, "metrics": {},
            **fields}


def test_atomic_save_and_weights_only_load(tmp_path):
    p = tmp_path / "c" / "last.pt"
    ck.save_training_state(p, state(3, model={"w": torch.ones(2)}, rng=ck.rng_state(), config={"a": [1, 2]}))
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


class _RunsCode:
    def __reduce__(self):  # unpickling would call print(...): any callable could be here
        return (print, ("unpickled arbitrary code",))


def test_pickle_with_arbitrary_objects_and_truncated_files_are_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": ck.FORMAT_VERSION, "model": {}, "x": _RunsCode()}, evil)
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*\(.*print\).*weights_only=True"):
        ck.load(evil)
    assert "unpickled arbitrary code" not in capsys.readouterr().out
    good = tmp_path / "good.pt"
    ck.save_training_state(good, state(1, model={"w": torch.randn(1000)}))
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            ck.load(tmp_path / "cut.pt")


def test_saving_non_plain_objects_fails_before_writing(tmp_path):
    from omegaconf import OmegaConf

    p = tmp_path / "last.pt"
    ck.save_training_state(p, state(1))
    with pytest.raises(TypeError, match=r"checkpoint\['model_config'\]\['kwargs'\]\['dims'\] is a omegaconf"):
        ck.save_training_state(p, state(2, model_config={"kwargs": {"dims": OmegaConf.create([1, 2])}}))
    assert ck.load(p)["step"] == 1  # the good checkpoint is untouched


def test_model_kwargs_lists_from_yaml_are_plain_in_the_checkpoint():
    from sslkit.config import compose
    from sslkit.methods import build_method

    m = build_method(compose(["model=sslkit_pvt_test", "++model.kwargs.depths=[1,1,1,1]"]))
    assert type(m.model_config["kwargs"]["depths"]) is list
    ck.check_plain(m.model_config)


def test_find_resume_falls_back_to_newest_readable(tmp_path):
    d = tmp_path / "checkpoints"
    ck.save_training_state(d / "step_2.pt", state(2))
    ck.save_training_state(d / "step_4.pt", state(4))
    (d / "last.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        got = ck.find_resume(tmp_path, "auto")
    assert got["step"] == 4
    assert ck.find_resume(tmp_path, "never") is None
    assert ck.find_resume(tmp_path / "empty", "auto") is None


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 10):
        ck.save_training_state(tmp_path / f"step_{s}.pt", state(s))
    ck.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10.pt", "step_3.pt"]


def test_prune_keeps_permanent_milestones(tmp_path):
    for s in range(1, 11):
        ck.save_training_state(tmp_path / f"step_{s}.pt", state(s))
    ck.prune(tmp_path, keep_last=2, keep_permanent_every=4)
    assert sorted(int(p.stem[5:]) for p in tmp_path.iterdir()) == [4, 8, 9, 10]


def test_unwrap_compiled_like_wrappers():
    m = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert ck.unwrap(Wrap(Wrap(m))) is m
