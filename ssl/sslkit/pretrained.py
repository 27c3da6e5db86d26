"""Checkpoints in: the pretrained backbone of a checkpoint, rebuilt as a bare timm model.

``load_backbone`` is the one way weights enter a model outside resume: fine-tuning
(``method.checkpoint``), ``sslkit-eval``, export. It maps the method's keys to the bare backbone
(``checkpoint.backbone_state``: the method's ``backbone_prefix``), converts UM-MAE's pretraining
shapes to fine-tuning shapes (``models.convert_um_pretrain_to_finetune``, explicit, never by dropping
keys) and loads with an exact key match. Converters for other layouts (the next issue's official
checkpoints) belong here too; this module sits below ``methods`` so methods can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from sslkit import checkpoint as ckpt_io
from sslkit.errors import CheckpointError
from sslkit.models import convert_um_pretrain_to_finetune


def load_backbone(checkpoint: str | Path, for_finetune: bool = True,
                  **overrides: Any) -> tuple[torch.nn.Module, ckpt_io.Checkpoint, dict[str, Any]]:
    """Rebuild the pretrained encoder of an sslkit checkpoint: ``(model, checkpoint, create kwargs)``.

    With ``for_finetune`` the pretraining adaptations (e.g. UM's halved spatial reduction / window 8)
    are converted to the fine-tuning shapes; ``overrides`` are extra ``create_model`` kwargs (e.g.
    ``drop_path_rate``). Raises CheckpointError when the file holds no backbone or does not match it."""
    ckpt = ckpt_io.load(checkpoint)
    spec = ckpt["model_config"]
    prefix, sd = ckpt_io.backbone_state(ckpt)
    if not sd:
        raise CheckpointError(f"{checkpoint} holds no '{prefix}*' weights; it is not a pretraining checkpoint")
    kwargs = dict(spec["kwargs"])
    if for_finetune and kwargs.get("um_pretrain"):
        sd = convert_um_pretrain_to_finetune(spec["name"], sd)
        kwargs["um_pretrain"] = False
    kwargs.update(overrides)
    model = timm.create_model(spec["name"], **kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: backbone {spec['name']} does not match the checkpoint "
                              f"(missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]})")
    return model, ckpt, kwargs
