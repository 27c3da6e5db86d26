"""PVT (UM-MAE PVT-S) backbone: interface shapes, non-overlapping stem, position handling, SDPA
exactness, gradients, timm registration / layer decay / pretrained loading, UM-pretrain -> fine-tune
conversion. Tiny variant, small images."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from sslkit.errors import CheckpointError, ConfigError
from sslkit.models.pos_embed import grid_coords
from sslkit.models.pvt import (
    PVT,
    Block,
    PatchMerge,
    SRAttention,
    backbone_keys,
    convert_um_pretrain_to_finetune,
)

torch.set_num_threads(2)
TEST_DEPTHS = (1, 1, 1, 1)


# ------------------------------------------------------------------------------------- helpers
def make(**kw) -> PVT:
    torch.manual_seed(0)
    return timm.create_model("sslkit_pvt_test", **kw).eval()


def gather_units(x: torch.Tensor, keep_offset: torch.Tensor, u: int) -> torch.Tensor:
    """NHWC (B, H, W, C): keep unit ``keep_offset`` (0 tl, 1 tr, 2 bl, 3 br) of every 2x2 block of
    u x u units (blocks in raster order) and pack them into (B, H/2, W/2, C)."""
    B, H, W, C = x.shape
    bh, bw = H // (2 * u), W // (2 * u)
    x = x.reshape(B, bh, 2, u, bw, 2, u, C).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, bh, bw, 4, u, u, C)
    idx = keep_offset.view(B, bh, bw, 1, 1, 1, 1).expand(B, bh, bw, 1, u, u, C)
    x = x.gather(3, idx).squeeze(3)  # (B, bh, bw, u, u, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, bh * u, bw * u, C)


def um_pos(keep_offset: torch.Tensor, grid: tuple[int, int], u: int) -> torch.Tensor:
    """Original (row, col) stem-token coordinates of the tokens packed by ``gather_units``."""
    full = grid_coords(grid[0] * 2 * u, grid[1] * 2 * u)[None].expand(keep_offset.shape[0], -1, -1, -1)
    return gather_units(full, keep_offset, u)


def permute_blocks(x: torch.Tensor, perm: torch.Tensor, b: int) -> torch.Tensor:
    """NHWC (B, H, W, C): move b x b block ``perm[k]`` (raster order) to position k."""
    B, H, W, C = x.shape
    nh, nw = H // b, W // b
    x = x.reshape(B, nh, b, nw, b, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nh * nw, b, b, C)[:, perm]
    return x.reshape(B, nh, nw, b, b, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


# --------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("um_pretrain", [False, True])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_shapes(um_pretrain: bool, patch_size: int) -> None:
    m = make(um_pretrain=um_pretrain, patch_size=patch_size, num_classes=5)
    assert m.embed_dims == (16, 32, 48, 64) and m.num_features == 64
    assert m.stem_stride == patch_size and m.reduction == 8 * patch_size
    assert m.sr_ratios == ((4, 2, 1, 1) if um_pretrain else (8, 4, 2, 1))
    img = torch.randn(2, 3, 64, 64)
    t = m.stem(img)
    s = 64 // patch_size
    assert t.shape == (2, s, s, 16)
    assert m.forward_tokens(t, grid_coords(s, s)[None].expand(2, -1, -1, -1)).shape == (2, s // 8, s // 8, 64)
    f = m.forward_features(img)
    assert f.shape == (2, s // 8, s // 8, 64)
    assert m.forward_head(f, pre_logits=True).shape == (2, 64)
    assert m(img).shape == (2, 5)
    # non-square, non-nominal size
    assert m.forward_features(torch.randn(1, 3, 8 * patch_size * 2, 8 * patch_size * 3)).shape == (1, 2, 3, 64)


def test_bad_sizes_raise() -> None:
    m = make()
    with pytest.raises(ConfigError, match="stem stride"):
        m.stem(torch.randn(1, 3, 62, 64))
    with pytest.raises(ConfigError, match="not divisible by 8"):
        m.forward_features(torch.randn(1, 3, 60, 64))  # 15x16 stem tokens


# ------------------------------------------------------------------------------ stem / positions
def test_stem_is_non_overlapping() -> None:
    """stem(gather(pixels)) == gather(stem(pixels)) for units of 4x4 stem tokens."""
    m = make(patch_size=4)
    img = torch.randn(2, 3, 64, 64)
    keep = torch.randint(0, 4, (2, 4))  # 2x2 blocks of 2x2 units of 16 px
    full = m.stem(img)  # (2, 16, 16, C)
    packed_px = gather_units(img.permute(0, 2, 3, 1), keep, 16).permute(0, 3, 1, 2)  # (2, 3, 32, 32)
    torch.testing.assert_close(m.stem(packed_px), gather_units(full, keep, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("um_pretrain", [False, True])
def test_pos_none_is_regular_grid(um_pretrain: bool) -> None:
    m = make(um_pretrain=um_pretrain)
    t = m.stem(torch.randn(2, 3, 64, 64))
    pos = grid_coords(16, 16)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(m.forward_tokens(t), m.forward_tokens(t, pos), rtol=0, atol=0)


def test_pos_is_used() -> None:
    m = make(um_pretrain=True, patch_size=2)
    img = torch.randn(2, 3, 64, 64)
    t = m.stem(img[:, :, :32, :32])  # (2, 16, 16, C) compacted-size input
    keep_a, keep_b = torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 3)
    out_a = m.forward_tokens(t, um_pos(keep_a, (2, 2), 8))
    out_b = m.forward_tokens(t, um_pos(keep_b, (2, 2), 8))
    assert (out_a - out_b).abs().max() > 1e-3
    out_shift = m.forward_tokens(t, um_pos(keep_a, (2, 2), 8) + torch.tensor([0.0, 1.0]))
    assert (out_a - out_shift).abs().max() > 1e-3


@pytest.mark.parametrize("um_pretrain", [False, True])
def test_block_permutation_equivariance(um_pretrain: bool) -> None:
    """Moving aligned 8x8 blocks of stem tokens *together with their positions* moves the outputs
    (one final token per block) the same way: every spatial op (SR pooling windows, 2x2 merges) stays
    inside such a block and attention is permutation-equivariant. So positions enter only via ``pos``,
    which is exactly what UM compaction relies on."""
    m = make(um_pretrain=um_pretrain, patch_size=2)
    t = m.stem(torch.randn(2, 3, 64, 64))  # (2, 32, 32, C): 4x4 blocks of 8x8 tokens
    pos = grid_coords(32, 32)[None].expand(2, -1, -1, -1)
    perm = torch.randperm(16)
    out = m.forward_tokens(t, pos)  # (2, 4, 4, C)
    out_p = m.forward_tokens(permute_blocks(t, perm, 8), permute_blocks(pos, perm, 8))
    torch.testing.assert_close(out_p, permute_blocks(out, perm, 1), rtol=1e-5, atol=1e-5)
    # ... whereas permuting tokens but keeping the grid positions changes the result
    out_np = m.forward_tokens(permute_blocks(t, perm, 8), pos)
    assert (out_np - permute_blocks(out, perm, 1)).abs().max() > 1e-3


# --------------------------------------------------------------------------------- attention
def reference_attention(attn: SRAttention, x: torch.Tensor) -> torch.Tensor:
    """Straightforward SR attention on (B, H, W, C): pool each (clamped, ceil-mode) window by an
    explicit mean over the tokens it covers, 1x1 conv, LN, softmax(q k^T * scale) v, proj."""
    B, H, W, C = x.shape
    r = min(attn.sr_ratio, H, W)
    rows = []
    for i in range(0, H, r):
        rows.append(torch.stack([x[:, i : i + r, j : j + r].mean(dim=(1, 2)) for j in range(0, W, r)], 1))
    pooled = torch.stack(rows, 1).reshape(B, -1, C)  # (B, M, C)
    pooled = F.conv2d(pooled.transpose(1, 2)[..., None], attn.sr.weight, attn.sr.bias)[..., 0].transpose(1, 2)
    pooled = attn.norm(pooled)
    nh, hd = attn.num_heads, attn.head_dim
    q = attn.q(x.reshape(B, H * W, C)).reshape(B, H * W, nh, hd).permute(0, 2, 1, 3)
    k, v = attn.kv(pooled).reshape(B, -1, 2, nh, hd).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1)
    return attn.proj((a @ v).permute(0, 2, 1, 3).reshape(B, H, W, C))


@pytest.mark.parametrize(
    "hw,sr",
    [((8, 12), 2), ((8, 8), 8), ((8, 8), 1), ((5, 7), 2), ((3, 3), 8), ((2, 6), 4)],
    ids=["divisible", "sr8", "sr1", "ceil-window", "clamped", "clamped-ceil"],
)
def test_block_sdpa_matches_reference(hw: tuple[int, int], sr: int) -> None:
    torch.manual_seed(0)
    blk = Block(32, num_heads=2, sr_ratio=sr, mlp_ratio=2, drop_path=0.0).eval()
    for p in blk.parameters():  # non-trivial norms / biases
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, *hw, 32)
    with torch.no_grad():
        y = x + reference_attention(blk.attn, blk.norm1(x))
        y = y + blk.mlp(blk.norm2(y))
        torch.testing.assert_close(blk(x), y, rtol=1e-5, atol=1e-5)


def test_divisible_pooling_equals_official_avg_pool() -> None:
    """For divisible maps the SR path equals the reference code's NCHW avg_pool2d(x, sr) + conv."""
    torch.manual_seed(0)
    attn = SRAttention(16, 1, 4).eval()
    x = torch.randn(2, 8, 12, 16)
    kv_official = F.conv2d(F.avg_pool2d(x.permute(0, 3, 1, 2), 4), attn.sr.weight, attn.sr.bias)
    kv_official = attn.norm(kv_official.flatten(2).transpose(1, 2))  # (B, M, C)
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), 4, ceil_mode=True).permute(0, 2, 3, 1)
    kv_ours = attn.norm(F.linear(pooled, attn.sr.weight.flatten(1), attn.sr.bias)).reshape(2, -1, 16)
    torch.testing.assert_close(kv_ours, kv_official, rtol=1e-6, atol=1e-6)


