"""Launching and sweeping: the SLURM launcher preset yields the right sbatch script (submitted to a fake
``sbatch``); a real two-point sweep through hydra/launcher=local (submitit, one process per point) whose
points are preempted with submitit's signal, requeued and resumed, ending with each point's config,
metrics and checkpoint; the sweep summary reads them back."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslkit.sweep import format_table, summarize_sweep

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
submitit = pytest.importorskip("submitit")

PRETRAIN = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"  # = the sslkit-pretrain script
TINY = ["experiment=umae_demo", "data.num_samples=64", "data.batch_size=8", "trainer.max_steps=2",
        "trainer.summary=false", "logger.wandb.mode=disabled", "trainer.progress=false", "data.num_workers=0"]


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """``srun`` (submitit checks that it exists) and an ``sbatch`` that keeps a copy of the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{tmp_path}/sbatch_script.sh"\necho "Submitted batch job 4242"\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_slurm_launcher_writes_the_sbatch_script(tmp_path, monkeypatch):
    """Compose with hydra/launcher=slurm, instantiate hydra-submitit-launcher's SlurmLauncher from it and
    launch a 2-point sweep against a fake sbatch: the real plugin + submitit code writes the job-array
    script and the pickled (checkpointable = requeueable) jobs."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.utils import setup_globals
    from hydra.types import HydraContext
    from hydra.utils import instantiate

    from sslkit.cli import _hydra_pretrain
    from sslkit.config import config_dir
    from sslkit.config import register_configs

    monkeypatch.setenv("PATH", f"{_fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda self: [None])  # do not wait for the fake job
    register_configs()
    setup_globals()
    overrides = ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.partition=gpu",
                 "hydra.launcher.nodes=2", "hydra.launcher.qos=high", "hydra.launcher.account=vision",
                 "hydra.launcher.constraint=a100", "hydra.launcher.timeout_min=600"]
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="pretrain", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8  # one task per GPU
    launcher = instantiate(cfg.hydra.launcher)
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(config_dir()))
    launcher.setup(hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(cfg)),
                   task_function=_hydra_pretrain, config=cfg)
    launcher.launch([["optim.blr=1e-4"], ["optim.blr=3e-4"]], initial_job_idx=0)

    script = (tmp_path / "sbatch_script.sh").read_text()
    flags = {line.split("=", 1)[0][len("#SBATCH --"):]: (line.split("=", 1) + [""])[1]
             for line in script.splitlines() if line.startswith("#SBATCH --")}
    sig = submitit.JobEnvironment.USR_SIG  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    assert flags["partition"] == "gpu" and flags["nodes"] == "2" and flags["qos"] == "high"
    assert flags["account"] == "vision" and flags["constraint"] == "a100"
    assert flags["gpus-per-node"] == "8" and flags["ntasks-per-node"] == "8" and flags["cpus-per-task"] == "10"
    assert flags["mem"] == "480GB" and flags["time"] == "600"
    assert flags["signal"] == f"{sig}@120"  # checkpoint signal 2 min before the time limit
    assert "requeue" in flags and flags["array"] == "0-1%2"  # 2 points, at most 16 at once
    assert "srun" in script and "submitit.core._submit" in script
    # each point's pickled job is checkpointable (submitit requeues it) and allows 20 timeouts
    pickles = sorted((tmp_path / "sweep" / ".submitit").rglob("*_submitted.pkl"))
    assert len(pickles) == 2
    delayed = pickle.loads(pickles[0].read_bytes())
    assert hasattr(delayed.function, "checkpoint") and delayed._timeout_countdown == 20
    assert sorted(a[0][0] for a in (pickle.loads(p.read_bytes()).args for p in pickles)) == ["optim.blr=1e-4",
                                                                                             "optim.blr=3e-4"]


def _submitit_tasks(sweep: Path) -> dict[int, int]:
    """{sweep point: pid} of the running submitit task processes of ``sweep`` (Linux /proc)."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(x.split(b"=", 1) for x in (proc / "environ").read_bytes().split(b"\0") if b"=" in x)
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in cmd and any(str(sweep).encode() in c for c in cmd):
            jid = env.get(b"SUBMITIT_LOCAL_JOB_ID", b"").decode()
            pkl = sweep / ".submitit" / jid / f"{jid}_submitted.pkl"
            if jid and pkl.is_file():
                out[pickle.loads(pkl.read_bytes()).args[2]] = int(proc.name)  # args: overrides, key, job num, ...
    return out


