"""Tiny DINOv2 checkpoints written by the reference code (facebookresearch/dinov2), for the loader tests.

``make(repo, out)`` imports ``dinov2.models.vision_transformer`` from the checkout ``repo`` (nothing of it is
copied here), builds the reference ``DinoVisionTransformer`` at a tiny size -- ``sslkit_vit_test``'s depth 2
and mlp_ratio 2 with ``embed_dim=8``, ``num_heads=2`` (the file budget: the 14 x 14 patch kernel dominates) and
DINOv2's patch 14 at 42 px (a 3x3 grid) -- seeds and perturbs
every weight (LayerScale, norms, tokens far from their init), and writes under ``out``:

- ``dinov2_ckpt_hub.pth``: ``torch.save(model.state_dict())`` like ``dinov2_vits14_pretrain.pth``, built as
  ``dinov2/hub/backbones.py`` does (``init_values=1.0``, ``block_chunks=0``, ``interpolate_offset=0.1``);
- ``dinov2_ckpt_reg4_hub.pth``: likewise ``dinov2_vits14_reg4_pretrain.pth`` (4 registers,
  ``interpolate_antialias=True``, ``interpolate_offset=0.0``);
- ``dinov2_ckpt_train.pth``: a training checkpoint ``{"model": SSLMetaArch-like state dict, "iteration": ...}``
  with ``student.*`` and ``teacher.*`` = ``{backbone, dino_head, ibot_head}``; the backbones are built with
  ``block_chunks=2`` (FSDP chunk numbering ``blocks.0.0``, ``blocks.1.1``) and the training defaults
  (``layerscale=1e-5``, ``interpolate_offset=0.1``, no antialias); the teacher holds the reg4 hub weights
  (copied parameter by parameter in the reference's own order), the student other weights;
- ``dinov2_ckpt_outputs.safetensors`` (``common.write_fixture``, with the reference commit): the input ``x``
  (2 x 3 x 28 x 28) and each model's ``forward_features`` (``x_norm_clstoken``, ``x_norm_patchtokens``,
  ``x_norm_regtokens``) in eval mode, fp32, on three inputs made of ``x`` (``inputs``): ``native`` 42 x 42 (``x``
  tiled: the model's own grid, no interpolation), ``small`` = ``x`` (2x2: the reference interpolates its
  position embeddings down, as 518 -> 224 px does) and ``wide`` 28 x 42 (2x3).

The script also checks, on the reference side, that the chunked teacher gives the reg4 hub model's outputs.
Same repo and commit -> the same bytes (single-threaded forward; ``torch.save`` of the same tensors under the
same file name is byte-identical).

xFormers: the reference imports it optionally; ``XFORMERS_DISABLED=1`` makes it take its pure-PyTorch paths
(``MemEffAttention`` -> ``F.scaled_dot_product_attention``, ``SwiGLUFFN``) whether or not xFormers is installed,
so nothing needs stubbing. Its other imports (torch, numpy) are installed.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

from common import commit_of, on_path, write_fixture

REFERENCE = "facebookresearch/dinov2"
PREFIX = "dinov2_ckpt_"
# sslkit_vit_test (depth 2, mlp_ratio 2) with embed_dim 8, 2 heads (the fixture budget), DINOv2's patch 14
ARCH = dict(img_size=42, patch_size=14, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
            ffn_layer="mlp")
HUB = dict(init_values=1.0, block_chunks=0, num_register_tokens=0, interpolate_antialias=False,
           interpolate_offset=0.1)  # dinov2/hub/backbones.py _make_dinov2_model defaults (dinov2_vits14)
REG4_HUB = dict(HUB, num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)  # dinov2_vits14_reg
TRAIN = dict(init_values=1e-5, block_chunks=2, num_register_tokens=4, interpolate_antialias=False,
             interpolate_offset=0.1)  # ssl_default_config.yaml (layerscale, interpolation) + FSDP chunks
HEAD = dict(out_dim=16, hidden_dim=16, bottleneck_dim=8, nlayers=3)  # DINOHead, tiny


def inputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of the outputs fixture, made of the stored ``x`` (B, 3, 28, 28) (the tests do the same)."""
    big = torch.cat([x, x[..., :14]], dim=-1)  # (B, 3, 28, 42)
    return {"native": torch.cat([big, big[..., :14, :]], dim=-2), "small": x, "wide": big}  # 42x42, 28x28, 28x42


