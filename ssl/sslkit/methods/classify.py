"""Supervised fine-tuning of a pretrained encoder (or training from scratch): cross-entropy with label
smoothing on the backbone's timm head. Same loop, same checkpoint format, resumable.

The pretrained weights come in through ``sslkit.cli.load_backbone``: key mapping (method wrapper ->
bare timm backbone), the explicit UM -> fine-tune conversion, and a load that fails on any missing or
unexpected key; only the new head is initialized fresh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sslkit.errors import CheckpointError
from sslkit.methods.base import Method, create_backbone


class Classifier(Method):
    name = "classify"

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.label_smoothing = float(cfg.label_smoothing)
        if cfg.checkpoint:
            from sslkit.cli import load_backbone

            self.backbone, ckpt, kwargs = load_backbone(
                cfg.checkpoint, for_finetune=True, drop_path_rate=float(model_cfg.drop_path_rate))
            if ckpt["model_config"]["name"] != str(model_cfg.name):
                raise CheckpointError(
                    f"method.checkpoint holds a {ckpt['model_config']['name']} encoder but model={model_cfg.name}: "
                    f"use model={ckpt['model_config']['name']}")
            self.model_config = {"name": ckpt["model_config"]["name"], "kwargs": {**kwargs, "num_classes": int(cfg.num_classes)}}
        else:
            self.backbone, self.model_config = create_backbone(model_cfg, um_pretrain=False)
            self.model_config["kwargs"]["num_classes"] = int(cfg.num_classes)
        self.backbone.reset_classifier(int(cfg.num_classes))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.backbone(batch["images"])  # (B, num_classes)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, ignore_index=-1)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc.detach()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
