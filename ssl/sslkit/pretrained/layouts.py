"""The foreign-layout registry of ``sslkit.pretrained``: a family module describes each layout it converts
(``Layout``) and registers it; ``load_pretrained`` picks the first registered layout that detects a file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Layout:
    """A foreign checkpoint layout: ``detect(state_dict)`` says whether a (container-unwrapped) state dict is
    in this layout; ``convert(state_dict, model_name, kwargs)`` returns the sslkit backbone state dict and
    the create kwargs it needs (``kwargs``: those the caller already has, e.g. from the model config)."""

    name: str
    families: tuple[str, ...]  # sslkit model name prefixes it converts to, e.g. ("sslkit_vit_",)
    detect: Callable[[Mapping[str, Tensor]], bool]
    convert: Callable[[Mapping[str, Tensor], str, dict[str, Any]], tuple[StateDict, dict[str, Any]]]
    description: str


LAYOUTS: list[Layout] = []  # filled by the family modules (register_layout)


def register_layout(layout: Layout) -> Layout:
    if any(x.name == layout.name for x in LAYOUTS):
        raise ValueError(f"layout {layout.name!r} is already registered")
    LAYOUTS.append(layout)
    return layout
