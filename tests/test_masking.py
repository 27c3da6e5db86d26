import pytest
import torch

from sslkit.errors import ConfigError
from sslkit.masking import RandomMasking, UniformMasking, blocks_to_grid


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (4, 6)])
def test_uniform_keeps_exactly_one_per_block(grid):
    m = UniformMasking(grid, 0.25)(5, gen())
    gh, gw = grid
    masked = m["masked"].view(5, gh // 2, 2, gw // 2, 2)
    kept_per_block = (~masked).sum(dim=(2, 4))
    assert (kept_per_block == 1).all()
    assert m["masked"].float().mean().item() == pytest.approx(0.75)
    # keep_offset agrees with the masked grid
    keep_idx = blocks_to_grid(m["keep_offset"], grid)
    assert not m["masked"].gather(1, keep_idx).any()
    assert keep_idx.shape == (5, gh * gw // 4)


def test_uniform_positions_balanced_per_image():
    m = UniformMasking((16, 16), 0.25)(8, gen(1))
    for b in range(8):
        counts = torch.bincount(m["keep_offset"][b], minlength=4)
        assert counts.tolist() == [16, 16, 16, 16]
    # and not the same pattern for every image
    assert not (m["keep_offset"][0] == m["keep_offset"][1]).all()


@pytest.mark.parametrize("ratio,expected", [(0.25, 16), (0.0, 0), (0.5, 32)])
def test_secondary_mask_exact_share(ratio, expected):
    m = UniformMasking((16, 16), ratio)(4, gen(2))
    assert m["sm_masked"].shape == (4, 64)
    assert (m["sm_masked"].sum(1) == expected).all()


def test_masks_deterministic_given_generator():
    a = UniformMasking((8, 8))(3, gen(7))
    b = UniformMasking((8, 8))(3, gen(7))
    c = UniformMasking((8, 8))(3, gen(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["keep_offset"], c["keep_offset"])


def test_uniform_rejects_odd_grid():
    with pytest.raises(ConfigError, match="even"):
        UniformMasking((7, 8))


def test_random_masking_exact_ratio():
    m = RandomMasking((16, 16), 0.75)(6, gen())["masked"]
    assert (m.sum(1) == 192).all()
    assert m.shape == (6, 256)
