"""Compaction geometry: every kept unit lands where expected, with its original position."""

import torch

from sslkit.masking import UniformMasking, blocks_to_grid
from sslkit.models.um import gather_kept_units, patchify, um_positions, unpatchify, upsample_units


def index_image(B: int, grid: int, unit: int) -> torch.Tensor:
    """(B, 3, grid*unit, grid*unit): every pixel of unit (i, j) holds its unit index i*grid + j;
    channel 1 holds the row inside the unit, channel 2 the column."""
    idx = torch.arange(grid * grid, dtype=torch.float32).view(grid, 1, grid, 1).expand(grid, unit, grid, unit)
    rr = torch.arange(unit, dtype=torch.float32).view(1, unit, 1, 1).expand(grid, unit, grid, unit)
    cc = torch.arange(unit, dtype=torch.float32).view(1, 1, 1, unit).expand(grid, unit, grid, unit)
    img = torch.stack([idx, rr, cc]).reshape(3, grid * unit, grid * unit)
    return img.unsqueeze(0).expand(B, -1, -1, -1).clone()


def test_gather_places_each_kept_unit_in_block_order():
    B, grid, unit = 3, 8, 4
    m = UniformMasking((grid, grid))(B, torch.Generator().manual_seed(0))
    img = index_image(B, grid, unit)
    packed = gather_kept_units(img, m["keep_offset"], unit)  # (B, 3, 16, 16)
    assert packed.shape == (B, 3, grid // 2 * unit, grid // 2 * unit)
    keep_idx = blocks_to_grid(m["keep_offset"], (grid, grid))  # (B, 16)
    for b in range(B):
        for n in range(keep_idx.shape[1]):
            bi, bj = divmod(n, grid // 2)
            tile = packed[b, :, bi * unit:(bi + 1) * unit, bj * unit:(bj + 1) * unit]
            assert (tile[0] == keep_idx[b, n]).all()  # the right unit...
            assert torch.equal(tile[1], torch.arange(unit).float().view(-1, 1).expand(unit, unit))  # ...unrotated
            assert torch.equal(tile[2], torch.arange(unit).float().view(1, -1).expand(unit, unit))
            # the kept unit is inside its own 2x2 block
            r, c = divmod(int(keep_idx[b, n]), grid)
            assert r // 2 == bi and c // 2 == bj


def test_positions_are_original_coordinates():
    B, grid, r = 2, 8, 4  # r stem tokens per unit side
    m = UniformMasking((grid, grid))(B, torch.Generator().manual_seed(3))
    pos = um_positions(m["keep_offset"], (grid // 2, grid // 2), r)  # (B, 16, 16, 2)
    assert pos.shape == (B, grid // 2 * r, grid // 2 * r, 2)
    keep_idx = blocks_to_grid(m["keep_offset"], (grid, grid))
    for b in range(B):
        for n in range(keep_idx.shape[1]):
            bi, bj = divmod(n, grid // 2)
            ur, uc = divmod(int(keep_idx[b, n]), grid)
            tile = pos[b, bi * r:(bi + 1) * r, bj * r:(bj + 1) * r]  # (r, r, 2)
            assert torch.equal(tile[..., 0], (ur * r + torch.arange(r)).float().view(-1, 1).expand(r, r))
            assert torch.equal(tile[..., 1], (uc * r + torch.arange(r)).float().view(1, -1).expand(r, r))


def test_patchify_roundtrip_and_order():
    img = torch.randn(2, 3, 32, 48)
    p = patchify(img, 8)
    assert p.shape == (2, 4 * 6, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (4, 6)), img)
    # patch 7 = row 1, col 1; its first entry is pixel (8, 8) channel 0, then channel 1
    assert p[0, 7, 0] == img[0, 0, 8, 8] and p[0, 7, 1] == img[0, 1, 8, 8]


def test_upsample_units():
    m = torch.tensor([[True, False, False, True]])
    up = upsample_units(m, (2, 2), 3)
    assert up.shape == (1, 6, 6, 1)
    assert up[0, :3, :3].all() and not up[0, :3, 3:].any() and up[0, 3:, 3:].all()
