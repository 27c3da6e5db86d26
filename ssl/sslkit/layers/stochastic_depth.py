"""Stochastic depth for residual branches: efficient sample-subset drop (as in DINOv2), dense and packed.

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

Requirements on ``branch``: it must act on each sample independently -- true for ViT attention / MLP
branches (attention mixes tokens *within* a sample, never across samples) -- and return a tensor of the
same shape as its input. BatchNorm-style branches violate this and must not be used here.

Public API
----------
- :func:`keep_count` -- ``k = max(1, int(B * (1 - drop_rate)))``.
- :func:`sample_keep` -- the subset draw: ``k`` sorted distinct row ids (``randperm``).
- :func:`drop_add_residual` -- dense ``(B, ...)`` tensor, rows = samples.
- :func:`drop_add_residual_packed` -- packed multi-group ``(T, C)`` token matrix
  (:mod:`sslkit.layers.packing`, e.g. DINOv2 global + local crops): per group its own subset, the branch
  runs once on the kept samples' tokens of all groups.
- :func:`drop_path_residual_packed` -- timm's ``DropPath`` (per-sample Bernoulli mask / keep_prob, branch
  computed for every sample) on a packed matrix, for comparison; the dense counterpart is
  ``timm.layers.drop_path``.

Used by :class:`sslkit.models.vit.PackedBlock` (``drop_path_mode="efficient"`` / ``"mask"``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from sslkit.layers.packing import PackLayout, token_rows

__all__ = [
    "keep_count",
    "sample_keep",
    "drop_add_residual",
    "drop_add_residual_packed",
    "drop_path_residual_packed",
]

Branch = Callable[[Tensor], Tensor]  # (B, ...) -> (B, ...)
PackedBranch = Callable[[Tensor, PackLayout], Tensor]  # ((T, C), layout) -> (T, C)


def _check_rate(drop_rate: float) -> float:
    drop_rate = float(drop_rate)
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    return drop_rate


def _check_out(out: Tensor, expected: torch.Size) -> None:
    if out.shape != expected:
        raise ValueError(
            f"residual branch must preserve the input shape: got {tuple(out.shape)} for input {tuple(expected)}"
        )


def keep_count(batch_size: int, drop_rate: float) -> int:
    """Number of rows whose branch is computed: ``max(1, int(B * (1 - drop_rate)))``.

    At least one row is always kept (so ``drop_rate == 1`` still computes one sample, scaled by B).
    """
    drop_rate = _check_rate(drop_rate)
    return max(1, int(batch_size * (1.0 - drop_rate)))


def sample_keep(
    batch_size: int, k: int, device: torch.device, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Sorted ids of ``k`` distinct rows out of ``batch_size``, drawn uniformly: ``randperm(B)[:k]``.

    ``randperm`` runs on ``generator``'s device (``None``: the global RNG of ``device``); the ids are then
    moved to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    perm = torch.randperm(batch_size, generator=generator, device=gen_device)
    idx = perm[:k].sort().values  # (k,) sorted: better memory locality for the gather / index_add
    return idx.to(device, non_blocking=True)


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
        drop_rate: rate ``d`` in ``[0, 1]``.
        training: if False (or ``d == 0``) returns ``x + branch(x)`` on the whole batch.
        generator: optional RNG for the subset draw (see :func:`sample_keep`).

    Returns:
        Training with ``d > 0``: ``x.index_add(0, idx, branch(x[idx]), alpha=B/k)`` where ``idx``
        are ``k = keep_count(B, d)`` sorted distinct rows (drawn even when ``k == B``). Rows not in
        ``idx`` are exactly ``x`` and run no branch compute (forward or backward).
    """
    drop_rate = _check_rate(drop_rate)
    if not training or drop_rate == 0.0:
        out = branch(x)
        _check_out(out, x.shape)
        return x + out
    b = x.shape[0]
    k = keep_count(b, drop_rate)
    idx = sample_keep(b, k, x.device, generator)  # (k,)
    out = branch(x[idx])  # (k, ...)
    _check_out(out, torch.Size((k, *x.shape[1:])))
    # Out of place: x gets the identity gradient on every row, the kept rows' gradient (times B/k) goes
    # into `out`. The cast keeps it valid under autocast (bf16 branch output, fp32 residual stream).
    return torch.index_add(x, 0, idx, out.to(x.dtype), alpha=b / k)


