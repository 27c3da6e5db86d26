"""``build_source``: the data source a ``DataConfig`` describes (``data.name``, ``data.path``, ``data.split``)."""

from __future__ import annotations

import os
from typing import Any

from sslkit.data.shards import WebDatasetSource
from sslkit.data.sources import (SOURCE_NAMES, CIFARSource, HFSource, ImageFolderSource, STL10Source, apply_split,
                                 imagenet_source)
from sslkit.data.synthetic import SyntheticSource
from sslkit.errors import ConfigError, DataError
from sslkit.schemas import DataConfig


def build_source(cfg: DataConfig) -> Any:
    """The data source described by ``cfg`` (``data.name``, ``data.path``, ``data.split``, ...).

    Raises ``DataError`` (with the fix) for a missing path, missing files or an empty result.
    """
    name = str(cfg.name)
    if name not in SOURCE_NAMES:
        raise ConfigError(f"data.name must be one of {SOURCE_NAMES}, got {name!r}")
    if name == "synthetic":
        src: Any = SyntheticSource(int(cfg.num_samples), int(cfg.num_classes), int(cfg.image_size), int(cfg.seed))
    else:
        if not cfg.path:
            where = {
                "image_folder": "a class-per-folder directory or an uncompressed .tar of one",
                "cifar10": "the folder containing cifar-10-batches-py/",
                "cifar100": "the folder containing cifar-100-python/",
                "stl10": "the folder containing stl10_binary/",
                "imagenet": "the folder containing train/<wnid>/*.JPEG",
                "hf": "a Hugging Face save_to_disk directory, parquet / arrow files, or a cached Hub id",
                "webdataset": "the shards: a brace pattern (/data/train-{000000..000099}.tar), a glob, a "
                              "directory or an index .json",
            }[name]
            raise DataError(f"data.name={name} needs data.path: set data.path to {where}")
        path = os.path.expanduser(str(cfg.path))
        if name == "hf":
            src = HFSource(path, str(cfg.image_column), cfg.label_column, cfg.hf_split)
        elif name == "webdataset":
            src = WebDatasetSource(path.split("::"), cfg.label_key)
        elif not os.path.exists(path):
            raise DataError(
                f"data.path={path} does not exist (data.name={name}). Fix: correct data.path, or use "
                f"data.name=synthetic for the built-in data"
            )
        elif name == "image_folder":
            src = ImageFolderSource(path)
        elif name in ("cifar10", "cifar100"):
            src = CIFARSource(name, path)
        elif name == "stl10":
            src = STL10Source(path)
        else:
            src = imagenet_source(path)
    out = apply_split(src, str(cfg.split), float(cfg.val_fraction))
    if len(out) == 0:
        raise DataError(
            f"data.split={cfg.split} of data.name={name} ({len(src)} samples in total) is empty. Fix: "
            f"use data.split=all, or a data.val_fraction that leaves samples in both train and val "
            f"(got {cfg.val_fraction}), or add images"
        )
    return out

