"""Checkpoints out: the backbone of a checkpoint in timm's Hugging Face Hub layout.

``export(checkpoint, out)`` writes, into ``out`` (made absolute):

- ``config.json`` + ``model.safetensors``: timm's hub layout, written by timm's own ``save_for_hf`` (the
  save step of ``timm.models.push_to_hf_hub``). ``config.json`` holds ``architecture`` (the sslkit model),
  ``num_classes: 0`` (the export is backbone-only), ``num_features``, ``global_pool``, ``pretrained_cfg``,
  ``model_args`` (every create kwarg the weights need, e.g. ``patch_size=2``, ``um_pretrain=False``,
  ``img_size``, ``pos_embed`` / ``fc_norm``; drop rates left out) and the provenance under ``sslkit``
  (timm ignores unknown top-level keys). So
  ``import sslkit.models, timm; timm.create_model("local-dir:<out>", pretrained=True)`` loads the encoder,
  ``num_classes=N`` adds a new head, and ``push_to_hf_hub`` publishes exactly this folder (see README).
- ``backbone.json``: the same provenance (model name, create kwargs, method, step, source checkpoint and
  layout, sslkit version, ``notes`` = the method's ``export_note``, the load lines), and
  ``backbone.safetensors``: the same file as ``model.safetensors`` (a hard link when the file system allows
  it, else a copy): the layout of earlier sslkit exports, for their readers.
- ``timm_model.safetensors``, only for ViTs with registers: the weights in timm's DINOv2-with-registers
  layout (see ``timm_equivalent``).

``timm_equivalent`` says whether timm's own classes hold the backbone, loadable by timm name without sslkit:
``sslkit_vit_*`` -> ``vit_{tiny,small,base,large}_patch16_224`` (or ``vit_tiny_patch16_224`` with explicit
``embed_dim`` / ``depth`` / ``num_heads`` for other sizes) with ``img_size``, ``patch_size`` (and
``init_values``, ``mlp_ratio``, ``qkv_bias``, ``in_chans``, ``global_pool`` + ``fc_norm=False`` when they
differ from timm's defaults); ``sslkit_resnet50`` -> ``resnet50``, ``sslkit_resnet_test`` -> ``resnet50`` with
its depths / widths. PVT and Swin are sslkit's own architectures: no timm equivalent, ``import sslkit.models``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from timm.models.resnet import ResNet

import sslkit
from sslkit import checkpoint as ckpt_io
from sslkit.methods import METHODS, Method
from sslkit.models.vit import LayerScale, VisionTransformer
from sslkit.pretrained import load_backbone

HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"  # timm's hub names (timm.models._hub)
TIMM_WEIGHTS = "timm_model.safetensors"  # ViTs with registers only: timm's register layout

# (embed_dim, depth, num_heads) of timm's named ViTs
_TIMM_VITS = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
              (1024, 24, 16): "vit_large"}
# sslkit ResNets are timm's ResNet class: the timm entry point and the arguments that make it the same network
_TIMM_RESNETS = {"sslkit_resnet50": ("resnet50", {}),
                 "sslkit_resnet_test": ("resnet50", {"layers": [1, 1, 2, 2], "channels": [8, 16, 32, 64],
                                                     "stem_width": 8})}
_NOT_WEIGHTS = ("num_classes", "img_size", "um_pretrain", "drop_path_rate", "drop_rate", "drop_block_rate")


def _is_drop(key: str) -> bool:
    return key in ("drop_rate", "drop_path_rate", "drop_block_rate") or key.endswith("_drop_rate")


def _py(s: str) -> str:
    """A Python string literal in double quotes (the load lines)."""
    return json.dumps(s)


def _call(name: str, **kwargs: Any) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({_py(name)}, pretrained=True{args})"


def _overlay(model: torch.nn.Module, weights: Path) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` for a by-name load: the file, no head (so the load is strict), the input size
    and normalization of the sslkit model (timm's named configs have their own)."""
    cfg = model.pretrained_cfg
    size = getattr(model, "img_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else tuple(cfg["input_size"][1:])
    return {"file": str(weights), "num_classes": 0, "input_size": (3, *size), "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"])}


