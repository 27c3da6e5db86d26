"""Checkpoints in: the pretrained backbone of any supported checkpoint, as a bare sslkit timm model.

``load_pretrained(path, model=None)`` reads a file safely and returns a ``Pretrained``: the backbone's
state dict in sslkit's names, the timm model name and the create kwargs that fit it, and where it came
from. ``load_backbone`` builds the model and loads it with an exact key match. Every way weights enter a
model outside resume goes through here: fine-tuning (``method.checkpoint``), continued pretraining
(``method.init_from``), ``sslkit-eval``, export.

Supported sources (``source`` of the result):

- ``sslkit``: an sslkit checkpoint (``checkpoint.Checkpoint``); the model comes from it.
- ``sslkit_export``: an ``sslkit-export`` folder (timm hub layout ``config.json`` + ``model.safetensors``,
  or ``backbone.json`` + ``backbone.safetensors``) or one of its weight files.
- foreign layouts, converted by the family modules of this package (``LAYOUTS``: ``umae.py`` for the
  UM-MAE reference checkpoints of PVT / Swin, ``dinov2.py`` for DINOv2 and timm ViT checkpoints); they
  need ``model=<sslkit model name>`` since the file does not say which sslkit model to build.

Loading is always ``torch.load(weights_only=True)``; the only non-tensor class allowed in (for the UM-MAE
reference checkpoints, which pickle their ``argparse.Namespace`` under ``args``) is
``argparse.Namespace``, through ``torch.serialization.safe_globals``. Converters never drop a key
silently: a key that is neither mapped nor expected is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import timm
import torch
from torch import Tensor

from sslkit import checkpoint as ckpt_io
from sslkit.errors import CheckpointError
from sslkit.models import convert_um_pretrain_to_finetune
from sslkit.pretrained import dinov2, umae  # noqa: F401  (register their layouts)
from sslkit.pretrained.layouts import LAYOUTS, Layout, StateDict

@dataclass
class Pretrained:
    """A backbone's weights in sslkit's names and what builds the model they fit."""

    model_name: str  # the timm model name (an sslkit_* model)
    kwargs: dict[str, Any]  # create_model kwargs the weights need (architecture; no num_classes)
    state_dict: StateDict  # bare backbone, sslkit key names, the shapes of ``kwargs``
    source: str  # sslkit | sslkit_export | the foreign layout's name
    path: str
    ckpt: Optional[ckpt_io.Checkpoint] = None  # the sslkit checkpoint, when source == "sslkit"
    meta: dict[str, Any] = field(default_factory=dict)  # method, step, ... (what the source says)


# ----------------------------------------------------------------------------------------- reading
def read_file(path: str | Path) -> Any:
    """The object in a checkpoint file, read safely: ``torch.load(weights_only=True)`` (``argparse.Namespace``
    allowed, nothing else) or safetensors. CheckpointError with the fix otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} contains pickled Python objects that are not tensors, plain containers or "
                              f"an argparse.Namespace ({e}); sslkit only loads checkpoints with "
                              f"torch.load(weights_only=True) and will not execute arbitrary pickles. If you trust "
                              f"the file, re-save its state dict as a plain dict (or safetensors) and load that") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                              f"truncated") from e


def _export_dir(path: Path) -> Optional[tuple[Path, dict[str, Any], str]]:
    """(weights file, meta, which) of an sslkit-export folder or of a weights file inside one."""
    folder = path if path.is_dir() else path.parent
    for weights, meta, which in (("model.safetensors", "config.json", "hub"),
                                 ("backbone.safetensors", "backbone.json", "backbone")):
        w, m = folder / weights, folder / meta
        if (path.is_dir() or path.name == weights) and w.exists() and m.exists():
            cfg = json.loads(m.read_text())
            return w, {**cfg.get("sslkit", {}), **cfg}, which  # hub: the provenance (method, step) is under "sslkit"
    return None


def unwrap_state_dict(obj: Any) -> tuple[StateDict, dict[str, Any]]:
    """The tensors of a foreign checkpoint: a bare state dict, or one nested under ``model`` / ``state_dict``
    / ``teacher`` / ``module`` (DINOv2 training checkpoints keep both networks under ``model``); the other
    top-level entries are returned as metadata."""
    meta: dict[str, Any] = {}
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in ("model", "state_dict", "teacher", "module") if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        meta.update({k: v for k, v in obj.items() if k != key and not isinstance(v, dict)})
        obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError("no state dict found (expected a dict of tensors, or one under 'model' / 'state_dict')")
    return dict(obj), meta


def _layouts_for(model_name: str) -> list[Layout]:
    return [x for x in LAYOUTS if any(model_name.startswith(f) for f in x.families)]


