"""Packed ("nested") token matrices: several groups of sequences with different token counts in one ``(T, C)``.

Group ``g`` holds ``B_g`` sequences of ``N_g`` tokens (e.g. DINOv2: 2B global crops of 197 tokens and 8B
local crops of 37 tokens); their tokens are flattened sample-major and concatenated, ``T = sum_g B_g * N_g``.
Token-wise ops then run once on the whole matrix; ops that mix tokens (attention) split it by
:class:`PackLayout`.

- :class:`PackLayout` -- ``((B_g, N_g), ...)`` plus sizes / offsets / total.
- :func:`pack_groups` / :func:`unpack_groups` -- ``[(B_g, N_g, C)] <-> (T, C)``.
- :func:`token_rows` -- packed row index of all tokens of chosen samples of each group (and their layout),
  used by sample-subset stochastic depth (:func:`sslkit.layers.stochastic_depth.drop_add_residual_packed`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["PackLayout", "pack_groups", "unpack_groups", "token_rows"]


class PackLayout(NamedTuple):
    """Layout of a packed ``(T, C)`` token matrix: group ``g`` holds ``B_g`` sequences of ``N_g``
    tokens in rows ``[offsets[g], offsets[g] + B_g * N_g)``, sample-major (sample ``i``'s tokens are
    the contiguous rows ``offsets[g] + i * N_g + [0, N_g)``)."""

    shapes: tuple[tuple[int, int], ...]  # ((B_g, N_g), ...)

    @property
    def sizes(self) -> list[int]:
        return [b * n for b, n in self.shapes]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return out

    @property
    def total(self) -> int:
        return sum(self.sizes)


def pack_groups(xs: Sequence[Tensor]) -> tuple[Tensor, PackLayout]:
    """``[(B_g, N_g, C)] -> ((T, C), layout)`` with ``T = sum_g B_g * N_g`` (one copy)."""
    if not xs:
        raise ValueError("pack_groups: need at least one group")
    c = xs[0].shape[-1]
    for x in xs:
        if x.ndim != 3 or x.shape[-1] != c or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"pack_groups: expected non-empty (B, N, {c}) groups, got {tuple(x.shape)}")
    layout = PackLayout(tuple((int(x.shape[0]), int(x.shape[1])) for x in xs))
    flat = [x.reshape(-1, c) for x in xs]  # (B_g*N_g, C) views
    return (flat[0] if len(flat) == 1 else torch.cat(flat, dim=0)), layout  # (T, C)


def unpack_groups(x: Tensor, layout: PackLayout) -> list[Tensor]:
    """``(T, C) -> [(B_g, N_g, C)]`` (views of ``x``)."""
    if x.shape[0] != layout.total:
        raise ValueError(f"unpack_groups: {x.shape[0]} rows for a layout of {layout.total} tokens")
    return [t.view(b, n, x.shape[-1]) for t, (b, n) in zip(x.split(layout.sizes, dim=0), layout.shapes)]


def token_rows(layout: PackLayout, sample_idx: Sequence[Tensor]) -> tuple[Tensor, PackLayout]:
    """Rows of the tokens of samples ``sample_idx[g]`` (``(k_g,)`` sample ids within group ``g``) in the
    packed matrix, group after group, in the given sample order; and the layout ``[(k_g, N_g)]`` of
    ``x.index_select(0, rows)``."""
    rows = []
    for (_, n), idx, off in zip(layout.shapes, sample_idx, layout.offsets):
        rows.append((off + idx[:, None] * n + torch.arange(n, device=idx.device)).reshape(-1))  # (k_g*N_g,)
    out = rows[0] if len(rows) == 1 else torch.cat(rows)  # (T_k,)
    return out, PackLayout(tuple((int(idx.numel()), n) for idx, (_, n) in zip(sample_idx, layout.shapes)))
