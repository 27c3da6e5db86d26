"""DropBlock placement presets (paper / timm / custom) on tiny models, layouts, schedule functions."""

import copy

import pytest
import timm
import torch
from torch import nn

import sslkit.models  # noqa: F401  (registers sslkit_resnet_test, sslkit_pvt_test, sslkit_vit_test)
from sslkit.errors import ConfigError
from sslkit.layers import DropBlock2d
from sslkit.layers.dropblock_placement import (ScheduledDropBlock2d, apply_dropblock, dropblock_schedule,
                                               set_drop_prob)


def resnet(**kwargs) -> nn.Module:
    return timm.create_model("sslkit_resnet_test", num_classes=0, **kwargs)


def zero_probe(model: nn.Module, name: str) -> list[bool]:
    """Registers (after the DropBlock hook) a probe that records whether ``name``'s output is all zero."""
    seen: list[bool] = []
    model.get_submodule(name).register_forward_hook(
        lambda m, i, o: seen.append(bool((o[0] if isinstance(o, tuple) else o).eq(0).all())))
    return seen


def test_paper_preset_places_dropblock_after_every_conv_and_on_both_skip_kinds():
    m = resnet()
    keys = list(m.state_dict())
    mods = apply_dropblock(m, {"preset": "resnet_paper", "drop_prob": 0.1})
    # groups 3 and 4 have 2 blocks each (projection shortcut, then identity): 3 convs + 1 skip per block
    expected = [f"layer{g}.{b}.{s}" for g in (3, 4) for b in (0, 1)
                for s in ("act1", "aa", "bn3", "downsample" if b == 0 else "shortcut")]
    assert [x.site for x in mods] == expected
    assert all(x.block_size == 7 and x.mode == "paper" for x in mods)
    assert [x.rate_factor for x in mods] == [0.25] * 8 + [1.0] * 8  # group 3: a quarter of the rate
    assert [x.drop_prob for x in mods] == pytest.approx([0.025] * 8 + [0.1] * 8)
    assert list(m.state_dict()) == keys  # pretrained checkpoints still load
    m.load_state_dict(resnet().state_dict(), strict=True)
    assert m.layer3[1].downsample is mods[7] and m.layer4[1].downsample is mods[15]  # identity shortcut slot
    assert all(any(c is x for c in m.modules()) for x in mods)  # children: .train()/.eval() reach them
    m.eval()
    assert not any(x.training for x in mods)


@pytest.mark.parametrize("site", ["layer3.0.act1", "layer3.0.aa", "layer3.1.bn3", "layer4.0.downsample"])
def test_each_hooked_site_really_drops_its_output(site):
    m = resnet(zero_init_last=False).train()  # (timm zero-inits bn3's scale: its output would be 0 anyway)
    mods = apply_dropblock(m, {"preset": "resnet_paper", "drop_prob": 0.1, "block_size": 64})
    set_drop_prob(mods, 0.0)
    seen = zero_probe(m, site)
    m(torch.randn(2, 3, 32, 32))
    next(x for x in mods if x.site == site).drop_prob = 1.0  # block >= the map: the whole map goes
    m(torch.randn(2, 3, 32, 32))
    assert seen == [False, True]


def test_timm_preset_uses_timm_slots_block_sizes_and_gamma_scales():
    m = resnet()
    keys = list(m.state_dict())
    mods = apply_dropblock(m, {"preset": "resnet_timm", "drop_prob": 0.2})
    assert [x.site for x in mods] == [f"layer{g}.{b}.drop_block" for g in (3, 4) for b in (0, 1)]
    assert [(x.block_size, x.rate_factor) for x in mods] == [(5, 0.25)] * 2 + [(3, 1.0)] * 2
    assert m.layer3[0].drop_block is mods[0] and m.layer4[1].drop_block is mods[3]
    assert isinstance(m.layer2[0].drop_block, nn.Identity)
    assert list(m.state_dict()) == keys
    with pytest.raises(ConfigError, match="drop_block_rate"):  # timm's own DropBlock already there
        apply_dropblock(timm.create_model("sslkit_resnet_test", drop_block_rate=0.1), {"preset": "resnet_timm"})


@pytest.mark.parametrize("preset", ["resnet_paper", "resnet_timm"])
def test_identity_in_eval_and_at_rate_zero_different_in_train(preset):
    ref = resnet(zero_init_last=False)  # (zero-init bn3 would make the residual branch 0 at init)
    m = copy.deepcopy(ref)
    mods = apply_dropblock(m, {"preset": preset, "drop_prob": 0.5})
    x = torch.randn(4, 3, 32, 32)
    ref.eval(), m.eval()
    assert torch.equal(m(x), ref(x))
    ref.train(), m.train()
    set_drop_prob(mods, 0.0)
    assert torch.equal(m(x), ref(x))
    set_drop_prob(mods, 0.5)
    assert not torch.allclose(m(x), ref(x))
    assert [x.drop_prob for x in mods] == pytest.approx([0.5 * x.rate_factor for x in mods])


