"""Stochastic depth (sslkit.layers.stochastic_depth): dense drop_add_residual, packed drop_add_residual_packed
(per-group subsets), packed timm-DropPath mode, and the ViT's PackedBlock built on them."""

import pytest
import torch
from timm.layers import drop_path as timm_drop_path
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from sslkit.layers.packing import PackLayout, pack_groups, token_rows, unpack_groups
from sslkit.layers.stochastic_depth import (
    drop_add_residual,
    drop_add_residual_packed,
    drop_path_residual_packed,
    keep_count,
    sample_keep,
)
from sslkit.models.vit import PackedBlock

torch.set_num_threads(2)


class CountingBranch:
    """Deterministic branch recording how many rows (and which packed layout) it was called on."""

    def __init__(self, fn, takes_layout: bool = False):
        self.fn, self.takes_layout = fn, takes_layout
        self.calls: list[int] = []
        self.layouts: list[PackLayout] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, t, *layout):
        self.calls.append(t.shape[0])
        self.inputs.append(t)
        self.layouts.extend(layout)
        return self.fn(t, *layout) if self.takes_layout else self.fn(t)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seq_fn(g):
    """Per-sequence (token-mixing, like attention) branch on (B, N, C)."""
    return g + 2.0 * g.mean(dim=1, keepdim=True)


def _seq_fn_packed(t, layout):
    return pack_groups([_seq_fn(g) for g in unpack_groups(t, layout)])[0]  # (T, C)


def _kept_samples(y, x):
    """(B,) bool: samples whose rows changed. y, x: (B, N, C)."""
    return (y != x).flatten(1).any(dim=1)


# ------------------------------------------------------------------------------------ building blocks
def test_sample_keep_and_token_rows():
    idx = sample_keep(10, 4, torch.device("cpu"), _gen(0))
    assert idx.shape == (4,) and idx.dtype == torch.long
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == 4 and 0 <= idx.min() <= idx.max() < 10
    assert torch.equal(idx, torch.randperm(10, generator=_gen(0))[:4].sort().values)  # randperm(B)[:k], sorted
    layout = PackLayout(((2, 3), (3, 2)))
    rows, kept = token_rows(layout, [torch.tensor([1]), torch.tensor([0, 2])])
    assert rows.tolist() == [3, 4, 5, 6, 7, 10, 11] and kept == PackLayout(((1, 3), (2, 2)))
    with pytest.raises(ValueError):
        pack_groups([])


# --------------------------------------------------------------------------- subset size, exact scale
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


