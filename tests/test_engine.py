"""The loop end to end: smoke runs of every experiment, save -> resume equivalence, non-finite loss."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.tasks import run_pretrain
from sslkit.errors import TrainingError
from tests.test_config import EXPERIMENTS

FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "trainer.log_every=1"]


def tiny(*extra: str) -> list[str]:
    return FAST + ["data.num_samples=64", "data.batch_size=8", "trainer.max_steps=6", "trainer.ckpt_every=100",
                   *extra]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_smoke_every_experiment_with_save_and_resume(experiment, tmp_path):
    real_data = compose([f"experiment={experiment}"]).data.name != "synthetic"  # e.g. the cifar10_* benchmarks
    ov = [f"experiment={experiment}", *(["data=synthetic"] if real_data else []), *FAST, "data.batch_size=2",
          "data.num_samples=8", "trainer.max_steps=3",
          "trainer.accum_steps=1",
          "trainer.stop_after=2"]
    r = run_pretrain(compose(ov), tmp_path)
    assert r.step == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(torch.isfinite(torch.tensor(x["loss"])) for x in rows)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["data_state"]["batches_consumed"] == 2
    assert "derived" in (tmp_path / "config.yaml").read_text()
    # resume=auto picks it up and finishes the schedule
    r2 = run_pretrain(compose([x for x in ov if not x.startswith("trainer.stop_after")]), tmp_path)
    assert r2.step == 3


def _params(path: Path) -> dict[str, torch.Tensor]:
    return ck.load(path)["model"]


@pytest.mark.parametrize("workers,experiment", [(0, "umae_demo"), (2, "umae_demo"), (0, "dinov2_demo")])
def test_resume_equals_uninterrupted(tmp_path, workers, experiment):
    # dinov2: schedules by epoch (teacher temp warm-up, last-layer freeze) cross the resume point
    extra = ["method.warmup_teacher_temp_epochs=1", "method.freeze_last_layer_epochs=0.5",
             "model.drop_path_rate=0.3"] if experiment.startswith("dinov2") else []
    ov = tiny(f"experiment={experiment}", f"data.num_workers={workers}", "optim.warmup_steps=2", *extra)
    run_pretrain(compose(ov), tmp_path / "a")
    run_pretrain(compose(ov + ["trainer.stop_after=3"]), tmp_path / "b")
    assert ck.load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 3
    run_pretrain(compose(ov), tmp_path / "b")  # resume=auto
    a, b = _params(tmp_path / "a" / "checkpoints" / "last.pt"), _params(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in ma] == [x["loss"] for x in mb]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from sslkit.methods.umae import UMMAE

    orig = UMMAE.forward
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        out = orig(self, batch)
        if calls["n"] == 3:
            out = {**out, "loss": out["loss"] * float("nan"), "loss_rec": out["loss_rec"] * float("nan")}
        return out

    monkeypatch.setattr(UMMAE, "forward", flaky)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2 \(loss=nan, loss_rec=nan\)"):
        run_pretrain(compose(tiny("trainer.ckpt_every=1")), tmp_path)
    good = ck.load(tmp_path / "checkpoints" / "last.pt")
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_nonfinite_loss_on_another_rank_stops_this_rank_too():
    from sslkit.engine import check_finite

    ok, nan = {"loss": torch.tensor(1.0)}, {"loss": torch.tensor(float("nan"))}
    seen = []

    def agree(flag):  # stands in for the all-reduce MAX: another rank reports a non-finite loss
        seen.append(flag)
        return True

    with pytest.raises(TrainingError, match="non-finite loss on another rank at step 5"):
        check_finite(ok, 5, agree)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5 \(loss=nan\)"):
        check_finite(nan, 5, agree)
    assert seen == [False, True]
    check_finite(ok, 5, lambda flag: flag)  # nobody is bad: no error
    check_finite(ok, 5)


def test_resume_into_a_different_model_is_refused(tmp_path):
    from sslkit.errors import CheckpointError

    run_pretrain(compose(tiny("trainer.max_steps=1")), tmp_path)
    with pytest.raises(CheckpointError, match="cannot resume"):
        run_pretrain(compose(tiny("trainer.max_steps=2", "model=sslkit_swin_test")), tmp_path)


def test_resume_on_changed_data_is_refused(tmp_path):
    """The epoch's sample order depends on the data: a resume on a source of another size fails with the fix."""
    from sslkit.errors import DataError

    run_pretrain(compose(tiny("trainer.max_steps=1")), tmp_path)
    n = compose(tiny()).data.num_samples
    with pytest.raises(DataError, match=rf"the data changed since the checkpoint.*{n} samples then, {n + 8} now"):
        run_pretrain(compose(tiny("trainer.max_steps=2", f"data.num_samples={n + 8}")), tmp_path)


def test_console_script_runs_and_reports_config_errors(tmp_path):
    exe = Path(sys.executable).with_name("sslkit-pretrain")
    ok = subprocess.run([str(exe), *tiny("trainer.max_steps=2"), f"hydra.run.dir={tmp_path}/run"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    bad = subprocess.run([str(exe), "method.secondary_mask_ratoi=0.5", f"hydra.run.dir={tmp_path}/bad"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "secondary_mask_ratoi" in bad.stderr


def test_summary_reports_what_was_learned(tmp_path, capsys):
    ov = [x for x in tiny("trainer.max_steps=2") if x != "trainer.summary=false"]
    run_pretrain(compose(ov), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {"heldout_loss_pretrained", "heldout_loss_random_init", "knn_top1_pretrained", "knn_top1_raw_pixels"} <= set(s)
    assert "kNN top-1" in capsys.readouterr().out


def test_wandb_offline_run_id_survives_resume(tmp_path):
    ov = [x for x in tiny("trainer.max_steps=2") if not x.startswith("logger.wandb.mode")] + ["logger.wandb.mode=offline"]
    run_pretrain(compose(ov + ["trainer.stop_after=1"]), tmp_path)
    first = ck.load(tmp_path / "checkpoints" / "last.pt")["wandb_id"]
    run_pretrain(compose(ov), tmp_path)
    assert first and ck.load(tmp_path / "checkpoints" / "last.pt")["wandb_id"] == first
    runs = [p.name for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run")]
    # wandb names the dir offline-run-<time>-<id>, with a "-<n>" suffix when the resume starts within the same
    # second: what matters is that every dir belongs to the one run id
    assert runs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", r) for r in runs), runs


def test_data_wait_is_logged_and_warned_about(tmp_path):
    from sslkit.engine import data_wait_warning

    run_pretrain(compose(tiny("trainer.max_steps=3")), tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data_wait"] == 0.0  # the first batch (the workers' start-up) is not counted
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in rows)
    assert data_wait_warning(0.1, 10, 2) is None and data_wait_warning(0.05, 10, 2) is None
    msg = data_wait_warning(0.234, 10, 2)
    assert "23% of the wall time of the last 10 steps" in msg and "data.num_workers (now 2)" in msg
