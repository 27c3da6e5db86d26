"""UM-MAE parity fixtures: the reference implementation (implus/UM-MAE, CC-BY-NC 4.0) run at a tiny size.

Nothing of the reference is copied here: its modules are imported from the checkout given on the command
line, built with seeded, perturbed weights, fed seeded images and masks, and what they output is written as
numbers (``tests/fixtures/umae_*``). Per backbone family (PVT, Swin):

- ``umae_{fam}_pretrain.pth``: the reference's checkpoint layout (``{"model", "epoch", "args": Namespace}``)
  of a tiny ``MaskedAutoencoder{PVT,Swin}`` (the tests load it with weights_only + the Namespace allow-list);
- ``umae_{fam}_parity.safetensors``: images, the uniform + secondary masks, the encoder output and the loss,
  both with the reference decoder as published ("loss_official") and corrected ("loss", see below);
- ``umae_{fam}_finetune.pth`` + ``umae_{fam}_finetune_out.safetensors``: a tiny reference fine-tuning model
  (learned position embedding for PVT, ``fc_norm``, a head) and its logits / pre-logit features on an input;
- ``umae_simmim_{fam}.pth`` + ``umae_simmim_{fam}_parity.safetensors``: the reference's SimMIM baseline.

The secondary mask: the reference draws it inside ``forward_encoder`` from ``torch.rand(N, L)`` (the visible
units with the largest noise are hidden). We hand it noise that makes it hide exactly the units our
``UniformMasking`` chose, so both sides see the same masks.

The decoder correction: the reference gives its k-th visible decoder token (block order, from the pixel
shuffle) the position of the k-th visible unit in *raster* order (``decoder_pos_embed[~mask]``), which is
another unit's whenever two kept units of a block row lie in different unit rows. Corrected = each token
gets its own unit's position, i.e. the one-line change ``pos_vis = decoder_pos_embed[kept units in block
order]``. We make it without editing the reference: per image, the rows of its ``decoder_pos_embed`` at the
visible units are permuted so that raster-order lookup returns block-order positions (masked rows unchanged).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from common import commit_of, on_path, write_fixture

REFERENCE = "implus/UM-MAE"
IMG, PATCH, UNIT, B = 32, 1, 4, 2  # 32 px, stem stride 1, 4-px units (8 x 8 unit grid), 2 images
GRID = IMG // UNIT
PVT_ARCH = dict(embed_dims=[4, 8, 12, 16], depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], mlp_ratios=[2, 2, 2, 2])
SWIN_ARCH = dict(embed_dim=4, depths=[2, 1, 1, 1], num_heads=[1, 1, 2, 2], mlp_ratio=2, posmlp_dim=4)
DECODER = dict(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
# what sslkit composes for the same models (tests/test_parity_umae.py)
OURS = {
    "pvt": ["model=sslkit_pvt_test", "++model.kwargs.patch_size=1", "++model.kwargs.embed_dims=[4,8,12,16]",
            "++model.kwargs.num_heads=[1,1,2,2]", "++model.kwargs.mlp_ratios=[2,2,2,2]"],
    "swin": ["model=sslkit_swin_test", "++model.kwargs.patch_size=1", "++model.kwargs.embed_dim=4",
             "++model.kwargs.depths=[2,1,1,1]", "++model.kwargs.num_heads=[1,1,2,2]", "++model.kwargs.mlp_ratio=2",
             "++model.kwargs.posmlp_dim=4"],
}
OURS_UMAE = ["method=umae_tiny", "method.unit=4", "method.view.size=32", "method.decoder_dim=8",
             "method.decoder_depth=1", "method.decoder_heads=2", "method.secondary_mask_ratio=0.25",
             "method.norm_pix_loss=true"]


def _images(seed: int) -> torch.Tensor:
    """Seeded images whose values are exact in float16, so the fixture stores them in half the bytes."""
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).half().float()


def _shims() -> None:
    """Let the 2022 reference import under timm 1.0 / NumPy 2: its decoder blocks pass ``qk_scale`` (gone from
    timm), a Swin file imports ``turtle`` by accident, its pos-embed helper uses ``np.float``."""
    import numpy as np
    import timm.models.vision_transformer as vt

    if not getattr(vt.Block, "_sslkit_shim", False):
        base = vt.Block

        class Block(base):  # type: ignore[misc, valid-type]
            _sslkit_shim = True

            def __init__(self, *a: Any, qk_scale: Any = None, **kw: Any) -> None:
                super().__init__(*a, **kw)

        vt.Block = Block
    sys.modules.setdefault("turtle", types.SimpleNamespace(pos=None))  # type: ignore[arg-type]
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]


def _perturb(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded noise on every float tensor (LayerNorm weights away from 1, biases away from 0), then the state
    dict. The fixed sin-cos tables (requires_grad=False parameters) are left as the reference made them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim == 1 else 0.02))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _masks(seed: int) -> dict[str, torch.Tensor]:
    from sslkit.masking import UniformMasking, blocks_to_grid

    m = UniformMasking((GRID, GRID), 0.25)(B, torch.Generator().manual_seed(seed))
    m["keep_idx"] = blocks_to_grid(m["keep_offset"], (GRID, GRID))  # (B, n) raster index of each kept unit
    return m


def _noise_for(m: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) noise that makes the reference hide exactly ``sm_masked`` among the kept units."""
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(B, GRID * GRID, generator=g) * 0.5  # kept units: [0, 0.5) -> stay visible
    hidden = torch.zeros(B, GRID * GRID, dtype=torch.bool)
    hidden.scatter_(1, m["keep_idx"], m["sm_masked"])
    return torch.where(hidden, noise + 0.5, noise)  # secondary-masked: [0.5, 1) -> hidden


