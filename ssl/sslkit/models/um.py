"""Uniform-masking geometry shared by UM-MAE and its tests: gather kept units, original positions,
patchify. Masks come from ``sslkit.masking.UniformMasking`` (``keep_offset`` in block raster order).
"""

from __future__ import annotations

import torch


def gather_kept_units(images: torch.Tensor, keep_offset: torch.Tensor, unit: int) -> torch.Tensor:
    """Pack the kept unit of every 2x2 block into a half-resolution image, in block order.

    images: (B, C, H, W); keep_offset: (B, nb) in [0, 4) with nb = (H/2u)*(W/2u).
    Returns (B, C, H/2, W/2).
    """
    B, C, H, W = images.shape
    bh, bw = H // (2 * unit), W // (2 * unit)
    x = images.reshape(B, C, bh, 2, unit, bw, 2, unit)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(B, bh * bw, 4, C * unit * unit)  # (B, nb, 4, C*u*u)
    idx = keep_offset.view(B, bh * bw, 1, 1).expand(-1, -1, 1, C * unit * unit)
    x = x.gather(2, idx).view(B, bh, bw, C, unit, unit)  # (B, bh, bw, C, u, u)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, bh * unit, bw * unit)


def um_positions(keep_offset: torch.Tensor, block_grid: tuple[int, int], r: int) -> torch.Tensor:
    """Original (row, col) coordinates, in stem-token units, of every token of the compacted grid.

    keep_offset: (B, bh*bw); r: stem tokens per unit side. Returns (B, bh*r, bw*r, 2) float32.
    """
    B = keep_offset.shape[0]
    bh, bw = block_grid
    dev = keep_offset.device
    di = (keep_offset // 2).view(B, bh, 1, bw, 1).float()
    dj = (keep_offset % 2).view(B, bh, 1, bw, 1).float()
    bi = torch.arange(bh, device=dev, dtype=torch.float32).view(1, bh, 1, 1, 1)
    bj = torch.arange(bw, device=dev, dtype=torch.float32).view(1, 1, 1, bw, 1)
    ri = torch.arange(r, device=dev, dtype=torch.float32).view(1, 1, r, 1, 1)
    rj = torch.arange(r, device=dev, dtype=torch.float32).view(1, 1, 1, 1, r)
    row = (r * (2 * bi + di) + ri).expand(B, bh, r, bw, r)
    col = (r * (2 * bj + dj) + rj).expand(B, bh, r, bw, r)
    return torch.stack([row, col], dim=-1).reshape(B, bh * r, bw * r, 2)


def patchify(images: torch.Tensor, unit: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, u*u*C) in MAE order (row, col, channel inside each patch)."""
    B, C, H, W = images.shape
    h, w = H // unit, W // unit
    x = images.reshape(B, C, h, unit, w, unit).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, unit * unit * C)


def unpatchify(x: torch.Tensor, unit: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``: (B, L, u*u*C) -> (B, C, H, W)."""
    B = x.shape[0]
    h, w = grid
    x = x.reshape(B, h, w, unit, unit, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * unit, w * unit)


def upsample_units(m: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """(B, gh*gw) per-unit flags -> (B, gh*r, gw*r, 1) per-token flags (nearest)."""
    B = m.shape[0]
    gh, gw = grid
    return m.view(B, gh, 1, gw, 1, 1).expand(B, gh, r, gw, r, 1).reshape(B, gh * r, gw * r, 1)
