"""Hyper-parameter search with Optuna (>= 3, ask / tell) as a Hydra sweeper: ``-m hydra/sweeper=optuna``.

``hydra_plugins.sslkit_optuna_sweeper.OptunaSweeper`` (the class Hydra instantiates) hands its work to
``OptunaSweep``. A sweep is one Optuna study stored in the sweep dir (default: a journal file,
``<hydra.sweep.dir>/optuna.journal``; no database needed). Each trial is one launcher job whose job
number is the trial's number, so its run dir (``hydra.sweep.subdir``, ``<number>_<experiment>``) is the
trial's for good; the job returns ``trainer.objective``'s value (``tasks.pretrain_objective``), which is
told to the study.

- Search spaces (``hydra.sweeper.params`` and the command line's sweeps), parsed by Hydra's override
  parser: ``interval(lo, hi)`` (float), ``tag(log, interval(lo, hi))``, ``tag(int, interval(lo, hi))``
  (both ends included), ``range(start, stop[, step])`` (Hydra's: stop excluded; ``tag(log, range(...))``),
  ``choice(a, b)`` / ``a,b`` (categorical); anything else is a fixed override passed to every trial.
- Failures: a trial whose job raises, exits with a user error (``errors.ErrorExit``), returns no value
  or a non-finite one, whose overrides do not compose, or whose job dies without a result is told
  ``FAIL``; the sweep goes on.
- Resume: the same command with the same ``hydra.sweep.dir`` loads the study and runs only the trials
  still missing up to ``n_trials``. A trial left ``RUNNING`` by a sweep that died is finished from its
  record (``.optuna_trials/<number>.json``, written by the job when it ended) if it has one, else re-run
  with the same overrides in the same run dir, so the trainer resumes from its ``last.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

from sslkit.errors import ConfigError, ErrorExit, SSLKitError
from sslkit.runlog import flatten
from sslkit.schemas import OBJECTIVE_DIRECTIONS, validate

log = logging.getLogger(__name__)

RECORDS = ".optuna_trials"  # <sweep dir>/.optuna_trials/<number>.json: how each trial's job ended
JOURNAL = "optuna.journal"  # the default storage, in the sweep dir
SPACES = ("interval(lo, hi) | tag(log, interval(lo, hi)) | tag(int, interval(lo, hi)) | range(start, stop[, step]) "
          "| choice(a, b, ...) | a,b,...")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ConfigError('hydra/sweeper=optuna needs optuna>=3.1: pip install "sslkit[optuna]"') from e
    return optuna


# ----------------------------------------------------------------------------------------- search space
@dataclass
class SearchSpace:
    """What ``params`` + the command line ask for: Optuna distributions by parameter name (the override key
    without ``+``), the override key of each (``+key`` stays ``+key``), and the fixed overrides."""

    distributions: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # parameter name -> override key
    fixed: list[str] = field(default_factory=list)  # overrides passed unchanged to every trial

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then ``key=value`` for each parameter."""
        return [*self.fixed, *(f"{self.keys.get(name, name)}={override_value(v)}" for name, v in params.items())]

    def sample(self) -> dict[str, Any]:
        """One point of the space (each distribution's low end / first choice), for a composition check."""
        out = {}
        for name, d in self.distributions.items():
            out[name] = d.choices[0] if hasattr(d, "choices") else d.low
        return out


