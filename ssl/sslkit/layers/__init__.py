"""Regularisation layers."""

from sslkit.layers.dropblock import DropBlock2d, drop_block_2d, dropblock_drop_prob, dropblock_gamma

__all__ = [
    "DropBlock2d",
    "drop_block_2d",
    "dropblock_drop_prob",
    "dropblock_gamma",
]
