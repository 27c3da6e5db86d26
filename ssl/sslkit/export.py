"""Checkpoints out: the backbone of a checkpoint as files that plain timm loads.

``export`` writes ``backbone.safetensors`` (the bare backbone's state dict, fine-tuning shapes) and
``backbone.json`` (model name, create kwargs, provenance, what was left out: the method's
``export_note``). ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
loads it, with or without ``num_classes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sslkit import checkpoint as ckpt_io
from sslkit.methods import METHODS, Method
from sslkit.pretrained import load_backbone


def write_backbone(model: torch.nn.Module, out: str | Path, meta: dict[str, Any]) -> Path:
    """``out/backbone.safetensors`` (contiguous tensors of ``model.state_dict()``) + ``out/backbone.json`` (``meta``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "backbone.safetensors"), metadata={"format": "pt"})
    (out / "backbone.json").write_text(json.dumps(meta, indent=2))
    return out / "backbone.safetensors"


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Export the backbone of an sslkit checkpoint to ``out`` (see the module docstring); returns ``out``."""
    model, pre = load_backbone(checkpoint, for_finetune=True)
    name, ckpt = pre.model_name, pre.ckpt
    out = Path(out)
    weights = out / "backbone.safetensors"
    method = pre.meta.get("method")
    meta = {
        "model_name": name,
        "create_kwargs": {k: v for k, v in pre.kwargs.items() if k != "num_classes"},
        "method": method, "step": pre.meta.get("step"), "source_checkpoint": str(checkpoint), "source": pre.source,
        "sslkit_version": ckpt["sslkit_version"] if ckpt else None,
        "load_with": f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='{weights}'), "
                     f"num_classes=N)",
        "backbone_prefix": ckpt.get("backbone_prefix", ckpt_io.DEFAULT_BACKBONE_PREFIX) if ckpt else None,
        "notes": METHODS.get(method, Method).export_note if method else "Backbone only (no head).",
    }
    write_backbone(model, out, meta)
    print(f"[sslkit] wrote {weights} ({len(model.state_dict())} tensors) and backbone.json")
    return out
