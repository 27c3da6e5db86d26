"""Contract every registered ``sslkit_*`` backbone fulfils, parametrized over ``timm.list_models("sslkit_*")``
(a new family or variant is covered without touching this file, as in timm's own model tests).

- ``*_test`` variants (tiny) get every check, at their pretrained_cfg input size: forward / feature /
  head shapes, ``reset_classifier`` semantics (timm: ``None`` keeps the pooling, ``""`` = unpooled),
  classifier init at construction == at reset, ``group_matcher`` / layer decay, ``no_weight_decay``,
  export -> plain-timm load round trip (``sslkit-export``'s ``backbone.safetensors``).
- the full-size variants are built for real once (forward on a 64 px input, reset to no head), and on
  the meta device (no memory, no init) for the structural checks: ``group_matcher`` / layer decay,
  ``no_weight_decay``, the stochastic-depth schedule.
- every variant: ``drop_path_schedule`` ("linear": ``rate * i / (n - 1)`` over all blocks; "uniform": the
  same rate in every block) matches the per-block rates of a model built with ``drop_path_rate=0.3``.
- pyramid families (:class:`PyramidClassifierMixin`): strict classifier semantics (ConfigError,
  trunc-normal 2e-5 head, per-location head without pooling, unchanged model after a refused reset).
"""

from __future__ import annotations

import fnmatch
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

import sslkit.models  # noqa: F401  (registers the models)
from sslkit.errors import ConfigError
from sslkit.models._common import HEAD_INIT_STD, PyramidClassifierMixin

ALL = timm.list_models("sslkit_*")
TINY = [n for n in ALL if n.endswith("_test")]
BIG = [n for n in ALL if n not in TINY]
# Extra create kwargs a variant needs in this suite (none so far: every *_test variant runs at its
# pretrained_cfg input size with its defaults). Applied to every create_model call, incl. the reload.
KWARGS: dict[str, dict] = {}
BIG_INPUT = 64  # divisible by every stride / patch size of the full-size variants
# Until a family declares ``drop_path_schedule``: its documented convention (vit.py docstring: uniform).
DOCUMENTED_SCHEDULE = {"sslkit_vit_": "uniform"}
DPR = 0.3


def _is_pyramid(name: str) -> bool:
    with torch.device("meta"):
        return isinstance(timm.create_model(name, **KWARGS.get(name, {})), PyramidClassifierMixin)


PYRAMID = [n for n in TINY if _is_pyramid(n)]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Small tensors: one intra-op thread is faster and robust to a busy machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- helpers
def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**KWARGS.get(name, {}), **kw}).eval()


def make_meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **{**KWARGS.get(name, {}), **kw})


def images(m: torch.nn.Module, b: int = 2) -> torch.Tensor:
    _, h, w = m.pretrained_cfg["input_size"]
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def channel_axis(m: torch.nn.Module, f: torch.Tensor) -> int:
    """Feature axis of ``forward_features``' output: tokens (B, N, C) and NHWC maps -> -1, NCHW -> 1."""
    return -1 if f.ndim == 3 or getattr(m, "output_fmt", "NCHW") == "NHWC" else 1


def head_prefix(m: torch.nn.Module) -> str:
    return m.pretrained_cfg["classifier"] + "."


def block_drop_rates(m: torch.nn.Module) -> list[float]:
    """Per-block stochastic-depth rate, in module order, of every module with a ``drop_path`` attribute:
    a DropPath module (``drop_prob``), Identity / None (0), or a float (the sslkit ViT's blocks)."""
    rates = []
    for mod in m.modules():
        if "drop_path" not in vars(mod) and "drop_path" not in mod._modules:
            continue
        dp = mod.drop_path
        if dp is None or isinstance(dp, torch.nn.Identity):
            rates.append(0.0)
        elif isinstance(dp, (int, float)):
            rates.append(float(dp))
        else:
            rates.append(float(dp.drop_prob))
    return rates


# --------------------------------------------------------------------------------- registration
def test_registry_is_covered() -> None:
    assert {"sslkit_pvt_test", "sslkit_swin_test", "sslkit_vit_test", "sslkit_resnet_test"} <= set(TINY)
    assert {"sslkit_pvt_test", "sslkit_swin_test"} <= set(PYRAMID)
    module = lambda n: timm.models.model_entrypoint(n).__module__  # noqa: E731
    for n in BIG:  # every full-size variant's family (module) has a tiny variant with the full contract
        assert any(module(t) == module(n) for t in TINY), n


# ---------------------------------------------------------------------------------- tiny: full
@pytest.mark.parametrize("name", TINY)
def test_forward_shapes(name: str) -> None:
    m = make(name)
    assert m.num_classes == m.pretrained_cfg["num_classes"] == 0  # backbone-only by default
    x = images(m)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape[0] == 2 and f.shape[channel_axis(m, f)] == m.num_features
        pre = m.forward_head(f, pre_logits=True)
        assert pre.shape == (2, m.num_features)
        torch.testing.assert_close(m(x), m.forward_head(f), rtol=0, atol=0)
        assert m(x).shape == (2, m.num_features)
        mc = make(name, num_classes=5)
        assert mc(x).shape == (2, 5) and mc.num_classes == 5
        assert mc.get_classifier().weight.shape == (5, m.num_features)
        assert mc.forward_head(mc.forward_features(x), pre_logits=True).shape == (2, m.num_features)


