"""UM-MAE: masked autoencoding with Uniform Masking for pyramid ViTs (Li et al. 2022, arXiv 2205.10063).

Encoder input: the kept unit of every 2x2 block (25%), packed into a half-resolution image, so the
pyramid's local operators still see neighbours; a further ``secondary_mask_ratio`` of the kept units
are replaced by a learned ``vis_mask_token`` after the stem. Positions are the kept tokens' original
ones. The decoder pixel-shuffles the stride-32 encoder output back to one token per kept unit, adds
mask tokens for the removed units, and predicts the pixels of the removed units only.

The stem is run on the gathered pixels (not on the full image): it is non-overlapping, so this is
equal to stem-then-gather (tested) and costs a quarter of the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

from sslkit.errors import ConfigError
from sslkit.masking import UniformMasking, blocks_to_grid
from sslkit.methods.base import (GREY, Method, create_backbone, init_backbone, register_method, tile, to_uint8,
                                 to_unit_rgb)
from sslkit.models.pos_embed import grid_coords, sincos_2d
from sslkit.models.um import gather_kept_units, patchify, um_positions, unpatchify, upsample_units
from sslkit.schemas import MethodConfig, between, checked, positive


@dataclass
class UMMAEConfig(MethodConfig):
    """Uniform sampling always removes 75% of the units (one of every 2x2 block kept): no ratio knob."""

    name: str = "umae"
    init_from: Optional[str] = None  # continued pretraining: a checkpoint whose backbone initializes the encoder
    unit: int = positive(16)  # patch unit in pixels (the pyramid's final stride / 2)
    secondary_mask_ratio: float = checked(0.25, between(0.0, 1.0, open_hi=True))  # of the kept units, behind a token
    norm_pix_loss: bool = True
    decoder_dim: int = positive(512)
    decoder_depth: int = positive(2)
    decoder_heads: int = positive(16)
    decoder_mlp_ratio: float = positive(4.0)


def check_unit(cfg_unit: int, backbone: nn.Module, img_size: int) -> tuple[int, int]:
    """The unit is half the backbone's total stride; the unit grid must be even. Returns (unit, grid)."""
    unit = backbone.reduction // 2
    if cfg_unit != unit:
        raise ConfigError(
            f"method.unit={cfg_unit} but the backbone's total stride is {backbone.reduction}, so the unit "
            f"must be {unit} px: set method.unit={unit} (or change the stem with model.kwargs.patch_size)"
        )
    if img_size % (2 * unit):
        raise ConfigError(
            f"method.view.size={img_size} is not a multiple of 2 x unit ({2 * unit} px): the unit grid must be "
            f"even; use e.g. {max(2 * unit, img_size // (2 * unit) * 2 * unit)}"
        )
    return unit, img_size // unit