def test_custom_nhwc_stages_of_sslkit_pvt():
    m = timm.create_model("sslkit_pvt_test", num_classes=0, img_size=64, patch_size=2)  # stages output (B, H, W, C)
    keys = list(m.state_dict())
    mods = apply_dropblock(m, {"preset": "custom", "targets": ["stages.[23]"], "drop_prob": 0.3, "block_size": 3})
    assert [x.site for x in mods] == ["stages.2", "stages.3"] and list(m.state_dict()) == keys
    seen = zero_probe(m, "stages.2")
    m.train()
    set_drop_prob(mods, 0.0)
    ref = m(x := torch.randn(2, 3, 64, 64))
    assert torch.equal(m(x), ref)
    set_drop_prob(mods, 0.3)
    assert not torch.allclose(m(x), ref)
    mods[0].drop_prob, mods[0].block_size = 1.0, 64  # the whole (8 x 8) map of every channel
    m(x)
    assert seen[-1] and not any(seen[:-1])


@pytest.mark.parametrize("layout,shape", [("nhwc", (2, 6, 6, 5)), ("tokens", (2, 36, 5)), ("nchw", (2, 5, 6, 6))])
def test_layouts_apply_the_nchw_dropblock_to_the_right_axes(layout, shape):
    x = torch.randn(*shape)
    db = ScheduledDropBlock2d(0.3, 3, layout="auto").train()
    ref = DropBlock2d(0.3, 3).train()
    to_nchw = {"nhwc": lambda t: t.permute(0, 3, 1, 2), "nchw": lambda t: t,
               "tokens": lambda t: t.transpose(1, 2).reshape(2, 5, 6, 6)}[layout]
    torch.manual_seed(1)
    got = db(x)
    torch.manual_seed(1)
    want = ref(to_nchw(x))
    assert torch.equal(to_nchw(got), want) and got.shape == x.shape
    assert (want == 0).any()  # something was dropped


def test_custom_tokens_on_a_timm_pyramid_vit_and_non_square_tokens_fail():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    pvt = PyramidVisionTransformerV2(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1),
                                     mlp_ratios=(2, 2, 2, 2), num_classes=0)  # blocks: (B, N, C) tokens
    mods = apply_dropblock(pvt, {"preset": "custom", "targets": ["stages.[12].blocks.0"], "drop_prob": 1.0,
                                 "block_size": 64})  # rate 1 and block >= map: all of it dropped
    assert len(mods) == 2
    seen = zero_probe(pvt, "stages.1.blocks.0")
    pvt.train()(torch.randn(2, 3, 64, 64))
    assert seen == [True]

    vit = timm.create_model("sslkit_vit_test", num_classes=0, img_size=32)  # blocks: class token + 8x8 patches
    apply_dropblock(vit, {"preset": "custom", "targets": ["blocks.0"], "drop_prob": 0.1})
    with pytest.raises(ConfigError, match=r"65 tokens .* not a square map"):
        vit.train()(torch.randn(2, 3, 32, 32))
    vit.eval()(torch.randn(2, 3, 32, 32))  # eval: identity, no complaint


def test_ambiguous_auto_layout_asks_for_the_layout():
    with pytest.raises(ConfigError, match="layout=nchw"):
        ScheduledDropBlock2d(0.1, 3, layout="auto", site="s").train()(torch.randn(2, 8, 8, 8))
    y = ScheduledDropBlock2d(0.0, 3, layout="nhwc").train()(x := torch.randn(2, 8, 8, 8))
    assert torch.equal(y, x)


def test_config_errors_name_the_options():
    with pytest.raises(ConfigError, match=r"resnet_pape.*\['none', 'resnet_paper', 'resnet_timm', 'custom'\]"):
        apply_dropblock(resnet(), {"preset": "resnet_pape"})
    with pytest.raises(ConfigError, match="needs method.dropblock.targets"):
        apply_dropblock(resnet(), {"preset": "custom"})
    with pytest.raises(ConfigError, match=r"\['stage.9'\] match no module"):
        apply_dropblock(resnet(), {"preset": "custom", "targets": ["stage.9"]})
    with pytest.raises(ConfigError, match="needs a timm ResNet"):
        apply_dropblock(timm.create_model("sslkit_pvt_test", num_classes=0), {"preset": "resnet_paper"})
    with pytest.raises(ConfigError, match="schedule"):
        apply_dropblock(resnet(), {"preset": "resnet_paper", "schedule": "cosine"})
    assert apply_dropblock(m := resnet(), {"preset": "none"}) == [] and not hasattr(m, "dropblock")


def test_deepcopy_repoints_hooks_to_the_copied_modules():
    m = resnet()
    apply_dropblock(m, {"preset": "resnet_paper", "drop_prob": 0.1})
    c = copy.deepcopy(m)
    hook = next(iter(c.layer3[0].act1._forward_hooks.values()))
    assert hook.block is c.dropblock[0] and hook.block is not m.dropblock[0]


def test_schedules_are_pure_functions_of_the_step():
    lin = {"drop_prob": 0.1, "schedule": "linear"}
    assert [dropblock_schedule(lin, s, 10, 5) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    warm = {"drop_prob": 0.2, "schedule": "warmup", "warmup_epochs": 2}  # 2 epochs x 5 steps = 10 steps
    assert [dropblock_schedule(warm, s, 100, 5) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    const = {"drop_prob": 0.1, "schedule": "constant"}
    assert [dropblock_schedule(const, s, 10, 5) for s in (0, 7)] == [0.1, 0.1]