@pytest.mark.parametrize("name", TINY)
def test_reset_classifier(name: str) -> None:
    m = make(name, num_classes=5)
    x = images(m)
    with torch.no_grad():
        f = m.forward_features(x)
        ax = channel_axis(m, f)
        m.reset_classifier(7)
        assert m.num_classes == 7 and m(x).shape == (2, 7)
        assert m.get_classifier().weight.shape == (7, m.num_features)
        m.reset_classifier(0)
        assert isinstance(m.get_classifier(), torch.nn.Identity) and m.num_classes == 0
        torch.testing.assert_close(m(x), m.forward_head(f, pre_logits=True), rtol=0, atol=0)
        assert m(x).shape == (2, m.num_features)
        m.reset_classifier(0, global_pool="avg")
        assert m(x).shape == (2, m.num_features)
        # "": no pooling -> forward == forward_features, pre_logits too
        m.reset_classifier(0, global_pool="")
        torch.testing.assert_close(m(x), f, rtol=0, atol=0)
        torch.testing.assert_close(m.forward_head(f, pre_logits=True), f, rtol=0, atol=0)
        if ax == -1:  # channels-last: the head runs per location; None keeps the unpooled setting
            # (timm's NCHW ResNet has a Linear fc that cannot run unpooled: not checked there)
            m.reset_classifier(3)
            y = m(x)
            assert y.shape == (*f.shape[:-1], 3)
            torch.testing.assert_close(y, m.get_classifier()(f), rtol=0, atol=0)
        m.reset_classifier(3, global_pool="avg")
        assert m(x).shape == (2, 3)
        with pytest.raises((ValueError, AssertionError)):  # ConfigError is a ValueError
            m.reset_classifier(3, global_pool="bogus")


@pytest.mark.parametrize("name", TINY)
def test_head_init_same_at_construction_and_reset(name: str) -> None:
    """Whatever a family's classifier init is, a reset head is initialized the same way."""
    n = 64
    m = make(name, num_classes=n)
    w0, b0 = m.get_classifier().weight.detach().clone(), m.get_classifier().bias.detach().clone()
    m.reset_classifier(n)
    w1, b1 = m.get_classifier().weight.detach(), m.get_classifier().bias.detach()
    assert not torch.equal(w0, w1)  # a fresh head
    assert 0.8 < (w1.std() / w0.std()).item() < 1.25
    assert (b0.abs().max() == 0) == (b1.abs().max() == 0)
    if b0.abs().max() > 0:
        assert 0.6 < (b1.std() / b0.std()).item() < 1.6


@pytest.mark.parametrize("name", ALL)
def test_group_matcher_and_layer_decay(name: str) -> None:
    m = make_meta(name, num_classes=5)  # structure only: meta tensors, no init
    names = [n for n, _ in m.named_parameters()]
    head = head_prefix(m)
    assert any(n.startswith(head) for n in names)
    first_conv = m.pretrained_cfg["first_conv"] + ".weight"
    for coarse in (False, True):
        gm = m.group_matcher(coarse=coarse)
        groups = group_parameters(m, gm)
        flat = [n for g in groups.values() for n in g]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))  # each exactly once
        assert first_conv in groups[min(groups)]  # stem first
        assert {n for n in groups[max(groups)] if n.startswith(head)} == {n for n in names if n.startswith(head)}
        if not coarse:  # (coarse: per stage, timm leaves a final norm to the head's group)
            # every backbone parameter is matched explicitly: only the head falls through to the last group
            specs = [r for v in gm.values() if v for r in ([v] if isinstance(v, str) else [e[0] for e in v])]
            unmatched = [n for n in names if not n.startswith(head) and not any(re.match(s, n) for s in specs)]
            assert unmatched == [], unmatched
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names) == len(scale)
    P = dict(m.named_parameters())
    assert scale[id(P[first_conv])] == min(scale.values()) < 1.0
    assert all(scale[id(p)] == 1.0 for n, p in P.items() if n.startswith(head))


@pytest.mark.parametrize("name", ALL)
def test_no_weight_decay(name: str) -> None:
    m = make_meta(name)
    nwd = m.no_weight_decay() if hasattr(m, "no_weight_decay") else set()
    assert isinstance(nwd, set) and all(isinstance(s, str) for s in nwd)
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for n, p in m.named_parameters():
        excluded = any(fnmatch.fnmatch(n, s) for s in nwd) or p.ndim <= 1 or n.endswith(".bias")
        assert wd[id(p)] == (0.0 if excluded else 0.05), n


