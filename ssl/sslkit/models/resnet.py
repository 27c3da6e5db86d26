"""ResNets for fine-tuning with DropBlock (``method.dropblock``, see ``sslkit.layers.dropblock_placement``).

Both are timm's own ``ResNet`` class (same module names and state-dict keys as timm's ``resnet50``, so
timm / torchvision-style weights load unchanged); the registered entry points only add what the sslkit
model interface passes to every backbone: ``img_size`` is accepted and ignored (a CNN takes any size;
``ModelConfig.img_size`` is still recorded in the checkpoint's ``model_config``), ``um_pretrain=False`` is
accepted (there is no UM-MAE variant of a ResNet).

- ``sslkit_resnet50``: ResNet-50 (Bottleneck, depths 3-4-6-3, widths 64-128-256-512, 7x7 stem), i.e.
  ``timm.create_model("resnet50")`` with timm's ``resnet50`` pretrained cfgs.
- ``sslkit_resnet_test``: tiny Bottleneck ResNet for tests (depths 1-1-2-2, widths 8-16-32-64, stem 8,
  256 output channels). Groups 3 and 4 have two blocks each: the first with a projection shortcut, the
  second with an identity shortcut (both skip kinds of the DropBlock paper placement).

Stochastic depth (``drop_path_rate``, timm's ``ResNet`` / ``make_blocks``): a LINEAR ramp over all
blocks of all stages, like PVT and Swin (``drop_path_schedule = "linear"``, set on the instances
created here; the sslkit ViT uses the same rate in every block instead). Block ``i`` of ``n``
(0-based, counted across ``layer1 .. layer4`` in order) gets ``DropPath(drop_path_rate * i / (n - 1))``
on its residual branch, applied before the shortcut add; block 0 (rate 0) gets ``drop_path=None``, the
last block gets ``drop_path_rate``. E.g. ``sslkit_resnet_test`` (6 blocks) at 0.3:
0, 0.06, 0.12, 0.18, 0.24, 0.3.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from timm.models.resnet import resnet50 as _timm_resnet50

__all__ = ["sslkit_resnet50", "sslkit_resnet_test", "DROP_PATH_SCHEDULE"]

DROP_PATH_SCHEDULE = "linear"  # timm's ResNet rule, see the module docstring


def _sslkit_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.pop("img_size", None)
    if kwargs.pop("um_pretrain", False):
        raise ValueError("ResNets have no UM-MAE pretraining variant (um_pretrain=True)")
    return kwargs


def _with_schedule(model: ResNet) -> ResNet:
    model.drop_path_schedule = DROP_PATH_SCHEDULE  # instance attribute: ResNet is timm's class
    return model


def _resnet_cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 0, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }  # fmt: skip


default_cfgs = generate_default_cfgs({"sslkit_resnet_test": _resnet_cfg(input_size=(3, 64, 64), pool_size=(2, 2))})


@register_model
def sslkit_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """timm's ResNet-50 (``resnet50``), accepting the sslkit ``img_size`` argument (ignored).
    ``drop_path_rate``: linear ramp over the 16 blocks, ``rate * i / 15`` (see the module docstring)."""
    return _with_schedule(_timm_resnet50(pretrained=pretrained, **_sslkit_kwargs(kwargs)))


@register_model
def sslkit_resnet_test(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Tiny Bottleneck ResNet for tests: depths 1-1-2-2, widths 8-16-32-64 (x4 out), stem width 8.
    ``drop_path_rate``: linear ramp over the 6 blocks, ``rate * i / 5`` (see the module docstring)."""
    args: dict[str, Any] = dict(block=Bottleneck, layers=(1, 1, 2, 2), channels=(8, 16, 32, 64), stem_width=8)
    model = build_model_with_cfg(ResNet, "sslkit_resnet_test", pretrained, **dict(args, **_sslkit_kwargs(kwargs)))
    return _with_schedule(model)