def override_value(v: Any) -> str:
    """A parameter value as the value part of a Hydra override (categorical strings are already escaped)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _spec_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):  # a YAML list of choices: [a, b] -> a,b
        return ",".join(override_value(x) for x in v)
    return override_value(v)


def parse_search_space(params: Any, arguments: Sequence[str] = ()) -> SearchSpace:
    """``params`` (``{key: spec}``, nested dicts flattened; a YAML list is a choice) and the command line's
    ``arguments``, which win for the same key, as a ``SearchSpace``. A bad spec raises ConfigError."""
    if isinstance(params, (DictConfig, ListConfig)):
        params = OmegaConf.to_container(params, resolve=True)
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"hydra.sweeper.params must be a mapping {{key: search space}}, got {params!r}; e.g. "
                          f"'hydra.sweeper.params={{optim.blr:\"tag(log, interval(1e-4,1e-2))\"}}'")
    lines = [(f"hydra.sweeper.params.{k}", f"{k}={_spec_text(v)}") for k, v in flatten(params or {}).items()]
    lines += [("the command line", a) for a in arguments]
    parser = OverridesParser.create()
    by_key: dict[str, tuple[Override, Any]] = {}
    for where, line in lines:
        try:
            (o,) = parser.parse_overrides([line])
            by_key[o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}"] = (o, _distribution(o))
        except (HydraException, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"hydra/sweeper=optuna: cannot use {line!r} from {where}: {msg}\n"
                              f"search spaces: {SPACES}") from None
    space = SearchSpace()
    for name, (o, dist) in by_key.items():
        if dist is None:
            space.fixed.append(o.input_line)
        else:
            space.distributions[name], space.keys[name] = dist, o.get_key_element()
    return space


def _distribution(o: Override) -> Any:
    """The Optuna distribution of one sweep override (None: a fixed override)."""
    if not o.is_sweep_override():
        return None
    d = _optuna().distributions
    v = o.value()
    tags = set(getattr(v, "tags", ()) or ())
    if isinstance(v, Glob):
        raise ValueError("glob() sweeps are not supported: list the options, key=a,b,c")
    if isinstance(v, ChoiceSweep):
        if tags:
            raise ValueError(f"tags {sorted(tags)} have no meaning for a choice")
        choices = []
        for x, s in zip(v.list, o.sweep_string_iterator()):
            choices.append(x if isinstance(x, (int, float, bool)) else s)  # strings as Hydra writes them
        if len(set(map(str, choices))) != len(choices):
            raise ValueError("a choice lists a value twice")
        return d.CategoricalDistribution(choices)
    if isinstance(v, RangeSweep):
        if tags - {"log"}:
            raise ValueError(f"unknown tags {sorted(tags - {'log'})} for a range: it takes log")
        values = list(o.sweep_iterator())
        if not values:
            raise ValueError(f"range({v.start}, {v.stop}, step={v.step}) is empty (the stop is excluded)")
        lo, hi, step = min(values), max(values), abs(v.step)
        if all(isinstance(x, int) for x in values):
            if "log" in tags and step != 1:
                raise ValueError("tag(log, range(...)) needs step 1")
            return d.IntDistribution(int(lo), int(hi), log="log" in tags, step=1 if "log" in tags else int(step))
        if "log" in tags:
            raise ValueError("tag(log, ...) of a float range: use tag(log, interval(lo, hi))")
        return d.FloatDistribution(float(lo), float(round(lo + step * (len(values) - 1), 12)), step=float(step))
    if isinstance(v, IntervalSweep):
        if tags - {"log", "int"}:
            raise ValueError(f"unknown tags {sorted(tags - {'log', 'int'})} for an interval: it takes log and int")
        lo, hi = float(v.start), float(v.end)
        if not lo < hi:
            raise ValueError(f"interval({lo}, {hi}) needs lo < hi")
        if "log" in tags and lo <= 0:
            raise ValueError(f"tag(log, interval({lo}, {hi})) needs lo > 0")
        if "int" in tags:
            if lo != int(lo) or hi != int(hi):
                raise ValueError(f"tag(int, interval({lo}, {hi})) needs whole-number ends")
            return d.IntDistribution(int(lo), int(hi), log="log" in tags)
        return d.FloatDistribution(lo, hi, log="log" in tags)
    raise ValueError(f"{type(v).__name__} sweeps are not supported")


# ----------------------------------------------------------------------------------------- storage, records
def open_storage(spec: Optional[str], sweep_dir: str | Path) -> Any:
    """The study's storage: a journal file (``spec`` a path; None: ``<sweep_dir>/optuna.journal``), or ``spec``
    itself when it is a URL (an RDB such as ``sqlite:///...``, which needs SQLAlchemy)."""
    optuna = _optuna()
    if spec and "://" in str(spec):
        return str(spec)
    path = Path(spec) if spec else Path(sweep_dir) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # JournalStorage is "experimental" in optuna 3.x
        warnings.simplefilter("ignore")
        journal = getattr(optuna.storages, "journal", None)
        if journal is not None and hasattr(journal, "JournalFileBackend"):  # optuna >= 4
            return optuna.storages.JournalStorage(journal.JournalFileBackend(str(path)))
        return optuna.storages.JournalStorage(optuna.storages.JournalFileStorage(str(path)))  # 3.1 - 3.6


def judge(value: Any) -> tuple[str, Optional[float], Optional[str]]:
    """A job's return value as (state, value, error): COMPLETE with a finite float, else FAIL with why."""
    if value is None:
        return "FAIL", None, ("the job returned no objective value: hydra/sweeper=optuna runs sslkit-pretrain with "
                              "trainer.objective set")
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "FAIL", None, f"the job returned {value!r}, not a number"
    if not math.isfinite(v):
        return "FAIL", None, f"the objective is {v}"
    return "COMPLETE", v, None


def record_path(sweep_dir: str | Path, number: int) -> Path:
    return Path(sweep_dir) / RECORDS / f"{number}.json"


def write_record(sweep_dir: str | Path, number: int, state: str, value: Optional[float], error: Optional[str],
                 run_dir: Optional[str]) -> None:
    """How trial ``number`` ended, written atomically (what a resumed or recovering sweep reads)."""
    path = record_path(sweep_dir, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"number": number, "state": state, "value": value, "error": error,
                               "run_dir": run_dir}))
    os.replace(tmp, path)