class DecoderBlock(nn.Module):
    """Pre-norm ViT block (SDPA attention + GELU MLP). ``forward(x, n_out)`` returns only the last
    ``n_out`` tokens, computing queries, projection and MLP for those alone (keys / values still come
    from every token): exactly the corresponding rows of the full block's output, for less work. The
    last decoder block uses it, since only the removed units are predicted."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, n_out: int | None = None) -> torch.Tensor:
        B, L, D = x.shape
        h = self.num_heads
        y = self.norm1(x)
        if n_out is None or n_out == L:
            q, k, v = self.qkv(y).view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d)
        else:
            x = x[:, L - n_out:]
            wq, wkv = self.qkv.weight.split([D, 2 * D])
            bq, bkv = self.qkv.bias.split([D, 2 * D])
            q = F.linear(y[:, L - n_out:], wq, bq).view(B, n_out, h, D // h).transpose(1, 2)  # (B, h, n, d)
            k, v = F.linear(y, wkv, bkv).view(B, L, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)  # (B, n, D)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


HIDDEN_GREY = 0.2  # a kept unit hidden by the secondary mask, in the pictures


def mim_picture(images: torch.Tensor, removed: torch.Tensor, prediction: torch.Tensor, unit: int,
                grid: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                hidden: Optional[torch.Tensor] = None) -> np.ndarray:
    """The masked-image-modelling picture (UM-MAE, SimMIM), one row per image: original | the kept units
    (removed units grey) | [with ``hidden``: the kept units the secondary mask hides, dark grey] | the
    prediction of the removed units (kept units grey) | the prediction with the kept units pasted back.

    ``images`` and ``prediction``: (B, 3, H, W) normalized pixels (``prediction`` is read at the removed
    units only); ``removed`` / ``hidden``: (B, gh*gw) unit flags on the unit grid. Returns (H', W', 3) uint8.
    """
    orig, pred = to_unit_rgb(images, mean, std), to_unit_rgb(prediction, mean, std)  # (B, H, W, 3) in [0, 1]
    rm = upsample_units(removed.cpu(), grid, unit)  # (B, H, W, 1)
    grey = torch.full_like(orig, GREY)
    panels = [orig, torch.where(rm, grey, orig)]
    if hidden is not None:
        panels.append(torch.where(upsample_units(hidden.cpu(), grid, unit), torch.full_like(orig, HIDDEN_GREY),
                                  panels[1]))
    panels += [torch.where(rm, pred, grey), torch.where(rm, pred, orig)]
    cols = [to_uint8(p) for p in panels]
    return tile([[c[b] for c in cols] for b in range(orig.shape[0])])


@register_method
class UMMAE(Method):
    name = "umae"
    config_class = UMMAEConfig
    export_note = ("Backbone only (no head). UM pretraining adaptations were converted to fine-tuning shapes (PVT "
                   "spatial-reduction ratios 4,2,1,1 -> 8,4,2,1; Swin window 8 -> 16, continuous position bias MLPs "
                   "kept). The method's mask tokens and decoder are not exported.")
    test_overrides = ("method=umae_tiny", "model=sslkit_pvt_test")

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, self.model_config = create_backbone(model_cfg, um_pretrain=True)
        if cfg.init_from:  # continued pretraining from any supported checkpoint (sslkit.pretrained)
            init_backbone(self.backbone, self.model_config, str(cfg.init_from))
        img = int(cfg.view.size)
        self.unit, g = check_unit(int(cfg.unit), self.backbone, img)
        self.grid = (g, g)
        self.r = self.unit // self.backbone.stem_stride  # stem tokens per unit side
        self.norm_pix_loss = bool(cfg.norm_pix_loss)
        self.sm_ratio = float(cfg.secondary_mask_ratio)
        c0 = self.backbone.embed_dims[0]
        self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, 1, c0)) if self.sm_ratio > 0 else None

        D = int(cfg.decoder_dim)
        self.decoder_embed = nn.Linear(self.backbone.num_features, 4 * D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(D, int(cfg.decoder_heads), float(cfg.decoder_mlp_ratio)) for _ in range(int(cfg.decoder_depth)))
        self.decoder_norm = norm(D)
        self.decoder_pred = nn.Linear(D, self.unit * self.unit * 3)
        self.register_buffer("decoder_pos", sincos_2d(grid_coords(g, g).view(-1, 2), D), persistent=False)  # (L, D)
        self._init_decoder()

    def _init_decoder(self) -> None:
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)
        if self.vis_mask_token is not None:
            trunc_normal_(self.vis_mask_token, std=0.02)

    def masking(self) -> UniformMasking:
        return UniformMasking(self.grid, self.sm_ratio)

    def forward_encoder(self, images: torch.Tensor, keep_offset: torch.Tensor,
                        sm_masked: torch.Tensor | None) -> torch.Tensor:
        bh, bw = self.grid[0] // 2, self.grid[1] // 2
        x = gather_kept_units(images, keep_offset, self.unit)  # (B, 3, H/2, W/2)
        x = self.backbone.stem(x)  # (B, bh*r, bw*r, C0)
        if self.vis_mask_token is not None and sm_masked is not None:
            hide = upsample_units(sm_masked, (bh, bw), self.r)  # (B, bh*r, bw*r, 1)
            x = torch.where(hide, self.vis_mask_token.to(x.dtype), x)
        pos = um_positions(keep_offset, (bh, bw), self.r)  # (B, bh*r, bw*r, 2) original coordinates
        return self.backbone.forward_tokens(x, pos)  # (B, bh/2, bw/2, C)

    def forward_decoder(self, z: torch.Tensor, keep_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        B, h, w, _ = z.shape
        D = self.mask_token.shape[-1]
        x = self.decoder_embed(z)  # (B, h, w, 4D)
        # pixel shuffle x2 (channel d*4 + 2i + j -> (d, i, j)): one token per kept unit, block raster order
        x = x.view(B, h, w, D, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(B, 4 * h * w, D)  # (B, nb, D)
        pos = self.decoder_pos.to(x.dtype)
        x_vis = x + pos[keep_idx]  # original positions of the kept units
        x_mask = self.mask_token.to(x.dtype) + pos[masked_idx]  # (B, 3nb, D)
        x = torch.cat([x_vis, x_mask], dim=1)  # (B, L, D)
        n_masked = masked_idx.shape[1]
        for i, blk in enumerate(self.decoder_blocks):  # the last block computes the removed units only
            x = blk(x, n_masked if i == len(self.decoder_blocks) - 1 else None)
        return self.decoder_pred(self.decoder_norm(x[:, -n_masked:]))  # (B, 3nb, u*u*3)

    def loss(self, images: torch.Tensor, pred: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.unit)  # (B, L, u*u*3)
        target = target.gather(1, masked_idx[..., None].expand(-1, -1, target.shape[-1]))  # (B, 3nb, u*u*3)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (pred.float() - target.float()).pow(2).mean()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, keep_offset, masked = batch["images"], batch["keep_offset"], batch["masked"]
        B = images.shape[0]
        z = self.forward_encoder(images, keep_offset, batch.get("sm_masked"))
        keep_idx = blocks_to_grid(keep_offset, self.grid)  # (B, nb) unit indices in the full grid
        masked_idx = masked.nonzero()[:, 1].view(B, -1)  # (B, 3nb) removed units, raster order
        pred = self.forward_decoder(z, keep_idx, masked_idx)
        loss = self.loss(images, pred, masked_idx)
        return {"loss": loss, "loss_rec": loss.detach()}

    @torch.no_grad()
    def visualize(self, images: torch.Tensor, generator: torch.Generator, mean: Sequence[float],
                  std: Sequence[float], **options: Any) -> dict[str, np.ndarray]:
        """``reconstruction`` (``mim_picture``): original | uniformly sampled kept units | after secondary
        masking | predicted removed units | prediction + kept units, with the masks of ``masking()``. With
        ``norm_pix_loss`` the decoder predicts each patch normalized by its own mean / variance: the
        prediction is de-normalized with the target patch's mean and variance (as MAE's visualization)."""
        B = images.shape[0]
        m = {k: v.to(images.device) for k, v in self.masking()(B, generator).items()}
        keep_offset, masked, sm_masked = m["keep_offset"], m["masked"], m["sm_masked"]
        z = self.forward_encoder(images, keep_offset, sm_masked)
        keep_idx = blocks_to_grid(keep_offset, self.grid)  # (B, nb)
        masked_idx = masked.nonzero()[:, 1].view(B, -1)  # (B, 3nb), as forward
        pred = self.forward_decoder(z, keep_idx, masked_idx).float()  # (B, 3nb, u*u*3)
        patches = patchify(images.float(), self.unit)  # (B, L, u*u*3)
        idx = masked_idx[..., None].expand(-1, -1, patches.shape[-1])
        if self.norm_pix_loss:
            target = patches.gather(1, idx)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        prediction = unpatchify(patches.scatter(1, idx, pred), self.unit, self.grid)  # (B, 3, H, W)
        hidden = torch.zeros_like(masked).scatter(1, keep_idx, sm_masked) if self.sm_ratio > 0 else None
        return {"reconstruction": mim_picture(images, masked, prediction, self.unit, self.grid, mean, std, hidden)}
