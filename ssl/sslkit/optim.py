"""AdamW with param groups: no weight decay on norms / biases / tokens, optional layer-wise lr decay.

Each group carries ``lr_scale`` and ``wd_scale``; the loop multiplies the scheduled lr / wd by them,
so schedules stay pure functions of the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslkit.errors import ConfigError

_NO_WD_SUFFIXES = ("token", "pos_embed", "gamma", "logit_scale")


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer index per parameter from the backbone's timm ``group_matcher``; other params get the top."""
    from timm.models import group_parameters

    backbone = getattr(model, "backbone", model)
    prefix = next((p for p, m in model.named_modules() if m is backbone), "")
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise ConfigError(f"optim.layer_decay < 1 needs a backbone with group_matcher(); {type(backbone).__name__} has none")
    layer_map = group_parameters(backbone, matcher(coarse=False), reverse=True)
    full = {(f"{prefix}.{n}" if prefix else n): i for n, i in layer_map.items()}
    outside = any(n not in full for n, p in model.named_parameters() if p.requires_grad)  # decoder, heads, tokens (not frozen EMA copies)
    num_layers = max(layer_map.values()) + (2 if outside else 1)  # outside params form the top layer
    return full, num_layers


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 lr_mult: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Groups by (layer, decay?, lr multiplier). ``lr_mult`` maps a name substring (e.g. ``patch_embed``)
    to an extra lr factor; a parameter matching several keys gets their product."""
    no_wd = _no_weight_decay_names(model)
    ids, num_layers = _layer_ids(model) if layer_decay < 1.0 else ({}, 1)
    lr_mult = {str(k): float(v) for k, v in (lr_mult or {}).items()}
    unused = set(lr_mult)
    groups: dict[tuple[int, bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in no_wd or name.endswith(_NO_WD_SUFFIXES))
        layer = ids.get(name, num_layers - 1)
        mult = 1.0
        for k, v in lr_mult.items():
            if k in name:
                mult *= v
                unused.discard(k)
        key = (layer, decay, mult)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) * mult
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "wd_scale": 1.0 if decay else 0.0,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if unused:
        raise ConfigError(f"optim.lr_mult keys {sorted(unused)} match no trainable parameter name; "
                          f"e.g. {[n for n, _ in model.named_parameters()][:4]}")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: Any, lr: float) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name={cfg.name!r} is not supported; use optim=adamw")
    groups = param_groups(model, float(cfg.weight_decay), float(cfg.layer_decay), dict(cfg.get("lr_mult") or {}))
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    kwargs: dict[str, Any] = {"betas": tuple(cfg.betas), "eps": float(cfg.eps)}
    kwargs["fused"] = True  # one kernel for all params; on CPU ~3x faster than foreach for PVT-S
    opt = torch.optim.AdamW(groups, lr=lr, **kwargs)
    for g in opt.param_groups:  # names are for debugging only; keep the state dict lean
        g.pop("names", None)
    return opt


def apply_schedule(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
        g["weight_decay"] = wd * g["wd_scale"]