def read_record(sweep_dir: str | Path, number: int) -> Optional[dict[str, Any]]:
    path = record_path(sweep_dir, number)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class TrialFailed(RuntimeError):
    """A trial's user error, raised as an Exception so the launcher reports the job FAILED (not SystemExit)."""


class TrialTask:
    """The task function as a trial runs it (picklable: launchers such as submitit pickle it): runs the task,
    writes the trial's record on rank 0, and turns a user error's exit (``ErrorExit``) into an exception the
    launcher reports as a failed job. Other exits (a preemption's, which submitit requeues) pass through."""

    def __init__(self, task: TaskFunction) -> None:
        self.task = task

    def __call__(self, cfg: DictConfig) -> Any:
        hc = HydraConfig.get()
        number, sweep_dir = int(hc.job.num), str(hc.sweep.dir)
        run_dir = str(cfg.get("run_dir") or hc.runtime.output_dir)
        main = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0  # (distributed.detect's rank)

        def record(state: str, value: Optional[float], error: Optional[str]) -> None:
            if main:
                write_record(sweep_dir, number, state, value, error, run_dir)

        try:
            value = self.task(cfg)
        except ErrorExit as e:
            record("FAIL", None, str(e.error))
            raise TrialFailed(str(e.error)) from None
        except Exception as e:
            record("FAIL", None, f"{type(e).__name__}: {e}")
            raise
        record(*judge(value))
        return value


