"""Backbones registered with timm (importing this package registers them).

``sslkit_pvt_small`` / ``sslkit_pvt_test`` (pvt.py) and ``sslkit_swin_tiny`` / ``sslkit_swin_test``
(swin.py) implement the UM-capable pyramid interface in ``docs/backbone_interface.md``.
``sslkit_resnet50`` / ``sslkit_resnet_test`` (resnet.py) are timm ResNets for fine-tuning with DropBlock.
"""

from __future__ import annotations

import importlib
from typing import Mapping

import timm
import torch

from sslkit.errors import CheckpointError
from sslkit.models import pvt, resnet, swin, vit  # noqa: F401  (registers the models)


def convert_um_pretrain_to_finetune(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dispatch to the model family's explicit UM-pretraining -> fine-tuning conversion."""
    if not timm.is_model(model_name):
        raise CheckpointError(f"unknown model {model_name!r}: cannot convert its UM-pretraining weights")
    module = importlib.import_module(timm.models.model_entrypoint(model_name).__module__)
    fn = getattr(module, "convert_um_pretrain_to_finetune", None)
    if fn is None:
        raise CheckpointError(f"{model_name} ({module.__name__}) has no convert_um_pretrain_to_finetune: it was not "
                              f"pretrained with UM-MAE adaptations, or the family does not support them")
    return fn(state_dict)


__all__ = ["convert_um_pretrain_to_finetune", "pvt", "resnet", "swin", "vit"]
