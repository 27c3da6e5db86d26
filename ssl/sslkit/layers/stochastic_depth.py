"""Efficient stochastic depth (sample-subset residual drop, as in DINOv2).

Classic DropPath computes the residual branch ``f`` for every sample and then multiplies the
dropped samples' output by zero -- the compute for dropped samples is wasted. The efficient
variant used by DINOv2 instead draws, per forward pass, a random subset of
``k = max(1, int(B * (1 - drop_rate)))`` samples, runs ``f`` **only on those rows** and adds the
result back with ``index_add`` scaled by ``B / k``::

    idx = randperm(B)[:k]                      # (sorted)
    out = f(x[idx])                            # k rows of compute instead of B
    y   = x.index_add(0, idx, out, alpha=B/k)  # out of place; dropped rows: y = x

In expectation over the draw this equals ``x + f(x)`` (each row is kept with probability k/B and
then scaled by B/k), exactly like DropPath with ``keep_prob = k/B``; the difference from timm's
DropPath is that exactly ``k`` rows are kept (no binomial variance in the batch's kept count) and
the dropped rows cost nothing in the forward *and* backward pass. In eval, or with
``drop_rate == 0``, the result is the plain residual ``x + f(x)``.

Requirements on ``branch``: it must act on each sample (row along dim 0) independently -- true for
ViT attention / MLP branches (attention mixes tokens *within* a sample, never across samples) --
and return a tensor of the same shape as its input. BatchNorm-style branches violate this and
must not be used here.

Public API
----------
- :func:`keep_count` -- ``k = max(1, int(B * (1 - drop_rate)))``.
- :func:`drop_add_residual` -- one tensor.
- :func:`drop_add_residual_grouped` -- a list of crop groups (e.g. DINOv2 global + local crops),
  independent subset per group, branch run once on the concatenated kept rows when the groups'
  per-sample shapes agree, else once per group.
- :class:`SDBlock` -- pre-norm ViT block (attention + MLP, optional LayerScale) whose two branches
  both use :func:`drop_add_residual`; parameter names match ``timm``'s ``vision_transformer.Block``
  (``qkv_bias=True``) so state dicts load either way with ``strict=True``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "keep_count",
    "drop_add_residual",
    "drop_add_residual_grouped",
    "LayerScale",
    "SDAttention",
    "SDMlp",
    "SDBlock",
]

Branch = Callable[[Tensor], Tensor]


def _check_rate(drop_rate: float) -> float:
    drop_rate = float(drop_rate)
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    return drop_rate


def keep_count(batch_size: int, drop_rate: float) -> int:
    """Number of rows whose branch is computed: ``max(1, int(B * (1 - drop_rate)))``.

    At least one row is always kept (so ``drop_rate == 1`` still computes one sample, scaled by B).
    """
    drop_rate = _check_rate(drop_rate)
    return max(1, int(batch_size * (1.0 - drop_rate)))


def _sample_keep_idx(
    batch_size: int, k: int, device: torch.device, generator: Optional[torch.Generator]
) -> Tensor:
    """Sorted indices of ``k`` distinct rows out of ``batch_size``, drawn uniformly."""
    gen_device = generator.device if generator is not None else device
    perm = torch.randperm(batch_size, generator=generator, device=gen_device)
    idx = perm[:k].sort().values  # sorted: better memory locality for the gather / index_add
    return idx.to(device, non_blocking=True)


def _check_out(out: Tensor, expected: torch.Size) -> None:
    if out.shape != expected:
        raise ValueError(
            f"residual branch must preserve the input shape: got {tuple(out.shape)} for input "
            f"{tuple(expected)}"
        )


def _add_subset(x: Tensor, idx: Tensor, out: Tensor, scale: float) -> Tensor:
    # Out of place: autograd gives x the identity gradient on every row and routes the kept rows'
    # gradient (times `scale`) into `out`. The cast keeps it valid under autocast (bf16 branch
    # output into an fp32 residual stream).
    return torch.index_add(x, 0, idx, out.to(x.dtype), alpha=scale)


def drop_add_residual(
    x: Tensor,
    branch: Branch,
    drop_rate: float,
    training: bool,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Residual ``x + branch(x)`` with efficient sample-subset stochastic depth.

    Args:
        x: ``(B, ...)`` input; rows along dim 0 are independent samples.
        branch: per-sample residual function, output shape == input shape.
        drop_rate: probability-like rate ``d`` in ``[0, 1]``.
        training: if False (or ``d == 0``) returns ``x + branch(x)`` on the whole batch.
        generator: optional RNG for the subset draw (its device is used for ``randperm``; the
            indices are then moved to ``x.device``). ``None`` uses the global RNG of ``x.device``.

    Returns:
        Training with ``d > 0``: ``x.index_add(0, idx, branch(x[idx]), alpha=B/k)`` where ``idx``
        are ``k = keep_count(B, d)`` sorted distinct rows. Rows not in ``idx`` are exactly ``x``
        and run no branch compute (forward or backward).
    """
    drop_rate = _check_rate(drop_rate)
    if not training or drop_rate == 0.0:
        out = branch(x)
        _check_out(out, x.shape)
        return x + out
    b = x.shape[0]
    k = keep_count(b, drop_rate)
    idx = _sample_keep_idx(b, k, x.device, generator)
    out = branch(x[idx])
    _check_out(out, torch.Size((k, *x.shape[1:])))
    return _add_subset(x, idx, out, b / k)


