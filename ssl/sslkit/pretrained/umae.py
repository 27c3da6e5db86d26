"""UM-MAE reference checkpoints (implus/UM-MAE) of PVT-S and Swin-T, pretraining and fine-tuning, into
sslkit's ``sslkit_pvt_*`` / ``sslkit_swin_*`` backbones."""

from __future__ import annotations
