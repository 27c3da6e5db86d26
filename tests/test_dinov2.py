"""The DINOv2 method: gradient contract, EMA teacher, schedules, freeze, config errors, small-batch warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from sslkit.config import compose
from sslkit.errors import ConfigError
from sslkit.methods import build_method
from sslkit.methods.dinov2 import DINOv2
from sslkit.schedules import cosine

B = 4


def make(*overrides: str) -> DINOv2:
    torch.manual_seed(0)
    m = build_method(compose(["experiment=dinov2_demo", *overrides]))
    assert isinstance(m, DINOv2)
    return m


def derived(steps_per_epoch: int = 10, total: int = 100, micro: int = B, global_batch: int = 64) -> SimpleNamespace:
    return SimpleNamespace(steps_per_epoch=steps_per_epoch, total_steps=total, micro_batch=micro,
                           global_batch=global_batch, world_size=1)


def batch(m: DINOv2, b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = m.cfg.view
    out = {"global_crops": torch.randn(v.n_global * b, 3, v.size, v.size, generator=g),
           "local_crops": torch.randn(v.n_local * b, 3, v.local_size, v.local_size, generator=g),
           "index": torch.arange(b), "labels": torch.zeros(b, dtype=torch.long)}
    out.update(m.masking()(b, g))
    return out


def test_every_student_parameter_gets_a_gradient_and_no_teacher_parameter(caplog):
    m = make("model.drop_path_rate=0.0")
    m.begin(50, derived())  # past the first-epoch freeze of the last layer
    m.train()
    b = batch(m)
    assert b["masked"].any(), "the test needs some iBOT-masked patches"
    out = m(b)
    out["loss"].backward()
    missing = [n for n, p in m.student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert set(out) >= {"loss", "dino", "ibot", "koleo", "teacher_entropy"}
    assert all(torch.isfinite(v).all() for v in out.values())


def test_separate_ibot_head_gets_gradients():
    m = make("method.ibot_separate_head=true", "method.ibot_prototypes=32")
    m.begin(50, derived())
    m.train()
    m(batch(m))["loss"].backward()
    assert all(p.grad is not None for p in m.student["ibot_head"].parameters())
    assert m.student["ibot_head"].weight_v.shape[0] == 32


def test_last_layer_frozen_during_the_first_epoch():
    m = make()
    m.begin(0, derived(steps_per_epoch=10))
    assert m.last_layer_frozen_at(9) and not m.last_layer_frozen_at(10)
    m.train()
    m(batch(m))["loss"].backward()
    head = m.student["dino_head"]
    assert head.weight_v.grad is None and head.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None


def test_teacher_temperature_and_momentum_schedules():
    m = make("method.warmup_teacher_temp_epochs=3", "method.ema_momentum=0.992", "method.warmup_teacher_temp=0.04",
             "method.teacher_temp=0.07")
    m.begin(0, derived(steps_per_epoch=10, total=100))
    assert m.teacher_temp_at(0) == pytest.approx(0.04)
    assert m.teacher_temp_at(15) == pytest.approx(0.04 + 0.03 * 15 / 30)
    assert m.teacher_temp_at(30) == pytest.approx(0.07) and m.teacher_temp_at(99) == pytest.approx(0.07)
    assert m.ema_momentum_at(0) == pytest.approx(0.992) and m.ema_momentum_at(100) == pytest.approx(1.0)
    assert m.ema_momentum_at(50) == pytest.approx(0.996)


def test_after_step_is_the_ema_formula_and_advances_the_step():
    m = make("method.ema_momentum=0.992")
    m.begin(0, derived(total=100))
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1)
    t0 = {n: p.clone() for n, p in m.teacher.named_parameters()}
    logs = m.after_step(7)
    mom = cosine(6, 100, 0.992, 1.0)
    assert logs["ema_momentum"] == pytest.approx(mom)
    s = dict(m.student.named_parameters())
    for n, p in m.teacher.named_parameters():
        torch.testing.assert_close(p, mom * t0[n] + (1 - mom) * s[n])
    assert m._step == 7


def test_teacher_runs_in_eval_mode_and_features_are_teacher_cls():
    m = make("model.drop_path_rate=0.5")
    m.train()
    assert m.student.training and not m.teacher.training
    x = torch.randn(3, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (3, m.backbone.num_features)
    bb = m.teacher["backbone"]
    torch.testing.assert_close(f, bb.forward_features(x)[:, 0])


def test_softmax_centering_path_updates_the_center():
    m = make("method.centering=softmax")
    m.begin(0, derived())
    m.train()
    out = m(batch(m))
    assert torch.isfinite(out["loss"])
    assert m.dino_center.center.abs().sum() > 0


@pytest.mark.parametrize("override,match", [
    ("method.view.local_size=18", "local_size=18 is not a multiple of the patch size 4"),
    ("method.view.size=30", r"img_size=30.*not a multiple of patch_size 4"),
    ("method.prototypes=1", "prototypes"),
    ("method.view.n_global=1", "n_global=1"),
    ("method.centering=center", "centering"),
    ("model=sslkit_pvt_test", "forward_packed"),
])
def test_config_errors_at_build(override, match):
    with pytest.raises(ConfigError, match=match):
        make(*override.split())


def test_koleo_batch_too_small_and_small_batch_warning(caplog):
    m = make()
    with pytest.raises(ConfigError, match="at least 2 images per device"):
        m.begin(0, derived(micro=1))
    m.cfg.recipe_batch = 1024
    with caplog.at_level(logging.WARNING, logger="sslkit"):
        m.begin(0, derived(global_batch=64))
    assert "far below the DINOv2 recipe" in caplog.text


def test_state_dict_holds_teacher_student_and_centers():
    m = make("method.centering=softmax")
    keys = m.state_dict().keys()
    assert any(k.startswith("teacher.backbone.") for k in keys) and any(k.startswith("student.backbone.") for k in keys)
    assert "dino_center.center" in keys and "ibot_center.center" in keys
    assert m.backbone_prefix == "teacher.backbone."


def test_gradient_clipping_treats_backbone_and_heads_separately_as_the_reference():
    """optim.clip_grad clips each student part (backbone, DINO head) to the norm on its own (DINOv2's
    train.py: for v in student.values(): v.clip_grad_norm_); the logged grad_norm is the global norm."""
    from sslkit.distributed import Dist, LaunchEnv

    m = make()
    parts = list(m.student.values())
    for i, part in enumerate(parts):
        for p in part.parameters():
            p.grad = torch.full_like(p, float(i + 1))  # backbone grads 1, head grads 2
    norms = [torch.cat([p.grad.flatten() for p in part.parameters()]).norm() for part in parts]
    dd = Dist("single", LaunchEnv(0, 1, 0, "none", "", 0), torch.device("cpu"), owns_group=False)
    total = dd.clip_grad_norm(m, 3.0)
    assert total == pytest.approx(float(torch.stack(norms).norm()), rel=1e-6)
    for part in parts:  # each part on its own at 3.0 (a global clip would leave the backbone far below 3)
        assert float(torch.cat([p.grad.flatten() for p in part.parameters()]).norm()) == pytest.approx(3.0, rel=1e-4)  # torch: max / (norm + 1e-6)