# ----------------------------------------------------------------------------------------- the sweep
def _plain(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


class OptunaSweep:
    """The sweep: see the module docstring. Options as in ``configs/hydra/sweeper/optuna.yaml``."""

    def __init__(self, direction: Any = None, n_trials: int = 20, n_jobs: int = 1, sampler: Any = "tpe",
                 n_startup_trials: int = 10, seed: Optional[int] = 0, study_name: str = "sslkit",
                 storage: Optional[str] = None, params: Any = None) -> None:
        self.direction = None if direction is None else str(_plain(direction))
        self.n_trials, self.n_jobs, self.n_startup_trials = int(n_trials), int(n_jobs), int(n_startup_trials)
        self.sampler_name, self.seed = str(_plain(sampler)), seed
        self.study_name, self.storage_spec, self.params = str(study_name), storage, params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=TrialTask(task_function))
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    # -- checks before anything runs
    def _check_config(self, space: SearchSpace) -> str:
        """The objective's name; a ConfigError for what would make every trial fail or collide."""
        if self.n_trials < 0 or self.n_jobs < 1 or self.n_startup_trials < 0:
            raise ConfigError(f"hydra.sweeper: n_trials={self.n_trials} must be >= 0, n_jobs={self.n_jobs} >= 1, "
                              f"n_startup_trials={self.n_startup_trials} >= 0")
        if self.sampler_name not in ("tpe", "random"):
            raise ConfigError(f"hydra.sweeper.sampler={self.sampler_name!r}: use tpe or random")
        if self.direction not in (None, "maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={self.direction!r}: use maximize, minimize or null (from "
                              f"trainer.objective)")
        cfg = self.config
        trainer = cfg.get("trainer")
        objective = trainer.get("objective") if trainer is not None else None
        if objective is None:
            raise ConfigError("hydra/sweeper=optuna optimizes trainer.objective: add trainer.objective=knn_top1 "
                              "(or linear_top1, loss) to the command")
        if cfg.get("run_dir"):
            raise ConfigError(f"run_dir={cfg.run_dir} would put every trial in one directory: drop it (each trial "
                              f"runs in hydra.sweep.dir/hydra.sweep.subdir)")
        subdir = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir"))
        if "hydra.job.num" not in subdir:
            raise ConfigError(f"hydra.sweep.subdir={subdir!r} must contain ${{hydra.job.num}} (the trial's number): "
                              f"trials would share run directories")
        error = self._compose_error(space.overrides(space.sample()))
        if error:
            hint = ("\n(an int key needs tag(int, interval(lo, hi)) or range(start, stop))"
                    if "could not be converted" in error.lower() else "")
            raise ConfigError(f"hydra/sweeper=optuna: a trial's overrides do not compose or validate "
                              f"({' '.join(space.overrides(space.sample()))}): {error}{hint}")
        return str(objective)

    def _compose_error(self, overrides: list[str]) -> Optional[str]:
        """Why a trial's ``overrides`` do not compose or validate (None: they do), before a job is launched."""
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            validate(task)
        except (HydraException, SSLKitError, ValueError) as e:
            cause = f": {e.__cause__}" if e.__cause__ is not None else ""
            return f"{e}{cause}".strip()
        return None

    def _open_study(self, direction: str, objective: str) -> Any:
        """The study (loaded when the sweep dir has it) with a fresh sampler; a ConfigError if it was made for
        another objective or direction, or if the sweep dir holds run directories of something else."""
        optuna = _optuna()
        storage = open_storage(self.storage_spec, self.sweep_dir)
        is_new = self.study_name not in optuna.study.get_all_study_names(storage)
        if is_new and self.sweep_dir.is_dir() and any(self.sweep_dir.glob("*/.hydra")):
            raise ConfigError(f"{self.sweep_dir} already holds run directories but no study {self.study_name!r} "
                              f"in {self.storage_spec or self.sweep_dir / JOURNAL}: trial directories would mix; "
                              f"use a new hydra.sweep.dir")
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction=direction,
                                    load_if_exists=True)
        made = (study.user_attrs.get("objective", objective), study.direction.name.lower())
        if made != (objective, direction):
            raise ConfigError(f"the study {self.study_name!r} in {self.sweep_dir} was made to {made[1]} {made[0]}, "
                              f"this sweep would {direction} {objective}: keep trainer.objective (and "
                              f"hydra.sweeper.direction) of the sweep you resume, or use a new hydra.sweep.dir")
        study.set_user_attr("objective", objective)
        seed = None if self.seed is None else int(self.seed) + len(study.trials)  # a resumed sweep draws anew
        if self.sampler_name == "tpe":
            with warnings.catch_warnings():  # constant_liar: a batch's trials see each other's points ("experimental")
                warnings.simplefilter("ignore")
                study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials,
                                                           constant_liar=True)
        else:
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
        return study

    # -- the sweep
    def sweep(self, arguments: list[str]) -> None:
        """Run the study's missing trials (see the module docstring); a user error exits 2 with the message."""
        try:
            self._sweep(arguments)
        except SSLKitError as e:
            print(f"\n[sslkit] error: {e}", file=sys.stderr)
            raise ErrorExit(e) from None

    def _sweep(self, arguments: list[str]) -> None:
        optuna = _optuna()
        space = parse_search_space(self.params, arguments)
        objective = self._check_config(space)
        direction = self.direction or OBJECTIVE_DIRECTIONS[objective]
        study = self._open_study(direction, objective)
        running = optuna.trial.TrialState.RUNNING
        rerun = []
        for t in study.get_trials(deepcopy=False, states=(running,)):  # left by a sweep that died
            rec = read_record(self.sweep_dir, t.number)
            if rec is not None:
                self._tell(study, t.number, rec["state"], rec["value"], rec["error"], rec["run_dir"])
            else:
                rerun.append((t.number, list(t.user_attrs.get("overrides") or space.overrides(t.params))))
        started = len(study.get_trials(deepcopy=False, states=tuple(s for s in optuna.trial.TrialState
                                                                     if s != optuna.trial.TrialState.WAITING)))
        n_new = max(0, self.n_trials - started)
        log.info(f"Optuna study {self.study_name!r} in {self.storage_spec or self.sweep_dir / JOURNAL}: {started} "
                 f"trials there, {len(rerun)} to re-run, {n_new} new (n_trials={self.n_trials}); {direction} "
                 f"trainer.objective={objective}; sampler {self.sampler_name}; params {list(space.distributions)}")
        for i in range(0, len(rerun), self.n_jobs):
            self._run(study, rerun[i:i + self.n_jobs])
        while n_new > 0:
            batch = []
            for _ in range(min(self.n_jobs, n_new)):
                trial = study.ask(space.distributions)
                overrides = space.overrides({name: trial.params[name] for name in space.distributions})
                trial.set_user_attr("overrides", overrides)
                batch.append((trial.number, overrides))
            self._run(study, batch)
            n_new -= len(batch)
        self._report(study, objective)

    def _run(self, study: Any, batch: list[tuple[int, list[str]]]) -> None:
        """Launch ``batch`` ((trial number, overrides)) as jobs numbered by the trials, tell their outcomes."""
        todo = []
        for number, overrides in batch:
            record_path(self.sweep_dir, number).unlink(missing_ok=True)
            error = self._compose_error(overrides)
            if error:
                self._tell(study, number, "FAIL", None, f"the overrides do not compose: {error}", None)
            else:
                todo.append((number, overrides))
        groups: list[list[tuple[int, list[str]]]] = []  # one launch per run of consecutive numbers
        for item in sorted(todo):
            if groups and groups[-1][-1][0] + 1 == item[0]:
                groups[-1].append(item)
            else:
                groups.append([item])
        for group in groups:
            try:
                returns: Sequence[Any] = self.launcher.launch([ov for _, ov in group], initial_job_idx=group[0][0])
            except Exception as e:  # e.g. a submitit job that died without a result: the others have records
                log.warning(f"launching trials {[n for n, _ in group]} raised {type(e).__name__}: {e}")
                returns = [e] * len(group)
            for (number, _), ret in zip(group, returns):
                self._tell(study, number, *self._outcome(number, ret))

    def _outcome(self, number: int, ret: Any) -> tuple[str, Optional[float], Optional[str], Optional[str]]:
        """(state, value, error, run dir) of a trial from its JobReturn (or the launch's exception + its record)."""
        if isinstance(ret, Exception):
            rec = read_record(self.sweep_dir, number)
            if rec is not None:
                return rec["state"], rec["value"], rec["error"], rec["run_dir"]
            return "FAIL", None, f"the job ended without a result ({type(ret).__name__}: {ret})", None
        run_dir = None
        if ret.hydra_cfg is not None:
            run_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir")
        if ret.status.name != "COMPLETED":
            err = ret._return_value  # the exception (return_value would raise it)
            plain = isinstance(err, TrialFailed) or not isinstance(err, BaseException)  # a user error: its message
            return "FAIL", None, str(err) if plain else f"{type(err).__name__}: {err}", run_dir
        return (*judge(ret._return_value), run_dir)

    def _tell(self, study: Any, number: int, state: str, value: Optional[float], error: Optional[str],
              run_dir: Optional[str]) -> None:
        """Tell the study how trial ``number`` ended and keep its record (with the run dir and the error)."""
        write_record(self.sweep_dir, number, state, value, error, run_dir)
        if state == "COMPLETE":
            t = study.tell(number, value)
            log.info(f"trial {number}: {study.user_attrs.get('objective', 'value')}={value:.6g}  "
                     f"({' '.join(f'{k}={v}' for k, v in t.params.items())})")
        else:
            study.tell(number, state=_optuna().trial.TrialState.FAIL)
            log.warning(f"trial {number} failed: {error}")

    def _report(self, study: Any, objective: str) -> None:
        """Log the best trial and write ``<sweep dir>/optimization_results.yaml``."""
        states = [t.state.name for t in study.trials]
        counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        try:
            best = study.best_trial
        except ValueError:
            raise ConfigError(f"no trial of the study in {self.sweep_dir} completed ({counts}): see each trial's "
                              f"error in `python scripts/sweep_summary.py {self.sweep_dir}`") from None
        log.info(f"best: trial {best.number} {objective}={best.value:.6g} params {best.params} ({counts})")
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": study.study_name, "objective": objective,
                                         "direction": study.direction.name.lower(), "best_trial": best.number,
                                         "best_value": best.value, "best_params": best.params,
                                         "storage": str(self.storage_spec or self.sweep_dir / JOURNAL)}),
                       self.sweep_dir / "optimization_results.yaml")

