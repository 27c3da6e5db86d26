"""Hyper-parameter search with sslkit's Optuna sweeper (``-m hydra/sweeper=optuna``): the search-space syntax,
real sweeps through ``sslkit-pretrain``'s Hydra entry point (tiny model, 2 steps per trial), the trial numbers
as run directories, failed trials recorded and skipped, resuming a sweep (missing trials only; a trial left
running re-run in its own directory, where the trainer resumes), the objective's value and its checks, and the
sweep summary marking the best trial."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from sslkit import cli
from sslkit.config import ComposeError, compose
from sslkit.errors import ConfigError, TrainingError
from sslkit.optuna_sweep import SearchSpace, open_storage, parse_search_space, read_record, write_record
from sslkit.sweep import format_study, main as summary_main, summarize_study
from sslkit.tasks import pretrain_objective

optuna = pytest.importorskip("optuna")

TINY = ["experiment=umae_demo", "data.num_samples=64", "data.batch_size=8", "trainer.max_steps=2",
        "optim.warmup_steps=0", "trainer.summary=false", "logger.wandb.mode=disabled", "trainer.progress=false",
        "data.num_workers=0"]
BLR = "optim.blr=tag(log, interval(1e-4, 1e-2))"


def _sweep(sweep_dir: Path, n_trials: int, *args: str, objective: str = "loss") -> None:
    cli.pretrain_main(["-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={n_trials}",
                       f"hydra.sweep.dir={sweep_dir}", f"trainer.objective={objective}", *TINY, *args])


def _study(sweep_dir: Path):
    return optuna.load_study(study_name="sslkit", storage=open_storage(None, sweep_dir))


def _dirs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _last_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]


# ----------------------------------------------------------------------------------------- search spaces
def test_search_space_syntax_maps_to_optuna_distributions():
    d = optuna.distributions
    space = parse_search_space({"optim": {"blr": "tag(log, interval(1e-4, 1e-2))"}, "trainer.max_steps": 10,
                                "model.x": ["a", "b"], "optim.min_lr": "interval(0, 1)"},
                               ["trainer.knn_every=range(1, 8)", "+trainer.extra=tag(int, interval(2, 6))",
                                "method=umae_tiny,simmim", "optim.min_lr=0.5,1e-05",
                                "trainer.seed=range(0.1, 0.5, 0.1)", "experiment=umae_demo"])
    dist = space.distributions
    assert dist["optim.blr"] == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert dist["trainer.knn_every"] == d.IntDistribution(1, 7)  # Hydra's range: the stop is excluded
    assert dist["trainer.extra"] == d.IntDistribution(2, 6) and space.keys["trainer.extra"] == "+trainer.extra"
    assert dist["model.x"] == d.CategoricalDistribution(["a", "b"])  # a YAML list is a choice
    assert dist["method"] == d.CategoricalDistribution(["umae_tiny", "simmim"])
    assert dist["optim.min_lr"] == d.CategoricalDistribution([0.5, 1e-05])  # the command line wins over params
    assert dist["trainer.seed"] == d.FloatDistribution(0.1, 0.4, step=0.1)
    assert space.fixed == ["trainer.max_steps=10", "experiment=umae_demo"]  # passed to every trial as they are
    ov = space.overrides({"optim.blr": 0.001, "trainer.extra": 3, "model.x": "b", "trainer.seed": 0.2})
    assert ov == ["trainer.max_steps=10", "experiment=umae_demo", "optim.blr=0.001", "+trainer.extra=3", "model.x=b",
                  "trainer.seed=0.2"]
    assert isinstance(space, SearchSpace) and parse_search_space(None).distributions == {}


@pytest.mark.parametrize("spec,named", [
    ("interval(1e-2)", "search spaces: interval(lo, hi)"),  # unparsable: the accepted syntax is listed
    ("tag(log, interval(0, 1))", "needs lo > 0"),
    ("interval(2, 1)", "needs lo < hi"),
    ("tag(int, interval(1.5, 3))", "whole-number ends"),
    ("tag(loog, interval(1, 2))", "unknown tags ['loog']"),
    ("range(5, 1)", "is empty"),
    ("tag(log, range(1, 9, 2))", "needs step 1"),
    ("glob(*)", "glob() sweeps are not supported"),
])
def test_a_bad_search_space_fails_naming_the_key_and_the_fix(spec, named):
    with pytest.raises(ConfigError) as e:
        parse_search_space({"optim.blr": spec})
    assert named in str(e.value) and "optim.blr" in str(e.value) and "hydra.sweeper.params" in str(e.value)


def test_hydras_plugin_scan_finds_the_sweeper():
    """Installed from a wheel, Hydra finds the sweeper by scanning hydra_plugins (it runs the module before it is
    in sys.modules); an editable install is not scanned, so sslkit.config registers it as well."""
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "print(sorted(f'{c.__module__}.{c.__name__}' for c in Plugins.instance().discover(Sweeper)))")
    src = Path(__file__).resolve().parents[1] / "ssl"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": str(src)}).stdout
    assert "hydra_plugins.sslkit_optuna_sweeper.OptunaSweeper" in out
    assert not (src / "hydra_plugins" / "__init__.py").exists()  # a namespace package, shared with other plugins


# ----------------------------------------------------------------------------------------- objective
def test_objective_values_and_checks(tmp_path):
    """loss: the mean of the last 10% of the steps' rows (a resumed run's re-logged steps count once, a torn
    line is skipped); knn_top1 without summary: the last online kNN; a run that cannot produce its objective
    fails at compose time with the fix; a typo fails naming the choices."""
    rows = [{"step": s, "loss": float(s)} for s in range(1, 21)] + [{"step": 19, "loss": 100.0},  # killed, re-logged
                                                                     {"step": 20, "loss": 7.0, "knn_top1": 40.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "lo')
    result = SimpleNamespace(run_dir=tmp_path, step=20, is_main=True)
    cfg = lambda **t: OmegaConf.create({"trainer": {"summary": False, "knn_every": None, **t}})  # noqa: E731
    assert pretrain_objective(cfg(objective="loss"), result) == (100.0 + 7.0) / 2  # steps 19, 20 of 20
    assert pretrain_objective(cfg(objective="knn_top1", knn_every=5), result) == 40.0
    assert pretrain_objective(cfg(objective=None), result) is None
    assert pretrain_objective(cfg(objective="loss"), SimpleNamespace(run_dir=tmp_path, step=20, is_main=False)) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ConfigError, match="trainer.knn_every=50 is beyond"):
        pretrain_objective(cfg(objective="knn_top1", knn_every=50), SimpleNamespace(run_dir=tmp_path, step=1,
                                                                                    is_main=True))
    with pytest.raises(ComposeError) as e:
        compose(["trainer.objective=knn_top"])
    assert "trainer.objective" in str(e.value) and "linear_top1" in str(e.value)
    with pytest.raises(ConfigError, match="set trainer.summary=true"):
        compose(["trainer.objective=linear_top1", "trainer.summary=false"])
    with pytest.raises(ConfigError, match=r"trainer.knn_every=N"):
        compose(["trainer.objective=knn_top1", "trainer.summary=false"])
    assert str(compose(["trainer.objective=knn_top1", "trainer.summary=false", "trainer.knn_every=5"])
               .trainer.objective) == "knn_top1"


def test_a_sweep_without_objective_exits_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.pretrain_main(["-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={tmp_path / 's'}", *TINY, BLR])
    assert e.value.code == 2 and "add trainer.objective=knn_top1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- sweeps
def test_sweep_runs_numbered_trials_and_the_summary_marks_the_best(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _sweep(sweep, 3, BLR)
    assert _dirs(sweep) == ["0_umae_demo", "1_umae_demo", "2_umae_demo"]  # job number = trial number
    study = _study(sweep)
    trials = study.trials
    assert [(t.number, t.state.name) for t in trials] == [(i, "COMPLETE") for i in range(3)]
    for t in trials:  # each trial ran its own parameters and told the study its run's objective
        run = sweep / f"{t.number}_umae_demo"
        assert f"optim.blr={t.params['optim.blr']!r}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert t.value == pytest.approx(_last_loss(run))  # 2 steps: the last 10% is the last row
        assert 1e-4 <= t.params["optim.blr"] <= 1e-2
    assert len({t.params["optim.blr"] for t in trials}) == 3 and study.user_attrs["objective"] == "loss"
    best = min(trials, key=lambda t: t.value)
    (s,) = summarize_study(sweep)
    assert s["best"] == best.number and [t["best"] for t in s["trials"]] == [t.number == best.number for t in trials]
    assert [t["step"] for t in s["trials"]] == [2, 2, 2]
    capsys.readouterr()
    summary_main([str(sweep)])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["trial", "state", "optim.blr", "loss", "step", "best"]
    assert out[3 + best.number].split()[-1] == "*" and out[-1].startswith(f"best: trial {best.number} value ")
    assert f"optim.blr={best.params['optim.blr']}" in out[-1]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_trial == best.number and results.best_value == pytest.approx(best.value)


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """Trial 0's run raises a user error (the CLI's exit 2, not a crash of the sweep), trial 1 returns nan:
    both FAIL with their reason; trial 2 completes and is the best."""
    from hydra.core.hydra_config import HydraConfig

    real = cli.pretrain_objective

    def objective(cfg, result):
        num = HydraConfig.get().job.num
        if num == 0:
            raise TrainingError("the loss diverged")
        return math.nan if num == 1 else real(cfg, result)

    monkeypatch.setattr(cli, "pretrain_objective", objective)
    sweep = tmp_path / "sweep"
    _sweep(sweep, 3, BLR)
    assert [t.state.name for t in _study(sweep).trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert read_record(sweep, 0)["error"] == "the loss diverged" and "nan" in read_record(sweep, 1)["error"]
    (s,) = summarize_study(sweep)
    text = format_study(s)
    assert "trial 0 failed: the loss diverged" in text and "trial 1 failed: the objective is nan" in text
    assert text.splitlines()[-1].startswith("best: trial 2 value ")


def test_a_trial_whose_overrides_do_not_compose_fails_without_running(tmp_path, capsys):
    """(An enqueued trial fixes its parameters.) The sweep exits 2 when no trial of the study completed."""
    sweep = tmp_path / "sweep"
    study = optuna.create_study(study_name="sslkit", storage=open_storage(None, sweep), direction="minimize")
    study.enqueue_trial({"data.batch_size": "abc"})
    with pytest.raises(SystemExit) as e:
        _sweep(sweep, 1, "data.batch_size=8,abc")
    assert e.value.code == 2 and "no trial of the study" in capsys.readouterr().err
    (t,) = _study(sweep).trials
    assert t.state.name == "FAIL" and "do not compose" in read_record(sweep, 0)["error"] and _dirs(sweep) == []


class _Died(BaseException):
    """The sweep process dying (not an error a trial reports)."""


def test_resume_runs_the_missing_trials_and_reruns_a_trial_left_running(tmp_path, monkeypatch, capfd):
    """The sweep dies while trial 1 runs (after its last checkpoint): trial 1 is left RUNNING. The same command
    with n_trials=3 re-runs trial 1 in its own directory (the trainer resumes from last.pt, so its metrics are
    not written again) and adds trial 2 only; trial 0 is not touched. Re-running once more does nothing."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    real = cli.pretrain_objective

    def dies_in_trial_1(cfg, result):
        if HydraConfig.get().job.num == 1:
            raise _Died()
        return real(cfg, result)

    sweep = tmp_path / "sweep"
    monkeypatch.setattr(cli, "pretrain_objective", dies_in_trial_1)
    with pytest.raises(_Died):
        _sweep(sweep, 2, BLR)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(cli, "pretrain_objective", real)
    assert [t.state.name for t in _study(sweep).trials] == ["COMPLETE", "RUNNING"]
    files = [sweep / "0_umae_demo" / "metrics.jsonl", sweep / "0_umae_demo" / "checkpoints" / "last.pt",
             sweep / "1_umae_demo" / "metrics.jsonl"]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    blr_1 = _study(sweep).trials[1].params["optim.blr"]
    capfd.readouterr()
    _sweep(sweep, 3, BLR)
    out = "".join(capfd.readouterr())  # Hydra logs to stdout
    assert "1 to re-run, 1 new" in out and f"resumed from step 2 in {sweep / '1_umae_demo'}" in out
    trials = _study(sweep).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert trials[1].params["optim.blr"] == blr_1
    assert trials[1].value == pytest.approx(_last_loss(sweep / "1_umae_demo"))
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before  # trial 0 untouched, 1 not re-logged
    assert _dirs(sweep) == ["0_umae_demo", "1_umae_demo", "2_umae_demo"]
    _sweep(sweep, 3, BLR)  # complete: nothing to run
    assert "0 to re-run, 0 new" in "".join(capfd.readouterr()) and len(_study(sweep).trials) == 3
    with pytest.raises(SystemExit):  # another objective in the same study: refused, with the fix
        _sweep(sweep, 4, BLR, "trainer.knn_every=1", objective="knn_top1")
    assert "was made to minimize loss, this sweep would maximize knn_top1" in capfd.readouterr().err


