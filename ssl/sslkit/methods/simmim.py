"""SimMIM-style dense baseline on the same pyramid backbone (Xie et al. 2022).

The full-resolution image goes through the encoder; the stem tokens of masked units (random 75% of
units) are replaced by a learned mask token. A 1x1 linear decoder + pixel shuffle (x total stride)
reconstructs the image; the loss is L1 on the masked pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from sslkit.masking import RandomMasking
from sslkit.methods.base import Method, create_backbone, init_backbone, register_method
from sslkit.methods.umae import check_unit, mim_picture
from sslkit.models.um import upsample_units
from sslkit.schemas import MethodConfig, between, checked, positive


@dataclass
class SimMIMConfig(MethodConfig):
    name: str = "simmim"
    init_from: Optional[str] = None  # continued pretraining: a checkpoint whose backbone initializes the encoder
    unit: int = positive(16)  # mask unit in pixels (the pyramid's final stride / 2, as UM-MAE's)
    mask_ratio: float = checked(0.75, between(0.0, 1.0, open_lo=True, open_hi=True))  # random share of units masked


@register_method
class SimMIM(Method):
    name = "simmim"
    config_class = SimMIMConfig
    export_note = "Backbone only (no head); the SimMIM mask token and decoder are not exported."
    test_overrides = ("method=simmim", "model=sslkit_pvt_test", "method.unit=8", "method.view.size=64")

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, self.model_config = create_backbone(model_cfg, um_pretrain=False)
        if cfg.init_from:  # continued pretraining from any supported checkpoint (sslkit.pretrained)
            init_backbone(self.backbone, self.model_config, str(cfg.init_from))
        self.unit, g = check_unit(int(cfg.unit), self.backbone, int(cfg.view.size))
        self.grid = (g, g)
        self.r = self.unit // self.backbone.stem_stride
        self.mask_ratio = float(cfg.mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.backbone.embed_dims[0]))
        trunc_normal_(self.mask_token, std=0.02)
        s = self.backbone.reduction
        self.decoder = nn.Linear(self.backbone.num_features, s * s * 3)  # 1x1 conv as a linear on NHWC

    def masking(self) -> RandomMasking:
        return RandomMasking(self.grid, self.mask_ratio)

    def forward_encoder(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) + (B, L) masked units -> (B, H/s, W/s, C): the stem tokens of masked units replaced by
        the mask token, then the backbone."""
        x = self.backbone.stem(images)  # (B, h, w, C0)
        hide = upsample_units(masked, self.grid, self.r)  # (B, h, w, 1)
        x = torch.where(hide, self.mask_token.to(x.dtype), x)
        return self.backbone.forward_tokens(x)  # (B, H/s, W/s, C)

    def reconstruct(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) + (B, L) masked units -> the decoder's (B, 3, H, W) reconstruction (normalized pixels)."""
        z = self.forward_encoder(images, masked)  # (B, H/s, W/s, C)
        s = self.backbone.reduction
        rec = self.decoder(z).permute(0, 3, 1, 2)  # (B, s*s*3, H/s, W/s)
        return F.pixel_shuffle(rec, s)  # (B, 3, H, W)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, masked = batch["images"], batch["masked"]
        B, C, H, W = images.shape
        rec = self.reconstruct(images, masked)  # (B, 3, H, W)
        pix_mask = masked.view(B, 1, self.grid[0], 1, self.grid[1], 1).expand(
            B, 1, self.grid[0], self.unit, self.grid[1], self.unit).reshape(B, 1, H, W).float()  # fp32: an exact count
        l1 = (rec.float() - images.float()).abs()
        loss = (l1 * pix_mask).sum() / (pix_mask.sum() + 1e-5) / C
        return {"loss": loss, "loss_rec": loss.detach()}

    @torch.no_grad()
    def visualize(self, images: torch.Tensor, generator: torch.Generator, mean: Sequence[float],
                  std: Sequence[float], **options: Any) -> dict[str, np.ndarray]:
        """``reconstruction`` (``umae.mim_picture``): original | kept units | reconstruction of the masked
        units | reconstruction + kept units, with the masks of ``masking()`` (no secondary mask; the loss is on
        the normalized pixels themselves, so the reconstruction needs no per-patch de-normalization)."""
        masked = self.masking()(images.shape[0], generator)["masked"].to(images.device)
        rec = self.reconstruct(images, masked).float()
        return {"reconstruction": mim_picture(images, masked, rec, self.unit, self.grid, mean, std)}
