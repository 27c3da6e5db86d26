"""sslkit: self-supervised vision pretraining (UM-MAE, SimMIM, DINOv2-style) with one data
pipeline, one training loop and one checkpoint format.

The import package lives in ``ssl/sslkit``; ``ssl/`` itself is a source root and must never get an
``__init__.py`` (it would shadow the standard library's ``ssl`` module).
"""

__version__ = "0.1.0"

from sslkit.errors import CheckpointError, ConfigError, DataError, SSLKitError, TrainingError

__all__ = ["SSLKitError", "ConfigError", "DataError", "CheckpointError", "TrainingError", "__version__"]