@pytest.mark.parametrize("name", TINY)
def test_export_round_trip_through_plain_timm(name: str, tmp_path) -> None:
    """What ``sslkit-export`` writes (the backbone's whole state dict, contiguous, as
    ``backbone.safetensors``) loads with plain ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))``, with and without ``num_classes``: equal tensors, equal
    eval outputs."""
    src = make(name)
    with torch.no_grad():  # loaded-vs-fresh unmistakable, buffers (BN statistics) included
        for k, t in list(src.named_parameters()) + list(src.named_buffers()):
            if k.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    assert not any(k.startswith(head_prefix(src)) for k in sd)
    path = tmp_path / "backbone.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    x = images(src)
    for kw in (dict(), dict(num_classes=6)):
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                   **{**KWARGS.get(name, {}), **kw}).eval()
        got = loaded.state_dict()
        assert set(got) - set(sd) == ({k for k in got if k.startswith(head_prefix(src))} if kw else set())
        assert set(sd) <= set(got)
        for k, v in sd.items():
            assert torch.equal(got[k], v), k
        with torch.no_grad():
            f = src.forward_features(x)
            torch.testing.assert_close(loaded.forward_features(x), f, rtol=0, atol=0)
            torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                                       src.forward_head(f, pre_logits=True), rtol=0, atol=0)
            if kw:
                assert loaded(x).shape == (2, 6)
            else:
                torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- full size: cheap
@pytest.mark.parametrize("name", BIG)
def test_full_size_forward(name: str) -> None:
    m = make(name, num_classes=3)
    x = torch.randn(1, 3, BIG_INPUT, BIG_INPUT)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape[channel_axis(m, f)] == m.num_features
        assert m.forward_head(f).shape == (1, 3)
        m.reset_classifier(0)
        assert isinstance(m.get_classifier(), torch.nn.Identity)
        assert m.forward_head(f).shape == m.forward_head(f, pre_logits=True).shape == (1, m.num_features)


# ------------------------------------------------------------------------------- drop path
@pytest.mark.parametrize("name", ALL)
def test_drop_path_schedule(name: str) -> None:
    m = make_meta(name, drop_path_rate=DPR)
    schedule = getattr(m, "drop_path_schedule", None)
    if schedule is None:
        schedule = next((s for p, s in DOCUMENTED_SCHEDULE.items() if name.startswith(p)), None)
    assert schedule in ("linear", "uniform"), f"{name}: declare drop_path_schedule ('linear' or 'uniform')"
    rates = block_drop_rates(m)
    n = len(rates)
    assert n >= 2, rates
    if schedule == "linear":
        expected = [DPR * i / (n - 1) for i in range(n)]  # 0 for the first block ... DPR for the last
    else:
        expected = [DPR] * n
    assert rates == pytest.approx(expected, abs=1e-6)
    assert block_drop_rates(make_meta(name)) == [0.0] * n


# ------------------------------------------------------------------------------- pyramids
@pytest.mark.parametrize("name", PYRAMID)
def test_pyramid_classifier(name: str) -> None:
    """One behaviour for PVT and Swin (PyramidClassifierMixin): trunc-normal(2e-5) head with zero bias
    at construction and reset, on the model's dtype; ``""`` accepted by the constructor too; anything
    else is a ConfigError naming the accepted values and leaves the model unchanged."""
    m = make(name, num_classes=32)
    x = images(m)
    for _ in range(2):
        head = m.get_classifier()
        assert isinstance(head, torch.nn.Linear)
        assert 0.8 * HEAD_INIT_STD < head.weight.std().item() < 1.2 * HEAD_INIT_STD
        assert head.weight.abs().max() <= 2.0 and torch.equal(head.bias, torch.zeros_like(head.bias))
        m.reset_classifier(32)
    head, pool = m.get_classifier(), m.global_pool
    for bad in ("max", "token", "AVG"):
        with pytest.raises(ConfigError, match=r"'avg'.*''"):
            m.reset_classifier(4, global_pool=bad)
        assert m.get_classifier() is head and m.num_classes == 32 and m.global_pool == pool
        with pytest.raises(ConfigError, match=r"'avg'.*''"):
            make(name, global_pool=bad)
    # global_pool="" at construction: unpooled map, head per location, pre_logits = unpooled map
    u = make(name, num_classes=4, global_pool="")
    with torch.no_grad():
        f = u.forward_features(x)
        assert f.ndim == 4 and f.shape[-1] == u.num_features
        torch.testing.assert_close(u.forward_head(f, pre_logits=True), f, rtol=0, atol=0)
        torch.testing.assert_close(u(x), u.head(f), rtol=0, atol=0)
        u.reset_classifier(4, global_pool="avg")
        torch.testing.assert_close(u(x), u.head(f.mean(dim=(1, 2))), rtol=0, atol=0)
    # the reset head follows the model's device / dtype
    d = make(name).to(torch.float64)
    d.reset_classifier(3)
    assert d.get_classifier().weight.dtype == torch.float64
    # timm's pre-classifier dropout
    t = make(name, num_classes=2, drop_rate=0.5).train()
    assert t.head_drop.p == 0.5
    with torch.no_grad():
        pre = t.forward_head(t.forward_features(x), pre_logits=True)
    assert (pre == 0).any()
