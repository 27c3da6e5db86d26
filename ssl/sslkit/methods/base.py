"""The method contract, the method registry, and backbone creation.

A method is one ``nn.Module`` in one module (``methods/<name>.py``) next to its config schema (a
``MethodConfig`` subclass), registered with ``@register_method``, plus one YAML in
``configs/method/``. ``sslkit.methods`` imports every module of this package, so a new file here is
found without editing a list; a method defined elsewhere registers the same way (and its YAML goes
on ``hydra.searchpath``). ``config.register_configs`` stores every registered schema as
``method/<name>_schema``, ``build_method(cfg)`` builds the method that ``cfg.method.name`` names.

Contract (checked for every registered method by ``tests/test_method_contract.py``):

- ``forward(batch) -> {"loss": scalar tensor, <named terms>: detached scalars}``; no ``.backward()``.
- ``begin(step, derived)`` is called once per invocation before the first step (fresh or resumed)
  with the step about to run and the run's derived lengths (``config.Derived``: steps per epoch,
  total steps, batch sizes); methods keep what their schedules need.
- ``after_step(step) -> dict`` is the one per-step hook for side effects (EMA, centering, schedules of
  method hyper-parameters), after optimizer step ``step - 1`` (``step`` = steps done = the index of
  the next step). It must not change trainable parameters; it returns scalars to log.
- ``masking()`` returns the mask generator that the data collate calls (in the workers), or None.
- ``clip_groups()``: parameter groups that gradient clipping treats separately (default: one group).
- ``backbone`` is the trained encoder (the optimizer groups it for layer-wise lr decay);
  ``backbone_prefix`` names the state-dict prefix of the encoder that export / evaluation /
  fine-tuning read (``"backbone."``; DINOv2: the teacher's, ``"teacher.backbone."``).
- ``model_config`` is what rebuilds ``backbone`` with ``timm.create_model`` (name + kwargs).
- ``features(images) -> (B, C)``: frozen-encoder features for evaluation.
- ``visualize(images, generator, mean, std, **options) -> {name: (H, W, 3) uint8}``: optional named
  pictures of what the method does on normalized ``images`` (``mean`` / ``std``: the data's
  normalization; ``generator``: draws the masks, as ``masking()`` does in training); called in eval
  mode under ``no_grad`` (``sslkit.visualize.make_pictures``); methods ignore options they do not use.
  Default: none. The helpers below (``to_unit_rgb``, ``to_uint8``, ``tile``, ``heatmap``) compose them.
- Class attributes: ``name`` and ``config_class`` (its schema, whose ``name`` default equals
  ``name``), ``export_note`` (what ``sslkit-export`` says of the exported backbone) and
  ``test_overrides`` (config overrides that compose a tiny instance, for the contract tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

import sslkit.models  # noqa: F401  (registers the sslkit_* backbones with timm)
from sslkit.errors import CheckpointError, ConfigError
from sslkit.pretrained import Pretrained, check_load, load_pretrained
from sslkit.schemas import MethodConfig

MaskFn = Callable[[int, torch.Generator], dict[str, torch.Tensor]]


def backbone_kwargs(model_cfg: Any, **overrides: Any) -> dict[str, Any]:
    """The ``create_model`` kwargs of a ``ModelConfig`` (plain values: they go into checkpoints)."""
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": float(model_cfg.drop_path_rate),
                              "img_size": int(model_cfg.img_size)}
    extra = model_cfg.kwargs or {}
    if OmegaConf.is_config(extra):  # plain lists / dicts: the kwargs go into the checkpoint (weights_only)
        extra = OmegaConf.to_container(extra, resolve=True)
    return {**kwargs, **extra, **overrides}


def create_backbone(model_cfg: Any, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` from a ``ModelConfig``; returns the model and the kwargs that rebuild it."""
    kwargs = backbone_kwargs(model_cfg, **overrides)
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


_NOT_ARCH = ("num_classes", "drop_path_rate", "img_size")  # create kwargs that do not change the weights' shapes


def init_backbone(backbone: nn.Module, model_config: dict[str, Any], path: str) -> Pretrained:
    """Continued pretraining (``method.init_from``): load the backbone weights of ``path`` (any source of
    ``sslkit.pretrained``: sslkit checkpoints and exports, the UM-MAE / DINOv2 / timm layouts) into ``backbone``
    with an exact key match. UM-MAE pretraining and fine-tuning shapes are the same for sslkit's pyramids, so
    either kind of checkpoint initializes either. CheckpointError naming the mismatch and the model kwargs
    that would fit."""
    kwargs = {k: v for k, v in model_config["kwargs"].items() if k not in ("num_classes", "drop_path_rate")}
    pre = load_pretrained(path, model_config["name"], kwargs, for_finetune=not kwargs.get("um_pretrain", False))
    need = {k: v for k, v in pre.kwargs.items() if k not in (*_NOT_ARCH, "um_pretrain") and kwargs.get(k) != v}
    try:
        check_load(backbone, pre.state_dict, f"method.init_from={path}: backbone {model_config['name']}")
    except CheckpointError as e:
        hint = (" Its backbone was built with " + ", ".join(f"model.kwargs.{k}={v}" for k, v in need.items())
                + ": set those.") if need else ""
        raise CheckpointError(f"{e}.{hint}") from None
    print(f"[sslkit] method.init_from: backbone initialized from {path} ({pre.source}"
          f"{', step ' + str(pre.meta['step']) if pre.meta.get('step') is not None else ''})")
    return pre


