"""One mask vocabulary, generated in the data collate (in the workers), never in the training step.

Polarity is in the names: ``masked`` is True where a patch is *removed / hidden*, ``keep`` is True
where it stays visible. All generators take an explicit ``torch.Generator`` so that a batch's masks
depend only on (seed, batch index): reproducible across workers and across resume.

Masks live on the *unit grid*: the grid of ``unit``-pixel patches (16 px for a 256-px pyramid ViT
whose final stride is 32). Generators return a dict of batch tensors; the collate merges it into the
batch dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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


class _Uniforms:
    """Uniform [0, 1) floats from a ``torch.Generator``, drawn in chunks (one torch call per 256)."""

    def __init__(self, generator: torch.Generator, chunk: int = 256) -> None:
        self.generator, self.chunk = generator, chunk
        self._buf: list[float] = []
        self._pos = 0

    def __call__(self) -> float:
        if self._pos == len(self._buf):
            self._buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self()

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (both inclusive)."""
        return min(hi, lo + int(self() * (hi - lo + 1)))


@dataclass
class BlockMasking:
    """iBOT / BEiT block masks for the ``n_global`` global crops (DINOv2's masking collate).

    Per batch of B images there are ``n_rows = n_global * B`` global crops (rows view-major like the
    loader's ``global_crops``: row ``v * B + b`` = crop v of sample b). ``n_masked =
    int(n_rows * mask_probability)`` of them get a block mask, the others none; which rows is a random
    permutation. The masked rows' targets are stratified: with edges ``linspace(ratio[0], ratio[1],
    n_masked + 1)``, the i-th masked row targets ``int(N * uniform(edges[i], edges[i+1]))`` of the
    ``N = gh * gw`` patches.

    A mask is built BEiT-style: rectangles are placed one after another, each with an area uniform in
    [``min_patches``, min(``max_patches``, patches still missing)] and an aspect ratio log-uniform in
    ``aspect`` (up to 10 attempts per rectangle; an attempt is rejected when the rectangle does not
    fit the grid, covers nothing new or would overshoot the target). Only newly covered patches
    count, and building stops when the target is reached or a rectangle fails all 10 attempts. So the
    masked count never exceeds the target but may end slightly below it (typically when the few
    patches still missing cannot be covered by a rectangle that fits around the existing mask).
    As in BEiT / DINOv2, a rectangle is strictly smaller than the grid in both directions (h < gh, w < gw):
    with full-span rectangles allowed, border patches were masked ~1.4% more often than by the reference
    (docs/parity.md).

    All randomness comes from the ``torch.Generator`` passed to ``__call__``.

    Returns ``{"masked": (n_global * B, gh * gw) bool}``, True where the patch is hidden (replaced by
    the mask token in the student).
    """

    grid: tuple[int, int]
    n_global: int = 2
    mask_probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    min_patches: int = 4
    max_patches: Optional[int] = None  # largest rectangle, in patches; None = half the grid
    aspect: tuple[float, float] = (0.3, 1.0 / 0.3)
    attempts: int = 10  # tries per rectangle

    def __post_init__(self) -> None:
        self.grid = _check_grid(self.grid, even=False)
        N = self.grid[0] * self.grid[1]
        if int(self.n_global) < 1:
            raise ConfigError(f"method.view.n_global must be >= 1 for block masking, got {self.n_global}")
        self.n_global = int(self.n_global)
        if not 0.0 <= float(self.mask_probability) <= 1.0:
            raise ConfigError(f"method.mask_probability must be in [0, 1], got {self.mask_probability}")
        self.mask_probability = float(self.mask_probability)
        r0, r1 = (float(r) for r in self.ratio)
        if not 0.0 <= r0 <= r1 <= 1.0:
            raise ConfigError(f"method.mask_ratio must be (min, max) with 0 <= min <= max <= 1, got {tuple(self.ratio)}")
        self.ratio = (r0, r1)
        if self.max_patches is None:
            self.max_patches = max(1, N // 2)
        self.min_patches, self.max_patches = int(self.min_patches), int(self.max_patches)
        if not 1 <= self.min_patches <= self.max_patches:
            raise ConfigError(
                f"method.mask_min_patches must be in [1, max_patches={self.max_patches}] (the largest rectangle, "
                f"default half of the {self.grid[0]}x{self.grid[1]} grid), got {self.min_patches}"
            )
        a0, a1 = (float(a) for a in self.aspect)
        if not 0.0 < a0 <= a1:
            raise ConfigError(f"block mask aspect must be (min, max) with 0 < min <= max, got {tuple(self.aspect)}")
        self.aspect = (a0, a1)
        self._log_aspect = (math.log(a0), math.log(a1))
        if int(self.attempts) < 1:
            raise ConfigError(f"block mask attempts must be >= 1, got {self.attempts}")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def num_masked_rows(self, batch_size: int) -> int:
        """How many of the ``n_global * batch_size`` rows get a mask."""
        return int(self.n_global * batch_size * self.mask_probability)

    def targets(self, n_masked: int, rng: _Uniforms) -> list[int]:
        """Stratified target patch counts of the ``n_masked`` masked rows (ascending strata)."""
        N, (r0, r1) = self.num_patches, self.ratio
        edges = [r0 + (r1 - r0) * i / n_masked for i in range(n_masked + 1)] if n_masked else []
        return [int(N * rng.uniform(edges[i], edges[i + 1])) for i in range(n_masked)]

    def block_mask(self, target: int, generator: torch.Generator) -> torch.Tensor:
        """One (gh, gw) bool mask with at most ``target`` (and usually exactly ``target``) patches."""
        return self._block_mask(target, _Uniforms(generator))[0]

    def _block_mask(self, target: int, rng: _Uniforms) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """(mask (gh, gw) bool, the placed rectangles as (top, left, h, w)): the BEiT procedure."""
        gh, gw = self.grid
        mask = torch.zeros(gh, gw, dtype=torch.bool)
        rects: list[tuple[int, int, int, int]] = []
        count = 0
        while count < target:
            room = min(target - count, self.max_patches)  # most new patches this rectangle may add
            delta = 0
            for _ in range(self.attempts):
                area = rng.uniform(self.min_patches, room)  # (room < min_patches: area in [room, min])
                aspect = math.exp(rng.uniform(*self._log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if not (1 <= h < gh and 1 <= w < gw):  # strictly inside the grid, as the reference
                    continue
                top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                block = mask[top : top + h, left : left + w]  # (h, w) view
                new = h * w - int(block.sum())
                if 0 < new <= room:
                    block.fill_(True)
                    rects.append((top, left, h, w))
                    delta = new
                    break
            if delta == 0:
                break  # no progress: end slightly below the target
            count += delta
        return mask, rects

    def __call__(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        n_rows = self.n_global * batch_size
        n_masked = self.num_masked_rows(batch_size)
        rng = _Uniforms(generator)
        masked = torch.zeros(n_rows, self.num_patches, dtype=torch.bool)  # (n_global*B, N)
        rows = torch.randperm(n_rows, generator=generator)[:n_masked].tolist()  # which rows get a mask
        for row, target in zip(rows, self.targets(n_masked, rng)):
            masked[row] = self._block_mask(target, rng)[0].view(-1)  # (N,)
        return {"masked": masked}
