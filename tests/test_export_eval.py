"""Export -> plain timm load round trip, and kNN evaluation of a checkpoint from the CLI functions."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from sslkit import checkpoint as ck
from sslkit.cli import export_main
from sslkit.config import compose
from sslkit.evaluation import eval_knn
from sslkit.export import export
from sslkit.tasks import run_pretrain
from sslkit.errors import CheckpointError

FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "data.num_samples=64", "data.batch_size=16", "trainer.max_steps=2"]


@pytest.fixture(scope="module", params=["sslkit_pvt_test", "sslkit_swin_test"])
def trained(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    run_pretrain(compose(FAST + [f"model={request.param}"]), d)
    return request.param, d / "checkpoints" / "last.pt"


def test_export_loads_in_plain_timm(trained, tmp_path):
    name, ckpt = trained
    out = export(ckpt, tmp_path / "exp")
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["model_name"] == name and meta["create_kwargs"]["um_pretrain"] is False
    sd = load_file(str(out / "backbone.safetensors"))
    trained_sd = {k[len("backbone."):]: v for k, v in ck.load(ckpt)["model"].items() if k.startswith("backbone.")}
    assert sd.keys() == trained_sd.keys()  # nothing dropped, nothing added
    kw = {"patch_size": 2}
    for extra in ({}, {"num_classes": 10}):
        m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors")),
                              **kw, **extra)
        msd = m.state_dict()
        for k, v in sd.items():
            assert torch.equal(msd[k], v), k
        y = m(torch.randn(2, 3, 64, 64))
        assert y.shape == ((2, 10) if extra else (2, m.num_features))


def test_export_cli_default_out_dir(trained):
    name, ckpt = trained
    export_main([f"checkpoint={ckpt}"])
    assert (ckpt.parent.parent / "export" / "backbone.safetensors").exists()


def test_export_refuses_non_sslkit_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.ones(1)}, p)
    with pytest.raises(CheckpointError):
        export(p, tmp_path / "o")


def test_eval_knn_on_checkpoint(trained, tmp_path):
    _, ckpt = trained
    res = eval_knn(ckpt, [], k=5, out=tmp_path / "knn.json")
    assert 0.0 <= res["top1"] <= 100.0 and res["top5"] >= res["top1"]
    assert json.loads((tmp_path / "knn.json").read_text())["top1"] == res["top1"]


def test_a_finetuned_classifier_exports_its_backbone_without_the_head(tmp_path):
    """A fine-tuning checkpoint holds the classifier's head: export (and evaluation) read the backbone without it."""
    from sslkit.tasks import run_finetune

    cfg = compose(["model=sslkit_pvt_test", "method.num_classes=8", "method.view.size=64", *FAST,
                   "data.num_samples=80"], config_name="finetune")
    run_finetune(cfg, tmp_path / "ft")
    out = export(tmp_path / "ft" / "checkpoints" / "last.pt", tmp_path / "exp")
    m = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert m.num_classes == 0 and not any(k.startswith("head.") for k in load_file(str(out / "model.safetensors")))
    res = eval_knn(tmp_path / "ft" / "checkpoints" / "last.pt", [])
    assert 0.0 <= res["top1"] <= 100.0