def _import(repo: Path):
    os.environ["XFORMERS_DISABLED"] = "1"  # the reference's pure-PyTorch paths (see the module docstring)
    with on_path(repo), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "xFormers is disabled", weight_norm deprecation
        from dinov2.layers import DINOHead, MemEffAttention, NestedTensorBlock
        from dinov2.models import vision_transformer as vits
    return vits, DINOHead, partial(NestedTensorBlock, attn_class=MemEffAttention)  # block_fn as vits.vit_small


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if p.ndim == 1 and p.shape[0] == ARCH["embed_dim"]:  # LayerScale gammas / norm weights away from 1e-5 / 1
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def _plain(sd: dict) -> dict:
    """The state dict with its own storage per tensor (so each file holds exactly its tensors)."""
    out = type(sd)((k, v.detach().clone().contiguous()) for k, v in sd.items())
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata  # as model.state_dict() has it (what torch.save writes for the real files)
    return out


def make(repo: Path, out: Path) -> list[Path]:
    repo, out = Path(repo), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vits, DINOHead, block_fn = _import(repo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order -> the same output bytes every run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _make(vits, DINOHead, block_fn, repo, out)
    finally:
        torch.set_num_threads(threads)


def _make(vits, DINOHead, block_fn, repo: Path, out: Path) -> list[Path]:
    def build(seed: int, cfg: dict) -> nn.Module:
        torch.manual_seed(seed)
        return vits.DinoVisionTransformer(**ARCH, **cfg, block_fn=block_fn)

    hub = _perturb(build(0, HUB), 100)
    reg4 = _perturb(build(1, REG4_HUB), 101)
    teacher = build(2, TRAIN).eval()
    with torch.no_grad():  # the reg4 weights, parameter by parameter in the reference's own order
        src, dst = list(reg4.parameters()), list(teacher.parameters())
        assert [p.shape for p in src] == [p.shape for p in dst]
        for a, b in zip(src, dst):
            b.copy_(a)
    student = _perturb(build(3, TRAIN), 103)
    torch.manual_seed(4)
    heads = {who: {"dino_head": DINOHead(ARCH["embed_dim"], **HEAD), "ibot_head": DINOHead(ARCH["embed_dim"], **HEAD)}
             for who in ("student", "teacher")}  # separate_head=True, as the vitl14 / vitg14 recipes
    meta_arch = nn.ModuleDict({"student": nn.ModuleDict({"backbone": student, **heads["student"]}),
                               "teacher": nn.ModuleDict({"backbone": teacher, **heads["teacher"]})})
    assert any(k.startswith("teacher.backbone.blocks.1.1.") for k in meta_arch.state_dict())  # chunk numbering

    written = []
    for name, obj in (("hub.pth", _plain(hub.state_dict())), ("reg4_hub.pth", _plain(reg4.state_dict())),
                      ("train.pth", {"model": _plain(meta_arch.state_dict()), "iteration": 1249})):
        path = out / f"{PREFIX}{name}"
        torch.save(obj, path)
        written.append(path)

    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    tensors = {"x": x}
    with torch.no_grad():
        for mname, model in (("hub", hub), ("reg4_hub", reg4), ("train_teacher", teacher)):
            for iname, xi in inputs(x).items():
                o = model.forward_features(xi)
                tensors[f"{mname}.{iname}.cls"] = o["x_norm_clstoken"]
                tensors[f"{mname}.{iname}.patch"] = o["x_norm_patchtokens"]
                if model.num_register_tokens:
                    tensors[f"{mname}.{iname}.reg"] = o["x_norm_regtokens"]
    for k in ("cls", "patch", "reg"):  # the reference's chunked teacher == its unchunked reg4 backbone
        assert torch.equal(tensors[f"train_teacher.native.{k}"], tensors[f"reg4_hub.native.{k}"]), k
    written.append(write_fixture(
        out / f"{PREFIX}outputs.safetensors", tensors, reference=REFERENCE, commit=commit_of(repo),
        arch=ARCH, models={"hub": HUB, "reg4_hub": REG4_HUB, "train_teacher": TRAIN},
        inputs={"native": "cat of x, x[..., :14] along W, then of that and its first 14 rows along H (42x42)",
                "small": "x (28x28)", "wide": "cat of x and x[..., :14] along W (28x42)"},
        files=[p.name for p in written]))
    return written
