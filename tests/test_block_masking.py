"""iBOT / BEiT block masks (masking.BlockMasking): format, stratified ratios, rectangles, determinism."""

from __future__ import annotations

import pickle

import pytest
import torch

from sslkit.errors import ConfigError
from sslkit.masking import BlockMasking, _Uniforms


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_masked_rows() -> None:
    m = BlockMasking((14, 14), n_global=2, mask_probability=0.5)(8, gen())
    assert set(m) == {"masked"}
    masked = m["masked"]
    assert masked.shape == (16, 196) and masked.dtype == torch.bool
    counts = masked.sum(1)
    assert int((counts > 0).sum()) == 8  # int(16 * 0.5) rows get a mask, the others none
    # polarity: True = masked, a minority of the patches (ratio at most 0.5)
    assert 0 < int(counts.max()) <= 98


@pytest.mark.parametrize("batch_size,p,expected", [(5, 0.5, 5), (3, 0.3, 1), (4, 0.0, 0), (4, 1.0, 8)])
def test_number_of_masked_rows(batch_size: int, p: float, expected: int) -> None:
    bm = BlockMasking((8, 8), n_global=2, mask_probability=p, min_patches=2)
    masked = bm(batch_size, gen(1))["masked"]
    assert masked.shape == (2 * batch_size, 64)
    assert bm.num_masked_rows(batch_size) == expected
    assert int(masked.any(1).sum()) == expected
    if expected == 0:
        assert not masked.any()


def test_masked_rows_are_shuffled() -> None:
    """Which rows are masked varies between batches (a random permutation, not the first rows)."""
    bm = BlockMasking((8, 8), mask_probability=0.5, min_patches=2)
    patterns = {tuple(bm(8, gen(s))["masked"].any(1).tolist()) for s in range(6)}
    assert len(patterns) > 1 and patterns != {tuple([True] * 8 + [False] * 8)}


def test_stratified_ratios() -> None:
    """Sorted masked fractions spread over [0.1, 0.5]: the i-th smallest is at most the i-th stratum's top."""
    N, B = 256, 32
    bm = BlockMasking((16, 16), n_global=2, mask_probability=0.5, ratio=(0.1, 0.5))
    masked = bm(B, gen(2))["masked"]
    counts = masked.sum(1)
    fr = sorted((counts[counts > 0].float() / N).tolist())
    n = len(fr)
    assert n == 32
    edges = [0.1 + 0.4 * i / n for i in range(n + 1)]
    for i, f in enumerate(fr):
        assert f <= edges[i + 1] + 1e-9  # counts never exceed their targets
        assert f >= edges[i] - 4.0 / N  # and end close to them (a few patches short at most)
    assert fr[0] < 0.15 and fr[-1] > 0.45


def test_counts_at_most_target_and_close_on_average() -> None:
    bm = BlockMasking((16, 16))
    g = gen(3)
    for target in (3, 4, 10, 26, 64, 128):
        counts = [int(bm.block_mask(target, g).sum()) for _ in range(50)]
        assert max(counts) <= target
        assert sum(counts) / len(counts) >= 0.9 * target
    assert not bm.block_mask(0, g).any()


def test_targets_are_stratified() -> None:
    bm = BlockMasking((10, 10), ratio=(0.1, 0.5))
    t = bm.targets(4, _Uniforms(gen(4)))
    edges = [10, 20, 30, 40, 50]
    assert all(edges[i] <= t[i] <= edges[i + 1] for i in range(4))


@pytest.mark.parametrize("side", [2, 3])
def test_single_rectangle(side: int) -> None:
    """A target of exactly one block (min = max = target, square aspect) gives one side x side square."""
    area = side * side
    bm = BlockMasking((8, 8), n_global=2, mask_probability=1.0, ratio=(area / 64, area / 64),
                      min_patches=area, max_patches=area, aspect=(1.0, 1.0))
    masked = bm(6, gen(5))["masked"].view(12, 8, 8)
    tops = set()
    for m in masked:
        rows, cols = m.nonzero(as_tuple=True)
        assert int(m.sum()) == area
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert (h, w) == (side, side)  # the bounding box is filled: one rectangle
        tops.add((int(rows.min()), int(cols.min())))
    assert len(tops) > 1  # placed at random


def test_masks_are_unions_of_rectangles() -> None:
    """Every placed rectangle is fully masked and the mask is exactly their union."""
    bm = BlockMasking((14, 14))
    rng = _Uniforms(gen(6))
    for target in (5, 20, 60, 98):
        mask, rects = bm._block_mask(target, rng)
        union = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, h, w in rects:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            union[top : top + h, left : left + w] = True
        assert torch.equal(mask, union) and int(mask.sum()) <= target
        # no block is larger than max_patches (half the grid), and the aspect stays within bounds
        assert all(h * w <= 98 for _, _, h, w in rects)


def test_deterministic_given_generator() -> None:
    bm = BlockMasking((14, 14))
    a, b, c = bm(8, gen(7))["masked"], bm(8, gen(7))["masked"], bm(8, gen(8))["masked"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # no global RNG involved
    torch.manual_seed(0)
    x = bm(4, gen(9))["masked"]
    torch.manual_seed(1)
    assert torch.equal(x, bm(4, gen(9))["masked"])
    # picklable (sent to the data workers)
    assert torch.equal(x, pickle.loads(pickle.dumps(bm))(4, gen(9))["masked"])


@pytest.mark.parametrize("kwargs,match", [
    ({"grid": (0, 4)}, "grid must be positive"),
    ({"ratio": (0.5, 0.1)}, r"method.mask_ratio"),
    ({"ratio": (0.1, 1.5)}, r"method.mask_ratio"),
    ({"mask_probability": 1.5}, r"method.mask_probability"),
    ({"min_patches": 40, "max_patches": 8}, r"method.mask_min_patches"),
    ({"min_patches": 0}, r"method.mask_min_patches"),
    ({"n_global": 0}, r"n_global"),
    ({"aspect": (2.0, 1.0)}, r"aspect"),
])
def test_config_errors(kwargs: dict, match: str) -> None:
    kwargs = {"grid": (8, 8), **kwargs}
    with pytest.raises(ConfigError, match=match):
        BlockMasking(**kwargs)