@pytest.mark.parametrize("d", [0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_packed_subset_size_and_exact_scale(d):
    shapes = [(1, 3), (7, 2), (10, 4), (33, 1), (2, 5)]  # per-group scales B_g/k_g differ
    xs = [torch.zeros(b, n, 4) for b, n in shapes]
    x, layout = pack_groups(xs)
    ks = [keep_count(b, d) for b, _ in shapes]
    branch = CountingBranch(torch.ones_like)
    ys = unpack_groups(drop_add_residual_packed(x, layout, branch, d, True, generator=_gen(3)), layout)
    # one branch call on exactly the kept samples' tokens, with their layout
    assert branch.calls == [sum(k * n for k, (_, n) in zip(ks, shapes))]
    assert branch.layouts == [PackLayout(tuple((k, n) for k, (_, n) in zip(ks, shapes)))]
    for y, xi, k, (b, _) in zip(ys, xs, ks, shapes):
        kept = _kept_samples(y, xi)
        assert int(kept.sum()) == k
        assert torch.equal(y[kept], torch.full_like(y[kept], b / k))  # exactly B_g / k_g
        assert torch.equal(y[~kept], xi[~kept])


def test_packed_tiny_groups_nothing_drawn():
    """Every group keeps all samples (k_g == B_g, i.e. B_g == 1): no draw, no gather (the branch gets ``x``
    itself), x + f(x)."""
    xs = [torch.randn(1, 3, 4), torch.randn(1, 5, 4)]
    x, layout = pack_groups(xs)
    g = _gen(0)
    state = g.get_state()
    branch = CountingBranch(lambda t: 2.0 * t)
    y = drop_add_residual_packed(x, layout, branch, 0.5, True, generator=g)
    assert torch.equal(g.get_state(), state) and branch.calls == [8] and branch.layouts == [layout]
    assert branch.inputs[0] is x
    assert torch.equal(y, x + 2.0 * x)
    # ... whereas one droppable group draws for every group (in group order)
    xs.append(torch.randn(4, 2, 4))
    x, layout = pack_groups(xs)
    y = drop_add_residual_packed(x, layout, branch, 0.5, True, generator=g)
    ref = _gen(0)
    refs = [drop_add_residual(xi, lambda t: 2.0 * t, 0.5, True, generator=ref) for xi in xs]
    torch.testing.assert_close(y, pack_groups(refs)[0])
    assert torch.equal(g.get_state(), ref.get_state())


# -------------------------------------------------------------------------------- eval / rate 0
@pytest.mark.parametrize("d", [0.0, 0.3, 0.9])
def test_eval_and_zero_rate_are_identity_plus_branch(d):
    x = torch.randn(6, 5, 4)
    fn = lambda t: 2.0 * t + 1.0  # noqa: E731
    ref = x + fn(x)
    branch = CountingBranch(fn)
    assert torch.equal(drop_add_residual(x, branch, d, training=False), ref)
    assert torch.equal(drop_add_residual(x, branch, 0.0, training=True), ref)
    assert branch.calls == [6, 6]
    # packed, both modes: one call on all rows with the full layout
    xs = [x, torch.randn(3, 2, 4)]
    xp, layout = pack_groups(xs)
    ref_p = xp + fn(xp)
    for f in (drop_add_residual_packed, drop_path_residual_packed):
        branch = CountingBranch(fn)
        assert torch.equal(f(xp, layout, branch, d, False), ref_p)
        assert torch.equal(f(xp, layout, branch, 0.0, True), ref_p)
        assert branch.calls == [36, 36] and branch.layouts == [layout, layout]


def test_invalid_rate():
    with pytest.raises(ValueError):
        drop_add_residual(torch.zeros(2, 3), torch.ones_like, 1.5, training=True)
    with pytest.raises(ValueError):
        keep_count(4, -0.1)
    x, layout = pack_groups([torch.zeros(2, 3, 4)])
    for f in (drop_add_residual_packed, drop_path_residual_packed):
        for training in (True, False):
            with pytest.raises(ValueError):
                f(x, layout, lambda t, lay: t, 1.5, training)
    with pytest.raises(ValueError, match="drop_path"):
        PackedBlock(8, 2, drop_path=-0.1)


# ------------------------------------------------------------------------------------- gradients
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


def test_packed_gradient_only_through_kept_rows():
    d, dim = 0.4, 6
    shapes = [(10, 3), (7, 2)]  # k = 6, 4; scales 10/6, 7/4
    xs = [torch.randn(b, n, dim) for b, n in shapes]
    x0, layout = pack_groups(xs)
    x = x0.clone().requires_grad_()
    w = nn.Parameter(torch.randn(dim))
    y = drop_add_residual_packed(x, layout, lambda t, lay: t * w, d, True, generator=_gen(3))
    y.sum().backward()
    w_ref = torch.zeros(dim)
    for yg, xg, gg, (b, _) in zip(unpack_groups(y.detach(), layout), xs, unpack_groups(x.grad, layout), shapes):
        k = keep_count(b, d)
        kept = _kept_samples(yg, xg)
        assert int(kept.sum()) == k
        assert torch.equal(gg[~kept], torch.ones_like(gg[~kept]))  # identity path only
        torch.testing.assert_close(gg[kept], (1 + (b / k) * w.detach()).expand_as(gg[kept]))
        w_ref += (b / k) * xg[kept].sum(dim=(0, 1))
    torch.testing.assert_close(w.grad, w_ref)  # only kept rows' inputs, scaled by B_g / k_g


# ------------------------------------------------------------------------------------- unbiased
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


def test_packed_unbiased_in_expectation():
    """As above per group of a packed matrix (groups (10, 2) and (7, 3), d = 0.4: p = 6/10 and 4/7; std(m)
    for n = 5000 at most 0.0122, tolerance 0.06)."""
    n, d = 5000, 0.4
    x, layout = pack_groups([torch.randn(10, 2, 4), torch.randn(7, 3, 4)])
    fn = lambda t, lay: 2.0 * t + 1.0  # noqa: E731
    f = fn(x, layout)
    g = _gen(1234)
    acc = torch.zeros_like(x)
    for _ in range(n):
        acc += drop_add_residual_packed(x, layout, fn, d, True, generator=g)
    m = (acc / n - x) / f
    torch.testing.assert_close(m, torch.ones_like(m), atol=0.06, rtol=0)


# ----------------------------------------------------------------------------------- reproducibility
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


def test_packed_generator_reproducibility():
    x, layout = pack_groups([torch.randn(16, 2, 3), torch.randn(8, 3, 3)])
    fn = lambda t, lay: t + 1  # noqa: E731
    y1 = drop_add_residual_packed(x, layout, fn, 0.5, True, generator=_gen(7))
    assert torch.equal(y1, drop_add_residual_packed(x, layout, fn, 0.5, True, generator=_gen(7)))
    outs = {tuple((drop_add_residual_packed(x, layout, fn, 0.5, True, generator=_gen(s)) != x).any(1).tolist())
            for s in range(8)}
    assert len(outs) > 1  # different seeds -> different subsets
    torch.manual_seed(5)
    y3 = drop_add_residual_packed(x, layout, fn, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(y3, drop_add_residual_packed(x, layout, fn, 0.5, True))


# --------------------------------------------------------------- packed groups == per-group dense calls
def test_packed_same_token_count_single_branch_call():
    d = 0.5
    xs = [torch.randn(8, 5, 4), torch.randn(6, 5, 4), torch.randn(3, 5, 4)]
    fn = lambda t: 3.0 * t - 1.0  # noqa: E731
    branch = CountingBranch(fn)
    x, layout = pack_groups(xs)
    ys = unpack_groups(drop_add_residual_packed(x, layout, branch, d, True, generator=_gen(11)), layout)
    ks = [keep_count(t.shape[0], d) for t in xs]
    assert branch.calls == [sum(ks) * 5]  # one call on the concatenated kept rows
    g = _gen(11)
    refs = [drop_add_residual(t, fn, d, True, generator=g) for t in xs]  # same draws, in list order
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref)
    for y, t, k in zip(ys, xs, ks):
        assert int(_kept_samples(y, t).sum()) == k
    # eval: one call on everything, equals x + f(x)
    branch.calls.clear()
    ys = unpack_groups(drop_add_residual_packed(x, layout, branch, d, False), layout)
    assert branch.calls == [17 * 5]
    for y, t in zip(ys, xs):
        torch.testing.assert_close(y, t + fn(t))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_packed_different_token_counts_per_group(per_sequence):
    """Groups of different token counts (DINOv2 global 197 / local 37 tokens): one branch call on all
    groups' kept tokens; equal to per-group dense calls with the same RNG, also for a branch that mixes
    tokens within each sequence (needs the kept layout)."""
    d = 0.4
    xs = [torch.randn(4, 197, 8), torch.randn(12, 37, 8)]
    fn = _seq_fn if per_sequence else (lambda t: t * 0.5 + 2.0)
    branch = CountingBranch(_seq_fn_packed, takes_layout=True) if per_sequence else CountingBranch(fn)
    x, layout = pack_groups(xs)
    ys = unpack_groups(drop_add_residual_packed(x, layout, branch, d, True, generator=_gen(2)), layout)
    assert branch.calls == [keep_count(4, d) * 197 + keep_count(12, d) * 37]
    assert branch.layouts == [PackLayout(((keep_count(4, d), 197), (keep_count(12, d), 37)))]
    g = _gen(2)
    for y, t in zip(ys, xs):
        torch.testing.assert_close(y, drop_add_residual(t, fn, d, True, generator=g))
    # global RNG: same draws in the same order too
    torch.manual_seed(8)
    y = drop_add_residual_packed(x, layout, branch, d, True)
    torch.manual_seed(8)
    torch.testing.assert_close(y, pack_groups([drop_add_residual(t, fn, d, True) for t in xs])[0])


# ----------------------------------------------------------------------------- packed timm DropPath
def test_drop_path_residual_packed_matches_timm_per_group():
    """Mask mode: per group a (B_g, 1, 1) Bernoulli / keep_prob draw in list order, like timm's drop_path
    on each group; the branch runs on all rows."""
    d = 0.5
    xs = [torch.randn(16, 5, 4), torch.randn(16, 3, 4)]
    x, layout = pack_groups(xs)
    fn = lambda t: 2.0 * t + 1.0  # noqa: E731
    branch = CountingBranch(fn)
    torch.manual_seed(2)
    ys = unpack_groups(drop_path_residual_packed(x, layout, branch, d, True), layout)
    assert branch.calls == [16 * 5 + 16 * 3]
    torch.manual_seed(2)
    refs = [t + timm_drop_path(fn(t), d, True) for t in xs]
    for y, ref, t in zip(ys, refs, xs):
        torch.testing.assert_close(y, ref)
        dropped = (y == t).flatten(1).all(1)
        assert 0 < int(dropped.sum()) < 16  # both outcomes occur (seeded)
        torch.testing.assert_close(y[~dropped], (t + 2.0 * fn(t))[~dropped])  # scaled by 1 / keep_prob


# ----------------------------------------------------------------------------------- PackedBlock
@pytest.mark.parametrize("mode", ["efficient", "mask"])
@pytest.mark.parametrize("init_values", [None, 1e-5, 0.1])
def test_packed_block_eval_matches_timm_block(init_values, mode):
    dim, heads, ratio = 48, 4, 3.0
    blk = PackedBlock(dim, heads, mlp_ratio=ratio, drop_path=0.3, init_values=init_values, drop_path_mode=mode)
    with torch.no_grad():
        for p in blk.parameters():  # non-trivial norms / layer scales
            p.add_(0.1 * torch.randn_like(p))
    ref = TimmBlock(dim, heads, mlp_ratio=ratio, qkv_bias=True, init_values=init_values)
    ref.load_state_dict(blk.state_dict(), strict=True)
    blk.load_state_dict(ref.state_dict(), strict=True)  # interchangeable both ways
    blk.eval(), ref.eval()
    x = torch.randn(3, 17, dim)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref(x), atol=1e-5, rtol=1e-5)
        # packed forward in eval == per-group forward
        xs = [x, torch.randn(5, 9, dim)]
        xp, layout = pack_groups(xs)
        for y, xi in zip(unpack_groups(blk.forward_packed(xp, layout), layout), xs):
            torch.testing.assert_close(y, ref(xi), atol=1e-5, rtol=1e-5)
    # drop_path=0 in train mode is deterministic and equals eval
    blk0 = PackedBlock(dim, heads, mlp_ratio=ratio, drop_path=0.0, init_values=init_values,
                       drop_path_mode=mode).train()
    blk0.load_state_dict(ref.state_dict())
    torch.testing.assert_close(blk0(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blk0.forward_packed(xp, layout), pack_groups([ref(t) for t in xs])[0],
                               atol=1e-5, rtol=1e-5)


def test_packed_block_train_forward_backward_all_params_get_grad():
    dim = 32
    blk = PackedBlock(dim, 4, drop_path=0.5, init_values=1e-2).train()
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
    # packed (global + local crops) training path
    blk.zero_grad()
    xp, layout = pack_groups([torch.randn(2, 17, dim), torch.randn(6, 5, dim)])
    yp = blk.forward_packed(xp, layout, generator=_gen(1))
    yp.sum().backward()
    assert all(p.grad is not None for p in blk.parameters())
    torch.testing.assert_close(blk.forward_packed(xp, layout, generator=_gen(1)), yp)


@pytest.mark.parametrize("mode", ["efficient", "mask"])
def test_packed_block_autocast_bf16(mode):
    blk = PackedBlock(16, 2, drop_path=0.5, drop_path_mode=mode).train()
    x = torch.randn(4, 5, 16, requires_grad=True)
    xp, layout = pack_groups([torch.randn(4, 5, 16), torch.randn(6, 3, 16)])
    xp.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
        yp = blk.forward_packed(xp, layout)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert yp.dtype == xp.dtype and yp.shape == xp.shape
    (y.sum() + yp.sum()).backward()
    assert x.grad is not None and xp.grad is not None
