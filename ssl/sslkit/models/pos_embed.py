"""Fixed 2-D sin-cos position embeddings evaluated at arbitrary (possibly non-grid) coordinates.

UM-MAE gives every token the embedding of its *original* position, so the embedding is a function of
coordinates rather than a table indexed by the compacted order.
"""

from __future__ import annotations

import torch


def sincos_2d(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MAE-convention 2-D sin-cos embedding.

    Args:
        pos: (..., 2) float coordinates (row, col).
        dim: embedding dim, a multiple of 4. The first half encodes the column (w), the second the
            row (h), matching MAE's ``get_2d_sincos_pos_embed`` on a regular grid.
    Returns:
        (..., dim) float32 embedding.
    """
    assert dim % 4 == 0, f"sin-cos embedding dim must be a multiple of 4, got {dim}"
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=pos.device) / quarter
    omega = 1.0 / temperature**omega  # (D/4,)
    pos = pos.to(torch.float64)

    def enc(x: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., D/2)
        out = x[..., None] * omega
        return torch.cat([out.sin(), out.cos()], dim=-1)

    emb = torch.cat([enc(pos[..., 1]), enc(pos[..., 0])], dim=-1)
    return emb.to(torch.float32)


def grid_coords(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h, w, 2) float coordinates of a regular grid (row, col)."""
    r = torch.arange(h, dtype=torch.float32, device=device)
    c = torch.arange(w, dtype=torch.float32, device=device)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1)
