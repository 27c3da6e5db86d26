"""Pieces shared by the pyramid backbone families: timm default cfg, exact key-set validation for
the explicit pretraining -> fine-tuning conversions."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence

import torch

from sslkit.errors import CheckpointError


def pyramid_cfg(**kwargs) -> dict:
    """timm pretrained cfg. ``num_classes=0`` + ``classifier='head'``: a backbone-only file loads
    strictly when num_classes is left at the default (no head), and with num_classes=N timm drops
    ``head.*`` and loads non-strictly."""
    return {
        "url": "", "num_classes": 0, "input_size": (3, 256, 256), "pool_size": (8, 8), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }  # fmt: skip


def infer_depths(keys: Sequence[str]) -> list[int]:
    """Per-stage block counts from ``stages.<i>.blocks.<j>.`` keys."""
    blocks: dict[int, set[int]] = {}
    for k in keys:
        mt = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if mt:
            blocks.setdefault(int(mt[1]), set()).add(int(mt[2]))
    return [max(blocks.get(i, {-1})) + 1 for i in range(max(blocks, default=-1) + 1)]


def convert_exact(state_dict: Mapping[str, torch.Tensor], depths: Optional[Sequence[int]], family: str,
                  backbone_keys: Callable[[Sequence[int]], list[str]],
                  check: Callable[[str, torch.Tensor], Optional[str]]) -> dict[str, torch.Tensor]:
    """Validate that ``state_dict`` holds exactly the backbone's keys (``depths`` given or inferred)
    and that ``check(key, tensor)`` returns no complaint for any of them; return the tensors (not
    copied). Raises CheckpointError naming unknown / missing keys or the complaint."""
    depths = list(depths) if depths is not None else infer_depths(list(state_dict))
    expected = backbone_keys(depths)
    unknown = sorted(set(state_dict) - set(expected))
    missing = [k for k in expected if k not in state_dict]
    if unknown or missing:
        raise CheckpointError(
            f"convert_um_pretrain_to_finetune: not a {family} backbone state dict with depths {depths}: "
            f"unknown keys {unknown[:20]}{' ...' if len(unknown) > 20 else ''}, "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}. "
            "Pass only the backbone's keys (no head.*, no decoder, no module prefix)."
        )
    for k in expected:
        problem = check(k, state_dict[k])
        if problem:
            raise CheckpointError(f"convert_um_pretrain_to_finetune: {k} has shape {tuple(state_dict[k].shape)}; {problem}")
    return {k: state_dict[k] for k in expected}
