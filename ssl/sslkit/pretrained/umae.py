"""The UM-MAE reference checkpoints (implus/UM-MAE) into sslkit's ``sslkit_pvt_*`` / ``sslkit_swin_*``.

The reference saves ``{"model": state_dict, "optimizer", "epoch", "scaler", "args": argparse.Namespace}``;
``load_pretrained`` unwraps ``model`` (reading with ``weights_only=True`` and only ``argparse.Namespace``
allowed). Four backbone layouts, told apart by their keys:

================================  ====================================================================
``umae_pvt_pretrain``             ``MaskedAutoencoderPVT`` (UM-MAE pretraining): flat ``blocks.k`` with a
                                  ``downsample`` in the first block of stages 2..S, ``norm``, the decoder.
                                  -> ``um_pretrain=True`` (halved spatial-reduction ratios).
``umae_pvt_finetune``             the reference fine-tuning ``PVT``: a learned ``pos_embed``, ``fc_norm``
                                  after pooling, ``head``. -> ``pos_embed="learned"``, ``fc_norm=True``.
``umae_swin_pretrain``            ``MaskedAutoencoderSwin``: the bias MLP is ``attn.posmlp`` (1x1 convs).
                                  -> ``um_pretrain=True`` (window 8).
``umae_swin_finetune``            the reference fine-tuning ``Swin``: ``fc_norm``, ``head``.
                                  -> ``fc_norm=True`` (window 16).
``umae_simmim_{pvt,swin}``        the reference's SimMIM baselines (``SimMIMPVT`` / ``SimMIMSwin``).
================================  ====================================================================

Key mapping (backbone): ``blocks.k.*`` -> ``stages.i.blocks.j.*`` (stages from where the downsamples are),
``blocks.k.downsample.*`` -> ``stages.i.downsample.*``; Swin's ``attn.posmlp.0`` / ``.2`` (1x1 convs) ->
``attn.pos_mlp.fc1`` / ``fc2`` (linears; sslkit's last bias-MLP layer has no bias: a per-head constant added
to every attention logit cancels in the softmax, so the reference's ``posmlp.2.bias`` is dropped exactly).
Expected and not loaded: the fixed sin-cos tables (``pos_embed`` of pretraining, ``decoder_pos_embed``: sslkit
computes them), the decoder and mask tokens (a backbone has none; ``convert_method`` maps them for a whole
UM-MAE / SimMIM method), ``head`` (a new one is made for fine-tuning). Any other key is an error naming it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from sslkit.errors import CheckpointError
from sslkit.pretrained.layouts import Layout, StateDict, register_layout

_PVT_PARTS = ("norm1", "attn.q", "attn.kv", "attn.proj", "attn.sr", "attn.norm", "norm2", "mlp.fc1", "mlp.fc2")
_SWIN_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_DECODER = re.compile(r"^(decoder_\w+|mask_token|vis_mask_token)(\.|$)")


def _stages(sd: Mapping[str, Tensor]) -> dict[int, tuple[int, int]]:
    """Flat block index k -> (stage i, block j): a new stage starts at every block with a downsample."""
    ks = sorted({int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    out, i, j = {}, 0, 0
    for n, k in enumerate(ks):
        if n and f"blocks.{k}.downsample.proj.weight" in sd:
            i, j = i + 1, 0
        out[k] = (i, j)
        j += 1
    return out


def convert_backbone(sd: Mapping[str, Tensor], family: str, *, keep: tuple[str, ...] = (),
                     ignore: tuple[str, ...] = ()) -> StateDict:
    """The reference backbone keys of ``sd`` in sslkit's names (``family``: ``pvt`` | ``swin``). ``keep``:
    top-level keys taken as they are (e.g. ``pos_embed``, ``fc_norm``); ``ignore``: prefixes expected but not
    part of the backbone. CheckpointError naming every other key."""
    stages, parts = _stages(sd), (_PVT_PARTS if family == "pvt" else _SWIN_PARTS)
    out: StateDict = {}
    unknown = []
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and int(m[1]) in stages:
            i, j = stages[int(m[1])]
            part, p = m[2], m[3]
            if part in parts:
                out[f"stages.{i}.blocks.{j}.{part}.{p}"] = v
            elif part.startswith("downsample.") and j == 0:
                out[f"stages.{i}.{part}.{p}"] = v
            elif family == "swin" and part == "attn.posmlp.0":  # Conv2d(2, hidden, 1) -> Linear(2, hidden)
                out[f"stages.{i}.blocks.{j}.attn.pos_mlp.fc1.{p}"] = v.flatten(1) if p == "weight" else v
            elif family == "swin" and part == "attn.posmlp.2":  # Conv2d(hidden, heads, 1) -> Linear, no bias
                if p == "weight":
                    out[f"stages.{i}.blocks.{j}.attn.pos_mlp.fc2.weight"] = v.flatten(1)
            else:
                unknown.append(k)
        elif k.startswith(("patch_embed.", "norm.")) or k.split(".")[0] in keep:
            out[k] = v
        elif not k.startswith(ignore):
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"UM-MAE reference {family} checkpoint: keys that are neither mapped nor expected: "
                              f"{sorted(unknown)}")
    return out


def architecture(sd: Mapping[str, Tensor], family: str) -> dict[str, Any]:
    """The create kwargs that the reference weights fix (all but the head counts, which no shape shows):
    stem stride, per-stage widths, depths, MLP ratios (and the bias-MLP width for Swin)."""
    stages = _stages(sd)
    depths = [sum(1 for i, _ in stages.values() if i == s) for s in range(max(i for i, _ in stages.values()) + 1)]
    first = {i: k for k, (i, j) in sorted(stages.items(), reverse=True) if j == 0}  # first block of each stage
    dims = [int(sd[f"blocks.{first[i]}.norm1.weight"].shape[0]) for i in range(len(depths))]
    ratios = [sd[f"blocks.{first[i]}.mlp.fc1.weight"].shape[0] / dims[i] for i in range(len(depths))]
    out: dict[str, Any] = {"patch_size": int(sd["patch_embed.proj.weight"].shape[-1]), "depths": depths}
    if family == "pvt":
        return {**out, "embed_dims": dims, "mlp_ratios": [int(r) if r == int(r) else r for r in ratios]}
    return {**out, "embed_dim": dims[0], "mlp_ratio": ratios[0],
            "posmlp_dim": int(sd[f"blocks.{first[0]}.attn.posmlp.0.weight"].shape[0])}


def _is(sd: Mapping[str, Tensor], family: str, *need: str, without: tuple[str, ...] = ()) -> bool:
    marker = "blocks.0.attn.q.weight" if family == "pvt" else "blocks.0.attn.posmlp.0.weight"
    return marker in sd and all(k in sd for k in need) and not any(k in sd for k in without)


_PRETRAIN_IGNORE = ("pos_embed", "decoder_", "mask_token", "vis_mask_token")


def _pvt_pretrain(sd: Mapping[str, Tensor], model: str, kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    return convert_backbone(sd, "pvt", ignore=_PRETRAIN_IGNORE), {**architecture(sd, "pvt"), "um_pretrain": True}


def _pvt_finetune(sd: Mapping[str, Tensor], model: str, kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    out = convert_backbone(sd, "pvt", keep=("pos_embed", "fc_norm"), ignore=("head.",))
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    side = int(round(out["pos_embed"].shape[1] ** 0.5))  # the learned table's grid is the training size
    return out, {**architecture(sd, "pvt"), "um_pretrain": False, "pos_embed": "learned", "fc_norm": True,
                 "img_size": side * patch}


def _swin_pretrain(sd: Mapping[str, Tensor], model: str, kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    return convert_backbone(sd, "swin", ignore=_PRETRAIN_IGNORE), {**architecture(sd, "swin"), "um_pretrain": True}


def _swin_finetune(sd: Mapping[str, Tensor], model: str, kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    return convert_backbone(sd, "swin", keep=("fc_norm",), ignore=("head.",)), {**architecture(sd, "swin"),
                                                                                 "um_pretrain": False, "fc_norm": True}


def _simmim(family: str):
    def convert(sd: Mapping[str, Tensor], model: str, kwargs: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
        return (convert_backbone(sd, family, ignore=("pos_embed", "mask_token", "decoder_pred")),
                {**architecture(sd, family), "um_pretrain": False})
    return convert


for _layout in (
    Layout("umae_pvt_pretrain", ("sslkit_pvt_",), lambda sd: _is(sd, "pvt", "decoder_embed.weight"), _pvt_pretrain,
           "UM-MAE reference pretraining, PVT"),
    Layout("umae_pvt_finetune", ("sslkit_pvt_",), lambda sd: _is(sd, "pvt", "fc_norm.weight", "pos_embed"),
           _pvt_finetune, "UM-MAE reference fine-tuning, PVT"),
    Layout("umae_swin_pretrain", ("sslkit_swin_",), lambda sd: _is(sd, "swin", "decoder_embed.weight"),
           _swin_pretrain, "UM-MAE reference pretraining, Swin"),
    Layout("umae_swin_finetune", ("sslkit_swin_",), lambda sd: _is(sd, "swin", "fc_norm.weight"), _swin_finetune,
           "UM-MAE reference fine-tuning, Swin"),
    Layout("umae_simmim_pvt", ("sslkit_pvt_",),
           lambda sd: _is(sd, "pvt", "decoder_pred.weight", "mask_token", without=("decoder_embed.weight",)),
           _simmim("pvt"), "SimMIM baseline of the UM-MAE reference code, PVT"),
    Layout("umae_simmim_swin", ("sslkit_swin_",),
           lambda sd: _is(sd, "swin", "decoder_pred.weight", "mask_token", without=("decoder_embed.weight",)),
           _simmim("swin"), "SimMIM baseline of the UM-MAE reference code, Swin"),
):
    register_layout(_layout)


# ----------------------------------------------------------------------------------------- whole methods
def convert_method(sd: Mapping[str, Tensor], family: str, method: str, *, unit: int = 16,
                   stem_norm_eps: float = 1e-6) -> StateDict:
    """A reference UM-MAE (``method="umae"``) or SimMIM (``"simmim"``) pretraining state dict as the state dict of
    sslkit's method module (``methods.umae.UMMAE`` / ``methods.simmim.SimMIM``): the backbone under
    ``backbone.``, and

    - UM-MAE: ``vis_mask_token`` (the reference adds it after the stem; for Swin it passes it through the
      stem's LayerNorm first, so the converted token is that normalized value: the same forward),
      ``mask_token``, ``decoder_embed``, ``decoder_blocks.i`` (timm ``Block``: ``attn.qkv`` / ``attn.proj`` ->
      ``qkv`` / ``proj``), ``decoder_norm``, ``decoder_pred``;
    - SimMIM: ``mask_token`` and ``decoder`` = the reference's ``decoder_pred`` with its output rows permuted
      from (PixelShuffle(2), then ``unit`` x ``unit`` x 3 patches in (y, x, c) order) to one
      ``pixel_shuffle(2 * unit)`` over (c, y, x).
    """
    backbone = convert_backbone(sd, family, ignore=_PRETRAIN_IGNORE)
    out: StateDict = {f"backbone.{k}": v for k, v in backbone.items()}
    if method == "simmim":
        out["mask_token"] = sd["mask_token"].reshape(1, 1, 1, -1)
        p, s = unit, 2 * unit
        c, y, x = torch.meshgrid(torch.arange(3), torch.arange(s), torch.arange(s), indexing="ij")
        theirs = (((y % p) * p + (x % p)) * 3 + c) * 4 + (y // p) * 2 + (x // p)  # row of ours (c, y, x) in theirs
        order = theirs.flatten()
        out["decoder.weight"], out["decoder.bias"] = sd["decoder_pred.weight"][order], sd["decoder_pred.bias"][order]
        return out
    if "vis_mask_token" in sd:
        tok = sd["vis_mask_token"].reshape(1, 1, 1, -1)
        if family == "swin":
            tok = F.layer_norm(tok, tok.shape[-1:], sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"],
                               stem_norm_eps)
        out["vis_mask_token"] = tok
    out["mask_token"] = sd["mask_token"]
    for k, v in sd.items():
        if k.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            out[k] = v
        elif m := re.match(r"decoder_blocks\.(\d+)\.(.+)$", k):
            out[f"decoder_blocks.{m[1]}.{m[2].replace('attn.', '', 1)}"] = v
    return out
