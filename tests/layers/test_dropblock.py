"""DropBlock (sslkit.layers.dropblock): rates, block geometry, independence, gradient, schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sslkit.layers.dropblock as db
from sslkit.layers import DropBlock2d, drop_block_2d, dropblock_drop_prob, dropblock_gamma


def _expected_drop(drop: float, bs: int, h: int, w: int) -> float:
    """Exact expected dropped fraction under the paper's seeding (overlapping blocks make it < drop)."""
    g = dropblock_gamma(drop, bs, h, w)
    bh, bw = min(bs, h), min(bs, w)

    def cover(n: int, b: int) -> list[int]:  # number of seed rows (cols) whose block covers row (col) i
        return [sum(1 for s in range(n - b + 1) if s <= i < s + b) for i in range(n)]

    return sum(1 - (1 - g) ** (a * c) for a in cover(h, bh) for c in cover(w, bw)) / (h * w)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of two (N, H, W) indicator maps over samples, per-position means removed (the drop rate
    is lower near the borders in every channel, which alone would correlate pooled pixels)."""
    a, b = a.double(), b.double()
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt()).item()


def _blocks_only(dropped: torch.Tensor, bs: int) -> bool:
    """True iff the dropped set of every (H, W) map is a union of fully-dropped in-map bh x bw windows."""
    h, w = dropped.shape[-2:]
    bh, bw = min(bs, h), min(bs, w)
    d = dropped.reshape(-1, 1, h, w).float()
    full = (F.avg_pool2d(d, (bh, bw), stride=1) > 1 - 1e-6).float()  # top-left anchored fully-dropped windows
    cover = F.max_pool2d(F.pad(full, (bw - 1, bw - 1, bh - 1, bh - 1)), (bh, bw), stride=1)
    return torch.equal(cover.bool(), d.bool())


# (H, W, block_size, number of independent masks): enough masks for a std of the mean of ~5e-4
CASES = [(7, 7, 3, 40_000), (7, 7, 7, 100_000), (14, 14, 7, 80_000), (56, 56, 7, 3_000),
         (8, 16, 5, 40_000), (14, 14, 4, 20_000)]


@pytest.mark.parametrize("mode", ["paper", "fast"])
@pytest.mark.parametrize("h,w,bs,planes", CASES, ids=[f"{c[0]}x{c[1]}_bs{c[2]}" for c in CASES])
def test_drop_fraction(mode: str, h: int, w: int, bs: int, planes: int) -> None:
    torch.manual_seed(1)
    if mode == "paper":
        x, groups = torch.ones(planes // 4, 4, h, w), 1
    else:  # 2 groups of 2 channels -> `planes` independent masks
        x, groups = torch.ones(planes // 2, 4, h, w), 2
    d = drop_block_2d(x, 0.1, bs, mode=mode, groups=groups) == 0
    if mode == "fast":
        assert bool((d[:, 0] == d[:, 1]).all()) and bool((d[:, 2] == d[:, 3]).all())
        d = d[:, ::2]
    per_map = d.reshape(-1, h * w).double().mean(1)  # one value per independent mask
    frac, sem = per_map.mean().item(), per_map.std().item() / math.sqrt(per_map.numel())
    assert sem < 1e-3  # enough masks for the +-1% absolute tolerance to mean something
    assert abs(frac - 0.1) <= 0.01, frac  # +-10% relative of the target
    # and it matches the exact expectation of the paper's seeding (overlaps make it 0.093..0.1)
    expected = _expected_drop(0.1, bs, h, w)
    assert abs(frac - expected) < 5 * sem, (frac, expected, sem)
    assert _blocks_only(d[:500], bs)


def test_gamma_hand_derived() -> None:
    # keep 0.9, bs 3, 7x7: gamma = (1 - 0.9) / 3^2 * 7*7 / ((7-3+1) * (7-3+1)) = 0.1/9 * 49/25
    assert dropblock_gamma(0.1, 3, 7, 7) == pytest.approx(0.1 / 9 * 49 / 25)
    assert dropblock_gamma(0.1, 3, 7, 7) == pytest.approx(0.021777777777)
    # non-square 8x16, bs 5: 0.1/25 * 128 / (4 * 12)
    assert dropblock_gamma(0.1, 5, 8, 16) == pytest.approx(0.1 / 25 * 128 / 48)
    # bs >= both sides: a single seed position, gamma = drop
    assert dropblock_gamma(0.1, 7, 7, 7) == pytest.approx(0.1)
    assert dropblock_gamma(0.1, 9, 5, 6) == pytest.approx(0.1)
    # bs clipped on one side only: 8x16 bs 10 -> 8x10 blocks, valid 1 x 7
    assert dropblock_gamma(0.1, 10, 8, 16) == pytest.approx(0.1 / 80 * 128 / 7)


def test_seed_sampler_is_bernoulli() -> None:
    torch.manual_seed(0)
    n, p = 2_000_000, 0.01
    pos = db._bernoulli_positions(n, p, torch.device("cpu"))
    assert pos.dtype == torch.long and int(pos.min()) >= 0 and int(pos.max()) < n
    assert bool((pos[1:] > pos[:-1]).all())  # distinct, sorted
    sd = math.sqrt(n * p * (1 - p))
    assert abs(pos.numel() - n * p) < 5 * sd
    halves = torch.bincount(pos // (n // 4), minlength=4).double()  # uniform over the range
    assert (halves - n * p / 4).abs().max() < 5 * math.sqrt(n * p / 4)
    assert db._bernoulli_positions(100, 0.0, torch.device("cpu")).numel() == 0
    assert db._bernoulli_positions(50, 1.0, torch.device("cpu")).tolist() == list(range(50))


def test_seed_paints_one_block_inside_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single seed at valid-region (i, j) of plane k drops exactly rows i..i+bs-1, cols j..j+bs-1 of k."""
    h, w = 8, 11
    for bs in (3, 4):
        hv, wv = h - bs + 1, w - bs + 1
        for plane, i, j in [(0, 0, 0), (5, hv - 1, wv - 1), (2, 1, wv - 1), (3, 2, 3)]:
            seed = torch.tensor([plane * hv * wv + i * wv + j])
            monkeypatch.setattr(db, "_bernoulli_positions", lambda n, p, dev, s=seed: s)
            monkeypatch.setattr(db, "_DENSE_TRIALS", 0)  # the sparse path (the dense one: next test)
            y = drop_block_2d(torch.ones(2, 3, h, w), 0.1, bs)
            expect = torch.ones(6, h, w)
            expect[plane, i:i + bs, j:j + bs] = 0
            scale = 6 * h * w / (6 * h * w - bs * bs)
            assert torch.allclose(y, (expect * scale).view(2, 3, h, w))