def drop_add_residual_packed(
    x: Tensor,
    layout: PackLayout,
    branch: PackedBranch,
    drop_rate: float,
    training: bool,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """:func:`drop_add_residual` for a packed ``(T, C)`` matrix of several groups (see ``layout``).

    Each group ``g`` draws its own subset of ``k_g = keep_count(B_g, d)`` samples, in group order from
    ``generator`` (or the global RNG of ``x.device``): the same ids as :func:`drop_add_residual` on each
    group's ``(B_g, N_g, C)`` tensor in turn with the same RNG. The kept samples' tokens of all groups are
    gathered into one packed matrix with layout ``[(k_g, N_g)]``, ``branch(x_kept, kept_layout)`` runs
    once on it, and its output is added back with ``index_add`` scaled by ``B_g / k_g``. If every group
    keeps all its samples (tiny groups, ``k_g == B_g``) nothing is drawn and the result is
    ``x + branch(x, layout)``; likewise in eval or with ``d == 0``.

    ``branch((T', C), layout') -> (T', C)`` must be per-sample independent under ``layout'``.
    """
    drop_rate = _check_rate(drop_rate)
    if not training or drop_rate == 0.0:
        return x + branch(x, layout)  # (T, C)
    ks = [keep_count(b, drop_rate) for b, _ in layout.shapes]
    if all(k == b for k, (b, _) in zip(ks, layout.shapes)):  # tiny groups: nothing to drop
        return x + branch(x, layout)
    idxs = [sample_keep(b, k, x.device, generator) for k, (b, _) in zip(ks, layout.shapes)]  # [(k_g,)]
    rows, kept = token_rows(layout, idxs)  # (T_k,), [(k_g, N_g)]
    out = branch(x.index_select(0, rows), kept)  # (T_k, C): compute on kept samples only
    _check_out(out, torch.Size((rows.numel(), *x.shape[1:])))
    scales = [b / k for k, (b, _) in zip(ks, layout.shapes)]
    if len(set(scales)) > 1:  # per-group B_g / k_g, repeated over the group's kept tokens
        s = torch.cat([out.new_full((k * n, 1), sc) for sc, (k, n) in zip(scales, kept.shapes)])  # (T_k, 1)
        out, alpha = out * s, 1.0  # (T_k, C)
    else:
        alpha = scales[0]
    return torch.index_add(x, 0, rows, out.to(x.dtype), alpha=alpha)  # (T, C), dropped rows: exactly x


def drop_path_residual_packed(
    x: Tensor, layout: PackLayout, branch: PackedBranch, drop_rate: float, training: bool
) -> Tensor:
    """timm ``DropPath`` on a packed matrix: ``x + branch(x, layout) * mask``.

    ``mask`` is one Bernoulli(keep_prob) / keep_prob per sample (``keep_prob = 1 - d``), repeated over
    its tokens; drawn as ``(B_g, 1, 1)`` per group in group order from the global RNG, like
    ``timm.layers.drop_path`` on each group's ``(B_g, N_g, C)`` tensor. The branch runs on every sample.
    In eval or with ``d == 0``: ``x + branch(x, layout)``.
    """
    drop_rate = _check_rate(drop_rate)
    out = branch(x, layout)  # (T, C)
    if not training or drop_rate == 0.0:
        return x + out
    keep_prob = 1.0 - drop_rate
    masks = []
    for b, n in layout.shapes:
        m = x.new_empty(b, 1, 1).bernoulli_(keep_prob)  # (B_g, 1, 1)
        if keep_prob > 0.0:
            m.div_(keep_prob)
        masks.append(m.expand(b, n, 1).reshape(b * n, 1))  # (B_g*N_g, 1)
    return x + out * (masks[0] if len(masks) == 1 else torch.cat(masks))  # (T, C) * (T, 1)
