"""The method contract: one ``nn.Module`` per pretraining method.

- ``forward(batch) -> {"loss": scalar tensor, <named terms>: detached scalars}``; no ``.backward()``.
- ``after_step(step, total_steps) -> dict`` is the one per-step hook for side effects (EMA, centering,
  schedules of method hyper-parameters); it returns scalars to log. ``step`` counts the optimizer
  steps done, i.e. it is the index of the next step to run.
- ``begin(step, derived)`` is called once per invocation before the first step (fresh or resumed),
  with the step about to run and the run's derived lengths, for methods with epoch-based schedules.
- ``masking()`` returns the mask generator that the data collate calls (in the workers), or None.
- ``backbone`` is the trained encoder (the optimizer groups it for layer-wise lr decay);
  ``backbone_prefix`` names the state-dict prefix of the encoder that export / evaluation /
  fine-tuning read (``"backbone."``; DINOv2: the teacher's, ``"teacher.backbone."``).
- ``model_config`` is what it takes to rebuild ``backbone`` with ``timm.create_model``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from sslkit.errors import ConfigError


def create_backbone(model_cfg: Any, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` from a ``ModelConfig``; returns the model and the kwargs that rebuild it."""
    import sslkit.models  # noqa: F401  (registers sslkit_* models with timm)

    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": float(model_cfg.drop_path_rate),
                              "img_size": int(model_cfg.img_size)}
    extra = model_cfg.kwargs or {}
    if OmegaConf.is_config(extra):  # plain lists / dicts: the kwargs go into the checkpoint (weights_only)
        extra = OmegaConf.to_container(extra, resolve=True)
    kwargs.update(extra)
    kwargs.update(overrides)
    name = str(model_cfg.name)
    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('_')[-1]}*") if m.startswith("sslkit")][:8]
        raise ConfigError(f"model.name={name!r} is not a registered timm model; sslkit models: "
                          f"{timm.list_models('sslkit_*')} (similar: {close})")
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {name!r} rejected its arguments (img_size={kwargs['img_size']}, model.kwargs="
                          f"{dict(model_cfg.kwargs or {})}): {e}") from e
    return model, {"name": name, "kwargs": kwargs}


class Method(nn.Module):
    name: str = "method"
    backbone: nn.Module
    backbone_prefix: str = "backbone."
    model_config: dict[str, Any]

    def masking(self) -> Optional[Callable[[int, torch.Generator], dict[str, torch.Tensor]]]:
        return None

    def begin(self, step: int, derived: Any) -> None:
        return None

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features for evaluation: (B, 3, H, W) -> (B, C) (the backbone's pooled
        pre-logits: mean-pooled last stage for pyramids, CLS for ViTs)."""
        return embed(self.backbone, images)

    def heldout_batch(self, images: torch.Tensor, generator: torch.Generator) -> Optional[dict[str, torch.Tensor]]:
        """A batch for measuring the training loss on held-out ``images`` (same masks for every model
        given the same ``generator``), or None when the loss needs other views (the summary skips it)."""
        masking = self.masking()
        extra = masking(images.shape[0], generator) if masking is not None else {}
        return {"images": images, **{k: v.to(images.device) for k, v in extra.items()}}


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features of a timm backbone: (B, 3, H, W) -> (B, C)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)
