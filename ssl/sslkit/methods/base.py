"""The method contract: one ``nn.Module`` per pretraining method.

- ``forward(batch) -> {"loss": scalar tensor, <named terms>: detached scalars}``; no ``.backward()``.
- ``after_step(step, total_steps) -> dict`` is the one per-step hook for side effects (EMA, centering,
  schedules of method hyper-parameters); it returns scalars to log.
- ``masking()`` returns the mask generator that the data collate calls (in the workers), or None.
- ``backbone`` is the encoder that export / evaluation / fine-tuning use.
- ``model_config`` is what it takes to rebuild ``backbone`` with ``timm.create_model``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import timm
import torch
from torch import nn

from sslkit.errors import ConfigError


def create_backbone(model_cfg: Any, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` from a ``ModelConfig``; returns the model and the kwargs that rebuild it."""
    import sslkit.models  # noqa: F401  (registers sslkit_* models with timm)

    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": float(model_cfg.drop_path_rate),
                              "img_size": int(model_cfg.img_size)}
    kwargs.update(dict(model_cfg.kwargs or {}))
    kwargs.update(overrides)
    name = str(model_cfg.name)
    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('_')[-1]}*") if m.startswith("sslkit")][:8]
        raise ConfigError(f"model.name={name!r} is not a registered timm model; sslkit models: "
                          f"{timm.list_models('sslkit_*')} (similar: {close})")
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r} rejected model.kwargs {dict(model_cfg.kwargs or {})}: {e}") from e
    return model, {"name": name, "kwargs": kwargs}


class Method(nn.Module):
    name: str = "method"
    backbone: nn.Module
    model_config: dict[str, Any]

    def masking(self) -> Optional[Callable[[int, torch.Generator], dict[str, torch.Tensor]]]:
        return None

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features for evaluation: (B, 3, H, W) -> (B, C) (mean-pooled last stage)."""
        f = self.backbone.forward_features(images)  # (B, h, w, C)
        return f.mean(dim=(1, 2)) if f.ndim == 4 else f
