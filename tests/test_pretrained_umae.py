"""The UM-MAE reference checkpoints (tiny ones made by scripts/parity/umae_fixtures.py from the reference code)
through the commands: fine-tuning (checkpoint=<file> model=<name>) and evaluation (model=<name>), with the
architecture read from the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sslkit.config import compose
from sslkit.evaluation import eval_knn
from sslkit.tasks import run_finetune

FIXTURES = Path(__file__).parent / "fixtures"
DATA = ["data.num_samples=80", "data.batch_size=8", "data.num_workers=0"]
FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.max_steps=2", *DATA]


@pytest.mark.parametrize("ckpt,model", [("umae_pvt_pretrain.pth", "sslkit_pvt_test"),
                                        ("umae_pvt_finetune.pth", "sslkit_pvt_test"),
                                        ("umae_swin_pretrain.pth", "sslkit_swin_test"),
                                        ("umae_swin_finetune.pth", "sslkit_swin_test")])
def test_finetune_from_a_reference_checkpoint(ckpt, model, tmp_path):
    cfg = compose([f"checkpoint={FIXTURES / ckpt}", f"model={model}", "method.num_classes=8", "method.view.size=32",
                   *FAST], config_name="finetune")
    res = run_finetune(cfg, tmp_path)
    assert res["step"] == 2 and 0.0 <= res["top1"] <= 100.0
    saved = json.loads((tmp_path / "finetune.json").read_text())
    assert saved["top1"] == res["top1"]


def test_eval_knn_on_a_reference_checkpoint_needs_the_model_and_the_data(tmp_path):
    path = FIXTURES / "umae_swin_pretrain.pth"
    res = eval_knn(path, ["data=synthetic", *DATA], model="sslkit_swin_test", img_size=32, out=tmp_path / "k.json")
    assert 0.0 <= res["top1"] <= 100.0
    from sslkit.errors import CheckpointError, ConfigError

    with pytest.raises(CheckpointError, match="model=<name>"):
        eval_knn(path, ["data=synthetic", *DATA])
    with pytest.raises(ConfigError, match="carries no data config"):
        eval_knn(path, model="sslkit_swin_test")
