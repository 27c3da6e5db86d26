"""Regularisation layers: DropBlock (paper-correct, fast; placement presets + schedule), efficient
(sample-subset) stochastic depth for dense and packed tensors, and the packed multi-group token layout."""

from sslkit.layers.dropblock import DropBlock2d, drop_block_2d, dropblock_drop_prob, dropblock_gamma
from sslkit.layers.dropblock_placement import ScheduledDropBlock2d, apply_dropblock, dropblock_schedule, set_drop_prob
from sslkit.layers.packing import PackLayout, pack_groups, token_rows, unpack_groups
from sslkit.layers.stochastic_depth import (
    drop_add_residual,
    drop_add_residual_packed,
    drop_path_residual_packed,
    keep_count,
    sample_keep,
)

__all__ = [
    "DropBlock2d",
    "drop_block_2d",
    "dropblock_drop_prob",
    "dropblock_gamma",
    "ScheduledDropBlock2d",
    "apply_dropblock",
    "dropblock_schedule",
    "set_drop_prob",
    "PackLayout",
    "pack_groups",
    "unpack_groups",
    "token_rows",
    "keep_count",
    "sample_keep",
    "drop_add_residual",
    "drop_add_residual_packed",
    "drop_path_residual_packed",
]
