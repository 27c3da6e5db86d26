"""Regularisation layers: DropBlock (paper-correct, fast; placement presets + schedule) and efficient stochastic depth."""

from sslkit.layers.dropblock import DropBlock2d, drop_block_2d, dropblock_drop_prob, dropblock_gamma
from sslkit.layers.dropblock_placement import ScheduledDropBlock2d, apply_dropblock, dropblock_schedule, set_drop_prob
from sslkit.layers.stochastic_depth import SDBlock, drop_add_residual, drop_add_residual_grouped, keep_count

__all__ = [
    "DropBlock2d",
    "drop_block_2d",
    "dropblock_drop_prob",
    "dropblock_gamma",
    "ScheduledDropBlock2d",
    "apply_dropblock",
    "dropblock_schedule",
    "set_drop_prob",
    "SDBlock",
    "drop_add_residual",
    "drop_add_residual_grouped",
    "keep_count",
]
