"""Pretraining methods: one nn.Module each. ``build_method(cfg)`` picks one by ``method.name``."""

from __future__ import annotations

from typing import Any

from sslkit.errors import ConfigError
from sslkit.methods.base import Method, create_backbone
from sslkit.methods.classify import Classifier
from sslkit.methods.dinov2 import DINOv2
from sslkit.methods.simmim import SimMIM
from sslkit.methods.umae import UMMAE

METHODS: dict[str, type[Method]] = {"umae": UMMAE, "simmim": SimMIM, "dinov2": DINOv2, "classify": Classifier}


def build_method(cfg: Any) -> Method:
    name = str(cfg.method.name)
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is unknown; available: {sorted(METHODS)}")
    return METHODS[name](cfg.method, cfg.model)


__all__ = ["METHODS", "Method", "build_method", "create_backbone"]