def _concat_compatible(xs: Sequence[Tensor]) -> bool:
    first = xs[0]
    return all(
        t.shape[1:] == first.shape[1:] and t.dtype == first.dtype and t.device == first.device
        for t in xs[1:]
    )


def drop_add_residual_grouped(
    xs: Sequence[Tensor],
    branch: Branch,
    drop_rate: float,
    training: bool,
    generator: Optional[torch.Generator] = None,
) -> list[Tensor]:
    """:func:`drop_add_residual` for a list of groups (e.g. crop groups of a multi-crop batch).

    Each group ``g`` draws its own subset (``B_g`` rows, ``k_g = keep_count(B_g, d)`` kept, scale
    ``B_g / k_g``); the draws happen in list order from ``generator`` (or the global RNG), so the
    kept indices are identical to calling :func:`drop_add_residual` on each group in turn with the
    same RNG state.

    Compute:
        - If all groups share the per-sample shape (``x.shape[1:]``), dtype and device, the branch
          runs ONCE on ``cat([x_g[idx_g] for g])`` (in eval / ``d == 0``: once on ``cat(xs)``) and
          the result is split back per group. Because the branch must be per-sample independent,
          this equals running it per group, but with one larger, better-utilised kernel call.
        - Otherwise (e.g. DINOv2 global crops with 197 tokens and local crops with 37 tokens, which
          cannot be stacked along the batch dimension) the branch runs once per group.

    Returns a list with one tensor per input group, shapes unchanged.
    """
    xs = list(xs)
    if not xs:
        return []
    drop_rate = _check_rate(drop_rate)
    if not _concat_compatible(xs):
        return [drop_add_residual(x, branch, drop_rate, training, generator) for x in xs]

    sizes = [x.shape[0] for x in xs]
    if not training or drop_rate == 0.0:
        cat = torch.cat(xs, dim=0) if len(xs) > 1 else xs[0]
        out = branch(cat)
        _check_out(out, cat.shape)
        return [x + o for x, o in zip(xs, out.split(sizes, dim=0))]

    idxs, ks = [], []
    for x in xs:
        k = keep_count(x.shape[0], drop_rate)
        idxs.append(_sample_keep_idx(x.shape[0], k, x.device, generator))
        ks.append(k)
    kept = torch.cat([x[i] for x, i in zip(xs, idxs)], dim=0)
    out = branch(kept)
    _check_out(out, kept.shape)
    return [
        _add_subset(x, i, o, b / k)
        for x, i, o, b, k in zip(xs, idxs, out.split(ks, dim=0), sizes, ks)
    ]


# --------------------------------------------------------------------------------------------
# ViT block
# --------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (parameter name ``gamma`` as in timm)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SDAttention(nn.Module):
    """Multi-head self-attention (``qkv``, ``proj``) via ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class SDMlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (timm ``Mlp`` parameter names)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SDBlock(nn.Module):
    """Pre-norm ViT block with efficient (sample-subset) stochastic depth on both branches.

    ``x = drop_add_residual(x, ls1(attn(norm1(.))), drop_path, training)`` followed by
    ``x = drop_add_residual(x, ls2(mlp(norm2(.))), drop_path, training)``; the two branches draw
    independent subsets. In eval (or with ``drop_path == 0``) this is numerically the same as
    ``timm.models.vision_transformer.Block(dim, num_heads, mlp_ratio, qkv_bias=True,
    init_values=init_values)``, and the state dicts are interchangeable (``strict=True``):
    ``norm1.*, attn.qkv.*, attn.proj.*, ls1.gamma, norm2.*, mlp.fc1.*, mlp.fc2.*, ls2.gamma``
    (``ls*`` only when ``init_values`` is set). LayerNorm eps is 1e-6 as in timm.

    ``forward`` takes an optional ``generator`` for reproducible subset draws; ``forward_list``
    runs a list of token groups (e.g. global and local crops) through the block with one subset
    draw per group, see :func:`drop_add_residual_grouped`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        init_values: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.drop_path = _check_rate(drop_path)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SDAttention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SDMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        x = drop_add_residual(x, self.attn_residual, self.drop_path, self.training, generator)
        x = drop_add_residual(x, self.mlp_residual, self.drop_path, self.training, generator)
        return x

    def forward_list(
        self, xs: Sequence[Tensor], generator: Optional[torch.Generator] = None
    ) -> list[Tensor]:
        xs = drop_add_residual_grouped(
            xs, self.attn_residual, self.drop_path, self.training, generator
        )
        return drop_add_residual_grouped(
            xs, self.mlp_residual, self.drop_path, self.training, generator
        )

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"
