"""One mask vocabulary, generated in the data collate (in the workers), never in the training step.

Polarity is in the names: ``masked`` is True where a patch is *removed / hidden*, ``keep`` is True
where it stays visible. All generators take an explicit ``torch.Generator`` so that a batch's masks
depend only on (seed, batch index): reproducible across workers and across resume.

Masks live on the *unit grid*: the grid of ``unit``-pixel patches (16 px for a 256-px pyramid ViT
whose final stride is 32). Generators return a dict of batch tensors; the collate merges it into the
batch dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslkit.errors import ConfigError


def _check_grid(grid: tuple[int, int], even: bool) -> tuple[int, int]:
    gh, gw = int(grid[0]), int(grid[1])
    if gh <= 0 or gw <= 0:
        raise ConfigError(f"mask grid must be positive, got {grid}")
    if even and (gh % 2 or gw % 2):
        raise ConfigError(
            f"uniform masking needs an even unit grid, got {gh}x{gw}: choose data.image_size and "
            f"method.unit so that image_size / unit is even (e.g. 256 px with unit 16, 64 px with unit 8)"
        )
    return gh, gw


@dataclass
class UniformMasking:
    """UM-MAE Uniform Sampling + Secondary Masking.

    Uniform sampling keeps exactly one unit of every non-overlapping 2x2 block (25% kept). The kept
    position of each block (0=top-left, 1=top-right, 2=bottom-left, 3=bottom-right) is drawn from a
    shuffled balanced pool, so every position is used equally often per image (exactly when the
    number of blocks is a multiple of 4; the official code takes half of a 2x pool, which is only
    balanced on average).

    Secondary masking hides ``secondary_ratio`` of the kept units (chosen at random per image) behind
    a learned token; those units stay in the encoder input. The count per image is
    ``n_blocks - int(n_blocks * (1 - secondary_ratio))`` (the official rounding).

    Returns:
        ``masked``: (B, gh*gw) bool, True where the unit is removed (75%).
        ``keep_offset``: (B, gh//2 * gw//2) int64 in [0, 4), the kept position of each block in
            block raster order (the compacted order).
        ``sm_masked``: (B, gh//2 * gw//2) bool, True where a kept unit is hidden by the secondary
            mask, in compacted order.
    """

    grid: tuple[int, int]
    secondary_ratio: float = 0.25

    def __post_init__(self) -> None:
        self.grid = _check_grid(self.grid, even=True)
        if not 0.0 <= self.secondary_ratio < 1.0:
            raise ConfigError(f"method.secondary_mask_ratio must be in [0, 1), got {self.secondary_ratio}")

    @property
    def num_blocks(self) -> int:
        return (self.grid[0] // 2) * (self.grid[1] // 2)

    @property
    def num_secondary(self) -> int:
        n = self.num_blocks
        return n - int(n * (1.0 - self.secondary_ratio))

    def __call__(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        gh, gw = self.grid
        n = self.num_blocks
        pool = torch.arange(4).repeat((n + 3) // 4)[: (n + 3) // 4 * 4]  # balanced pool of positions
        offsets = torch.empty(batch_size, n, dtype=torch.long)
        for b in range(batch_size):
            perm = torch.randperm(pool.numel(), generator=generator)
            offsets[b] = pool[perm[:n]]
        # (B, n) offsets -> (B, gh, gw) masked grid
        onehot = torch.nn.functional.one_hot(offsets, 4).bool()  # (B, n, 4): True at the kept position
        keep = onehot.view(batch_size, gh // 2, gw // 2, 2, 2).permute(0, 1, 3, 2, 4)  # (B, gh/2, 2, gw/2, 2)
        masked = ~keep.reshape(batch_size, gh * gw)
        n_sm = self.num_secondary
        sm_masked = torch.zeros(batch_size, n, dtype=torch.bool)
        if n_sm > 0:
            scores = torch.rand(batch_size, n, generator=generator)
            idx = scores.argsort(dim=1)[:, :n_sm]
            sm_masked.scatter_(1, idx, True)
        return {"masked": masked, "keep_offset": offsets, "sm_masked": sm_masked}


@dataclass
class RandomMasking:
    """SimMIM-style random masking: exactly ``int(ratio * gh * gw)`` units removed per image.

    Returns ``masked``: (B, gh*gw) bool, True where the unit is hidden behind the mask token.
    """

    grid: tuple[int, int]
    ratio: float = 0.75

    def __post_init__(self) -> None:
        self.grid = _check_grid(self.grid, even=False)
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.ratio}")

    def __call__(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        L = self.grid[0] * self.grid[1]
        n_masked = int(self.ratio * L)
        scores = torch.rand(batch_size, L, generator=generator)
        idx = scores.argsort(dim=1)[:, :n_masked]
        masked = torch.zeros(batch_size, L, dtype=torch.bool)
        masked.scatter_(1, idx, True)
        return {"masked": masked}


def blocks_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Block-raster (compacted) order -> unit-grid raster index of each kept unit.

    ``x``: (B, n) keep offsets in [0, 4). Returns (B, n) int64 unit indices in the full grid.
    """
    gh, gw = grid
    B, n = x.shape
    bi = torch.arange(n, device=x.device) // (gw // 2)  # block row
    bj = torch.arange(n, device=x.device) % (gw // 2)  # block col
    r = 2 * bi + x // 2  # (B, n)
    c = 2 * bj + x % 2
    return r * gw + c