class Method(nn.Module):
    name: ClassVar[str] = "method"
    config_class: ClassVar[type] = MethodConfig
    export_note: ClassVar[str] = "Backbone only (no head)."
    test_overrides: ClassVar[tuple[str, ...]] = ()
    probe: ClassVar[str] = "linear"  # the frozen-feature probe the method's papers judge it by: linear | knn
    backbone_prefix: str = "backbone."
    backbone: nn.Module
    model_config: dict[str, Any]

    def masking(self) -> Optional[MaskFn]:
        return None

    def begin(self, step: int, derived: Any) -> None:
        return None

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def clip_groups(self) -> Optional[list[list[nn.Parameter]]]:
        """Parameter groups that ``optim.clip_grad`` clips each on its own; None: all together."""
        return None

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

    def visualize(self, images: torch.Tensor, generator: torch.Generator, mean: Sequence[float],
                  std: Sequence[float], **options: Any) -> dict[str, np.ndarray]:
        """Named RGB pictures ``{name: (H, W, 3) uint8}`` of what the method does on ``images`` ((B, 3, H, W),
        normalized with ``mean`` / ``std``); masks drawn with ``generator`` through ``masking()``. Default: none."""
        return {}


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features of a timm backbone: (B, 3, H, W) -> (B, C)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


# ----------------------------------------------------------------------------------------- registry
METHODS: dict[str, type[Method]] = {}  # filled by @register_method; never edit by hand


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` buildable as ``method.name=<cls.name>`` (and its schema composable)."""
    schema = cls.config_class
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"@register_method needs a Method subclass, got {cls!r}")
    if not (dataclasses.is_dataclass(schema) and issubclass(schema, MethodConfig)):
        raise TypeError(f"{cls.__name__}.config_class must be a dataclass extending sslkit.schemas.MethodConfig")
    default = next(f.default for f in dataclasses.fields(schema) if f.name == "name")
    if default != cls.name:
        raise TypeError(f"{schema.__name__}.name defaults to {default!r} but {cls.__name__}.name is {cls.name!r}")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TypeError(f"method {cls.name!r} is already registered ({METHODS[cls.name].__module__}."
                        f"{METHODS[cls.name].__qualname__})")
    METHODS[cls.name] = cls
    return cls


def build_method(cfg: Any) -> Method:
    """The registered method that ``cfg.method.name`` names, built from ``cfg.method`` and ``cfg.model``."""
    name = str(cfg.method.name)
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is unknown; registered methods: {sorted(METHODS)}")
    return METHODS[name](cfg.method, cfg.model)


# ----------------------------------------------------------------------------------------- pictures
GREY = 0.5  # a removed unit in the pictures
GAP = 2  # white pixels between the panels of a picture


def to_unit_rgb(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized ``(B, 3, H, W)`` -> ``(B, H, W, 3)`` float32 in [0, 1] on the CPU (``x * std + mean``, clamped)."""
    m = torch.as_tensor([float(v) for v in mean], dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor([float(v) for v in std], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * s + m).clamp(0.0, 1.0).permute(0, 2, 3, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(..., 3)`` floats in [0, 1] -> uint8 (rounded) numpy."""
    return (x.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def tile(rows: Sequence[Sequence[np.ndarray]], gap: int = GAP, fill: int = 255) -> np.ndarray:
    """Panels ``(h, w, 3)`` uint8, row by row, into one ``(H, W, 3)`` uint8 picture (``gap`` px of ``fill``
    between them; a column is as wide as its widest panel, a row as high as its highest)."""
    ncol = max(len(r) for r in rows)
    hs = [max(p.shape[0] for p in r) for r in rows]
    ws = [max(r[j].shape[1] for r in rows if j < len(r)) for j in range(ncol)]
    out = np.full((sum(hs) + gap * (len(rows) - 1), sum(ws) + gap * (ncol - 1), 3), fill, dtype=np.uint8)
    y = 0
    for r, h in zip(rows, hs):
        x = 0
        for p, w in zip(r, ws):
            out[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += w + gap
        y += h + gap
    return out


_HEAT = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0  # inferno


def heatmap(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] ``(...)`` -> colours ``(..., 3)`` in [0, 1] (an inferno-like map: black -> purple ->
    red -> orange -> light yellow)."""
    t = x.detach().float().cpu().clamp(0.0, 1.0) * (len(_HEAT) - 1)
    lo = t.floor().long().clamp(max=len(_HEAT) - 2)
    frac = (t - lo).unsqueeze(-1)
    return _HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac
