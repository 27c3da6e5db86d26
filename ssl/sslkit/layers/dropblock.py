"""DropBlock (Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018).

Two modes of :class:`DropBlock2d`:

``paper`` (default)
    One independent mask per (sample, channel), as in Algorithm 1 of the paper. Seeds are sampled
    only where the whole block fits, i.e. on the valid region ``(H - bh + 1) x (W - bw + 1)`` with
    ``bh = min(block_size, H)``, ``bw = min(block_size, W)``, at the rate (paper eq. 1, non-square)::

        gamma = (1 - keep_prob) / (bh * bw) * (H * W) / ((H - bh + 1) * (W - bw + 1))

    A seed at ``(i, j)`` of the valid region drops the block of rows ``i .. i+bh-1`` and columns
    ``j .. j+bw-1`` (top-left anchoring, used consistently for odd and even sizes: the block always lies
    fully inside the map). If ``block_size >= H`` and ``>= W`` there is a single seed position and the
    whole channel map is dropped with probability ``1 - keep_prob``. The output is
    ``x * mask * count / count_ones`` (``count`` = number of mask elements, ``count_ones`` = kept ones;
    all-dropped gives zeros).

``fast``
    One mask per sample shared by all channels (``groups=1``) or by each of ``groups`` contiguous channel
    groups, same gamma.

Speed. Seeds are sparse (gamma ~ 1e-3..1e-2), so nothing of size ``N*C*H*W`` is ever max-pooled or
even drawn at random: the seed positions of the Bernoulli(gamma) process on the flattened valid region
are sampled exactly from geometric inter-arrival gaps (``O(#seeds)`` random numbers), and the blocks are
painted by one ``index_fill_`` of the ``bh*bw`` offsets of every seed into a 0/1 mask of ones built
directly in ``x.dtype``. The only full-size passes are the mask fill, its sum (for ``count_ones``) and
one ``addcmul`` computing ``x * mask * scale``; the backward is one ``addcmul`` ``grad * mask * scale``
with the saved mask, nothing recomputed. (A float mask multiplies faster on CPU than a bool one, which
pays a dtype promotion.) In ``fast`` mode the mask is only N*G*H*W: when there are fewer than
``_DENSE_TRIALS`` seed positions they are drawn densely and painted with one small max-pool (fewer
kernel launches than the sparse path), the count/count_ones scale is folded into the mask and the
output is a plain broadcast multiply, like ``nn.Dropout2d``. Measurements against
timm's DropBlock2d and Dropout2d: ``sslkit/bench/dropblock.py``.

The training loop's schedule sets ``module.drop_prob`` every step (see :func:`dropblock_drop_prob`);
it is a plain float read at forward time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DropBlock2d", "dropblock_drop_prob", "dropblock_gamma", "drop_block_2d"]


def dropblock_drop_prob(step: int, total_steps: int, target_drop_prob: float,
                        warmup_steps: int | None = None) -> float:
    """Drop probability at ``step`` for the paper's linear schedule.

    ``keep_prob`` ramps linearly from 1.0 (step 0) to ``1 - target_drop_prob`` over the whole run
    (``step == total_steps``), or, with ``warmup_steps``, over the warm-up only and then stays constant.
    Returns ``1 - keep_prob``.
    """
    if not 0.0 <= target_drop_prob <= 1.0:
        raise ValueError(f"target_drop_prob must be in [0, 1], got {target_drop_prob}")
    ramp = total_steps if warmup_steps is None else warmup_steps
    if ramp <= 0:
        return float(target_drop_prob)
    frac = min(max(step, 0), ramp) / ramp
    keep = 1.0 - frac * target_drop_prob
    return float(1.0 - keep)


def dropblock_gamma(drop_prob: float, block_size: int, height: int, width: int) -> float:
    """Seed rate of the paper (eq. 1), generalised to non-square maps and clipped block sizes (<= 1)."""
    bh, bw = min(block_size, height), min(block_size, width)
    valid = (height - bh + 1) * (width - bw + 1)
    return min(1.0, drop_prob / (bh * bw) * (height * width) / valid)


def _bernoulli_positions(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Sorted indices of the successes of ``n`` i.i.d. Bernoulli(p) trials, in O(#successes).

    Exact: the gaps between successive successes of a Bernoulli process are i.i.d. Geometric(p)
    (``Tensor.geometric_`` counts trials up to and including the success), so the cumulative sums of
    geometric draws are the success positions. float64 keeps the positions exact up to 2**53.
    """
    if p <= 0.0 or n <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if p >= 1.0:
        return torch.arange(n, device=device)
    mean = n * p
    k = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)
    chunks, start = [], -1.0
    while True:
        pos = torch.empty(k, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).add_(start)
        chunks.append(pos)
        last = float(pos[-1])
        if last >= n:
            break
        start, k = last, int((n - last) * p * 1.5) + 16  # rare: ran out of draws before the end
    pos = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return pos[pos < n].long()


_DENSE_TRIALS = 1 << 15  # below this many seed positions, draw them densely instead of by geometric gaps


