"""Composing a config: Hydra's ConfigStore filled from the schemas, ``compose``, and the derived values.

- ``register_configs()`` stores the shared schemas (``sslkit.schemas``) and every registered method's
  schema (``methods.METHODS``: ``method/<name>_schema``); the YAML options in ``configs/`` extend them
  through their defaults lists.
- ``compose(overrides, config_name)`` composes like the commands do (tests, notebooks, sweeps) and
  validates ranges (``schemas.validate``); a failure is a ``ComposeError`` naming the key.
- ``derive(cfg, dataset_size, world_size)`` computes the derived values (effective lr, global batch,
  steps per epoch, total steps, warm-up) once; the loop logs them and saves them with the run.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException
from hydra_plugins.sslkit_optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from sslkit.errors import ConfigError
from sslkit.methods import METHODS
from sslkit.schemas import (DataConfig, EvalKNNConfig, EvalLinearConfig, ExportConfig, FinetuneConfig, LoggerConfig,
                            MethodConfig, ModelConfig, MultiCropViewConfig, OptimConfig, PretrainConfig, ShardConfig,
                            TrainerConfig,
                            ViewConfig, VisualizeConfig, WandbConfig, validate)

__all__ = ["ComposeError", "DataConfig", "Derived", "LoggerConfig", "MethodConfig", "ModelConfig", "MultiCropViewConfig",
           "OptimConfig", "TrainerConfig", "ViewConfig", "WandbConfig", "compose", "config_dir", "derive",
           "register_configs", "to_plain", "validate"]

PRIMARY = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval_knn": EvalKNNConfig,
           "eval_linear": EvalLinearConfig, "export": ExportConfig,
           "visualize": VisualizeConfig, "shard": ShardConfig}  # config name -> schema (configs/<name>.yaml)


# ${sslkit.or:a,b}: a unless it is null, else b (e.g. sweep subdirs: the experiment's name, else the method's).
# Registered on import: launchers resolve the hydra config in the job process, which imports sslkit.cli.
OmegaConf.register_new_resolver("sslkit.or", lambda a, b: b if a is None or a == "None" else a, replace=True)


class ComposeError(ConfigError, ConfigCompositionException):
    """A config that does not compose or validate (unknown key, wrong type, unknown choice, out of range)."""


def config_dir() -> str:
    """The packaged configs (works from a source checkout, an editable install and a wheel)."""
    return str(importlib.resources.files("sslkit.configs"))


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (again on every call: methods registered since are added) and
    register sslkit's sweeper (hydra/sweeper=optuna) with Hydra, whose plugin scan misses it in an editable install."""
    Plugins.instance().register(OptunaSweeper)
    cs = ConfigStore.instance()
    for name, schema in PRIMARY.items():
        cs.store(name=f"{name}_schema", node=schema)
    for name, cls in METHODS.items():
        cs.store(group="method", name=f"{name}_schema", node=cls.config_class)
    for group, schema in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
                          ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name=f"{group}_schema", node=schema)


def check_overrides(overrides: list[str]) -> None:
    """Fail early, with the fix, where Hydra would fail with an unhelpful message: ``hydra/sweeper=optuna`` while
    the ``hydra-optuna-sweeper`` plugin is installed (it also stores ``hydra/sweeper/optuna``, so Hydra refuses
    to compose either, citing automatic schema matching)."""
    if any(o.lstrip("+~") in ("hydra/sweeper=optuna", "override hydra/sweeper=optuna") for o in overrides) and \
            importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        raise ConfigError("hydra/sweeper=optuna is sslkit's sweeper, and the hydra-optuna-sweeper plugin installed here "
                          "names the same config, so Hydra cannot compose it. Fix: pip uninstall hydra-optuna-sweeper "
                          "(sslkit's sweeper replaces it: optuna >= 3, a resumable study in the sweep dir)")


def compose(overrides: list[str] | None = None, config_name: str = "pretrain", *,
            return_hydra_config: bool = False) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` as the command line would, then validate."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []),
                                return_hydra_config=return_hydra_config)
    except ConfigCompositionException as e:
        cause = f": {e.__cause__}" if e.__cause__ is not None else ""
        raise ComposeError(f"{e}{cause}") from e
    validate(cfg)
    return cfg


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict of plain values (for checkpoints and config.yaml)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- derived
@dataclass
class Derived:
    world_size: int
    micro_batch: int  # images per device per forward (data.batch_size)
    global_batch: int  # batch_size * accum_steps * world_size
    lr: float  # effective peak lr
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    warmup_steps: int
    dataset_size: int


def derive(cfg: DictConfig, dataset_size: int, world_size: int = 1) -> Derived:
    """Compute the derived values once. ``dataset_size`` comes from the built data source."""
    b = int(cfg.data.batch_size)
    accum = int(cfg.trainer.accum_steps)
    if b <= 0 or accum <= 0:
        raise ConfigError(f"data.batch_size and trainer.accum_steps must be positive, got {b}, {accum}")
    global_batch = b * accum * world_size
    steps_per_epoch = dataset_size // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {dataset_size} images, fewer than one global batch of {global_batch} "
            f"(data.batch_size={b} x trainer.accum_steps={accum} x world_size={world_size}); "
            f"lower data.batch_size or use more data"
        )
    if cfg.trainer.max_steps is not None:
        total = int(cfg.trainer.max_steps)
    else:
        total = int(math.ceil(float(cfg.trainer.epochs) * steps_per_epoch))
    if total <= 0:
        raise ConfigError(f"training would run {total} steps: set trainer.max_steps or trainer.epochs > 0")
    scaling = str(cfg.optim.lr_scaling)
    if scaling not in ("linear", "sqrt"):  # (composed configs are checked at compose time; plain ones here)
        raise ConfigError(f"optim.lr_scaling={scaling!r}: use linear (MAE: blr x batch/256) or sqrt (DINOv2)")
    ratio = global_batch / float(cfg.optim.lr_ref_batch)
    scale = ratio if scaling == "linear" else math.sqrt(ratio)
    lr = float(cfg.optim.lr) if cfg.optim.lr is not None else float(cfg.optim.blr) * scale
    if cfg.optim.warmup_steps is not None:
        warm = int(cfg.optim.warmup_steps)
    else:
        warm = int(round(float(cfg.optim.warmup_epochs) * steps_per_epoch))
    warm = min(warm, total)
    return Derived(world_size, b, global_batch, lr, steps_per_epoch, total, warm, dataset_size)