def load_pretrained(path: str | Path, model: Optional[str] = None, kwargs: Optional[dict[str, Any]] = None,
                    for_finetune: bool = True) -> Pretrained:
    """Read ``path`` and return the backbone weights in sslkit's names (see the module docstring).

    ``model``: the sslkit model to build (required for foreign layouts; for sslkit checkpoints and exports,
    when given, it must match). ``kwargs``: create kwargs the caller already has (e.g. ``model.kwargs``),
    for foreign layouts. ``for_finetune``: convert UM-MAE pretraining shapes to fine-tuning shapes."""
    path = Path(path)
    exported = _export_dir(path)
    if exported is not None:
        weights, meta, which = exported
        name = meta["architecture"] if which == "hub" else meta["model_name"]
        kw = dict(meta.get("model_args" if which == "hub" else "create_kwargs", {}))
        res = Pretrained(name, kw, dict(read_file(weights)), "sslkit_export", str(path), meta=meta)
    elif path.is_dir():
        raise CheckpointError(f"{path} is a folder but not an sslkit export (no config.json + model.safetensors, "
                              f"no backbone.json + backbone.safetensors)")
    else:
        obj = read_file(path)
        if isinstance(obj, dict) and "format_version" in obj:
            ckpt = ckpt_io.load(path)
            prefix, sd = ckpt_io.backbone_state(ckpt)
            if not sd:
                raise CheckpointError(f"{path} holds no '{prefix}*' weights; it is not a pretraining checkpoint")
            spec = ckpt["model_config"]
            res = Pretrained(spec["name"], dict(spec["kwargs"]), sd, "sslkit", str(path), ckpt,
                             {"method": ckpt["method"], "step": ckpt["step"]})
        else:
            res = _convert_foreign(obj, path, model, dict(kwargs or {}))
    if model is not None and res.model_name != model:
        raise CheckpointError(f"{path} holds a {res.model_name} encoder but model={model}: use model={res.model_name}")
    if res.kwargs.pop("num_classes", 0):  # a classifier's checkpoint: the backbone is everything but its head
        res.state_dict = _without_classifier(res.state_dict, res.model_name)
    if for_finetune and res.kwargs.get("um_pretrain"):
        res.state_dict = convert_um_pretrain_to_finetune(res.model_name, res.state_dict)
        res.kwargs["um_pretrain"] = False
    return res


def _without_classifier(sd: StateDict, model_name: str) -> StateDict:
    """``sd`` without the model's classifier (timm's ``pretrained_cfg['classifier']``, e.g. ``head`` / ``fc``)."""
    classifier = timm.models.get_pretrained_cfg(model_name).classifier or "head" if timm.is_model(model_name) else "head"
    return {k: v for k, v in sd.items() if not k.startswith(f"{classifier}.")}


def _convert_foreign(obj: Any, path: Path, model: Optional[str], kwargs: dict[str, Any]) -> Pretrained:
    names = sorted({x.name for x in LAYOUTS})
    try:
        sd, meta = unwrap_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}; supported: sslkit checkpoints and exports, {names}") from None
    found = [x for x in LAYOUTS if x.detect(sd)]
    if not found:
        sample = sorted(sd)[:8]
        raise CheckpointError(f"{path} is not an sslkit checkpoint and matches no supported layout ({names}); its "
                              f"first keys: {sample}")
    if model is None:
        raise CheckpointError(f"{path} is a {found[0].name} checkpoint ({found[0].description}): say which sslkit "
                              f"model to build with model=<name> (e.g. one of {found[0].families[0]}*)")
    usable = [x for x in found if x in _layouts_for(model)]
    if not usable:
        raise CheckpointError(f"{path} is a {found[0].name} checkpoint ({found[0].description}), which converts to "
                              f"{[f + '*' for f in found[0].families]}, not to model={model}")
    layout = usable[0]
    sd, need = layout.convert(sd, model, kwargs)
    return Pretrained(model, {**kwargs, **need}, sd, layout.name, str(path), meta=meta)


def load_backbone(checkpoint: str | Path, for_finetune: bool = True, model: Optional[str] = None,
                  kwargs: Optional[dict[str, Any]] = None, **overrides: Any) -> tuple[torch.nn.Module, Pretrained]:
    """Build the pretrained backbone of ``checkpoint`` (any source of ``load_pretrained``) and load its weights
    with an exact key match; ``overrides`` are extra ``create_model`` kwargs (e.g. ``drop_path_rate``).
    Returns ``(model, pretrained)``."""
    pre = load_pretrained(checkpoint, model, kwargs, for_finetune)
    create = {**pre.kwargs, **overrides}
    net = timm.create_model(pre.model_name, **create)
    check_load(net, pre.state_dict, f"{checkpoint}: backbone {pre.model_name}")
    pre.kwargs = create
    return net, pre


def check_load(model: torch.nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """``model.load_state_dict(state_dict)`` requiring the exact key set and shapes (CheckpointError naming
    every missing / unexpected key and shape mismatch)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{what} does not match the checkpoint: missing {missing}, unexpected {unexpected}, "
                              f"shape mismatches {shapes}")
    model.load_state_dict(state_dict, strict=True)

