"""Trackers (logger.tensorboard / logger.mlflow, alongside wandb): a run stopped and resumed logs the same
metrics as metrics.jsonl, the config, the end-of-run summary and pictures, into one tracker run, read back
with the trackers' own readers (TensorBoard's EventAccumulator, MLflow's client)."""

import json
import sys

import pytest

import sslkit.tasks
from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.errors import ConfigError
from sslkit.runlog import build_trackers
from sslkit.tasks import run_pretrain
from tests.test_engine import FAST

pytest.importorskip("tensorboard", reason="the tensorboard extra (in .[dev])")
pytest.importorskip("mlflow", reason="the mlflow extra (in .[dev])")

TRACKED = [x for x in FAST if x != "trainer.summary=false"] + [
    "data.num_samples=32", "data.batch_size=8", "trainer.max_steps=4", "trainer.ckpt_every=100",
    "logger.tensorboard.enabled=true", "logger.mlflow.enabled=true"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """Stopped after 2 of 4 steps, then resumed to the end with the summary (stubbed) and the pictures."""
    run_dir = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setattr(sslkit.tasks, "summarize", lambda *a, **k: {"knn_top1_pretrained": 12.5})
    try:
        run_pretrain(compose(TRACKED + ["trainer.stop_after=2"]), run_dir)
        first = ck.load(run_dir / "checkpoints" / "last.pt")["tracker_ids"]
        run_pretrain(compose(TRACKED), run_dir)
    finally:
        mp.undo()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, first, rows


def test_tensorboard_event_files_hold_the_run(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, rows = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"lr", "wd", "images_per_s", "summary/knn_top1_pretrained"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("summary/knn_top1_pretrained")[0].value == 12.5
    assert "pictures/reconstruction" in acc.Tags()["images"]
    assert acc.Images("pictures/reconstruction")[-1].step == 4
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_mlflow_run_continues_after_resume(tracked_run):
    from mlflow import MlflowClient

    run_dir, first, rows = tracked_run
    last = ck.load(run_dir / "checkpoints" / "last.pt")
    assert first["mlflow"] and last["tracker_ids"]["mlflow"] == first["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sslkit")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first["mlflow"]]  # one run, not one per resume
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    history = sorted((m.step, m.value) for m in history)
    assert [h[0] for h in history] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [h[1] for h in history] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert run.data.params["method.name"] == "umae" and run.data.params["data.batch_size"] == "8"
    assert "derived.steps_per_epoch" in run.data.params
    assert run.data.metrics["summary/knn_top1_pretrained"] == 12.5
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.json" in artifacts and "images" in artifacts


def test_logger_typos_fail_at_compose():
    with pytest.raises(Exception, match="enabeld"):
        compose(["logger.tensorboard.enabeld=true"])


def test_a_missing_tracker_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    cfg = compose(["logger.wandb.mode=disabled", "logger.mlflow.enabled=true"])
    with pytest.raises(ConfigError, match=r'pip install "sslkit\[mlflow\]"'):
        build_trackers(tmp_path, cfg.logger, {}, 0, {})