def test_a_running_trial_with_a_record_is_told_without_rerunning(tmp_path, capfd):
    """The sweep died after trial 0's job ended but before it told the study: the job's record finishes it."""
    sweep = tmp_path / "sweep"
    study = optuna.create_study(study_name="sslkit", storage=open_storage(None, sweep), direction="minimize")
    study.ask({"optim.blr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    write_record(sweep, 0, "COMPLETE", 1.25, None, str(sweep / "0_umae_demo"))
    _sweep(sweep, 1, BLR)
    (t,) = _study(sweep).trials
    assert t.state.name == "COMPLETE" and t.value == 1.25 and _dirs(sweep) == []
    assert "0 to re-run, 0 new" in "".join(capfd.readouterr())


def test_knn_objective_from_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    _sweep(sweep, 1, BLR, "trainer.summary=true", "trainer.knn_train_samples=32", "trainer.knn_val_samples=16",
           objective="knn_top1")
    (t,) = _study(sweep).trials
    assert t.value == json.loads((sweep / "0_umae_demo" / "summary.json").read_text())["knn_top1_pretrained"]
    assert _study(sweep).direction.name == "MAXIMIZE"


def test_parallel_trials_through_the_local_submitit_launcher(tmp_path):
    """hydra/launcher=local: n_jobs=2 trials at once, each a submitit job (its own process), numbered by trial."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    _sweep(sweep, 3, BLR, "hydra/launcher=local", "hydra.sweeper.n_jobs=2")
    trials = _study(sweep).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and _dirs(sweep) == [f"{i}_umae_demo" for i in range(3)]
    for t in trials:
        assert t.value == pytest.approx(_last_loss(sweep / f"{t.number}_umae_demo"))
        assert read_record(sweep, t.number)["run_dir"] == str(sweep / f"{t.number}_umae_demo")


def test_the_official_plugin_installed_alongside_fails_with_the_fix(tmp_path, monkeypatch, capsys):
    """hydra-optuna-sweeper also names hydra/sweeper=optuna, so Hydra could compose neither: the command says so."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "hydra_plugins.hydra_optuna_sweeper" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        _sweep(tmp_path / "sweep", 1, BLR)
    assert e.value.code == 2 and "pip uninstall hydra-optuna-sweeper" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