def timm_equivalent(model: torch.nn.Module, name: str, kwargs: dict[str, Any],
                    out: Path) -> tuple[Optional[dict[str, Any]], Optional[dict[str, torch.Tensor]], str]:
    """(what loads ``model``'s export into timm's own classes by timm name, the weights to write to
    ``out / TIMM_WEIGHTS`` if ``model.safetensors`` does not load as it is, a note). ``(None, None, note)``
    when timm has no class for the architecture (sslkit is needed)."""
    if isinstance(model, VisionTransformer):
        blk = model.blocks[0]
        arch = (model.embed_dim, len(model.blocks), blk.attn.num_heads)
        size = _TIMM_VITS.get(arch)
        img = model.img_size[0] if model.img_size[0] == model.img_size[1] else list(model.img_size)
        args: dict[str, Any] = {"img_size": img, "patch_size": model.patch_size}
        if size is None:
            args.update(embed_dim=arch[0], depth=arch[1], num_heads=arch[2])
        mlp_ratio = blk.mlp.fc1.out_features / model.embed_dim
        if mlp_ratio != 4.0:
            args["mlp_ratio"] = mlp_ratio
        if blk.attn.qkv.bias is None:
            args["qkv_bias"] = False
        if isinstance(blk.ls1, LayerScale):  # the value only initializes LayerScale; the weights overwrite it
            args["init_values"] = float(kwargs.get("init_values") or 1e-5)
        if model.in_chans != 3:
            args["in_chans"] = model.in_chans
        if model.global_pool != "token":  # sslkit 'avg': norm, then the mean of patch tokens = timm fc_norm=False
            args.update(global_pool=model.global_pool, **({"fc_norm": False} if model.global_pool == "avg" else {}))
        sd = None
        weights = out / HUB_WEIGHTS
        note = ("timm's VisionTransformer: the same state-dict names and, without registers, the same pos_embed "
                "layout (class_token=True, no_embed_class=False); timm's checkpoint filter drops mask_token")
        if model.num_reg_tokens:  # timm's DINOv2 register layout: no position on prefix tokens
            args.update(reg_tokens=model.num_reg_tokens, no_embed_class=True)
            sd = {k: v for k, v in model.state_dict().items() if k != "mask_token"}
            pe = sd["pos_embed"]
            sd["cls_token"] = sd["cls_token"] + pe[:, :1]  # exact: the class token only ever gets pe[:, 0] added
            sd["pos_embed"] = pe[:, 1:]
            weights = out / TIMM_WEIGHTS
            note = (f"timm's VisionTransformer with reg_tokens={model.num_reg_tokens}, no_embed_class=True (timm's "
                    f"DINOv2-with-registers layout): sslkit's pos_embed (class + patches, none on registers) does not "
                    f"fit it, so {TIMM_WEIGHTS} holds the weights with the class position folded into cls_token "
                    f"(exact), no mask_token")
        timm_name = f"{size or 'vit_tiny'}_patch16_224"
        note += "; equal outputs at img_size (timm's ViT is fixed-size, sslkit's interpolates pos_embed)"
    elif isinstance(model, ResNet) and name in _TIMM_RESNETS:
        timm_name, arch_args = _TIMM_RESNETS[name]
        extra = {k: v for k, v in kwargs.items() if k not in _NOT_WEIGHTS and not _is_drop(k)}
        args, sd, weights = {**arch_args, **extra}, None, out / HUB_WEIGHTS
        note = f"timm's ResNet class ({name} is timm's {timm_name} entry point with these arguments)"
    else:
        return None, None, (f"{name} ({type(model).__module__}.{type(model).__name__}) is sslkit's own architecture; "
                            f"timm has no class with its layout: loading needs sslkit (import sslkit.models)")
    overlay = _overlay(model, weights)
    line = f"import timm; m = {_call(timm_name, pretrained_cfg_overlay=overlay, **args)}"
    return ({"architecture": timm_name, "model_args": args, "pretrained_cfg_overlay": overlay,
             "weights": weights.name, "load_with": line, "note": note}, sd, note)


