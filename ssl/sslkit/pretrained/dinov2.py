"""DINOv2 checkpoints (facebookresearch/dinov2 hub backbones, its training checkpoints) and timm's
``vit_*_dinov2`` state dicts into sslkit's ``sslkit_vit_*`` backbones."""

from __future__ import annotations
