"""Preemption and requeue: a real SIGTERM mid-run stops after the step with a checkpoint and the same command
resumes to the same parameters as an uninterrupted run; SIGKILL during a checkpoint write leaves the previous
one loadable; a truncated newest checkpoint falls back to the previous one; keep_every / keep_last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.tasks import run_pretrain
from sslkit.preemption import Preempted, PreemptionGuard

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=umae_demo", "data.num_samples=64", "data.batch_size=8", "trainer.summary=false",
        "logger.wandb.mode=disabled", "trainer.progress=false", "data.num_workers=0", "trainer.log_every=1",
        "optim.warmup_steps=2"]


def _env() -> dict[str, str]:  # the same thread count as this process: bitwise-equal CPU math
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "WANDB_MODE": "disabled"}


# ----------------------------------------------------------------------------------------- the guard
def test_guard_records_signals_and_restores_handlers():
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with PreemptionGuard() as g:
            assert not g.requested and not g.should_stop()
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
            time.sleep(0.01)
            assert g.requested and g.should_stop() and g.signum == signal.SIGUSR1
            e = g.preempted(7, "last.pt")
        assert seen == []  # recorded only, the previous handler did not run yet
        os.kill(os.getpid(), signal.SIGUSR1)  # restored on exit
        time.sleep(0.01)
        assert seen == [signal.SIGUSR1]
        # the CLI's exit: the previous handler (submitit's requeue) runs after the checkpoint, then 128 + signum
        assert e.step == 7 and e.exit_code == 128 + signal.SIGUSR1
        with pytest.raises(SystemExit) as ex:
            e.exit()
        assert ex.value.code == 138 and seen == [signal.SIGUSR1, signal.SIGUSR1]
        with pytest.raises(SystemExit) as ex:  # no Python handler before sslkit's: just the exit code
            Preempted(3, signal.SIGTERM, "last.pt", signal.SIG_DFL).exit()
        assert ex.value.code == 143
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_guard_agrees_across_ranks():
    votes = []

    def agree(flag: bool) -> bool:  # a stand-in for the all-reduce MAX: another rank was signalled
        votes.append(flag)
        return True

    with PreemptionGuard(agree=agree) as g:
        assert g.should_stop() and votes == [False]
        assert g.preempted(5, "x").signum == signal.SIGTERM  # stop like a SIGTERM'd rank


# ----------------------------------------------------------------------------------------- SIGTERM -> resume
def test_sigterm_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGTERM to the whole process group (as SLURM signals every process of a step), DataLoader workers
    included: the run stops after the step with last.pt and exits 143; the same command resumes and
    reaches the parameters of an uninterrupted run bit for bit."""
    steps = 16
    ov = TINY + [f"trainer.max_steps={steps}", "trainer.ckpt_every=1000"]  # last.pt only at the end / on a signal
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(REPO / "scripts" / "pretrain.py"), *ov, "data.num_workers=2",
                          f"hydra.run.dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(), cwd=tmp_path, start_new_session=True)
    metrics = run / "metrics.jsonl"
    try:
        while p.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                os.killpg(p.pid, signal.SIGTERM)
                break
            time.sleep(0.02)
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "preempted by SIGTERM" in err
    stopped = ck.load(run / "checkpoints" / "last.pt")
    assert 2 <= stopped["step"] < steps and stopped["data_state"]["batches_consumed"] == stopped["step"]
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, stopped["step"] + 1))

    # the same config again (in this process, 0 workers: same batches): resume=auto picks up last.pt
    resumed = run_pretrain(compose(ov), run)
    reference = run_pretrain(compose(ov), tmp_path / "reference")
    assert resumed.step == reference.step == steps
    a, b = ck.load(run / "checkpoints" / "last.pt"), ck.load(tmp_path / "reference" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"]["loss"] == b["metrics"]["loss"]


# ----------------------------------------------------------------------------------------- SIGKILL while writing
_WRITER = """
import sys, torch
from pathlib import Path
from sslkit.checkpoint import FORMAT_VERSION, save_training_state
path = Path(sys.argv[1])
for i in range(1000):
    w = torch.full((24 * 2**20,), float(i))  # 96 MB: a write takes a while
    print("writing", i, flush=True)
    save_training_state(path, dict(format_version=FORMAT_VERSION, sslkit_version="test", method="umae",
                                   model_config={"name": "m", "kwargs": {}}, model={"w": w}, optimizer={}, scaler={},
                                   step=i, data_state={}, rng={}, config={}, derived={}, wandb_id=None, metrics={}))
    print("saved", i, flush=True)
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(last)], stdout=subprocess.PIPE, text=True, env=_env())
    tmp = last.with_name(f".last.pt.tmp.{p.pid}")  # checkpoint.atomic_save's temp file
    try:
        for line in p.stdout:
            if line.startswith("saved 0"):  # checkpoint 0 is complete; now kill inside the write of 1
                break
        t0 = time.monotonic()
        while not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() - t0 < 60:
            pass  # busy-wait: the write of 96 MB takes far longer than one stat()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert tmp.is_file() and tmp.stat().st_size > 0  # killed inside the write: a torn temp file is left...
    state = ck.load(last)  # ...while last.pt is the previous complete checkpoint
    assert state["step"] == 0
    assert state["model"]["w"].numel() == 24 * 2**20 and bool((state["model"]["w"] == 0).all())  # all of it
    assert ck.find_resume(tmp_path, "auto")["step"] == 0  # the temp file is never a candidate
    assert ck.step_checkpoints(last.parent) == []


# ----------------------------------------------------------------------------------------- truncated + keeps
def test_keeps_and_a_truncated_newest_checkpoint(tmp_path):
    ov = TINY + ["trainer.max_steps=5", "trainer.ckpt_every=1000", "trainer.keep_every=1", "trainer.keep_last=2"]
    run_pretrain(compose(ov), tmp_path)
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "step_4.pt", "step_5.pt"]  # keep_last=2 periodic
    final = ck.load(d / "last.pt")
    assert final["step"] == 5
    for name in ("last.pt", "step_5.pt"):  # both copies of step 5 torn (e.g. a full disk)
        blob = (d / name).read_bytes()
        (d / name).write_bytes(blob[: len(blob) // 2])
    with pytest.warns(UserWarning, match="unreadable") as w:
        r = run_pretrain(compose(ov), tmp_path)  # resumes from step_4.pt and redoes step 5
    assert sum("unreadable" in str(x.message) for x in w) == 2
    assert r.step == 5
    redone = ck.load(d / "last.pt")
    for k in final["model"]:
        assert torch.equal(final["model"][k], redone["model"][k]), k