@pytest.mark.parametrize("bs", [1, 3, 4, 7, 20])
def test_dense_and_sparse_paths_paint_the_same_blocks(monkeypatch: pytest.MonkeyPatch, bs: int) -> None:
    """The dense path (few seed positions: fast mode) paints exactly what the sparse path paints."""
    h, w, planes = 9, 12, 5
    bh, bw = min(bs, h), min(bs, w)
    g = torch.Generator().manual_seed(bs)
    seeds = torch.rand(planes, h - bh + 1, w - bw + 1, generator=g) < 0.08  # (P, hv, wv)
    dense = db._paint_dense(seeds, bh, bw, torch.float32)
    monkeypatch.setattr(db, "_bernoulli_positions", lambda n, p, dev: seeds.flatten().nonzero().flatten())
    monkeypatch.setattr(db, "_DENSE_TRIALS", 0)
    sparse = db._block_mask(planes, h, w, bs, 0.1, torch.float32, torch.device("cpu"))
    assert dense.shape == (planes, h, w) and torch.equal(dense, sparse)
    assert ((dense == 0).sum(dim=(1, 2)) >= bh * bw * seeds.flatten(1).any(1)).all()


def test_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(4, 8, 14, 14)
    for mode in ("paper", "fast"):
        m = DropBlock2d(0.2, 5, mode=mode)
        m.eval()
        assert m(x) is x
        m.train()
        m.drop_prob = 0.0
        assert m(x) is x
        m.drop_prob = 0.2  # the schedule sets the attribute; read at forward time
        assert (m(x) == 0).any()


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_expected_value_preserved(mode: str) -> None:
    torch.manual_seed(2)
    m = DropBlock2d(0.3, 3, mode=mode)
    x = torch.ones(64, 16, 12, 12)
    y = m(x)
    assert y.mean().item() == pytest.approx(1.0, abs=1e-5)  # count / count_ones renormalisation, exact
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, y.numel() / kept.numel()))
    # random input: the per-position expectation is preserved on average
    x = torch.randn(256, 16, 12, 12) + 2.0
    assert m(x).mean().item() == pytest.approx(x.mean().item(), rel=0.02)