def _paint_dense(seeds: torch.Tensor, bh: int, bw: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, hv, wv) bool seeds on the valid region -> (P, hv+bh-1, wv+bw-1) mask, 0 in every seed's block."""
    s = seeds.to(dtype).unsqueeze(1)  # (P, 1, hv, wv)
    # pixel (r, c) is dropped iff a seed lies in rows r-bh+1..r, cols c-bw+1..c (top-left anchoring)
    hit = F.max_pool2d(F.pad(s, (bw - 1, bw - 1, bh - 1, bh - 1)), (bh, bw), stride=1)  # (P, 1, H, W)
    return (1.0 - hit).squeeze(1)


def _block_mask(planes: int, height: int, width: int, block_size: int, drop_prob: float,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(planes, H, W) mask of ones with the dropped blocks set to 0; each plane independent."""
    bh, bw = min(block_size, height), min(block_size, width)
    hv, wv = height - bh + 1, width - bw + 1
    gamma = dropblock_gamma(drop_prob, block_size, height, width)
    if planes * hv * wv <= _DENSE_TRIALS:  # few trials (fast mode): a dense draw + pooling is fewer ops
        return _paint_dense(torch.rand(planes, hv, wv, device=device) < gamma, bh, bw, dtype)
    seeds = _bernoulli_positions(planes * hv * wv, gamma, device)
    mask = torch.ones(planes * height * width, dtype=dtype, device=device)
    if seeds.numel():
        plane, r = seeds.div(hv * wv, rounding_mode="floor"), seeds.remainder(hv * wv)
        i, j = r.div(wv, rounding_mode="floor"), r.remainder(wv)
        base = plane.mul_(height * width).add_(i.mul_(width)).add_(j)  # flat index of the block's top-left
        offs = (torch.arange(bh, device=device)[:, None] * width + torch.arange(bw, device=device)[None, :])
        mask.index_fill_(0, (base[:, None] + offs.view(1, -1)).view(-1), 0)
    return mask.view(planes, height, width)


class _ApplyMask(torch.autograd.Function):
    """``x * mask * scale`` in one pass (``addcmul``); backward ``grad * mask * scale`` with the saved 0/1 mask
    (never recomputed, no grad for the mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.scale = scale
        if scale == 1.0:  # nothing dropped -> plain 2-operand mul
            return x * mask
        return torch.addcmul(x.new_zeros(()), x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if ctx.scale == 1.0:
            return grad * mask, None, None
        return torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.scale), None, None


def drop_block_2d(x: torch.Tensor, drop_prob: float, block_size: int, mode: str = "paper",
                  groups: int = 1) -> torch.Tensor:
    """Functional DropBlock on a (N, C, H, W) tensor (always applies; no train/eval logic)."""
    if drop_prob <= 0.0:
        return x
    n, c, h, w = x.shape
    if mode == "paper":
        planes, view, mview = n * c, (n, c, h, w), (n, c, h, w)
    elif mode == "fast":
        if c % groups:
            raise ValueError(f"channels ({c}) not divisible by groups ({groups})")
        planes = n * groups
        view, mview = ((n, c, h, w), (n, 1, h, w)) if groups == 1 else \
            ((n, groups, c // groups, h, w), (n, groups, 1, h, w))
    else:
        raise ValueError(f"mode must be 'paper' or 'fast', got {mode!r}")
    with torch.no_grad():
        mask = _block_mask(planes, h, w, block_size, drop_prob, x.dtype, x.device)
        ones = float(mask.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))
        scale = mask.numel() / ones if ones > 0 else 0.0  # count / count_ones; all dropped -> zeros
        if mode == "fast":  # the mask is small: scale it here, then a plain broadcast mul like Dropout2d
            mask.mul_(scale)
    if mode == "fast":
        return (x.reshape(view) * mask.view(mview)).view(n, c, h, w)  # (N, C, H, W) * (N, 1, H, W)
    return _ApplyMask.apply(x.reshape(view), mask.view(mview), scale).view(n, c, h, w)


class DropBlock2d(nn.Module):
    """DropBlock on (N, C, H, W) feature maps; identity in eval mode and at ``drop_prob == 0``.

    Args:
        drop_prob: ``1 - keep_prob``; a plain float attribute read at every forward (schedules set it).
        block_size: side of the square block (clipped to the map's sides).
        mode: ``"paper"`` (independent mask per sample and channel) or ``"fast"`` (one mask per sample
            shared across channels, or per contiguous channel group with ``groups > 1``).
        groups: number of channel groups for ``mode="fast"``.
    """

    def __init__(self, drop_prob: float, block_size: int, mode: str = "paper", groups: int = 1) -> None:
        super().__init__()
        if mode not in ("paper", "fast"):
            raise ValueError(f"mode must be 'paper' or 'fast', got {mode!r}")
        if block_size < 1 or groups < 1:
            raise ValueError("block_size and groups must be >= 1")
        if mode == "paper" and groups != 1:
            raise ValueError("groups only applies to mode='fast'")
        self.drop_prob = float(drop_prob)
        self.block_size = int(block_size)
        self.mode = mode
        self.groups = int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.drop_prob)
        if not self.training or p <= 0.0:
            return x
        if p > 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {p}")
        return drop_block_2d(x, p, self.block_size, self.mode, self.groups)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}, mode={self.mode!r}, groups={self.groups}"
