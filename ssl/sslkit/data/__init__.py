"""The one data pipeline: sources -> views -> batches (+ masks, made in the workers).

- ``build_source(cfg)``: synthetic (default), image_folder (directory or uncompressed .tar),
  cifar10 / cifar100 / stl10 / imagenet (offline), hf (Hugging Face), webdataset (tar shards,
  ``data/shards.py``, with the shard writer ``write_shards``).
- ``build_pretrain_loader(source, cfg, view, mask_fn, seed=...)``: endless, deterministic,
  exactly resumable batches ``{"images", "labels", "index", **masks}`` (multi-crop views:
  ``{"global_crops", "local_crops", "labels", "index", **masks}``, crops view-major).
- ``build_eval_loader(source, cfg, size)``: resize + center crop, in order, for kNN evaluation.
- ``build_view(view, mean, std)``: the view of family ``view.kind`` (``VIEWS``): ``build_mae_view``
  (one MAE-style crop) or ``build_multicrop_view`` (DINOv2 global + local crops).
"""

from sslkit.data.loader import PretrainLoader, build_eval_loader, build_pretrain_loader, derive_seed
from sslkit.data.sources import (
    CIFARSource,
    ImageFolderSource,
    Source,
    STL10Source,
    SubsetSource,
    UnreadableImageError,
    split_indices,
)
from sslkit.data.build import build_source
from sslkit.data.shards import WebDatasetSource, write_shards
from sslkit.data.synthetic import SyntheticSource
from sslkit.data.views import VIEWS, build_eval_view, build_mae_view, build_multicrop_view, build_view

__all__ = [
    "build_source",
    "build_pretrain_loader",
    "build_eval_loader",
    "build_mae_view",
    "build_multicrop_view",
    "build_view",
    "VIEWS",
    "build_eval_view",
    "PretrainLoader",
    "Source",
    "SyntheticSource",
    "ImageFolderSource",
    "CIFARSource",
    "STL10Source",
    "SubsetSource",
    "WebDatasetSource",
    "write_shards",
    "UnreadableImageError",
    "split_indices",
    "derive_seed",
]