# Loaded by every Python process of the sweep (PYTHONPATH): after point 0 logs step 2, its training process
# waits until the test has sent the preemption signal (the file SSLKIT_TEST_HOLD exists), so the signal
# always lands mid-run, whatever the machine's speed. A resumed point 0 (from step 2) never waits.
_HOLD = """
import importlib.abc, importlib.machinery, os, sys, time

class _Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sslkit.runlog":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            log = module.RunLogger.log

            def held(self, step, metrics):
                log(self, step, metrics)
                if step == 2 and self.run_dir.name == "0_umae_demo":
                    deadline = time.monotonic() + 300
                    while not os.path.exists(os.environ["SSLKIT_TEST_HOLD"]) and time.monotonic() < deadline:
                        time.sleep(0.01)

            module.RunLogger.log = held

        spec.loader.exec_module = patched
        return spec

if os.environ.get("SSLKIT_TEST_HOLD"):
    sys.meta_path.insert(0, _Hold())
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the job processes through /proc")
def test_local_sweep_preempted_points_are_requeued_and_resume(tmp_path):
    """``sslkit-pretrain -m hydra/launcher=local trainer.ckpt_every=500,1000``: submitit runs each point as
    its own process. Point 0 gets submitit's preemption signal mid-run (it waits after step 2 until the
    signal is sent: see _HOLD): sslkit checkpoints after the step, hands over to submitit's handler, which
    requeues the job; the new process resumes in the same point dir. Every point ends with its resolved
    config, complete metrics and a checkpoint at the last step, and the preempted point's final parameters
    equal the uninterrupted point's bit for bit (ckpt_every beyond max_steps changes nothing else)."""
    steps, sweep = 12, tmp_path / "sweep"
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_HOLD)
    go = tmp_path / "signal_sent"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]),
           "SSLKIT_TEST_HOLD": str(go)}
    cmd = [sys.executable, str(PRETRAIN), "-m", "hydra/launcher=local", *TINY, f"trainer.max_steps={steps}",
           "trainer.log_every=1", "optim.warmup_steps=2", "trainer.ckpt_every=500,1000", f"hydra.sweep.dir={sweep}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    signalled: set[int] = set()
    sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    try:
        while p.poll() is None and not signalled:
            for num, pid in _submitit_tasks(sweep).items():
                m = sweep / f"{num}_umae_demo" / "metrics.jsonl"
                if num == 0 and m.is_file() and len(m.read_text().splitlines()) >= 2:  # waiting in step 2
                    os.kill(pid, sig)
                    signalled.add(num)
                    go.touch()  # the signal is pending: let it finish the step
            time.sleep(0.05)
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert signalled == {0}
    jobs = sorted(q for q in sweep.iterdir() if q.is_dir() and not q.name.startswith("."))
    assert [q.name for q in jobs] == ["0_umae_demo", "1_umae_demo"]
    logs = {d.name: "".join(f.read_text() for f in sorted(d.glob("*_log.*"))) for d in (sweep / ".submitit").iterdir()}
    preempted = [k for k, v in logs.items() if f"preempted by SIG{submitit.JobEnvironment.USR_SIG}" in v]
    assert len(preempted) == 1 and "Requeued job" in logs[preempted[0]]  # submitit requeued point 0 only
    assert sum("Requeued job" in v for v in logs.values()) == 1
    finals, models = [], []
    for every, job in zip((500, 1000), jobs):
        ck = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        assert ck["step"] == steps and ck["config"]["trainer"]["ckpt_every"] == every
        models.append(ck["model"])
        assert (job / "config.yaml").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))  # resumed, not restarted from 0
        finals.append(rows[-1]["loss"])
    rows = summarize_sweep(sweep)
    assert [r["varying"] for r in rows] == [{"trainer.ckpt_every": "500"}, {"trainer.ckpt_every": "1000"}]
    assert [r["status"] for r in rows] == ["done", "done"] and [r["final"]["loss"] for r in rows] == finals
    # preempted + requeued + resumed == uninterrupted
    assert finals[0] == finals[1] and models[0].keys() == models[1].keys()
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k


def test_summarize_sweep_marks_incomplete_points_and_merges_results(tmp_path, capsys):
    def job(name: str, overrides: list[str], rows: list[dict], total: int, results: dict | None = None) -> None:
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (d / "config.yaml").write_text(f"derived:\n  total_steps: {total}\n")
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # torn
        if results:
            (d / "summary.json").write_text(json.dumps(results))

    job("1_umae_demo", ["experiment=umae_demo", "optim.blr=3e-4"], [{"step": 4, "time": 0, "loss": 0.5}], 4,
        {"knn_top1_pretrained": 40.0})
    job("0_umae_demo", ["experiment=umae_demo", "optim.blr=1e-4"],
        [{"step": 2, "time": 0, "loss": 0.9}, {"step": 3, "time": 0, "loss": 0.7}], 4)
    (tmp_path / ".submitit").mkdir()  # not a run dir
    rows = summarize_sweep(tmp_path)
    assert [r["job"] for r in rows] == ["0_umae_demo", "1_umae_demo"]
    assert [r["varying"] for r in rows] == [{"optim.blr": "1e-4"}, {"optim.blr": "3e-4"}]  # experiment is fixed
    assert [(r["step"], r["status"]) for r in rows] == [(3, "incomplete"), (4, "done")]
    assert rows[0]["final"] == {"loss": 0.7} and rows[1]["results"] == {"knn_top1_pretrained": 40.0}
    table = format_table(rows).splitlines()
    assert table[0].split() == ["job", "optim.blr", "step", "status", "loss", "knn_top1_pretrained"]
    assert table[2].split() == ["0_umae_demo", "1e-4", "3/4", "incomplete", "0.7", "-"]
    assert table[3].split() == ["1_umae_demo", "3e-4", "4/4", "done", "0.5", "40"]
