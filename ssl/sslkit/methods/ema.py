"""Exponential moving average of a module's parameters (EMA teacher, EMA of weights in fine-tuning)."""

from __future__ import annotations

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter: an EMA copy never receives gradients."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` for every parameter (matched by name);
    buffers are copied. Both modules must have the same parameter names and shapes."""
    tgt = dict(target.named_parameters())
    src = dict(source.named_parameters())
    if tgt.keys() != src.keys():
        raise RuntimeError(f"EMA target and source differ: {sorted(tgt.keys() ^ src.keys())[:6]}")
    names = list(tgt)
    t = [tgt[n] for n in names]
    s = [src[n].detach().to(tgt[n].dtype) for n in names]
    torch._foreach_lerp_(t, s, 1.0 - float(momentum))  # t + (1 - m) (s - t) = m t + (1 - m) s
    for (_, bt), (_, bs) in zip(target.named_buffers(), source.named_buffers()):
        bt.copy_(bs)
