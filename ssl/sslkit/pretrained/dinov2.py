"""DINOv2 checkpoints (facebookresearch/dinov2 hub backbones, its training checkpoints) and timm's
``vit_*_dinov2`` state dicts into sslkit's ``sslkit_vit_*`` backbones.

Layouts (registered with ``sslkit.pretrained.layouts``, all converting to ``sslkit_vit_*``):

- ``dinov2_backbone``: a bare ``DinoVisionTransformer`` state dict, e.g. the released
  ``dinov2_vit{s,b,l}14[_reg4]_pretrain.pth``: ``cls_token``, ``pos_embed`` (``1 + 37*37`` entries at 518 px),
  ``register_tokens``, ``mask_token`` ``(1, C)``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``. Also the
  chunked numbering of its FSDP training (``block_chunks > 0``): chunk ``C`` is a list of ``nn.Identity``
  placeholders followed by its blocks, so the keys are ``blocks.C.N.*`` with ``N`` the GLOBAL block index
  (depth 4, 2 chunks: ``blocks.0.0``, ``blocks.0.1``, ``blocks.1.2``, ``blocks.1.3``); ``blocks.C.N`` ->
  ``blocks.N``, checked (every block once, chunks in order).
- ``dinov2_train``: its training checkpoints: ``{"model": {"teacher.backbone.*", "student.backbone.*",
  "{teacher,student}.{dino,ibot}_head.*"}, "iteration": ...}`` (``load_pretrained`` unwraps ``model``) and the
  ``eval/<it>/teacher_checkpoint.pth`` files, ``{"teacher": {"backbone.*", "dino_head.*", ...}}``. The TEACHER's
  backbone is converted (what DINOv2 evaluates; the student's only when there is no teacher); the heads and
  the student are expected and ignored; the backbone may be chunked.
- ``timm_vit``: timm ``VisionTransformer`` state dicts with a class token, e.g. ``vit_small_patch14_dinov2.lvd142m``
  (no registers: timm's names are ours, no ``mask_token``: zeros) and ``vit_small_patch14_reg4_dinov2.lvd142m``
  (``reg_token``, ``no_embed_class=True``: ``pos_embed`` has only the ``N`` patch entries and the class-token
  position is folded into ``cls_token``). The position layouts are converted by the ViT's own
  ``sslkit.models.vit.checkpoint_filter_fn``; a classifier ``head.*`` is expected and ignored.

Every key is mapped or expected-and-ignored; anything else is a ``CheckpointError`` naming every such key.
The converters return the create kwargs the weights need: ``patch_size`` (from ``patch_embed.proj``),
``reg_tokens``, ``init_values`` (LayerScale present or not; its value is irrelevant once loaded), ``qkv_bias``
(when the checkpoint has none) and ``img_size``. Width, depth and heads come from the model the user names
(``model=sslkit_vit_small`` ...) and are checked by ``check_load`` (shape mismatches named).

``img_size`` and position embeddings: with a caller ``img_size`` (fine-tuning and evaluation pass the crop
size) the patch positions are resampled once at load time to that grid **by the source model's own rule**
(``resample_like_source``), so at that size sslkit's model computes what the source model computes; without
one the model keeps the checkpoint's own grid (518 px for the released backbones). At forward time, for
other input sizes, the sslkit ViT resamples by its one rule (bicubic from the patch grid, size-based,
``align_corners=False``, antialias off). The source rules are not in the weights but in how the models are
built:

- ``DinoVisionTransformer.interpolate_pos_encoding`` with ``interpolate_offset=0.1`` (hub backbones without
  registers, training default): bicubic with ``scale_factor=(g + 0.1) / M`` instead of the output size, so
  the sampling positions are stretched by ``g / (g + 0.1)`` (also along an axis whose size does not change);
- the ``_reg`` hub backbones: ``interpolate_offset=0``, ``interpolate_antialias=True``: size-based but
  antialiased (PyTorch's antialiased bicubic also uses the a = -0.5 kernel, not -0.75, even when upsampling);
- timm with ``dynamic_img_size=True``: ``resample_abs_pos_embed`` with antialias on.

At the checkpoint's own grid and at the loaded ``img_size`` the outputs agree to float rounding; at other
sizes (forward-time resampling) they differ slightly (measured up to ~0.04 on LayerNormed tokens, only
from the rule): ``tests/test_pretrained_dinov2.py``.

The DINOv2 ViT against sslkit's, each difference handled or refused:

=============================  ==================================  ======================================
DINOv2                         sslkit ``VisionTransformer``        here
=============================  ==================================  ======================================
patch 14                       any ``patch_size``                  ``patch_size`` from the weights
``ls1.gamma`` / ``ls2.gamma``  same names (``init_values``)        ``init_values`` so LayerScale exists
``register_tokens`` (no pos)   ``reg_token`` (no pos), same order  renamed; ``reg_tokens`` from the shape
``qkv_bias`` True / False      ``qkv_bias``                        ``qkv_bias=False`` passed when absent
``proj_bias``/``ffn_bias`` F   always biases                       refused (CheckpointError)
SwiGLU FFN (ViT-g: w12, w3)    GELU MLP only (fc1, fc2)            refused (CheckpointError)
LayerNorm eps 1e-6             1e-6                                same
``mask_token`` ``(1, C)``      ``(1, C)``                          copied (checked); timm: zeros
pos. interpolation             bicubic, size-based, no antialias   the source's rule at load (see above)
=============================  ==================================  ======================================
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from sslkit.errors import CheckpointError
from sslkit.models.vit import checkpoint_filter_fn
from sslkit.pretrained.layouts import Layout, StateDict, register_layout

FAMILIES = ("sslkit_vit_",)
DEFAULT_INIT_VALUES = 1e-5  # LayerScale init when the caller gives none (DINOv2's ``layerscale``; overwritten)

# the per-block parameters sslkit's ViT has (timm Block names, shared by DINOv2)
BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "ls2.gamma",
)
OPTIONAL_BLOCK_KEYS = ("attn.qkv.bias", "ls1.gamma", "ls2.gamma")  # qkv_bias, LayerScale
TOP_KEYS = ("cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias")
# DINOv2's SwiGLU FFN (w12, w3; SwiGLUFFNAligned: w1, w2, w3) and timm's unpacked SwiGLU (fc1_g, fc1_x)
_SWIGLU = re.compile(r"^blocks\.(?:\d+\.)?\d+\.mlp\.(?:w12|w1|w2|w3|fc1_g|fc1_x)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_HEAD = re.compile(r"^(?:teacher\.|student\.)?(?:dino_head|ibot_head)\.")
TRAIN_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.")  # in order of preference

_SWIGLU_WHY = ("sslkit's ViT has only the GELU MLP (fc1 -> GELU -> fc2); a SwiGLU FFN (w3(silu(x W1) * x W2), "
               "DINOv2 ViT-g/14 and timm's vit_giant_patch14*_dinov2) is a different function and cannot be "
               "represented by it, so the checkpoint is not converted. Use a ViT-S/B/L DINOv2 checkpoint")


# ------------------------------------------------------------------------------------- helpers
def _fail(what: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{what}: {msg}")


def _vit_like(sd: Mapping[str, Tensor]) -> bool:
    return all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")) and \
        any(k.startswith("blocks.") for k in sd)


def _is_chunked(sd: Mapping[str, Tensor]) -> bool:
    return any(_CHUNKED.match(k) for k in sd)


def _has_swiglu(sd: Mapping[str, Tensor]) -> bool:
    return any(_SWIGLU.match(k) for k in sd)


def _square(n: int) -> Optional[int]:
    g = math.isqrt(n) if n >= 0 else -1
    return g if g > 0 and g * g == n else None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise CheckpointError(f"img_size={v!r}: expected an int or a pair")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _unchunk(sd: Mapping[str, Tensor], what: str) -> StateDict:
    """``blocks.C.N.*`` (the reference's chunk numbering: N global) -> ``blocks.N.*``; checked."""
    out: StateDict = {}
    chunk_of: dict[int, int] = {}
    plain = []
    for k, v in sd.items():
        m = _CHUNKED.match(k)
        if m is None:
            if _BLOCK.match(k):
                plain.append(k)
            out[k] = v
            continue
        c, n, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if chunk_of.setdefault(n, c) != c:
            raise _fail(what, f"block {n} appears in chunks {chunk_of[n]} and {c} (blocks.{c}.{n}.{rest}); the "
                              f"reference numbers blocks globally inside chunks (blocks.C.N, N = the block index)")
        out[f"blocks.{n}.{rest}"] = v
    if chunk_of and plain:
        raise _fail(what, f"mixes chunked (blocks.C.N.*) and plain (blocks.N.*) block keys: {sorted(plain)}")
    by_chunk: dict[int, list[int]] = {}
    for n, c in chunk_of.items():
        by_chunk.setdefault(c, []).append(n)
    chunks = sorted(by_chunk)
    for a, b in zip(chunks, chunks[1:]):
        if max(by_chunk[a]) >= min(by_chunk[b]):
            raise _fail(what, f"chunk {a} holds blocks {sorted(by_chunk[a])} and chunk {b} blocks "
                              f"{sorted(by_chunk[b])}: not the reference's chunking (consecutive blocks, numbered "
                              f"globally: blocks.0.0, blocks.0.1, blocks.1.2, ...)")
    return out


def _arch_kwarg(kwargs: dict[str, Any], key: str, value: Any, what: str, why: str) -> Any:
    """``value`` (what the weights need), unless the caller asked for another: then a CheckpointError."""
    if key in kwargs and kwargs[key] != value:
        raise _fail(what, f"the checkpoint needs {key}={value!r} ({why}) but the model is configured with "
                          f"{key}={kwargs[key]!r}: set model.kwargs.{key}={value!r} (or leave it out), or use a "
                          f"matching checkpoint")
    return value


def resample_like_source(pe: Tensor, old: tuple[int, int], new: tuple[int, int], offset: float,
                         antialias: bool) -> Tensor:
    """``(1, h0*w0, C) -> (1, h*w, C)`` patch positions resampled by the rule the checkpoint's own model uses
    (bicubic; with ``offset`` by ``scale_factor = (new + offset) / old`` as DINOv2's
    ``interpolate_pos_encoding``, else by size; antialiased or not), so that at the loaded size sslkit's
    positions are the source model's."""
    c = pe.shape[-1]
    grid = pe.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2).float()  # (1, C, h0, w0)
    kw: dict[str, Any] = ({"scale_factor": ((new[0] + offset) / old[0], (new[1] + offset) / old[1])} if offset
                          else {"size": new})
    grid = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **kw)
    assert tuple(grid.shape[-2:]) == new, (grid.shape, new)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], c).to(pe.dtype)


