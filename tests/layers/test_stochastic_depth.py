"""Efficient (sample-subset) stochastic depth: drop_add_residual, grouped variant, SDBlock."""

import pytest
import torch
from torch import nn

from sslkit.layers.stochastic_depth import (
    SDBlock,
    drop_add_residual,
    drop_add_residual_grouped,
    keep_count,
)


class CountingBranch:
    """Deterministic per-sample branch recording how many rows it was called on."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[int] = []

    def __call__(self, t):
        self.calls.append(t.shape[0])
        return self.fn(t)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("b", [1, 2, 7, 10, 32, 33])
@pytest.mark.parametrize("d", [0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_subset_size_and_exact_scale(b, d):
    k = max(1, int(b * (1 - d)))
    assert keep_count(b, d) == k
    x = torch.zeros(b, 3, 4)
    branch = CountingBranch(torch.ones_like)  # adds a constant 1 to every kept element
    y = drop_add_residual(x, branch, d, training=True, generator=_gen(b))
    assert branch.calls == [k]  # branch ran on exactly the kept rows, nothing else
    changed = (y != x).flatten(1).any(dim=1)
    assert int(changed.sum()) == k
    # kept rows: exactly 0 + 1 * (B/k); dropped rows: exactly x
    assert torch.equal(y[changed], torch.full_like(y[changed], b / k))
    assert torch.equal(y[~changed], x[~changed])


@pytest.mark.parametrize("d", [0.0, 0.3, 0.9])
def test_eval_and_zero_rate_are_identity_plus_branch(d):
    x = torch.randn(6, 5, 4)
    fn = lambda t: 2.0 * t + 1.0  # noqa: E731
    ref = x + fn(x)
    branch = CountingBranch(fn)
    assert torch.equal(drop_add_residual(x, branch, d, training=False), ref)
    assert torch.equal(drop_add_residual(x, branch, 0.0, training=True), ref)
    assert branch.calls == [6, 6]


def test_invalid_rate():
    with pytest.raises(ValueError):
        drop_add_residual(torch.zeros(2, 3), torch.ones_like, 1.5, training=True)
    with pytest.raises(ValueError):
        keep_count(4, -0.1)


def test_gradient_only_through_kept_rows():
    b, dim, d = 10, 6, 0.4
    k = keep_count(b, d)
    x = torch.randn(b, 3, dim, requires_grad=True)
    w = nn.Parameter(torch.randn(dim))
    y = drop_add_residual(x, lambda t: t * w, d, training=True, generator=_gen(3))
    y.sum().backward()
    kept = (y != x).flatten(1).any(dim=1)
    assert int(kept.sum()) == k
    # dropped rows: identity gradient from the residual only
    assert torch.equal(x.grad[~kept], torch.ones_like(x.grad[~kept]))
    # kept rows: residual + (B/k) * d(branch)/dx
    torch.testing.assert_close(x.grad[kept], (1 + (b / k) * w.detach()).expand_as(x.grad[kept]))
    # branch parameter sees only kept rows' inputs, scaled by B/k
    torch.testing.assert_close(w.grad, (b / k) * x.detach()[kept].sum(dim=(0, 1)))


@pytest.mark.parametrize("b,d", [(10, 0.4), (7, 0.5)])
def test_unbiased_in_expectation(b, d):
    """mean over n draws of y = x + m*f(x), m = (B/k) * kept-frequency, E[m] = 1.

    std(m) = sqrt((1-p)/(p n)) with p = k/B; for (10, 0.4), n=5000: 0.0115. Tolerance 0.06
    (> 5 sigma for every row) -- deterministic anyway because the generator is seeded.
    """
    n = 5000
    x = torch.randn(b, 4)
    fn = lambda t: 2.0 * t + 1.0  # noqa: E731
    f = fn(x)
    g = _gen(1234)
    acc = torch.zeros_like(x)
    for _ in range(n):
        acc += drop_add_residual(x, fn, d, training=True, generator=g)
    mean = acc / n
    m = (mean - x) / f  # per-element multiplier of f, should be ~1
    torch.testing.assert_close(m, torch.ones_like(m), atol=0.06, rtol=0)
    torch.testing.assert_close(mean, x + f, atol=0.06 * f.abs().max().item(), rtol=0)


def test_generator_reproducibility():
    x = torch.randn(16, 3)
    fn = lambda t: t + 1  # noqa: E731
    y1 = drop_add_residual(x, fn, 0.5, True, generator=_gen(7))
    y2 = drop_add_residual(x, fn, 0.5, True, generator=_gen(7))
    assert torch.equal(y1, y2)
    outs = {tuple((drop_add_residual(x, fn, 0.5, True, generator=_gen(s)) != x).any(1).tolist())
            for s in range(8)}
    assert len(outs) > 1  # different seeds -> different subsets
    # global RNG path is reproducible under manual_seed
    torch.manual_seed(5)
    y3 = drop_add_residual(x, fn, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(y3, drop_add_residual(x, fn, 0.5, True))


def test_grouped_same_shape_single_branch_call():
    d = 0.5
    xs = [torch.randn(8, 5, 4), torch.randn(6, 5, 4), torch.randn(3, 5, 4)]
    fn = lambda t: 3.0 * t - 1.0  # noqa: E731
    branch = CountingBranch(fn)
    ys = drop_add_residual_grouped(xs, branch, d, True, generator=_gen(11))
    ks = [keep_count(x.shape[0], d) for x in xs]
    assert branch.calls == [sum(ks)]  # one call on the concatenated kept rows
    g = _gen(11)
    refs = [drop_add_residual(x, fn, d, True, generator=g) for x in xs]
    for y, ref, k in zip(ys, refs, ks):
        torch.testing.assert_close(y, ref)
    for y, x, k in zip(ys, xs, ks):
        assert int((y != x).flatten(1).any(1).sum()) == k
    # eval: one call on everything, equals x + f(x)
    branch.calls.clear()
    ys = drop_add_residual_grouped(xs, branch, d, False)
    assert branch.calls == [17]
    for y, x in zip(ys, xs):
        torch.testing.assert_close(y, x + fn(x))


def test_grouped_different_token_counts_per_group_calls():
    d = 0.4
    xs = [torch.randn(4, 197, 8), torch.randn(12, 37, 8)]
    fn = lambda t: t * 0.5 + 2.0  # noqa: E731
    branch = CountingBranch(fn)
    ys = drop_add_residual_grouped(xs, branch, d, True, generator=_gen(2))
    assert branch.calls == [keep_count(4, d), keep_count(12, d)]
    g = _gen(2)
    for y, x in zip(ys, xs):
        torch.testing.assert_close(y, drop_add_residual(x, fn, d, True, generator=g))
    assert drop_add_residual_grouped([], branch, d, True) == []


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_sdblock_eval_matches_timm_block(init_values):
    from timm.models.vision_transformer import Block

    dim, heads, ratio = 48, 4, 3.0
    sd = SDBlock(dim, heads, mlp_ratio=ratio, drop_path=0.3, init_values=init_values)
    with torch.no_grad():
        for p in sd.parameters():  # non-trivial norms / layer scales
            p.add_(0.1 * torch.randn_like(p))
    ref = Block(dim, heads, mlp_ratio=ratio, qkv_bias=True, init_values=init_values)
    ref.load_state_dict(sd.state_dict(), strict=True)
    sd.load_state_dict(ref.state_dict(), strict=True)  # interchangeable both ways
    sd.eval(), ref.eval()
    x = torch.randn(3, 17, dim)
    with torch.no_grad():
        torch.testing.assert_close(sd(x), ref(x), atol=1e-5, rtol=1e-5)
        # forward_list in eval == per-group forward
        xs = [x, torch.randn(5, 9, dim)]
        for y, xi in zip(sd.forward_list(xs), xs):
            torch.testing.assert_close(y, ref(xi), atol=1e-5, rtol=1e-5)
    # drop_path=0 in train mode is deterministic and equals eval
    sd0 = SDBlock(dim, heads, mlp_ratio=ratio, drop_path=0.0, init_values=init_values).train()
    sd0.load_state_dict(ref.state_dict())
    torch.testing.assert_close(sd0(x), ref(x), atol=1e-5, rtol=1e-5)


def test_sdblock_train_forward_backward_all_params_get_grad():
    dim = 32
    blk = SDBlock(dim, 4, drop_path=0.5, init_values=1e-2).train()
    x = torch.randn(6, 11, dim, requires_grad=True)
    y = blk(x, generator=_gen(0))
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # reproducible with a generator
    torch.testing.assert_close(blk(x, generator=_gen(9)), blk(x, generator=_gen(9)))
    # grouped (global + local crops) training path
    blk.zero_grad()
    ys = blk.forward_list([torch.randn(2, 17, dim), torch.randn(6, 5, dim)], generator=_gen(1))
    sum(y.sum() for y in ys).backward()
    assert all(p.grad is not None for p in blk.parameters())


def test_sdblock_autocast_bf16():
    blk = SDBlock(16, 2, drop_path=0.5).train()
    x = torch.randn(4, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    y.sum().backward()