def _contiguous(model: torch.nn.Module) -> None:
    """safetensors writes contiguous tensors only (save_for_hf saves ``model.state_dict()`` as it is)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_contiguous():
            t.data = t.data.contiguous()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_backbone(model: torch.nn.Module, out: str | Path, meta: dict[str, Any],
                   model_args: Optional[dict[str, Any]] = None) -> Path:
    """``model`` (num_classes=0) into ``out`` in timm's hub layout with timm's ``save_for_hf``
    (``model.safetensors`` + ``config.json`` with ``meta`` under ``sslkit``; ``model_args``: the create kwargs
    to record besides those timm's factory recorded), plus ``backbone.json`` (``meta``) and
    ``backbone.safetensors`` (the same file). Returns ``out / "model.safetensors"``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _contiguous(model)
    save_for_hf(model, str(out), model_config={"sslkit": meta}, model_args=model_args, safe_serialization=True)
    _link_or_copy(out / HUB_WEIGHTS, out / "backbone.safetensors")
    (out / "backbone.json").write_text(json.dumps(meta, indent=2))
    return out / HUB_WEIGHTS


def export(checkpoint: str | Path, out: str | Path, model: Optional[str] = None,
           kwargs: Optional[dict[str, Any]] = None) -> Path:
    """Export the backbone of ``checkpoint`` to ``out`` (see the module docstring); returns ``out`` (absolute).

    ``checkpoint``: an sslkit checkpoint or export, or a foreign checkpoint ``sslkit.pretrained`` converts
    (then ``model`` = the sslkit model to build and ``kwargs`` its architecture kwargs, as for
    ``load_backbone``)."""
    net, pre = load_backbone(checkpoint, for_finetune=True, model=model, kwargs=kwargs)
    net.eval()
    name, ckpt = pre.model_name, pre.ckpt
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    method = pre.meta.get("method")
    create_kwargs = {k: v for k, v in pre.kwargs.items() if k != "num_classes"}
    equiv, timm_sd, note = timm_equivalent(net, name, create_kwargs, out)
    load_with = f"import sslkit.models, timm; m = {_call('local-dir:' + str(out))}"
    meta = {
        "model_name": name,
        "create_kwargs": create_kwargs,
        "method": method, "step": pre.meta.get("step"), "source_checkpoint": str(checkpoint), "source": pre.source,
        "sslkit_version": ckpt["sslkit_version"] if ckpt else pre.meta.get("sslkit_version"),
        "exported_with": f"sslkit {sslkit.__version__}",
        "load_with": load_with,
        "timm_equivalent": equiv,
        "needs_sslkit": equiv is None,
        "backbone_prefix": ckpt.get("backbone_prefix", ckpt_io.DEFAULT_BACKBONE_PREFIX) if ckpt else None,
        "notes": METHODS.get(method, Method).export_note if method else "Backbone only (no head).",
    }
    weights = write_backbone(net, out, meta, {k: v for k, v in create_kwargs.items() if not _is_drop(k)})
    if timm_sd is not None:
        save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(out / TIMM_WEIGHTS))
    else:
        (out / TIMM_WEIGHTS).unlink(missing_ok=True)  # a stale one from an earlier export into `out`
    print(f"[sslkit] wrote {out}: {HUB_CONFIG} + {weights.name} (timm hub layout, {len(net.state_dict())} tensors), "
          f"backbone.json + backbone.safetensors{' + ' + TIMM_WEIGHTS if timm_sd is not None else ''}")
    print(f"[sslkit] load with: {load_with}")
    if equiv is not None:
        print(f"[sslkit] timm by name, without sslkit: {equiv['load_with']}")
    else:
        print(f"[sslkit] no timm equivalent: {note}")
    return out
