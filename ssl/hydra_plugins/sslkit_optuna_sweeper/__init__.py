"""sslkit's Hydra sweeper over Optuna >= 3 (ask / tell): ``sslkit-pretrain -m hydra/sweeper=optuna ...``.

Hydra only instantiates plugin classes from the ``hydra_plugins`` namespace package, so the class lives
here; the work is done by ``sslkit.optuna_sweep`` (imported on first use: Hydra imports this module for
every app while it scans for plugins, so it stays light). The schema of ``hydra.sweeper`` is stored in
Hydra's ConfigStore as ``hydra/sweeper/sslkit_optuna_schema`` (``configs/hydra/sweeper/optuna.yaml``
extends it): a typo in a key or a choice fails at compose time.
"""

# No ``from __future__ import annotations``: Hydra's plugin scan runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations.
from dataclasses import dataclass
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class Direction(str, Enum):
    maximize = "maximize"
    minimize = "minimize"


class SamplerName(str, Enum):
    tpe = "tpe"  # optuna.samplers.TPESampler (random for the first n_startup_trials)
    random = "random"  # optuna.samplers.RandomSampler


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sslkit_optuna_sweeper.OptunaSweeper"
    direction: Optional[Direction] = None  # null: from trainer.objective (maximize knn_top1 / linear_top1, minimize loss)
    n_trials: int = 20  # trials of the study in all; a re-run of the command runs only the missing ones
    n_jobs: int = 1  # trials launched at once (one launcher batch: in parallel with hydra/launcher=local|slurm)
    sampler: SamplerName = SamplerName.tpe
    n_startup_trials: int = 10  # tpe: random trials before the model-based ones
    seed: Optional[int] = 0  # the sampler's seed (a resumed sweep offsets it by the trials already there)
    study_name: str = "sslkit"
    storage: Optional[str] = None  # a journal file (default <sweep dir>/optuna.journal) or an RDB URL (sqlite:///...)
    params: Optional[Any] = None  # {key: search space}: interval(lo, hi), tag(log, ...), tag(int, ...), range(), choice()


ConfigStore.instance().store(group="hydra/sweeper", name="sslkit_optuna_schema", node=OptunaSweeperConf,
                             provider="sslkit")


class OptunaSweeper(Sweeper):
    """Hydra's side of the sweeper: keeps the options, hands the work to ``sslkit.optuna_sweep.OptunaSweep``."""

    def __init__(self, **options: Any) -> None:
        from sslkit.optuna_sweep import OptunaSweep

        self.sweeper = OptunaSweep(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        self.sweeper.sweep(arguments)
