"""Fine-tuning a pretraining checkpoint through the same loop: weights arrive exactly, the wrong
architecture is refused, val accuracy is reported, resume works."""

import json

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.cli import compose, run_finetune, run_pretrain
from sslkit.errors import CheckpointError
from sslkit.methods import build_method

FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "data.num_workers=0", "data.num_samples=64",
        "data.batch_size=8", "trainer.log_every=1"]
TINY = ["model=sslkit_pvt_test", "++model.kwargs.patch_size=2", "method.view.size=64", "method.num_classes=8"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    run_pretrain(compose(FAST + ["trainer.max_steps=2", "trainer.summary=false"]), d)
    return d / "checkpoints" / "last.pt"


def ft(*extra):
    return compose(FAST + TINY + ["trainer.max_steps=3"] + list(extra), config_name="finetune")


def test_pretrained_weights_arrive_exactly_and_only_the_head_is_new(pretrained):
    m = build_method(ft(f"method.checkpoint={pretrained}"))
    pre = {k[len("backbone."):]: v for k, v in ck.load(pretrained)["model"].items() if k.startswith("backbone.")}
    got = m.backbone.state_dict()
    assert set(got) - set(pre) == {"head.weight", "head.bias"}
    for k, v in pre.items():
        assert torch.equal(got[k], v), k
    assert m.backbone.head.out_features == 8


def test_finetune_runs_reports_val_accuracy_and_resumes(pretrained, tmp_path):
    res = run_finetune(ft(f"method.checkpoint={pretrained}", "trainer.stop_after=2"), tmp_path)
    assert res["step"] == 2 and 0.0 <= res["top1"] <= 100.0 and res["val_images"] > 0
    res2 = run_finetune(ft(f"method.checkpoint={pretrained}"), tmp_path)  # resume=auto
    assert res2["step"] == 3
    assert json.loads((tmp_path / "finetune.json").read_text())["step"] == 3
    assert ck.load(tmp_path / "checkpoints" / "last.pt")["method"] == "classify"


def test_wrong_architecture_is_refused(pretrained):
    with pytest.raises(CheckpointError, match="sslkit_pvt_test encoder but model=sslkit_swin_test"):
        build_method(ft(f"method.checkpoint={pretrained}", "model=sslkit_swin_test"))


def test_from_scratch_and_layer_decay_groups(tmp_path):
    from sslkit.optim import build_optimizer

    cfg = ft()
    m = build_method(cfg)
    opt = build_optimizer(m, cfg.optim, 1e-3)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.85 ** (len(scales) - 1))
