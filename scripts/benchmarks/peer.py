"""The quality benchmark's peer: DINOv2 built from lightly 1.6's components, as an sslkit method.

``method.name=lightly_dinov2`` takes the same config as ``dinov2`` (schema, view, schedules) and trains
in sslkit's loop on sslkit's data pipeline, so everything around the method is the same as for the
sslkit run it is compared with: the data and its multi-crop views, batch, optimizer (AdamW, layer-wise
lr decay, per-part gradient clipping), lr / weight-decay schedules, teacher-temperature and EMA-momentum
schedules, steps and seed. What is lightly's, as in lightly's ``examples/pytorch/dinov2.py``:

- the backbone: timm's ``VisionTransformer`` with the sslkit model's architecture (``timm_equivalent``,
  the class sslkit's export loads into), started from the sslkit backbone's initial weights, wrapped in
  ``MaskedVisionTransformerTIMM``; the student runs once per crop resolution (no packing, timm's
  mask-based stochastic depth if any);
- the heads: ``DINOv2ProjectionHead`` (shared by DINO and iBOT), the teacher's an EMA copy;
- the losses: ``DINOLoss`` / ``IBOTPatchLoss`` (softmax centering with an EMA center: lightly has no
  Sinkhorn-Knopp), ``KoLeoLoss``;
- the masking: ``random_block_mask`` on the global crops each step (with the config's probability and
  ratio range), not sslkit's collate masks;
- the EMA: ``update_momentum``.

The last head layer is frozen for ``freeze_last_layer_epochs`` by taking it out of the optimizer step
(requires_grad off), which is what cancelling its gradient does. Register by importing this module.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from sslkit.export import timm_equivalent
from sslkit.methods import create_backbone, embed, register_method
from sslkit.methods import dino_losses as L
from sslkit.methods.dinov2 import DINOv2, DINOv2Config
from sslkit.methods.ema import freeze


@dataclass
class LightlyDINOv2Config(DINOv2Config):
    name: str = "lightly_dinov2"


def timm_vit_like(model_cfg: Any) -> tuple[dict[str, Any], nn.Module, dict[str, Tensor]]:
    """(the model spec of the sslkit backbone ``model_cfg`` makes, timm's ``VisionTransformer`` of the same
    architecture loaded with that backbone's initial weights, those weights). Raises when timm has no class
    for the architecture."""
    sslkit_vit, model_config = create_backbone(model_cfg)
    spec, sd, note = timm_equivalent(sslkit_vit, str(model_cfg.name), dict(model_cfg.kwargs or {}), Path("."))
    if spec is None:
        raise ValueError(f"the lightly peer needs a ViT backbone: {note}")
    vit = timm.create_model(spec["architecture"], pretrained=False, num_classes=0, dynamic_img_size=True,
                            **spec["model_args"])
    state = sd if sd is not None else {k: v for k, v in sslkit_vit.state_dict().items() if k != "mask_token"}
    vit.load_state_dict(state, strict=True)
    return model_config, vit, state


@register_method
class LightlyDINOv2(DINOv2):
    """DINOv2 from lightly's parts; schedules, hooks' timing and evaluation (teacher CLS) as :class:`DINOv2`."""

    name = "lightly_dinov2"
    config_class = LightlyDINOv2Config
    export_note = "The EMA teacher's timm ViT (the peer of the quality benchmark), no head."
    backbone_prefix = "teacher.backbone.vit."

    def __init__(self, cfg: Any, model_cfg: Any) -> None:  # noqa: D107 (DINOv2.__init__ is not called)
        nn.Module.__init__(self)
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM

        self.cfg = cfg
        self.model_config, vit, init = timm_vit_like(model_cfg)
        dim, k = int(vit.embed_dim), int(cfg.prototypes)
        with warnings.catch_warnings():  # DINOv2ProjectionHead uses the deprecated nn.utils.weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            head = DINOv2ProjectionHead(input_dim=dim, hidden_dim=int(cfg.head_hidden_dim),
                                        bottleneck_dim=int(cfg.head_bottleneck_dim), output_dim=k)
            teacher_head = DINOv2ProjectionHead(input_dim=dim, hidden_dim=int(cfg.head_hidden_dim),
                                                bottleneck_dim=int(cfg.head_bottleneck_dim), output_dim=k)
        teacher_head.load_state_dict(head.state_dict())  # weight_norm modules cannot be deep-copied
        backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        vit.load_state_dict(init, strict=True)  # the wrapper re-initializes the class token: sslkit's init again
        self.student = nn.ModuleDict({"backbone": backbone, "dino_head": head})
        self.teacher = freeze(nn.ModuleDict({"backbone": copy.deepcopy(backbone), "dino_head": teacher_head}))
        self.teacher.eval()
        self._last_trainable = [p.requires_grad for p in head.last_layer.parameters()]  # weight_g too, in lightly
        self.dino_criterion = DINOLoss(output_dim=k, student_temp=float(cfg.student_temp),
                                       center_momentum=float(cfg.center_momentum))
        self.ibot_criterion = IBOTPatchLoss(output_dim=k, student_temp=float(cfg.student_temp),
                                            center_momentum=float(cfg.center_momentum))
        self.koleo_criterion = KoLeoLoss()
        view = cfg.view
        self.n_global, self.n_local = int(view.n_global), int(view.n_local)
        patch = vit.patch_embed.patch_size[0]
        self.grid = (int(view.size) // patch, int(view.size) // patch)
        self._step, self._steps_per_epoch, self._total = 0, 1, 1

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.student["backbone"].vit  # the layer-wise lr decay groups: the same names as sslkit's ViT

    @property
    def fp32_reduce(self) -> tuple[str, ...]:
        return ()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        from lightly.models.utils import random_block_mask

        g_crops = batch["global_crops"]  # (G*B, 3, S, S)
        l_crops = batch.get("local_crops")  # (L*B, 3, s, s) or None
        temp = self.teacher_temp_at(self._step)
        frozen = self.last_layer_frozen_at(self._step)
        for p, trainable in zip(self.student["dino_head"].last_layer.parameters(), self._last_trainable):
            p.requires_grad_(trainable and not frozen)
        h, w = self.grid
        c = self.cfg
        block_mask = random_block_mask(size=(g_crops.shape[0], h, w), batch_mask_ratio=float(c.mask_probability),
                                       min_image_mask_ratio=float(c.mask_ratio[0]),
                                       max_image_mask_ratio=float(c.mask_ratio[1]), device=g_crops.device)
        mask = nn.functional.pad(block_mask.flatten(1), (1, 0))  # (G*B, 1+N): the CLS token is never masked
        s_bb, s_head = self.student["backbone"], self.student["dino_head"]
        t_bb, t_head = self.teacher["backbone"], self.teacher["dino_head"]

        with torch.no_grad():
            t_feat = t_bb.encode(g_crops)  # (G*B, 1+N, C)
            t_cls_out = t_head(t_feat[:, 0])  # (G*B, K)
            t_masked_out = t_head(t_feat[mask])  # (M, K)
        s_feat = s_bb.encode(g_crops, mask=mask)
        s_g_cls = s_feat[:, 0]  # (G*B, C)
        s_cls = [s_head(s_g_cls)]
        if l_crops is not None and l_crops.shape[0]:
            s_cls.append(s_head(s_bb.encode(l_crops)[:, 0]))
        s_cls_out = torch.cat(s_cls)  # ((G+L)*B, K)
        s_masked_out = s_head(s_feat[mask])  # (M, K)
        n_views = s_cls_out.shape[0] * self.n_global // g_crops.shape[0]
        center = self.dino_criterion.center.clone()  # before the loss updates it (for the logged entropy)
        dino = self.dino_criterion(teacher_out=list(t_cls_out.chunk(self.n_global)),
                                   student_out=list(s_cls_out.chunk(n_views)), teacher_temp=temp)
        ibot = self.ibot_criterion(teacher_out=t_masked_out, student_out=s_masked_out, mask=block_mask,
                                   teacher_temp=temp)
        koleo = sum(self.koleo_criterion(t) for t in s_g_cls.chunk(self.n_global))
        loss = (float(c.dino_loss_weight) * dino + float(c.ibot_loss_weight) * ibot
                + float(c.koleo_loss_weight) * koleo)
        t_probs = torch.softmax((t_cls_out.float() - center.reshape(1, -1)) / temp, dim=-1)
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach(),
                "teacher_entropy": L.entropy(t_probs), "teacher_temp": torch.tensor(temp),
                "masked_tokens": torch.tensor(float(block_mask.sum()))}

    def after_step(self, step: int) -> dict[str, float]:
        from lightly.models.utils import update_momentum

        m = self.ema_momentum_at(step - 1)
        update_momentum(self.student["backbone"], self.teacher["backbone"], m=m)
        update_momentum(self.student["dino_head"], self.teacher["dino_head"], m=m)
        self._step = int(step)
        return {"ema_momentum": m, "last_layer_frozen": float(self.last_layer_frozen_at(step - 1))}

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Teacher CLS after the final norm (timm's ``forward_head(pre_logits=True)``), as for :class:`DINOv2`."""
        return embed(self.teacher["backbone"].vit, images)

    def visualize(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}  # no pictures for the peer
