"""Augmented views (torchvision.transforms.v2), one builder per view family.

Every view maps a PIL RGB image or a (3, H, W) uint8 tensor to a (3, S, S) float32 tensor normalized
with the data mean/std. The transforms draw from torch's global CPU generator; the loaders seed it
per sample from (seed, batch, position) so views are reproducible across workers and resume.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from sslkit.config import ViewConfig
from sslkit.errors import ConfigError

# Modes that work on tensors (the pipeline converts to a tensor first, so PIL-only modes are out).
INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}

View = Callable[[object], torch.Tensor]


def interpolation(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[str(name).lower()]
    except KeyError:
        raise ConfigError(
            f"method.view.interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}"
        ) from None


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"data.mean and data.std need 3 values each (std > 0), got {mean}, {std}")
    return mean, std


def _to_plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(torch.Tensor)  # drop the tv_tensors.Image wrapper


def build_mae_view(view: ViewConfig, mean: Sequence[float], std: Sequence[float]) -> View:
    """MAE-style view: RandomResizedCrop(size, scale, ratio) + horizontal flip + normalize.

    Input: PIL RGB image or (3, H, W) uint8 tensor. Output: (3, size, size) float32.
    """
    size = int(view.size)
    scale = (float(view.scale[0]), float(view.scale[1]))
    ratio = (float(view.ratio[0]), float(view.ratio[1]))
    if size <= 0:
        raise ConfigError(f"method.view.size must be positive, got {size}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"method.view.scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"method.view.ratio must satisfy 0 < min <= max, got {ratio}")
    if not 0.0 <= float(view.hflip) <= 1.0:
        raise ConfigError(f"method.view.hflip is a probability in [0, 1], got {view.hflip}")
    mean, std = _check_norm(mean, std)
    return v2.Compose(
        [
            v2.ToImage(),  # (3, H, W) uint8
            v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation(view.interpolation),
                                 antialias=True),
            v2.RandomHorizontalFlip(float(view.hflip)),
            v2.ToDtype(torch.float32, scale=True),  # [0, 1]
            v2.Normalize(mean, std),
            _to_plain,
        ]
    )


def build_eval_view(size: int, mean: Sequence[float], std: Sequence[float], interp: str = "bicubic") -> View:
    """Deterministic evaluation view: resize the short side to ``size``, center crop ``size``."""
    if int(size) <= 0:
        raise ConfigError(f"eval image size must be positive, got {size}")
    mean, std = _check_norm(mean, std)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(size), interpolation=interpolation(interp), antialias=True),
            v2.CenterCrop(int(size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            _to_plain,
        ]
    )
