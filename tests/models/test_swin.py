"""Swin (UM-MAE continuous position bias) backbone: interface, exactness of the fast bias, timm loading,
UM-pretrain -> fine-tune conversion. Tiny variant, small images."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sslkit.errors import CheckpointError
from sslkit.models.swin import (
    SwinBlock,
    SwinUM,
    _grid_rel_pos_index,
    _window_mask,
    backbone_keys,
    build_rel_pos_index,
    convert_um_pretrain_to_finetune,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and robust to a busy machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- helpers
def um_pos(keep_offset: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """UM-like original positions (local test helper): every 2x2 block of units keeps the unit at
    ``keep_offset`` (0 tl, 1 tr, 2 bl, 3 br; blocks in raster order); ``grid`` = blocks (nb_h, nb_w);
    r = stem tokens per unit side. Returns (B, nb_h*r, nb_w*r, 2) float (row, col)."""
    B = keep_offset.shape[0]
    nbh, nbw = grid
    off = keep_offset.view(B, nbh, nbw)
    i = torch.arange(nbh * r)
    j = torch.arange(nbw * r)
    bi, bj = i // r, j // r
    di = (off // 2)[:, bi][:, :, bj]  # (B, h, w)
    dj = (off % 2)[:, bi][:, :, bj]
    row = r * (2 * bi[None, :, None] + di) + (i % r)[None, :, None]
    col = r * (2 * bj[None, None, :] + dj) + (j % r)[None, None, :]
    return torch.stack([row, col], dim=-1).float()


def grid_pos(B: int, h: int, w: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([r, c], -1)[None].expand(B, h, w, 2).clone()


def make(**kw) -> SwinUM:
    torch.manual_seed(0)
    return timm.create_model("sslkit_swin_test", **kw).eval()


def direct_bias(mlp: torch.nn.Module, pos: torch.Tensor, ws: int, shift: int) -> torch.Tensor:
    """Official-style all-pairs evaluation (1x1 convs on (B*nW, 2, N, N)) -> (B, nW*heads, N, N)."""
    B, H, W, _ = pos.shape
    if shift:
        pos = torch.roll(pos, (-shift, -shift), (1, 2))
    pw = pos.view(B, H // ws, ws, W // ws, ws, 2).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, 2)
    pw = pw.transpose(1, 2)  # (B*nW, 2, N)
    d = pw.unsqueeze(2) - pw.unsqueeze(3)  # (B*nW, 2, N, N): [i, j] = pos_j - pos_i
    d = torch.sign(d) * torch.log(1.0 + d.abs())
    h = F.conv2d(d, mlp.fc1.weight[:, :, None, None], mlp.fc1.bias).relu()
    out = F.conv2d(h, mlp.fc2.weight[:, :, None, None], mlp.fc2.bias)  # (B*nW, heads, N, N)
    N = ws * ws
    return out.view(B, -1, out.shape[1], N, N).flatten(1, 2)


def reference_block(blk: SwinBlock, x: torch.Tensor, pos: torch.Tensor, ws: int, shift: int) -> torch.Tensor:
    """Token-by-token (shifted-)window attention: pad to multiples of ws, roll by -shift; a query
    attends to the real tokens of its window and of its shift region. Independent of the fast path."""
    B, H, W, C = x.shape
    attn = blk.attn
    nh, d = attn.num_heads, C // attn.num_heads
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    xn = blk.norm1(x)
    q, k, v = attn.qkv(xn).view(B, H * W, 3, nh, d).unbind(2)  # (B, HW, nh, d)
    rr, cc = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    rr, cc = (rr - shift) % Hp, (cc - shift) % Wp  # rolled coordinates in the padded frame
    win = ((rr // ws) * (Wp // ws) + cc // ws).flatten()

    def region(t: torch.Tensor, L: int) -> torch.Tensor:
        return (t >= L - ws).long() + (t >= L - shift).long() if shift else torch.zeros_like(t)

    reg = (region(rr, Hp) * 3 + region(cc, Wp)).flatten()
    p = pos.expand(B, H, W, 2).reshape(B, H * W, 2)
    out = torch.empty(B, H * W, nh, d)
    for b in range(B):
        for i in range(H * W):
            keys = ((win == win[i]) & (reg == reg[i])).nonzero().flatten()
            off = p[b, keys] - p[b, i]  # (K, 2): key - query
            bias = attn.pos_mlp(torch.sign(off) * torch.log(1.0 + off.abs())).t()  # (nh, K)
            s = torch.einsum("hd,khd->hk", q[b, i], k[b, keys]) * d**-0.5 + bias
            out[b, i] = torch.einsum("hk,khd->hd", s.softmax(-1), v[b, keys])
    y = x + attn.proj(out.reshape(B, H, W, C))
    return y + blk.mlp(blk.norm2(y))


# ------------------------------------------------------------------------------------ interface
@pytest.mark.parametrize("patch_size", [2, 4])
@pytest.mark.parametrize("um_pretrain", [False, True])
def test_shapes(patch_size: int, um_pretrain: bool) -> None:
    m = make(patch_size=patch_size, um_pretrain=um_pretrain, num_classes=7)
    assert m.window_size == (8 if um_pretrain else 16)
    assert m.stem_stride == patch_size and m.reduction == patch_size * 8
    assert m.embed_dims == (16, 32, 64, 128) and m.num_features == 128
    B, img = 2, 64
    x = torch.randn(B, 3, img, img)
    with torch.no_grad():
        t = m.stem(x)
        s = img // patch_size
        assert t.shape == (B, s, s, 16)
        assert m.forward_features(x).shape == (B, s // 8, s // 8, 128)
        assert m.forward(x).shape == (B, 7)
        assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (B, 128)
        # compacted UM input: half the stem grid, original positions
        unit = m.reduction // 2
        r = unit // patch_size
        nb = img // (2 * unit)
        pos = um_pos(torch.randint(0, 4, (B, nb * nb)), (nb, nb), r)
        tc = t[:, : nb * r, : nb * r]
        assert pos.shape == (B, s // 2, s // 2, 2)
        y = m.forward_tokens(tc, pos)
        assert y.shape == (B, s // 16, s // 16, 128)


def test_stem_commutes_with_unit_gather() -> None:
    m = make(patch_size=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = m.stem(x)
        assert torch.allclose(m.stem(x[:, :, 16:32, 8:40]), full[:, 8:16, 4:20], atol=1e-5)


def test_bad_grid_raises() -> None:
    m = make(patch_size=4)
    with pytest.raises(ValueError):
        m.forward_tokens(torch.randn(1, 12, 12, 16))  # 12 not divisible by 8
    with pytest.raises(ValueError):
        m.forward_tokens(torch.randn(2, 16, 16, 16), torch.zeros(2, 8, 8, 2))


@pytest.mark.parametrize("um_pretrain", [False, True])
def test_pos_none_equals_regular_grid(um_pretrain: bool) -> None:
    m = make(patch_size=2, um_pretrain=um_pretrain)
    for s in (32, 24):  # 24: stage 0 needs padding for window 16 (and shift)
        t = torch.randn(2, s, s, 16)
        with torch.no_grad():
            ref = m.forward_tokens(t)
            assert torch.allclose(m.forward_tokens(t, grid_pos(2, s, s)), ref, atol=1e-5)
            assert torch.allclose(m.forward_tokens(t, grid_pos(1, s, s)), ref, atol=1e-5)


def test_pos_changes_output() -> None:
    m = make(patch_size=2, um_pretrain=True)
    t = torch.randn(2, 16, 16, 16)
    torch.manual_seed(1)
    keep = torch.randint(0, 4, (2, 16))
    p1 = um_pos(keep, (4, 4), 4)
    p2 = um_pos((keep + 1) % 4, (4, 4), 4)
    with torch.no_grad():
        y0 = m.forward_tokens(t)
        y1 = m.forward_tokens(t, p1)
        y2 = m.forward_tokens(t, p2)
        y1b = m.forward_tokens(t[:1], p1[:1])  # per-sample positions: sample 0 independent of sample 1
    assert not torch.allclose(y0, y1, atol=1e-4)
    assert not torch.allclose(y1, y2, atol=1e-4)
    assert torch.allclose(y1[:1], y1b, atol=1e-5)


# ------------------------------------------------------------------------------- bias / attention
@pytest.mark.parametrize("kind", ["grid", "um", "scattered"])
def test_fast_bias_equals_all_pairs(kind: str) -> None:
    torch.manual_seed(0)
    blk = SwinBlock(32, 4, shifted=False, posmlp_dim=8)
    B, H = 3, 16
    if kind == "scattered":  # arbitrary float positions: exercises the fallbacks of the index builder
        pos = grid_pos(B, H, H) + torch.rand(B, H, H, 2)
    else:
        pos = grid_pos(1, H, H) if kind == "grid" else um_pos(torch.randint(0, 4, (B, 16)), (4, 4), 4)
    for stage in range(3):  # also the subsampled positions of later stages (half-integers under UM)
        ws = min(8, pos.shape[1])
        for shift in (0, ws // 2) if pos.shape[1] > ws else (0,):
            rel = build_rel_pos_index(pos, ws, shift, 4, masked=False)
            fast = blk.attn.rel_pos_bias(rel)
            ref = direct_bias(blk.attn.pos_mlp, pos, ws, shift)
            assert fast.shape == ref.shape
            if stage == 0 and kind != "scattered":  # far fewer MLP evaluations than pairs
                assert rel.coords.shape[0] * 10 < ref.numel() // 4
            assert rel.coords.shape[0] <= ref.numel() // 4
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
            if shift:  # with the mask folded in: equal where visible, -inf elsewhere
                masked = blk.attn.rel_pos_bias(build_rel_pos_index(pos, ws, shift, 4))
                vis = torch.isfinite(masked)
                assert 0 < vis.float().mean() < 1
                torch.testing.assert_close(masked[vis], ref[vis], rtol=1e-5, atol=1e-6)
        pos = pos[:, 0::2, 0::2] / 2


@pytest.mark.parametrize(
    "H,ws,shift,kind", [(16, 8, 0, "um"), (16, 8, 4, "um"), (12, 8, 0, "grid"), (12, 8, 4, "grid"), (8, 8, 0, "um")]
)
def test_block_matches_tokenwise_reference(H: int, ws: int, shift: int, kind: str) -> None:
    torch.manual_seed(0)
    blk = SwinBlock(16, 2, shifted=shift > 0, posmlp_dim=8).eval()
    B = 2
    x = torch.randn(B, H, H, 16)
    pos = um_pos(torch.randint(0, 4, (B, (H // 4) ** 2)), (H // 4, H // 4), 4) if kind == "um" else grid_pos(1, H, H)
    with torch.no_grad():
        y = blk(x, ws, shift, build_rel_pos_index(pos, ws, shift, 2))
        ref = reference_block(blk, x, pos, ws, shift)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_sdpa_with_bias_matches_softmax_reference() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 16, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 6, 16, 16)
    bias[:, :, torch.arange(16) % 3 == 0, 5] = float("-inf")
    bias.requires_grad_(True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = ((q @ k.transpose(-1, -2)) * 8**-0.5 + bias).softmax(-1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v, bias), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------- training
def test_every_parameter_gets_gradient() -> None:
    m = make(patch_size=2, um_pretrain=True, num_classes=5, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64)
    pos = um_pos(torch.randint(0, 4, (2, 16)), (4, 4), 4)  # unit 8 px = 4 stem tokens
    y = m.forward_head(m.forward_tokens(m.stem(x)[:, :16, :16], pos))
    y.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # no exceptions: every parameter (incl. the bias MLPs) is trained
    assert m.no_weight_decay() == set()


def test_grad_checkpointing_same_result() -> None:
    m = make(patch_size=2, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_cache_built_in_inference_mode_usable_for_training() -> None:
    _grid_rel_pos_index.cache_clear()
    _window_mask.cache_clear()
    m = make(patch_size=2, num_classes=3)
    x = torch.randn(1, 3, 64, 64)  # the cached plans and masks are built in inference mode
    with torch.inference_mode():
        m(x)
    m.train()(x).sum().backward()


def test_timm_surface() -> None:
    """(Per-block drop-path rates, reset_classifier semantics: tests/models/test_contract.py.)"""
    m = make(num_classes=4, in_chans=1, img_size=128)
    assert m.patch_embed.proj.in_channels == 1 and m.img_size == 128
    assert m.get_classifier().out_features == 4
    m.reset_classifier(0)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 128)
    gm = m.group_matcher()
    assert gm["stem"] == r"^patch_embed"
    groups = {i: {n.rsplit(".", 1)[0] for n in names} for i, names in timm.models.group_parameters(m, gm).items()}
    assert len(groups) == 1 + 5  # stem, 5 blocks; a downsample joins its stage's first block, timm puts
    assert groups[2] >= {"stages.1.downsample.norm", "stages.1.blocks.0.norm1"}  # the final norm in the last
    assert groups[5] >= {"stages.3.blocks.0.norm1", "norm"}
    assert set(timm.list_models("sslkit_swin_*")) >= {"sslkit_swin_tiny", "sslkit_swin_test"}


# --------------------------------------------------------------------------------- checkpointing
def test_export_backbone_and_load_with_timm(tmp_path) -> None:
    src = make(num_classes=0, um_pretrain=True)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    assert not any(k.startswith("head.") for k in sd) and sorted(sd) == sorted(backbone_keys((1, 1, 2, 1)))
    path = str(tmp_path / "swin_test.safetensors")
    save_file(sd, path)
    for kw in (dict(num_classes=10), dict()):
        torch.manual_seed(123)
        fresh = timm.create_model("sslkit_swin_test", **kw)  # what the model would hold without loading
        qkv = "stages.0.blocks.0.attn.qkv.weight"
        assert not torch.equal(fresh.state_dict()[qkv], sd[qkv])
        torch.manual_seed(123)
        m = timm.create_model("sslkit_swin_test", pretrained=True, pretrained_cfg_overlay=dict(file=path), **kw)
        got = m.state_dict()
        for k, v in sd.items():
            assert torch.equal(got[k], v), k
        assert m.num_classes == kw.get("num_classes", 0)
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, kw.get("num_classes", 128))


def test_convert_um_pretrain_to_finetune_roundtrip() -> None:
    pre = make(um_pretrain=True, num_classes=0, patch_size=4)
    torch.manual_seed(1)
    ft = timm.create_model("sslkit_swin_test", um_pretrain=False, num_classes=0, patch_size=4).eval()
    assert (pre.window_size, ft.window_size) == (8, 16)
    sd = convert_um_pretrain_to_finetune(pre.state_dict())
    key = "stages.1.downsample.proj.weight"
    assert not torch.equal(ft.state_dict()[key], sd[key])  # different init: the load below matters
    ft.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, ft.state_dict()[k]) for k, v in sd.items())
    x = torch.randn(2, 3, 32, 32)  # stem 8x8: every stage fits in one window for both window sizes
    with torch.no_grad():
        torch.testing.assert_close(ft(x), pre(x), rtol=0, atol=0)
        x = torch.randn(1, 3, 128, 128)  # stem 32x32: the window sizes differ, same weights run in both
        assert not torch.allclose(ft(x), pre(x), atol=1e-4)
    ft.load_state_dict(convert_um_pretrain_to_finetune(pre.state_dict(), depths=(1, 1, 2, 1)), strict=True)


def test_convert_rejects_unknown_and_missing_keys() -> None:
    sd = make(num_classes=0).state_dict()
    extra = {"head.weight": torch.zeros(3, 128), "stages.0.blocks.0.attn.relative_position_index": torch.zeros(1)}
    bad = dict(sd, **extra)
    with pytest.raises(CheckpointError, match="head.weight"):
        convert_um_pretrain_to_finetune(bad)
    missing = {k: v for k, v in sd.items() if k != "stages.2.blocks.1.attn.pos_mlp.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"stages\.2\.blocks\.1\.attn\.pos_mlp\.fc2\.weight"):
        convert_um_pretrain_to_finetune(missing)
    wrong = dict(sd, **{"stages.0.blocks.0.attn.pos_mlp.fc1.weight": torch.zeros(8, 3)})
    with pytest.raises(CheckpointError, match="pos_mlp.fc1.weight"):
        convert_um_pretrain_to_finetune(wrong)
    with pytest.raises(CheckpointError):
        convert_um_pretrain_to_finetune(sd, depths=(2, 2, 6, 2))
