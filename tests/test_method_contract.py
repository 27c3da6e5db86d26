"""The method contract (methods/base.py), checked for every registered method: a new method gets this
coverage by registering, as a new timm model gets timm's tests. Each check is a function of the method's
name so tests/test_method_registration.py runs the same checks on a method defined in a test file."""

import json
import math

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.config import compose, derive
from sslkit.data import build_pretrain_loader, build_source
from sslkit.engine import train
from sslkit.methods import METHODS, Method, build_method

TINY = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "data.num_samples=24", "data.batch_size=4", "trainer.max_steps=4", "trainer.log_every=1",
        "optim.warmup_steps=1", "trainer.ckpt_every=100"]


def tiny_cfg(name: str, *extra: str):
    """The method's ``test_overrides`` (a tiny instance), small data, a 4-step run."""
    return compose([*METHODS[name].test_overrides, *TINY, *extra])


def first_batch(cfg, method: Method) -> dict[str, torch.Tensor]:
    """A real batch of the method's view and masks, through the data pipeline."""
    loader = build_pretrain_loader(build_source(cfg.data), cfg.data, cfg.method.view, method.masking(), seed=0)
    try:
        return next(iter(loader))
    finally:
        loader.close()


def built(name: str, *extra: str) -> tuple:
    cfg = tiny_cfg(name, *extra)
    torch.manual_seed(0)
    m = build_method(cfg)
    m.begin(0, derive(cfg, len(build_source(cfg.data))))
    return cfg, m, first_batch(cfg, m)


# ----------------------------------------------------------------------------------------- checks
def check_forward_and_gradients(name: str) -> None:
    """forward -> {"loss": scalar with grad, terms: detached scalars}; every trainable parameter gets a gradient."""
    _, m, batch = built(name)
    m.train()
    out = m(batch)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    for k, v in out.items():
        if k != "loss":
            assert torch.is_tensor(v) and v.numel() == 1 and not v.requires_grad, k
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == [], f"{name}: trainable parameters without a gradient: {missing}"


def check_after_step(name: str) -> None:
    """after_step(step) returns finite floats to log and leaves the trainable parameters to the optimizer."""
    _, m, batch = built(name)
    m.train()
    m(batch)["loss"].backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    logs = m.after_step(1)
    assert isinstance(logs, dict) and all(isinstance(k, str) and math.isfinite(float(v)) for k, v in logs.items())
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), f"{name}.after_step changed the trainable parameter {n}"


def check_state_dict_round_trip(name: str, tmp_path) -> None:
    """The state dict is plain (weights_only), loads strictly into a fresh instance, and gives the same loss."""
    cfg, m, batch = built(name)
    sd = m.state_dict()
    ck.check_plain(dict(sd))
    torch.save(sd, tmp_path / "sd.pt")
    torch.manual_seed(1)
    m2 = build_method(cfg)  # another init
    m2.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True), strict=True)
    m2.begin(0, derive(cfg, len(build_source(cfg.data))))
    m.eval(), m2.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        a = m(batch)["loss"]
        torch.manual_seed(2)
        b = m2(batch)["loss"]
    assert torch.equal(a, b)


def check_features(name: str) -> None:
    """features: (B, 3, S, S) -> (B, backbone.num_features), finite, in eval mode, no gradient; the
    summary's probe of the method is one it prints."""
    cfg, m, _ = built(name)
    assert m.probe in ("linear", "knn")
    s = int(cfg.method.view.size)
    f = m.eval().features(torch.randn(3, 3, s, s))
    assert f.shape == (3, m.backbone.num_features) and torch.isfinite(f).all() and not f.requires_grad
    held = m.heldout_batch(torch.randn(2, 3, s, s), torch.Generator().manual_seed(0))
    if held is not None:  # the summary's held-out loss
        with torch.no_grad():
            assert torch.isfinite(m(held)["loss"])


def check_resume_equals_uninterrupted(name: str, tmp_path) -> None:
    """4 steps == 2 steps, stop, resume, 2 steps: parameters and logged losses bit for bit (the engine,
    begin with the resumed step, the checkpoint)."""
    train(tiny_cfg(name), tmp_path / "a")
    train(tiny_cfg(name, "trainer.stop_after=2"), tmp_path / "b")
    assert ck.load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 2
    train(tiny_cfg(name), tmp_path / "b")
    a, b = [ck.load(tmp_path / r / "checkpoints" / "last.pt") for r in ("a", "b")]
    assert a["step"] == b["step"] == 4 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4


CHECKS = [check_forward_and_gradients, check_after_step, check_features]
CHECKS_TMP = [check_state_dict_round_trip, check_resume_equals_uninterrupted]


# ----------------------------------------------------------------------------------------- every registered method
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, check):
    check(name)


@pytest.mark.parametrize("check", CHECKS_TMP, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract_with_files(name, check, tmp_path):
    check(name, tmp_path)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registration_is_complete(name):
    cls = METHODS[name]
    assert cls.name == name and cls.test_overrides, f"{name}: set test_overrides (a tiny instance for these tests)"
    assert cls.export_note and cls.config_class.__module__ == cls.__module__  # the schema lives with the method