def test_patch_merge_equals_strided_conv() -> None:
    torch.manual_seed(0)
    pm = PatchMerge(16, 32)
    x = torch.randn(2, 6, 10, 16)
    ref = pm.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(pm(x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("um_pretrain", [False, True])
def test_every_parameter_gets_gradient(um_pretrain: bool) -> None:
    """No exceptions: every parameter (incl. the stage-4 SR conv/norm at ratio 1) is used."""
    m = make(um_pretrain=um_pretrain, num_classes=3, drop_path_rate=0.1).train()
    m(torch.randn(2, 3, 64, 64)).square().sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# (per-block drop-path rates of the linear schedule: tests/models/test_contract.py)
def test_grad_checkpointing_is_exact() -> None:
    m = make(num_classes=3).train()
    img = torch.randn(2, 3, 64, 64)
    m(img).sum().backward()
    g0 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(img).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g0[n], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- timm
def test_timm_registration() -> None:
    with torch.device("meta"):  # architecture only, skip the (slow) init of 24M parameters
        small = timm.create_model("sslkit_pvt_small", um_pretrain=True)
        assert timm.create_model("sslkit_pvt_small").sr_ratios == (8, 4, 2, 1)
    assert small.embed_dims == (64, 128, 320, 512) and small.reduction == 32
    assert [len(s.blocks) for s in small.stages] == list(small.depths) == [3, 4, 6, 3]
    assert [s.blocks[0].attn.num_heads for s in small.stages] == [1, 2, 5, 8]
    assert [s.blocks[0].mlp.fc1.out_features // d for s, d in zip(small.stages, small.embed_dims)] == [8, 8, 4, 4]
    assert small.sr_ratios == (4, 2, 1, 1)
    assert small.pretrained_cfg["num_classes"] == 0 and small.num_classes == 0
    assert set(small.state_dict()) == set(backbone_keys((3, 4, 6, 3)))
    t = make(patch_size=2, in_chans=1, num_classes=4, img_size=64)
    assert t.stem_stride == 2 and t.patch_embed.proj.in_channels == 1 and t.get_classifier().out_features == 4
    t.reset_classifier(0)
    assert isinstance(t.get_classifier(), torch.nn.Identity) and t(torch.randn(1, 1, 32, 32)).shape == (1, 64)


def test_layer_decay_groups() -> None:
    m = make(num_classes=10)
    assert m.no_weight_decay() == set()
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    P = dict(m.named_parameters())
    assert len(scale) == len(P)
    s = lambda n: scale[id(P[n])]  # noqa: E731
    # stem, then one layer per block (merge joins its stage's first block, final norm the last), head
    assert s("patch_embed.proj.weight") == pytest.approx(0.75**5)
    for i in range(4):
        assert s(f"stages.{i}.blocks.0.attn.q.weight") == pytest.approx(0.75 ** (4 - i))
    assert s("stages.2.downsample.proj.weight") == s("stages.2.blocks.0.mlp.fc1.weight")
    assert s("norm.weight") == s("stages.3.blocks.0.norm1.weight")
    assert s("head.weight") == 1.0
    assert wd[id(P["stages.0.blocks.0.attn.q.weight"])] == 0.05 and wd[id(P["norm.bias"])] == 0.0
    coarse = timm.models.group_parameters(m, m.group_matcher(coarse=True))
    assert len(coarse) == 6  # stem, 4 stages, norm + head


# --------------------------------------------------------------------------- export / loading
def test_backbone_only_export_loads_with_and_without_num_classes(tmp_path) -> None:
    """Default cfg num_classes=0 + classifier='head': a head-less file loads strictly when num_classes
    is omitted (model built without head), and with num_classes=10 timm drops head.* and loads the rest
    non-strictly. (With a cfg num_classes=1000 the omitted case would build a 1000-class head and the
    strict load would fail -- checked below.)"""
    src = make(num_classes=7)
    for p in src.parameters():  # make loaded-vs-random unmistakable
        p.data.normal_()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "backbone.safetensors"
    save_file(sd, str(path))

    for kw in (dict(num_classes=10), dict()):
        m = timm.create_model("sslkit_pvt_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
        got = m.state_dict()
        for k, v in sd.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
        assert set(got) - set(sd) == ({"head.weight", "head.bias"} if kw else set())
        if kw:
            assert m.head.weight.shape == (10, 64) and m.head.weight.abs().max() < 1e-3  # fresh small init

    with pytest.raises(RuntimeError, match="head.weight"):
        timm.create_model(
            "sslkit_pvt_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=1000)
        )

    # first_conv='patch_embed.proj' lets timm adapt the stem to other channel counts
    m1 = timm.create_model("sslkit_pvt_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1)
    torch.testing.assert_close(m1.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_convert_um_pretrain_round_trip() -> None:
    um = make(um_pretrain=True)
    for p in um.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    sd = um.state_dict()
    conv = convert_um_pretrain_to_finetune(sd, depths=TEST_DEPTHS)
    assert list(conv) == backbone_keys(TEST_DEPTHS)
    assert convert_um_pretrain_to_finetune(sd).keys() == conv.keys()  # depths inferred

    ft = make(um_pretrain=False)
    ft.load_state_dict(conv, strict=True)
    direct = make(um_pretrain=False)
    direct.load_state_dict(sd, strict=True)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ft.forward_features(img)
        torch.testing.assert_close(out, direct.forward_features(img), rtol=0, atol=0)
        assert (out - um.forward_features(img)).abs().max() > 1e-4  # the SR ratios do differ


def test_convert_rejects_what_it_does_not_understand() -> None:
    sd = make(um_pretrain=True).state_dict()
    with pytest.raises(CheckpointError, match=r"decoder\.pred\.weight"):
        convert_um_pretrain_to_finetune({**sd, "decoder.pred.weight": torch.zeros(1)}, depths=TEST_DEPTHS)
    with pytest.raises(CheckpointError, match=r"head\.weight"):
        convert_um_pretrain_to_finetune({**sd, "head.weight": torch.zeros(3, 64)}, depths=TEST_DEPTHS)
    missing = dict(sd)
    del missing["stages.1.blocks.0.attn.kv.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \['stages\.1\.blocks\.0\.attn\.kv\.bias'\]"):
        convert_um_pretrain_to_finetune(missing, depths=TEST_DEPTHS)
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_um_pretrain_to_finetune(sd, depths=(1, 2, 1, 1))
    with pytest.raises(CheckpointError, match="unknown keys"):
        convert_um_pretrain_to_finetune({"encoder." + k: v for k, v in sd.items()})
    bad_sr = {**sd, "stages.0.blocks.0.attn.sr.weight": torch.zeros(16, 16, 8, 8)}
    with pytest.raises(CheckpointError, match=r"stages\.0\.blocks\.0\.attn\.sr\.weight.*1x1"):
        convert_um_pretrain_to_finetune(bad_sr, depths=TEST_DEPTHS)
