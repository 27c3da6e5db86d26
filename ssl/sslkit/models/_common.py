"""Pieces shared by the pyramid backbone families (PVT, Swin): timm default cfg, the timm classifier
surface (:class:`PyramidClassifierMixin`), the linear stochastic-depth rule, exact key-set validation
for the explicit pretraining -> fine-tuning conversions."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from sslkit.errors import CheckpointError, ConfigError

#: ``global_pool`` values of the pyramid backbones: ``"avg"`` = mean over the last stage's (h, w),
#: ``""`` = no pooling (``forward_head`` returns the (B, h, w, C) map, the head is applied per location).
GLOBAL_POOLS = ("avg", "")
HEAD_INIT_STD = 2e-5


def pyramid_cfg(**kwargs) -> dict:
    """timm pretrained cfg. ``num_classes=0`` + ``classifier='head'``: a backbone-only file loads
    strictly when num_classes is left at the default (no head), and with num_classes=N timm drops
    ``head.*`` and loads non-strictly."""
    return {
        "url": "", "num_classes": 0, "input_size": (3, 256, 256), "pool_size": (8, 8), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }  # fmt: skip


def linear_drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Per-block stochastic-depth rates over ALL blocks of all stages (block order), ramping linearly
    from 0 (first block) to ``drop_path_rate`` (last block): ``rate * i / (n - 1)``. This is timm's
    ResNet formula and the ``linspace(0, rate, n)`` of timm's / the official PVT and Swin code (here in
    Python floats, so it also works under ``torch.device("meta")``)."""
    return [float(drop_path_rate) * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def check_global_pool(global_pool: str, family: str) -> str:
    """Return ``global_pool`` if it is one of :data:`GLOBAL_POOLS`, else raise ConfigError naming them."""
    if global_pool not in GLOBAL_POOLS:
        raise ConfigError(
            f"{family}: global_pool must be 'avg' (mean over the last stage) or '' (no pooling: forward_head "
            f"returns the (B, h, w, C) map), got {global_pool!r}"
        )
    return global_pool


def init_head(head: nn.Module) -> None:
    """Classifier init used at construction AND by ``reset_classifier``: trunc-normal weight with std
    2e-5 and zero bias, the MAE / MoCo-v3 fine-tuning convention (MAE ``main_finetune.py``: a
    near-zero head so the initial logits are ~0 and the pretrained features are not disturbed by large
    early gradients through a random projection). Identity heads are left alone."""
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=HEAD_INIT_STD)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def new_head(model: nn.Module, num_features: int, num_classes: int) -> nn.Module:
    """The classifier every sslkit backbone builds at construction and in ``reset_classifier``: a Linear
    with :func:`init_head`, on the device and in the dtype of ``model``'s parameters (Identity for 0)."""
    if num_classes <= 0:
        return nn.Identity()
    p = next(model.parameters(), None)
    head = nn.Linear(num_features, num_classes, device=p.device if p is not None else None)
    init_head(head)  # in float32, then cast (trunc_normal_ needs erfinv)
    return head.to(p.dtype) if p is not None and p.dtype.is_floating_point else head


class PyramidClassifierMixin:
    """timm classifier surface shared by the NHWC pyramid backbones (PVT, Swin), implemented once.

    The host ``nn.Module`` sets ``num_features``, ``num_classes``, ``global_pool`` (validated with
    :func:`check_global_pool`), ``head_drop`` (pre-classifier dropout, ``drop_rate``) and builds its
    ``head`` with :meth:`_new_head` (after its backbone init, so the head init is exactly the one of
    :meth:`reset_classifier`). Semantics follow timm (e.g. its NHWC Swin ``ClassifierHead``):

    - ``reset_classifier(num_classes, global_pool=None)``: ``None`` keeps the current pooling,
      ``"avg"`` / ``""`` set it, anything else raises ConfigError (the model is left unchanged);
      ``num_classes=0`` -> ``nn.Identity()``; a new Linear head gets :func:`init_head`, on the
      device of the model's parameters and in their dtype.
    - ``forward_head(x, pre_logits=False)`` on the (B, h, w, C) final-norm map: ``"avg"`` -> (B, C),
      ``""`` -> unpooled (B, h, w, C); then dropout; then (unless ``pre_logits``) the head, applied per
      location when unpooled -> (B, h, w, num_classes).

    The head's state-dict keys are ``head.weight`` / ``head.bias`` (timm ``classifier='head'``).
    """

    output_fmt = "NHWC"  # timm attribute: layout of forward_features' output

    num_features: int
    num_classes: int
    global_pool: str
    head: nn.Module
    head_drop: nn.Module
    fc_norm: nn.Module  # Identity, or the LayerNorm of the pooled feature (MAE-style fine-tuning heads)

    def _new_head(self, num_classes: int) -> nn.Module:
        return new_head(self, self.num_features, num_classes)  # type: ignore[arg-type]

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool, type(self).__name__)
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) -> (B, C) with ``global_pool='avg'``, (B, h, w, C) with ``''``; then dropout and,
        unless ``pre_logits``, the head (last dim C -> num_classes)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))  # (B, C)
        x = self.fc_norm(x)  # Identity unless the host normalizes after pooling (fc_norm=True)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


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