@contextlib.contextmanager
def _rand_returns(value: torch.Tensor) -> Iterator[None]:
    """``torch.rand(*value.shape)`` returns ``value`` (the reference's secondary-mask noise)."""
    orig = torch.rand

    def rand(*size: Any, **kw: Any) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)
        return value.clone() if shape == tuple(value.shape) else orig(*size, **kw)

    torch.rand = rand  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.rand = orig  # type: ignore[assignment]


def _corrected_table(table: torch.Tensor, masked: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """(1, L, D) decoder position table of one image, permuted so that raster-order lookup at the visible units
    yields their positions in block order (see the module docstring)."""
    raster = (~masked).nonzero().flatten()  # visible units, raster order
    out = table.clone()
    out[0, raster] = table[0, keep_idx]
    return out


def _save_checkpoint(path: Path, sd: dict[str, torch.Tensor], **args: Any) -> Path:
    """The reference's checkpoint layout (util/misc.py save_model): model + epoch + the pickled Namespace."""
    torch.save({"model": sd, "epoch": 0, "args": argparse.Namespace(**args)}, path)
    return path


def _umae(repo: Path, fam: str, out: Path, commit: str) -> list[Path]:
    import models_mae_pvt
    import models_mae_swin

    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    if fam == "pvt":
        cls = models_mae_pvt.MaskedAutoencoderPVT
        net = cls(img_size=IMG, patch_size=PATCH, stride=UNIT, sr_ratios=[4, 2, 1, 1], decoder_mlp_ratio=4,
                  norm_layer=norm, norm_pix_loss=True, vis_mask_ratio=0.25, **PVT_ARCH, **DECODER)
        arch = {**PVT_ARCH, "sr_ratios": [4, 2, 1, 1], "decoder_mlp_ratio": 4}
    else:
        cls = models_mae_swin.MaskedAutoencoderSwin
        net = cls(img_size=IMG, patch_size=PATCH, stride=UNIT, window_size=8, norm_layer=norm, norm_pix_loss=True,
                  vis_mask_ratio=0.25, **SWIN_ARCH, **DECODER)
        arch = {**SWIN_ARCH, "window_size": 8, "decoder_mlp_ratio": SWIN_ARCH["mlp_ratio"]}
    sd = _perturb(net, seed=1 if fam == "pvt" else 2)
    net.eval()
    images = _images(3)
    m = _masks(seed=4)
    mask = m["masked"]  # (B, L) True = removed, the reference's polarity too
    with torch.no_grad():
        with _rand_returns(_noise_for(m)):
            enc = net.forward_encoder(images, mask)  # (B, L', C)
        with _rand_returns(_noise_for(m)):
            loss_official = net(images, mask)[0]
        table = net.decoder_pos_embed.data.clone()
        losses = []
        for b in range(B):  # per image: its own corrected position table
            net.decoder_pos_embed.data.copy_(_corrected_table(table, mask[b], m["keep_idx"][b]))
            with _rand_returns(_noise_for(m)[b:b + 1]):
                losses.append(net(images[b:b + 1], mask[b:b + 1])[0])
        net.decoder_pos_embed.data.copy_(table)
    loss = torch.stack(losses).mean()  # every image has the same number of removed units
    files = [_save_checkpoint(out / f"umae_{fam}_pretrain.pth", sd, model=f"mae_{fam}_tiny", input_size=IMG,
                              mask_regular=True, vis_mask_ratio=0.25, norm_pix_loss=True)]
    files.append(write_fixture(
        out / f"umae_{fam}_parity.safetensors",
        {"images": images.half(), "masked": mask, "keep_offset": m["keep_offset"], "sm_masked": m["sm_masked"],
         "encoder": enc, "loss": loss, "loss_official": loss_official},
        reference=REFERENCE, commit=commit, model=cls.__name__, arch=arch, decoder=DECODER, img_size=IMG,
        patch_size=PATCH, stride=UNIT,
        ours=OURS[fam] + OURS_UMAE + [f"method.decoder_mlp_ratio={arch['decoder_mlp_ratio']}"],
        note="loss: decoder positions corrected (each visible token its own unit's); loss_official: as published"))
    return files


def _finetune(repo: Path, fam: str, out: Path, commit: str) -> list[Path]:
    import models_pvt
    import models_swin

    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    if fam == "pvt":
        net = models_pvt.PVT(img_size=IMG, num_classes=5, patch_size=PATCH, sr_ratios=[8, 4, 2, 1], drop_path_rate=0.0,
                             norm_layer=norm, **PVT_ARCH)
    else:
        net = models_swin.Swin(img_size=IMG, num_classes=5, patch_size=PATCH, window_size=16, drop_path_rate=0.0,
                               norm_layer=norm, **SWIN_ARCH)
    sd = _perturb(net, seed=5 if fam == "pvt" else 6)
    net.eval()
    x = _images(8)
    seen: dict[str, torch.Tensor] = {}
    hook = net.head.register_forward_hook(lambda mod, a, o: seen.__setitem__("pre", a[0].detach().clone()))
    with torch.no_grad():
        logits = net(x)
    hook.remove()
    ckpt = _save_checkpoint(out / f"umae_{fam}_finetune.pth", sd, model=f"{fam}_tiny", input_size=IMG, nb_classes=5)
    fx = write_fixture(out / f"umae_{fam}_finetune_out.safetensors", {"input": x.half(), "logits": logits,
                                                                      "pre_logits": seen["pre"]},
                       reference=REFERENCE, commit=commit, model=type(net).__name__, img_size=IMG, num_classes=5,
                       ours=OURS[fam])
    return [ckpt, fx]


def _simmim(repo: Path, fam: str, out: Path, commit: str, backbone: dict[str, torch.Tensor]) -> list[Path]:
    """The reference's SimMIM baseline with the UM-MAE fixture's backbone weights (the shapes do not depend on
    the spatial-reduction ratios / window), its own mask token and decoder recorded in the fixture."""
    import models_simmim_pvt
    import models_simmim_swin

    from sslkit.masking import RandomMasking

    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    if fam == "pvt":
        net = models_simmim_pvt.SimMIMPVT(img_size=IMG, patch_size=PATCH, stride=UNIT, sr_ratios=[8, 4, 2, 1],
                                          norm_layer=norm, **PVT_ARCH)
    else:
        net = models_simmim_swin.SimMIMSwin(img_size=IMG, patch_size=PATCH, stride=UNIT, window_size=16,
                                            norm_layer=norm, **SWIN_ARCH)
    own = _perturb(net, seed=9 if fam == "pvt" else 10)
    extras = {k: own[k] for k in ("mask_token", "decoder_pred.weight", "decoder_pred.bias")}
    shared = {k: v for k, v in backbone.items() if k in own and k not in extras and k != "pos_embed"}
    net.load_state_dict({**own, **shared})
    net.eval()
    images = _images(11)
    mask = RandomMasking((GRID, GRID), 0.75)(B, torch.Generator().manual_seed(12))["masked"]
    with torch.no_grad():
        enc = net.forward_encoder(images, mask)
        loss = net(images, mask)[0]
    fx = write_fixture(out / f"umae_simmim_{fam}_parity.safetensors",
                       {"images": images.half(), "masked": mask, "encoder": enc, "loss": loss,
                        **{f"extra.{k}": v for k, v in extras.items()}},
                       reference=REFERENCE, commit=commit, model=type(net).__name__, img_size=IMG, stride=UNIT,
                       backbone=f"umae_{fam}_pretrain.pth", ours=OURS[fam] + ["method=simmim", "method.unit=4",
                                                                               "method.view.size=32"])
    return [fx]


def _umae_weights(out: Path, fam: str) -> dict[str, torch.Tensor]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(out / f"umae_{fam}_pretrain.pth", weights_only=True)["model"]


def make(repo: Path, out: Path) -> list[Path]:
    commit = commit_of(repo)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    with on_path(repo):
        _shims()
        for fam in ("pvt", "swin"):
            files += _umae(repo, fam, out, commit)
            files += _finetune(repo, fam, out, commit)
            files += _simmim(repo, fam, out, commit, _umae_weights(out, fam))
    return files
