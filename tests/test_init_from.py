"""Continued pretraining (``method.init_from``): a UM-MAE / SimMIM encoder, or DINOv2's student and teacher
backbones, start from any supported checkpoint (an sslkit run, an export, the reference layouts), then train
as usual; resume after that is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.errors import CheckpointError
from sslkit.methods import build_method
from sslkit.tasks import run_pretrain

FIXTURES = Path(__file__).parent / "fixtures"
FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "data.num_samples=16", "data.batch_size=4", "trainer.max_steps=4", "trainer.log_every=1"]
# the tiny reference UM-MAE PVT of tests/fixtures (scripts/parity/umae_fixtures.py)
REF_PVT = ["model=sslkit_pvt_test", "++model.kwargs.patch_size=1", "++model.kwargs.embed_dims=[4,8,12,16]",
           "++model.kwargs.num_heads=[1,1,2,2]", "++model.kwargs.mlp_ratios=[2,2,2,2]", "method.unit=4",
           "method.view.size=32"]


def _backbone(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("source", ["sslkit", "export"])
def test_umae_init_from_an_sslkit_run_or_its_export_then_resume_is_exact(source, tmp_path):
    from sslkit.export import export

    run_pretrain(compose(FAST), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.pt"
    src = ckpt if source == "sslkit" else export(ckpt, tmp_path / "exp")
    ov = FAST + [f"method.init_from={src}"]
    m = build_method(compose(ov))
    first = _backbone(ck.load(ckpt)["model"], "backbone.")
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, first[k]), k  # the encoder starts where the first run ended
    run_pretrain(compose(ov), tmp_path / "a")
    run_pretrain(compose(ov + ["trainer.stop_after=2"]), tmp_path / "b")
    run_pretrain(compose(ov), tmp_path / "b")  # resume: the checkpoint wins over init_from
    a, b = [ck.load(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in "ab"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_umae_init_from_the_reference_pretraining_checkpoint():
    from sslkit.pretrained import load_pretrained

    path = FIXTURES / "umae_pvt_pretrain.pth"
    m = build_method(compose(["method=umae_tiny", *REF_PVT, *FAST, f"method.init_from={path}"]))
    ref = load_pretrained(path, "sslkit_pvt_test", for_finetune=False,
                          kwargs={"patch_size": 1, "embed_dims": [4, 8, 12, 16]}).state_dict
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_dinov2_init_from_initializes_student_and_teacher_backbones_heads_fresh(tmp_path):
    ov = ["experiment=dinov2_demo", *FAST]
    run_pretrain(compose(ov), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.pt"
    trained = ck.load(ckpt)["model"]
    torch.manual_seed(0)
    fresh = build_method(compose(ov))
    torch.manual_seed(0)
    m = build_method(compose(ov + [f"method.init_from={ckpt}"]))
    teacher = _backbone(trained, "teacher.backbone.")  # what an sslkit DINOv2 checkpoint's backbone is
    for net in (m.student["backbone"], m.teacher["backbone"]):
        for k, v in net.state_dict().items():
            assert torch.equal(v, teacher[k]), k
    for k, v in m.student["dino_head"].state_dict().items():  # heads: a fresh init, as without init_from
        assert torch.equal(v, fresh.student["dino_head"].state_dict()[k]), k
    run_pretrain(compose(ov + [f"method.init_from={ckpt}", "trainer.max_steps=2"]), tmp_path / "cont")
    assert ck.load(tmp_path / "cont" / "checkpoints" / "last.pt")["step"] == 2


def test_a_mismatched_init_from_names_the_keys_and_the_fitting_kwargs():
    path = FIXTURES / "umae_pvt_pretrain.pth"
    with pytest.raises(CheckpointError, match=r"shape mismatches .*model.kwargs.patch_size=1"):
        build_method(compose(["method=umae_tiny", "model=sslkit_pvt_test", *FAST, f"method.init_from={path}",
                              "++model.kwargs.embed_dims=[4,8,12,16]", "++model.kwargs.num_heads=[1,1,2,2]",
                              "++model.kwargs.mlp_ratios=[2,2,2,2]"]))


def test_the_summary_baseline_stays_at_random_init(tmp_path):
    import json

    run_pretrain(compose(FAST), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.pt"
    ov = [x for x in FAST if x != "trainer.summary=false"] + [f"method.init_from={ckpt}", "trainer.max_steps=1",
                                                              "trainer.knn_train_samples=16", "trainer.knn_val_samples=16"]
    run_pretrain(compose(ov), tmp_path / "cont")
    plain = [x for x in ov if not x.startswith("method.init_from")]
    run_pretrain(compose(plain), tmp_path / "plain")
    a, b = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("cont", "plain")]
    assert a["knn_top1_random_init"] == b["knn_top1_random_init"]  # the same random init in both runs
    assert a["heldout_loss_random_init"] == b["heldout_loss_random_init"]


def test_dinov2_init_from_the_reference_hub_backbone(tmp_path):
    """Continued DINOv2 pretraining from a DINOv2 hub-layout backbone (the tiny reference file of tests/fixtures:
    patch 14, LayerScale, dim 8): the model kwargs that fit, crops multiples of 14; then it trains."""
    from sslkit.pretrained import load_pretrained

    path = FIXTURES / "dinov2_ckpt_hub.pth"
    ov = ["experiment=dinov2_demo", *FAST, "++model.kwargs.patch_size=14", "++model.kwargs.embed_dim=8",
          "++model.kwargs.num_heads=2", "++model.kwargs.init_values=1e-5", "method.view.size=28",
          "method.view.local_size=14", "method.mask_min_patches=1", f"method.init_from={path}", "trainer.max_steps=2"]
    m = build_method(compose(ov))
    ref = load_pretrained(path, "sslkit_vit_test", {"embed_dim": 8, "num_heads": 2, "img_size": 28}).state_dict
    for net in (m.student["backbone"], m.teacher["backbone"]):
        for k, v in net.state_dict().items():
            assert torch.equal(v, ref[k]), k
    run_pretrain(compose(ov), tmp_path / "cont")
    assert ck.load(tmp_path / "cont" / "checkpoints" / "last.pt")["step"] == 2