def _vit_state(sd: Mapping[str, Tensor], kwargs: dict[str, Any], what: str, *, registers: str,
               pos_layouts: Optional[tuple[str, ...]] = None, ignore: tuple[str, ...] = (),
               rule: tuple[float, bool] = (0.0, True)) -> tuple[StateDict, dict[str, Any]]:
    """The shared part: validate a (plain-numbered) ViT state dict in timm / DINOv2 names, rename the registers
    to ``reg_token``, normalize the position layout (``checkpoint_filter_fn``), resample to the caller's
    ``img_size``, and work out the create kwargs. ``registers``: the register key of the layout;
    ``pos_layouts``: the ``pos_embed`` layouts it may have, tried in order (``"1+N"``: ours / DINOv2's, ``"N"``:
    timm ``no_embed_class``, ``"1+R+N"``: timm with register positions; default: timm's preference);
    ``ignore``: key prefixes expected and dropped; ``rule``: the source model's position-interpolation rule
    (``(offset, antialias)``, see ``resample_like_source``), used when resampling to ``img_size`` at load."""
    if _has_swiglu(sd):
        raise _fail(what, f"its blocks use a SwiGLU FFN ({sorted(k for k in sd if _SWIGLU.match(k))[:4]} ...): "
                          f"{_SWIGLU_WHY}")
    blocks: dict[int, set[str]] = {}
    unknown = []
    for k in sd:
        m = _BLOCK.match(k)
        if m and m.group(2) in BLOCK_KEYS:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif k not in TOP_KEYS and k != registers and not k.startswith(ignore):
            unknown.append(k)
    if unknown:
        raise _fail(what, f"keys that are neither mapped nor expected (not converted, nothing dropped silently): "
                          f"{sorted(unknown)}")
    depth = len(blocks)
    if sorted(blocks) != list(range(depth)):
        raise _fail(what, f"block indices {sorted(blocks)} are not 0..{depth - 1}")
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight"):
        if name not in sd:
            raise _fail(what, f"no {name}")
    required = set(BLOCK_KEYS) - set(OPTIONAL_BLOCK_KEYS)
    for i, have in sorted(blocks.items()):
        if missing := sorted(required - have):
            bias = [m for m in missing if m in ("attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")]
            why = (" (built with proj_bias=False / ffn_bias=False: sslkit's ViT always has those biases, so it "
                   "cannot represent this model; not converted)") if bias and len(bias) == len(missing) else ""
            raise _fail(what, f"block {i} has no {missing}{why}")
    fc1, fc2 = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc2.weight"]
    if fc1.shape[0] != fc2.shape[1]:
        packed = fc1.shape[0] == 2 * fc2.shape[1]
        raise _fail(what, (f"blocks.0.mlp.fc1 has {fc1.shape[0]} outputs, twice the {fc2.shape[1]} inputs of fc2: "
                           f"a packed SwiGLU FFN (timm SwiGLUPacked): {_SWIGLU_WHY}") if packed else
                    f"blocks.0.mlp.fc1 {tuple(fc1.shape)} does not feed blocks.0.mlp.fc2 {tuple(fc2.shape)}")
    has = {opt: [opt in blocks[i] for i in range(depth)] for opt in OPTIONAL_BLOCK_KEYS}
    for opt, flags in has.items():
        if any(flags) and not all(flags):
            raise _fail(what, f"{opt} in some blocks only ({[i for i, f in enumerate(flags) if f]})")
    layer_scale = all(has["ls1.gamma"]) and all(has["ls2.gamma"])
    if all(has["ls1.gamma"]) != all(has["ls2.gamma"]):
        raise _fail(what, "ls1.gamma without ls2.gamma (or the reverse)")

    out = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    cls = out["cls_token"]
    dim = cls.shape[-1]
    if tuple(cls.shape) != (1, 1, dim):
        raise _fail(what, f"cls_token has shape {tuple(cls.shape)}, expected (1, 1, C)")
    if registers in out:
        out["reg_token"] = out.pop(registers)
    reg = out.get("reg_token")
    r = 0 if reg is None else reg.shape[1]
    if reg is not None and (reg.ndim != 3 or reg.shape[0] != 1 or reg.shape[2] != dim):
        raise _fail(what, f"{registers} has shape {tuple(reg.shape)}, expected (1, R, {dim})")
    if "mask_token" in out and tuple(out["mask_token"].shape) != (1, dim):
        raise _fail(what, f"mask_token has shape {tuple(out['mask_token'].shape)}, expected (1, {dim}) (DINOv2's)")
    w = out["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise _fail(what, f"patch_embed.proj.weight has shape {tuple(w.shape)}: not a square patch kernel")
    p = int(w.shape[-1])

    # position layout -> ours (1 + N, the class position first), at the checkpoint's own grid
    pe = out["pos_embed"]
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != dim:
        raise _fail(what, f"pos_embed has shape {tuple(pe.shape)}, expected (1, L, {dim})")
    length = pe.shape[1]
    # timm's DINOv2 register ports are no_embed_class (N entries); timm-trained register ViTs have 1 + R + N.
    # (Tiny grids can fit two layouts, e.g. 9 = 3x3 = 1 + 4 + 2x2: the first in this order wins.)
    if pos_layouts is None:
        pos_layouts = ("N", "1+R+N", "1+N") if r else ("1+N", "N")
    offset = {"1+N": 1, "N": 0, "1+R+N": 1 + r}
    g = next((g for name in pos_layouts if (g := _square(length - offset[name]))), None)
    if g is None:
        raise _fail(what, f"pos_embed has {length} entries: not {' or '.join(pos_layouts)} for a square patch grid "
                          f"of N entries ({r} registers)")
    target = SimpleNamespace(mask_token=torch.zeros(1, dim, dtype=cls.dtype), grid_size=(g, g))  # what the filter
    out = checkpoint_filter_fn(out, target)  # reads of the model: pinned to the checkpoint's grid -> exact
    assert out["pos_embed"].shape[1] == 1 + g * g

    # only what differs from the model's defaults or what the caller set (the rest stays out of model configs)
    need: dict[str, Any] = {"patch_size": _arch_kwarg(kwargs, "patch_size", p, what, "its patch_embed.proj kernel")}
    if r or "reg_tokens" in kwargs:
        need["reg_tokens"] = _arch_kwarg(kwargs, "reg_tokens", r, what, f"its {registers}")
    if "qkv_bias" in kwargs or not all(has["attn.qkv.bias"]):
        need["qkv_bias"] = _arch_kwarg(kwargs, "qkv_bias", all(has["attn.qkv.bias"]), what, "attn.qkv.bias")
    iv = kwargs.get("init_values")
    if layer_scale and not iv and "init_values" in kwargs:
        raise _fail(what, f"the checkpoint has LayerScale (ls1.gamma) but the model is configured with "
                          f"init_values={iv!r} (no LayerScale): set model.kwargs.init_values={DEFAULT_INIT_VALUES} "
                          f"(or leave it out)")
    if not layer_scale and iv:
        raise _fail(what, f"the checkpoint has no LayerScale but the model is configured with init_values={iv!r}: "
                          f"leave model.kwargs.init_values out")
    if layer_scale or "init_values" in kwargs:
        need["init_values"] = (iv or DEFAULT_INIT_VALUES) if layer_scale else None
    if kwargs.get("img_size") is not None:
        size = _pair(kwargs["img_size"])
        if size[0] % p or size[1] % p:
            raise _fail(what, f"img_size={kwargs['img_size']} is not a multiple of the checkpoint's patch size {p} "
                              f"(e.g. {p * (size[0] // p)} or {p * (size[0] // p + 1)})")
        new = (size[0] // p, size[1] // p)
        if new != (g, g):  # the source model's rule: at this size the positions are the source's
            pe = out["pos_embed"]
            out["pos_embed"] = torch.cat([pe[:, :1], resample_like_source(pe[:, 1:], (g, g), new, *rule)], dim=1)
        need["img_size"] = kwargs["img_size"]
    else:
        need["img_size"] = g * p  # the checkpoint's own grid (518 px for the released backbones)
    return out, need


# ---------------------------------------------------------------------------- dinov2_backbone
def detect_backbone(sd: Mapping[str, Tensor]) -> bool:
    """A bare DinoVisionTransformer state dict: ViT keys with ``register_tokens``, chunked blocks, a SwiGLU FFN,
    or DINOv2's ``(1, C)`` ``mask_token`` without timm's ``reg_token``."""
    if not _vit_like(sd):
        return False
    mask = sd.get("mask_token")
    return "register_tokens" in sd or _is_chunked(sd) or _has_swiglu(sd) or \
        (mask is not None and mask.ndim == 2 and "reg_token" not in sd)


def convert_backbone(sd: Mapping[str, Tensor], model_name: str, kwargs: dict[str, Any],
                     what: str = "DINOv2 backbone") -> tuple[StateDict, dict[str, Any]]:
    if "reg_token" in sd:
        raise _fail(what, "has timm's reg_token next to DINOv2's keys (register_tokens, chunked blocks or a 2-d "
                          "mask_token): not one layout")
    # DINOv2's hub models: offset 0.1, no antialias; its *_reg models: offset 0, antialias (hubconf.py)
    rule = (0.0, True) if "register_tokens" in sd else (0.1, False)
    return _vit_state(_unchunk(sd, what), kwargs, what, registers="register_tokens", pos_layouts=("1+N",),
                      rule=rule)


# ------------------------------------------------------------------------------- dinov2_train
def _prefixes(sd: Mapping[str, Tensor]) -> dict[str, StateDict]:
    groups: dict[str, StateDict] = {p: {} for p in TRAIN_PREFIXES}
    for k, v in sd.items():
        for p in TRAIN_PREFIXES:
            if k.startswith(p):
                groups[p][k[len(p):]] = v
                break
    return groups


def detect_train(sd: Mapping[str, Tensor]) -> bool:
    return any(f"{p}patch_embed.proj.weight" in sd for p in TRAIN_PREFIXES)


def convert_train(sd: Mapping[str, Tensor], model_name: str,
                  kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    groups = _prefixes(sd)
    if groups["teacher.backbone."] and groups["backbone."]:
        raise _fail("DINOv2 training checkpoint", "has both teacher.backbone.* and backbone.* keys: two backbones, "
                                                  "which one is meant is unclear")
    prefix = next(p for p in TRAIN_PREFIXES if groups[p])  # teacher (what DINOv2 evaluates), else the only one
    unknown = sorted(k for k in sd if not k.startswith(TRAIN_PREFIXES) and not _HEAD.match(k))
    if unknown:
        raise _fail("DINOv2 training checkpoint", f"keys that are neither a backbone (teacher.backbone.*, "
                                                  f"student.backbone.*, backbone.*) nor a head (dino_head, ibot_head), "
                                                  f"not converted: {unknown}")
    what = f"DINOv2 training checkpoint ({prefix}*)"
    # the training config's interpolation: offset 0.1, no antialias (ssl_default_config.yaml), registers or not
    return _vit_state(_unchunk(groups[prefix], what), kwargs, what, registers="register_tokens", pos_layouts=("1+N",),
                      rule=(0.1, False))


# ---------------------------------------------------------------------------------- timm_vit
def detect_timm(sd: Mapping[str, Tensor]) -> bool:
    """timm ``VisionTransformer`` names (class token), none of DINOv2's own markers; a 2-d ``mask_token`` is
    accepted with ``reg_token`` (a bare sslkit ViT state dict)."""
    if not _vit_like(sd) or detect_backbone(sd):
        return False
    mask = sd.get("mask_token")
    return mask is None or (mask.ndim == 2 and "reg_token" in sd)


def convert_timm(sd: Mapping[str, Tensor], model_name: str,
                 kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    # timm resamples loaded position tables with resample_abs_pos_embed: bicubic by size, antialiased
    return _vit_state(sd, kwargs, "timm VisionTransformer state dict", registers="reg_token", ignore=("head.",),
                      rule=(0.0, True))


register_layout(Layout(
    name="dinov2_train", families=FAMILIES, detect=detect_train, convert=convert_train,
    description="a DINOv2 training checkpoint: teacher.backbone.* / student.backbone.* (or teacher_checkpoint.pth's "
                "backbone.*) + dino_head / ibot_head; the teacher's backbone is used"))
register_layout(Layout(
    name="dinov2_backbone", families=FAMILIES, detect=detect_backbone, convert=convert_backbone,
    description="a DINOv2 DinoVisionTransformer state dict, e.g. dinov2_vits14[_reg4]_pretrain.pth, blocks.N.* or "
                "chunked blocks.C.N.*"))
register_layout(Layout(
    name="timm_vit", families=FAMILIES, detect=detect_timm, convert=convert_timm,
    description="a timm VisionTransformer state dict, e.g. vit_small_patch14_dinov2.lvd142m or "
                "vit_small_patch14_reg4_dinov2.lvd142m"))
