"""Pretraining (and fine-tuning) methods: one ``nn.Module`` per module, registered with
``@register_method`` (``methods/base.py`` has the contract). Importing this package imports every
module in it, so a new method file registers itself: no central list to edit."""

from __future__ import annotations

import importlib
import pkgutil

from sslkit.methods.base import METHODS, Method, backbone_kwargs, build_method, create_backbone, embed, register_method

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "Method", "backbone_kwargs", "build_method", "create_backbone", "embed", "register_method"]