def test_channel_independence_paper() -> None:
    torch.manual_seed(3)
    y = DropBlock2d(0.3, 3)(torch.ones(4000, 4, 10, 10))
    d = (y == 0).float()
    assert not torch.equal(d[:, 0], d[:, 1])
    for c in (1, 2, 3):
        corr = _corr(d[:, 0], d[:, c])
        assert abs(corr) < 0.03, corr
    # within one channel neighbouring pixels are strongly correlated (blocks), unlike across channels
    within = torch.corrcoef(torch.stack([d[:, 0, :, 4].reshape(-1), d[:, 0, :, 5].reshape(-1)]))[0, 1].item()
    assert within > 0.5


def test_fast_mode_shared_masks_and_groups() -> None:
    torch.manual_seed(4)
    y = DropBlock2d(0.3, 3, mode="fast")(torch.ones(50, 6, 10, 10))
    d = y == 0
    assert d.any()
    assert bool((d == d[:, :1]).all())  # one mask for all channels
    y = DropBlock2d(0.3, 3, mode="fast", groups=3)(torch.ones(4000, 6, 10, 10))
    d = (y == 0).view(4000, 3, 2, 10, 10)
    assert bool((d == d[:, :, :1]).all())  # equal within a group (contiguous channels 0-1, 2-3, 4-5)
    assert not torch.equal(d[:, 0], d[:, 1])
    corr = _corr(d[:, 0, 0], d[:, 1, 0])
    assert abs(corr) < 0.03, corr
    with pytest.raises(ValueError):
        DropBlock2d(0.1, 3, mode="fast", groups=4)(torch.ones(2, 6, 10, 10))


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_gradient_is_mask_times_scale(mode: str) -> None:
    torch.manual_seed(5)
    x = (torch.rand(8, 6, 9, 13) + 0.5).requires_grad_()
    y = DropBlock2d(0.2, 4, mode=mode)(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask_scale = (y / x).detach()  # mask * scale, x > 0
    kept = int((y != 0).sum())
    scale = y.numel() / kept
    assert torch.allclose(mask_scale[y != 0], torch.full((kept,), scale), rtol=1e-5)
    assert torch.allclose(x.grad, g * mask_scale, rtol=1e-5, atol=1e-6)


def test_block_covers_whole_map_when_larger_than_sides() -> None:
    torch.manual_seed(6)
    y = drop_block_2d(torch.ones(5000, 4, 5, 6), 0.1, 7)  # bs >= both sides: whole channel maps
    d = (y == 0).view(20000, 30)
    assert bool(((d.all(1)) | (~d.any(1))).all())
    assert abs(d.all(1).double().mean().item() - 0.1) < 0.01
    y = drop_block_2d(torch.ones(500, 4, 5, 12), 0.1, 7)  # full-height strips of width 7
    assert _blocks_only(y == 0, 7)


def test_non_square_and_dtypes() -> None:
    torch.manual_seed(7)
    x = torch.randn(16, 8, 6, 20)
    y = DropBlock2d(0.2, 3)(x)
    assert y.shape == x.shape and _blocks_only(y == 0, 3) and (y == 0).any()
    yb = DropBlock2d(0.2, 3)(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and yb.shape == x.shape
    xc = x.to(memory_format=torch.channels_last)
    assert DropBlock2d(0.2, 3, mode="fast", groups=2)(xc).shape == x.shape


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DropBlock2d(0.1, 3, mode="nope")
    with pytest.raises(ValueError):
        DropBlock2d(0.1, 3, mode="paper", groups=2)


def test_schedule() -> None:
    t = 0.1
    assert dropblock_drop_prob(0, 1000, t) == 0.0
    assert dropblock_drop_prob(500, 1000, t) == pytest.approx(0.05)
    assert dropblock_drop_prob(250, 1000, t) == pytest.approx(0.025)
    assert dropblock_drop_prob(1000, 1000, t) == pytest.approx(0.1)
    assert dropblock_drop_prob(2000, 1000, t) == pytest.approx(0.1)  # clamped past the end
    # warm-up: ramp over the first 100 steps, then constant
    assert dropblock_drop_prob(0, 1000, t, warmup_steps=100) == 0.0
    assert dropblock_drop_prob(50, 1000, t, warmup_steps=100) == pytest.approx(0.05)
    assert dropblock_drop_prob(100, 1000, t, warmup_steps=100) == pytest.approx(0.1)
    assert dropblock_drop_prob(700, 1000, t, warmup_steps=100) == pytest.approx(0.1)
    assert dropblock_drop_prob(0, 1000, t, warmup_steps=0) == pytest.approx(0.1)
    assert isinstance(dropblock_drop_prob(3, 10, t), float)
