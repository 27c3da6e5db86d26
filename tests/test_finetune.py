"""Fine-tuning a pretraining checkpoint through the same loop: weights arrive exactly, the wrong
architecture is refused, val accuracy is reported, resume works."""

import json

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.tasks import run_finetune, run_pretrain
from sslkit.errors import CheckpointError
from sslkit.methods import build_method
from tests.test_config import FINETUNE_EXPERIMENTS

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


REG = ["method.mixup.mixup_alpha=0.8", "method.mixup.cutmix_alpha=1.0", "method.model_ema=true",
       "method.model_ema_decay=0.9"]


def test_finetune_runs_reports_val_accuracy_and_resumes(pretrained, tmp_path):
    # the top-level checkpoint= alias; PVT stages output (B, H, W, C): custom DropBlock targets, layout auto
    extra = [f"checkpoint={pretrained}", "method.dropblock.preset=custom", "method.dropblock.targets=[stages.2,stages.3]",
             "method.dropblock.block_size=3", *REG]
    res = run_finetune(ft(*extra, "trainer.stop_after=2"), tmp_path)
    assert res["step"] == 2 and 0.0 <= res["top1"] <= 100.0 and res["val_images"] > 0 and "top1_ema" in res
    res2 = run_finetune(ft(*extra), tmp_path)  # resume=auto
    assert res2["step"] == 3 and 0.0 <= res2["top1_ema"] <= 100.0
    assert json.loads((tmp_path / "finetune.json").read_text())["step"] == 3
    state = ck.load(tmp_path / "checkpoints" / "last.pt")
    assert state["method"] == "classify" and state["config"]["method"]["checkpoint"] == str(pretrained)
    assert any(k.startswith("model_ema.") for k in state["model"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropblock_drop_prob"] for r in rows] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3])  # linear over 3 steps


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


# ----------------------------------------------------------------------------------------- regularizers
RESNET = ["model=sslkit_resnet_test", "method.view.size=32", "method.num_classes=8"]


def resnet_cfg(*extra):
    return compose(FAST + RESNET + list(extra), config_name="finetune")


class ScriptedRng:
    """Stands in for the numpy generator of mix_batch with chosen draws."""

    def __init__(self, randoms, beta=0.5, ints=()):
        self.randoms, self.b, self.ints = list(randoms), beta, list(ints)

    def random(self):
        return self.randoms.pop(0)

    def beta(self, a, b):
        return self.b

    def integers(self, n):
        return self.ints.pop(0)


def test_mixup_and_cutmix_by_hand():
    from types import SimpleNamespace

    from sslkit.methods.classify import mix_batch

    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    mixup = SimpleNamespace(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5)
    img, t, lam, kind = mix_batch(x, y, 4, 0.2, mixup, ScriptedRng([0.0], beta=0.7))
    assert kind == "mixup" and lam == 0.7
    assert torch.allclose(img[0], 0.7 * x[0] + 0.3 * x[1]) and torch.allclose(img[1], 0.7 * x[1] + 0.3 * x[0])
    # smoothing 0.2 over 4 classes: 0.85 on the label, 0.05 elsewhere; row 0 = 0.7 * t(0) + 0.3 * t(2)
    assert torch.allclose(t[0], torch.tensor([0.61, 0.05, 0.29, 0.05]))
    cutmix = SimpleNamespace(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    # lam 0.75 -> a 4 x 4 box (side 8 * sqrt(0.25)) centred at (2, 7), clipped to rows 0-3, cols 5-7
    img, t, lam, kind = mix_batch(x, y, 4, 0.0, cutmix, ScriptedRng([0.0], beta=0.75, ints=[2, 7]))
    assert kind == "cutmix" and lam == 1.0 - 12 / 64
    assert torch.equal(img[0, :, 0:4, 5:8], x[1, :, 0:4, 5:8]) and torch.equal(img[0, :, 4:], x[0, :, 4:])
    assert torch.equal(img[0, :, :, :5], x[0, :, :, :5])
    assert torch.allclose(t[0], torch.tensor([lam, 0.0, 1 - lam, 0.0]))
    half = SimpleNamespace(mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.5, switch_prob=0.5)
    img, t, lam, kind = mix_batch(x, y, 4, 0.2, half, ScriptedRng([0.9]))  # 0.9 >= prob: not mixed
    assert kind == "none" and torch.equal(img, x) and torch.allclose(t[1], torch.tensor([0.05, 0.05, 0.85, 0.05]))


@torch.no_grad()
def test_mixup_switches_the_loss_to_soft_targets_on_mixed_images():
    import numpy as np
    import torch.nn.functional as F

    from sslkit.methods.classify import mix_batch, soft_target_cross_entropy

    batch = {"images": torch.randn(8, 3, 32, 32), "labels": torch.arange(8)}
    plain = build_method(resnet_cfg()).train()
    plain.backbone.fc.weight.mul_(100.0)  # confident logits: mixed targets change the loss visibly
    sd = plain.state_dict()
    want_plain = F.cross_entropy(plain.backbone(batch["images"]), batch["labels"], label_smoothing=0.1)
    assert float(plain(batch)["loss"]) == pytest.approx(float(want_plain), rel=1e-5)
    never = build_method(resnet_cfg("method.mixup.mixup_alpha=0.8", "method.mixup.prob=0.0")).train()
    never.load_state_dict(sd)  # active but never mixing: soft targets = smoothed one-hot, same value as plain CE
    assert float(never(batch)["loss"]) == pytest.approx(float(want_plain), rel=1e-5)
    mixed = build_method(resnet_cfg("method.mixup.mixup_alpha=0.8", "method.mixup.cutmix_alpha=1.0")).train()
    mixed.load_state_dict(sd)
    rng = np.random.default_rng([mixed.mix_seed, 0, 0, 0])  # (seed, step, micro-batch, rank)
    img, t, lam, _ = mix_batch(batch["images"], batch["labels"], 8, 0.1, mixed.mixup_cfg, rng)
    got = float(mixed(batch)["loss"])
    assert got == pytest.approx(float(soft_target_cross_entropy(mixed.backbone(img), t)), rel=1e-5)
    assert lam < 1.0 and abs(got - float(want_plain)) > 0.1


def test_ema_of_weights_by_hand_and_frozen():
    from sslkit.optim import build_optimizer

    cfg = resnet_cfg("method.model_ema=true", "method.model_ema_decay=0.9")
    m = build_method(cfg)
    w, e = m.backbone.fc.weight, m.model_ema.fc.weight
    with torch.no_grad():
        e.fill_(1.0)
        w.fill_(3.0)
        m.backbone.bn1.running_mean.fill_(5.0)
    m.after_step(1)
    assert torch.allclose(e, torch.full_like(e, 0.9 * 1.0 + 0.1 * 3.0))  # 1.2
    assert torch.equal(m.model_ema.bn1.running_mean, m.backbone.bn1.running_mean)  # buffers copied
    assert not any(p.requires_grad for p in m.model_ema.parameters())
    opt_params = {id(p) for g in build_optimizer(m, cfg.optim, 1e-3).param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in m.model_ema.parameters()} and id(w) in opt_params


def test_dropblock_rate_is_set_by_the_hooks_as_a_pure_function_of_the_step():
    from sslkit.config import Derived

    m = build_method(resnet_cfg("method.dropblock.preset=resnet_paper", "method.dropblock.drop_prob=0.2"))
    factors = [b.rate_factor for b in m.dropblocks]
    assert len(factors) == 16 and factors.count(0.25) == 8
    m.begin(3, Derived(1, 8, 8, 1e-3, steps_per_epoch=5, total_steps=10, warmup_steps=0, dataset_size=40))
    assert [b.drop_prob for b in m.dropblocks] == pytest.approx([0.2 * 3 / 10 * f for f in factors])  # resume at 3
    assert m.after_step(4) == pytest.approx({"dropblock_drop_prob": 0.2 * 3 / 10})  # the rate step 3 used
    assert [b.drop_prob for b in m.dropblocks] == pytest.approx([0.2 * 4 / 10 * f for f in factors])


def test_resnet_finetune_with_dropblock_mixup_ema_resumes_exactly(tmp_path):
    extra = ["method.dropblock.preset=resnet_paper", "method.dropblock.drop_prob=0.3", *REG, "trainer.max_steps=3"]
    run_finetune(resnet_cfg(*extra, "trainer.stop_after=1"), tmp_path / "a")
    res = run_finetune(resnet_cfg(*extra), tmp_path / "a")  # resumed at step 1
    ref = run_finetune(resnet_cfg(*extra), tmp_path / "b")  # uninterrupted
    assert res == ref and res["step"] == 3 and "top1_ema" in res
    a, b = (ck.load(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("a", "b"))
    assert a.keys() == b.keys() and any(k.startswith("model_ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["dropblock_drop_prob"] for r in rows] == pytest.approx([0.0, 0.1, 0.2])  # 0.3 * (s - 1) / 3


@pytest.mark.parametrize("experiment", [e for e in FINETUNE_EXPERIMENTS if "resnet" in e])
def test_every_resnet_finetune_experiment_runs_on_the_tiny_resnet(experiment, tmp_path):
    """(finetune_cifar10_pvt needs an image tar: tests/test_quality_bench.py runs it on a tiny one.)"""
    cfg = compose([f"experiment={experiment}", *FAST, *RESNET, "trainer.max_steps=2", "data.batch_size=4"],
                  config_name="finetune")
    assert cfg.method.dropblock.preset != "none"
    assert run_finetune(cfg, tmp_path)["step"] == 2
