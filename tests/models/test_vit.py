"""ViT backbone for DINOv2 (sslkit.models.vit): timm compatibility, packed multi-crop forward, mask token,
efficient / mask-mode stochastic depth, position-embedding interpolation, export round trip.
Tiny ``sslkit_vit_test`` model (32 px, patch 4, dim 48, 2 blocks), 2 global 32 px + 4 local 16 px crops."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.optim import create_optimizer_v2

from sslkit.layers import stochastic_depth as sdmod
from sslkit.layers.stochastic_depth import keep_count
from sslkit.models.vit import (  # importing sslkit.models registers the models with timm
    PackedBlock,
    PackLayout,
    VisionTransformer,
    checkpoint_filter_fn,
    pack_groups,
    unpack_groups,
)

torch.set_num_threads(2)
DIM, GRID = 48, 8  # sslkit_vit_test: 32 px / patch 4


# ------------------------------------------------------------------------------------- helpers
def make(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    m = timm.create_model("sslkit_vit_test", **kw)
    with torch.no_grad():  # non-trivial LayerScale / norms / tokens so that mistakes show
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def crops(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 32, 32, generator=g), torch.randn(4, 3, 16, 16, generator=g)]


def timm_vit(reg_tokens: int = 0, no_embed_class: bool = False, **kw) -> TimmViT:
    kw = {"num_classes": 0, **kw}
    return TimmViT(img_size=32, patch_size=4, embed_dim=DIM, depth=2, num_heads=3, mlp_ratio=2, init_values=1e-5,
                   reg_tokens=reg_tokens, no_embed_class=no_embed_class, class_token=True, **kw)


class FixedSampler:
    """Stand-in for ``sample_keep``: returns the next queued index tensor, records every call."""

    def __init__(self, queue: list[torch.Tensor] | None = None) -> None:
        self.queue = list(queue or [])
        self.calls: list[tuple[int, int]] = []
        self.real = sdmod.sample_keep

    def __call__(self, batch_size, k, device, generator):
        self.calls.append((batch_size, k))
        if self.queue:
            idx = self.queue.pop(0)
            assert idx.numel() == k
            return idx.to(device)
        return self.real(batch_size, k, device, generator)


def row_counter(module: torch.nn.Module) -> list[int]:
    """Record the number of rows (product of leading dims) every call of ``module`` sees."""
    seen: list[int] = []
    module.register_forward_hook(lambda m, inp, out: seen.append(inp[0].numel() // inp[0].shape[-1]))
    return seen


# ---------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_create_model_and_shapes(reg_tokens: int) -> None:
    m = make(reg_tokens=reg_tokens, num_classes=5)
    assert (m.embed_dim, m.num_features, m.patch_size) == (DIM, DIM, 4)
    assert m.num_reg_tokens == reg_tokens and m.num_prefix_tokens == 1 + reg_tokens
    assert m.mask_token.shape == (1, DIM) and len(m.blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    f = m.forward_features(x)
    assert f.shape == (2, 1 + reg_tokens + GRID * GRID, DIM)
    assert m.forward_head(f, pre_logits=True).shape == (2, DIM)
    assert m(x).shape == (2, 5)
    assert m.forward_features(torch.randn(1, 3, 16, 24)).shape == (1, 1 + reg_tokens + 4 * 6, DIM)


def test_registered_architectures() -> None:
    expected = {"sslkit_vit_tiny": (192, 12, 3), "sslkit_vit_small": (384, 12, 6),
                "sslkit_vit_base": (768, 12, 12), "sslkit_vit_large": (1024, 24, 16)}
    assert set(expected) | {"sslkit_vit_test"} <= set(timm.list_models("sslkit_vit_*"))
    with torch.device("meta"):
        for name, (dim, depth, heads) in expected.items():
            m = timm.create_model(name)
            assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.patch_size) == (dim, depth, heads, 16)
            assert m.pos_embed.shape == (1, 1 + 14 * 14, dim) and m.num_classes == 0
            assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and m.pretrained_cfg["input_size"] == (3, 224, 224)
        s = timm.create_model("sslkit_vit_small", patch_size=14, img_size=518, reg_tokens=4, init_values=1e-5)
        assert s.pos_embed.shape == (1, 1 + 37 * 37, 384) and s.reg_token.shape == (1, 4, 384)
        assert s.blocks[0].ls1.gamma.shape == (384,)
    t = make()
    assert (t.embed_dim, len(t.blocks), t.blocks[0].attn.num_heads, t.blocks[0].mlp.fc1.out_features) == (48, 2, 3, 96)
    assert not hasattr(t.blocks[0].ls1, "gamma")  # no LayerScale unless init_values is given


def test_constructor_kwargs() -> None:
    VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=3, dynamic_img_size=True,
                      class_token=True, no_embed_class=False, drop_rate=0.0)
    with pytest.raises(TypeError, match="bogus"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=3, bogus=1)
    with pytest.raises(ValueError, match="class_token"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=3, class_token=False)
    with pytest.raises(ValueError, match="drop_path_mode"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=3, drop_path_mode="x")
    with pytest.raises(ValueError, match="multiple"):
        VisionTransformer(img_size=30, patch_size=4, embed_dim=48, depth=1, num_heads=3)


# ------------------------------------------------------------------------------- timm parity
def test_state_dict_loads_into_timm_and_matches() -> None:
    """reg_tokens=0: identical key set (minus mask_token), strict load both ways, identical outputs, also
    with a non-zero drop_path_rate in eval (stochastic depth is the identity-free plain residual)."""
    ours = make(init_values=1e-5, drop_path_rate=0.3, num_classes=7)
    ref = timm_vit(num_classes=7).eval()
    sd = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    assert set(sd) == set(ref.state_dict())
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.forward_features(x), ours.forward_features(x))  # eval: deterministic
    back = make(init_values=1e-5, num_classes=7)
    back.load_state_dict({**ref.state_dict(), "mask_token": ours.mask_token.detach()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_timm_register_layouts_convert_exactly(tmp_path, no_embed_class: bool) -> None:
    """With registers timm's position-embedding conventions differ from ours (DINOv2's): timm
    ``no_embed_class=False`` has 1 + R + N positions (registers get one too), ``no_embed_class=True`` has N
    (the class token gets none); ours has 1 + N. Same key names; ``checkpoint_filter_fn`` converts
    both exactly, which the pretrained loader applies."""
    torch.manual_seed(1)
    ref = timm_vit(reg_tokens=2, no_embed_class=no_embed_class).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = make(reg_tokens=2, init_values=1e-5)
    assert set(ref.state_dict()) == set(ours.state_dict()) - {"mask_token"}
    assert ref.pos_embed.shape[1] == (64 if no_embed_class else 1 + 2 + 64) != ours.pos_embed.shape[1] == 1 + 64
    path = tmp_path / "timm_vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = timm.create_model("sslkit_vit_test", reg_tokens=2, init_values=1e-5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(loaded.mask_token, torch.zeros(1, DIM))  # missing in timm files: zeros
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    # the filter is needed: a plain strict load fails on the pos_embed shape
    with pytest.raises(RuntimeError, match="pos_embed"):
        ours.load_state_dict({**ref.state_dict(), "mask_token": ours.mask_token}, strict=True)


def test_checkpoint_filter_resamples_grid() -> None:
    big = make(img_size=48)  # 12x12 grid
    small = make()  # 8x8 grid
    sd = checkpoint_filter_fn(big.state_dict(), small)
    small.load_state_dict(sd, strict=True)
    ref = resample_abs_pos_embed(big.pos_embed.detach(), [8, 8], [12, 12], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(small.pos_embed.detach(), ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- packing
def test_pack_unpack_round_trip() -> None:
    xs = [torch.randn(2, 5, 4), torch.randn(3, 2, 4), torch.randn(1, 7, 4)]
    x, layout = pack_groups(xs)
    assert x.shape == (10 + 6 + 7, 4) and layout == PackLayout(((2, 5), (3, 2), (1, 7)))
    assert layout.offsets == [0, 10, 16] and layout.total == 23
    assert torch.equal(x[10:12], xs[1][0])  # sample-major rows
    for a, b in zip(unpack_groups(x, layout), xs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        unpack_groups(x[:-1], layout)
    with pytest.raises(ValueError):
        pack_groups([torch.randn(0, 5, 4)])


@pytest.mark.parametrize("reg_tokens", [0, 2])
@pytest.mark.parametrize("with_masks", [False, True])
def test_packed_equals_separate_forwards(reg_tokens: int, with_masks: bool) -> None:
    m = make(reg_tokens=reg_tokens, init_values=1e-5, drop_path_rate=0.4)  # eval: SD off
    cs = crops() + [torch.randn(3, 3, 24, 16)]  # third group: non-square, interpolated positions
    masks = None
    if with_masks:
        g = torch.Generator().manual_seed(5)
        masks = [torch.rand(2, 64, generator=g) < 0.4, None, torch.rand(3, 24, generator=g) < 0.5]
    with torch.no_grad():
        outs = m.forward_packed(cs, masks)
        refs = [m.forward_features(c, None if masks is None else masks[i]) for i, c in enumerate(cs)]
    assert [o.shape for o in outs] == [r.shape for r in refs]
    assert [o.shape[1] for o in outs] == [1 + reg_tokens + n for n in (64, 16, 24)]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_packed_attention_never_crosses_crops() -> None:
    m = make(reg_tokens=1)
    cs = crops()
    with torch.no_grad():
        base = m.forward_packed(cs)
        other = [cs[0].clone(), torch.randn_like(cs[1])]  # change every local crop
        other[0][1] += 1.0  # ... and global crop 1
        out = m.forward_packed(other)
    assert torch.equal(out[0][0], base[0][0])  # global crop 0 untouched by any other crop
    assert (out[0][1] - base[0][1]).abs().max() > 1e-3
    assert (out[1] - base[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------- mask token
def test_masked_positions_use_mask_token() -> None:
    m = make(reg_tokens=2)
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masked = torch.zeros(2, 64, dtype=torch.bool)
    masked[0, [0, 9, 63]] = True  # patches (0,0), (1,1), (7,7) of sample 0
    masked[1, :32] = True  # top half of sample 1
    with torch.no_grad():
        out = m.forward_features(x, masked)
        # pixels under masked patches do not matter ...
        y = x.clone()
        y[0, :, 0:4, 0:4] = 5.0
        y[0, :, 4:8, 4:8] = -3.0
        y[0, :, 28:32, 28:32] = 7.0
        y[1, :, :16] = torch.randn(3, 16, 32)
        torch.testing.assert_close(m.forward_features(y, masked), out, atol=0, rtol=0)
        # ... pixels of an unmasked patch do, and so does the mask token itself
        y[0, :, 0:4, 4:8] += 1.0
        assert (m.forward_features(y, masked) - out)[0].abs().max() > 1e-3
        delta = torch.randn(DIM)  # (a constant shift would be invisible: every LayerNorm removes it)
        m.mask_token.add_(delta)
        assert (m.forward_features(x, masked) - out).abs().max() > 1e-3
        m.mask_token.sub_(delta)
        # the token entering the blocks is mask_token + position embedding
        t = m.prepare_tokens(x, masked)
        torch.testing.assert_close(t[0, 1 + 2 + 9], m.mask_token[0] + m.pos_embed[0, 1 + 9])
        torch.testing.assert_close(t[0, 1 + 2 + 8], m.prepare_tokens(x)[0, 1 + 2 + 8])
        # packed path uses the same masks
        torch.testing.assert_close(m.forward_packed([x], [masked])[0], out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bool"):
        m.forward_features(x, masked.float())
    with pytest.raises(ValueError, match="shape"):
        m.forward_features(x, masked[:, :10])


# -------------------------------------------------------------------- efficient stochastic depth
def test_efficient_sd_kept_counts_and_compute(monkeypatch) -> None:
    """Per block and branch each group draws exactly k_g = keep_count(B_g, d) samples and the branch's
    token-wise ops see exactly sum_g k_g * N_g rows (no compute for dropped samples)."""
    d = 0.5
    m = make(drop_path_rate=d, init_values=1e-5).train()
    sampler = FixedSampler()
    monkeypatch.setattr(sdmod, "sample_keep", sampler)
    qkv_rows = [row_counter(b.attn.qkv) for b in m.blocks]
    fc1_rows = [row_counter(b.mlp.fc1) for b in m.blocks]
    cs = crops()  # groups: (2, 65 tokens), (4, 17 tokens)
    outs = m.forward_packed(cs)
    k0, k1 = keep_count(2, d), keep_count(4, d)
    assert (k0, k1) == (1, 2)
    assert sampler.calls == [(2, k0), (4, k1)] * 2 * len(m.blocks)  # attn then mlp, per block
    kept_rows = k0 * 65 + k1 * 17
    assert qkv_rows == [[kept_rows]] * 2 and fc1_rows == [[kept_rows]] * 2
    assert [o.shape for o in outs] == [(2, 65, DIM), (4, 17, DIM)]
    # single-tensor path: one group
    sampler.calls.clear()
    m.forward_features(cs[1])
    assert sampler.calls == [(4, k1)] * 2 * len(m.blocks)
    assert qkv_rows[0][-1] == k1 * 17 and fc1_rows[1][-1] == k1 * 17
    # eval: no draws, all rows
    sampler.calls.clear()
    m.eval().forward_packed(cs)
    assert sampler.calls == [] and qkv_rows[0][-1] == 2 * 65 + 4 * 17


def _block_reference(blk: PackedBlock, xs: list[torch.Tensor], idx_attn, idx_mlp) -> list[torch.Tensor]:
    """y = x; y[idx] += (B/k) f(x[idx]) per branch and group, computed with the (B, N, C) branches."""
    out = []
    for x, ia, im in zip(xs, idx_attn, idx_mlp):
        b = x.shape[0]
        y = x.clone()
        y[ia] = y[ia] + (b / len(ia)) * blk.attn_residual(y[ia])
        y[im] = y[im] + (b / len(im)) * blk.mlp_residual(y[im])
        out.append(y)
    return out


def test_efficient_sd_block_exact(monkeypatch) -> None:
    torch.manual_seed(0)
    blk = PackedBlock(DIM, 3, mlp_ratio=2, init_values=0.5, drop_path=0.4).train()
    xs = [torch.randn(5, 9, DIM), torch.randn(10, 4, DIM)]  # k = 3 of 5, 6 of 10; scales 5/3 and 10/6
    idx_attn = [torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3, 5, 8, 9])]
    idx_mlp = [torch.tensor([1, 2, 4]), torch.tensor([0, 2, 3, 5, 7, 9])]
    sampler = FixedSampler(idx_attn + idx_mlp)
    monkeypatch.setattr(sdmod, "sample_keep", sampler)
    x, layout = pack_groups(xs)
    ys = unpack_groups(blk.forward_packed(x, layout), layout)
    assert sampler.calls == [(5, 3), (10, 6), (5, 3), (10, 6)]
    with torch.no_grad():
        refs = _block_reference(blk, xs, idx_attn, idx_mlp)
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    # dropped in both branches: exactly the input; kept somewhere: changed
    assert torch.equal(ys[0][3], xs[0][3]) and torch.equal(ys[1][4], xs[1][4]) and torch.equal(ys[1][6], xs[1][6])
    assert (ys[0][0] - xs[0][0]).abs().max() > 1e-3
    # same scales in every group -> the alpha path; same reference
    xs2 = [torch.randn(5, 9, DIM), torch.randn(5, 4, DIM)]
    ia2, im2 = [torch.tensor([0, 1, 3])] * 2, [torch.tensor([2, 3, 4])] * 2
    monkeypatch.setattr(sdmod, "sample_keep", FixedSampler(ia2 + im2))
    x2, l2 = pack_groups(xs2)
    with torch.no_grad():
        for y, r in zip(unpack_groups(blk.forward_packed(x2, l2), l2), _block_reference(blk, xs2, ia2, im2)):
            torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)


def test_efficient_sd_gradient_only_through_kept_rows(monkeypatch) -> None:
    torch.manual_seed(0)
    blk = PackedBlock(DIM, 3, mlp_ratio=2, init_values=0.5, drop_path=0.5).train()
    idx = [torch.tensor([1, 3]), torch.tensor([0, 1, 4])]  # k of B = 2 of 4, 3 of 6
    xs = [torch.randn(4, 9, DIM), torch.randn(6, 5, DIM)]
    w = [torch.randn_like(t) for t in xs]

    def run(xs_in):
        monkeypatch.setattr(sdmod, "sample_keep", FixedSampler(idx + idx))  # same subset both branches
        xs_in = [t.clone().requires_grad_() for t in xs_in]
        blk.zero_grad()
        x, layout = pack_groups(xs_in)
        ys = unpack_groups(blk.forward_packed(x, layout), layout)
        sum((y * wi).sum() for y, wi in zip(ys, w)).backward()
        return xs_in, {n: p.grad.clone() for n, p in blk.named_parameters()}

    leaves, grads = run(xs)
    for leaf, wi, kept in zip(leaves, w, idx):
        dropped = torch.ones(leaf.shape[0], dtype=torch.bool)
        dropped[kept] = False
        assert torch.equal(leaf.grad[dropped], wi[dropped])  # identity path only
        assert (leaf.grad[kept] - wi[kept]).abs().max() > 1e-4  # plus the branches
    assert all(g.abs().sum() > 0 for g in grads.values())
    # parameter gradients do not depend on the dropped samples at all
    perturbed = [t.clone() for t in xs]
    perturbed[0][[0, 2]] += 3.0
    perturbed[1][[2, 3, 5]] -= 2.0
    _, grads2 = run(perturbed)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], atol=1e-6, rtol=1e-5)


def test_single_path_matches_packed_path_in_training() -> None:
    """Same RNG stream (attn draw, mlp draw per block) -> the (B, N, C) path and a one-group packed pass
    pick the same subsets and give the same result."""
    m = make(drop_path_rate=0.5, init_values=1e-5, reg_tokens=1).train()
    x = torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    a = m.forward_features(x)
    torch.manual_seed(3)
    b = m.forward_packed([x])[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.manual_seed(4)
    assert (m.forward_features(x) - a).abs().max() > 1e-4  # other seed, other subsets
    # drop_path_rate 0 in training == eval
    m0 = make(init_values=1e-5, reg_tokens=1)
    with torch.no_grad():
        train_out = m0.train().forward_packed([x])[0]
        torch.testing.assert_close(train_out, m0.eval().forward_features(x), atol=1e-5, rtol=1e-5)


def test_uniform_drop_path_rate() -> None:
    m = make(drop_path_rate=0.3)
    assert [b.drop_path for b in m.blocks] == [0.3, 0.3]


# -------------------------------------------------------------------------------- mask mode
def test_mask_mode_matches_timm_droppath() -> None:
    d = 0.5
    torch.manual_seed(0)
    blk = PackedBlock(DIM, 3, mlp_ratio=2, init_values=0.5, drop_path=d, drop_path_mode="mask").train()
    ref = TimmBlock(DIM, 3, mlp_ratio=2, qkv_bias=True, init_values=0.5, drop_path=d).train()
    ref.load_state_dict(blk.state_dict(), strict=True)
    x = torch.randn(8, 9, DIM)
    torch.manual_seed(11)
    y = blk(x)
    torch.manual_seed(11)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    # packed, one group: same draws
    torch.manual_seed(11)
    xp, layout = pack_groups([x])
    torch.testing.assert_close(blk.forward_packed(xp, layout).view_as(x), y, atol=1e-5, rtol=1e-5)
    # compute runs on all rows in mask mode
    seen = row_counter(blk.attn.qkv)
    blk(x)
    assert seen == [8 * 9]


def test_mask_mode_packed_per_sample() -> None:
    """Packed mask mode: every sample either skips a branch entirely or gets it scaled by 1/keep_prob."""
    torch.manual_seed(0)
    blk = PackedBlock(DIM, 3, mlp_ratio=2, init_values=0.5, drop_path=0.5, drop_path_mode="mask").train()
    blk.mlp_residual = lambda t: torch.zeros_like(t)  # isolate the attention branch
    xs = [torch.randn(16, 5, DIM), torch.randn(16, 3, DIM)]
    x, layout = pack_groups(xs)
    torch.manual_seed(2)
    ys = unpack_groups(blk.forward_packed(x, layout), layout)
    for y, xi in zip(ys, xs):
        with torch.no_grad():
            full = xi + 2.0 * blk.attn_residual(xi)  # scaled by 1 / keep_prob
        dropped = (y == xi).flatten(1).all(1)
        assert 0 < int(dropped.sum()) < 16  # both outcomes occur (seeded)
        torch.testing.assert_close(y[~dropped], full[~dropped], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["efficient", "mask"])
def test_packed_train_step_every_parameter_gets_gradient(mode: str) -> None:
    m = make(drop_path_rate=0.25, drop_path_mode=mode, init_values=1e-5, reg_tokens=2, num_classes=0).train()
    cs = crops()
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(2, 64, generator=g) < 0.5, None]
    outs = m.forward_packed(cs, masks)
    (outs[0].square().mean() + outs[1][:, 0].square().mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert m.mask_token.grad.abs().sum() > 0


def test_grad_checkpointing_is_exact() -> None:
    """Non-reentrant checkpointing restores the RNG, so the recomputed blocks draw the same subsets."""
    m = make(drop_path_rate=0.4, init_values=1e-5).train()
    cs = crops()

    def grads(checkpointing: bool, packed: bool):
        m.zero_grad()
        m.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)
        outs = m.forward_packed(cs) if packed else [m.forward_features(cs[0])]
        sum(o.square().sum() for o in outs).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if n != "mask_token"}  # (no masks)

    for packed in (True, False):
        g0, g1 = grads(False, packed), grads(True, packed)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------- position embedding
@pytest.mark.parametrize("size", [(48, 32), (16, 16)])
def test_pos_embed_interpolation(size: tuple[int, int]) -> None:
    m = make(reg_tokens=2, init_values=1e-5)
    h, w = size[0] // 4, size[1] // 4
    ref = make(reg_tokens=2, init_values=1e-5, img_size=size)
    sd = dict(m.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(m.pos_embed.detach(), [h, w], [GRID, GRID], num_prefix_tokens=1,
                                             antialias=False)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = m.forward_features(x)
        assert out.shape == (2, 1 + 2 + h * w, DIM)
        torch.testing.assert_close(out, ref.forward_features(x), atol=1e-5, rtol=1e-5)
    # native size: no interpolation at all
    cls_pos, patch_pos = m.pos_embed_for(GRID, GRID)
    assert torch.equal(patch_pos, m.pos_embed[:, 1:]) and torch.equal(cls_pos, m.pos_embed[:, :1])
    # differentiable
    m.forward_features(x).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad[:, 1:].abs().sum() > 0


def test_non_multiple_size_raises() -> None:
    m = make()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m.forward_packed([torch.randn(1, 3, 32, 32), torch.randn(1, 3, 16, 18)])


# ---------------------------------------------------------------------------- timm conventions
def test_heads_pools_and_layer_decay() -> None:
    m = make(num_classes=10, reg_tokens=2)
    assert m.no_weight_decay() == {"pos_embed", "cls_token", "reg_token", "mask_token"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = m.forward_features(x)
        torch.testing.assert_close(m.forward_head(f, pre_logits=True), f[:, 0])
        m.reset_classifier(3, global_pool="avg")
        assert m.get_classifier().out_features == 3
        torch.testing.assert_close(m.forward_head(f, pre_logits=True), f[:, 3:].mean(1))
        m.reset_classifier(0, global_pool="")
        assert isinstance(m.get_classifier(), torch.nn.Identity) and m.forward_head(f).shape == f.shape
    with pytest.raises(ValueError):
        m.reset_classifier(0, global_pool="max")
    m.reset_classifier(10, global_pool="token")
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    P = dict(m.named_parameters())
    assert len(scale) == len(P)
    s = lambda n: scale[id(P[n])]  # noqa: E731
    for stem in ("cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "mask_token"):
        assert s(stem) == pytest.approx(0.5**3), stem
    assert s("blocks.0.attn.qkv.weight") == pytest.approx(0.5**2)
    assert s("blocks.1.mlp.fc2.weight") == pytest.approx(0.5)
    assert s("norm.weight") == s("blocks.1.norm1.weight")
    assert s("head.weight") == 1.0
    for n in ("cls_token", "reg_token", "pos_embed", "mask_token", "norm.bias"):
        assert wd[id(P[n])] == 0.0, n
    assert wd[id(P["blocks.0.attn.qkv.weight"])] == 0.05


# --------------------------------------------------------------------------------------- export
def test_export_round_trip_through_timm(tmp_path) -> None:
    src = make(reg_tokens=2, init_values=1e-5, num_classes=4)
    with torch.no_grad():
        src.mask_token.normal_()
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "backbone.safetensors"
    save_file(sd, str(path))
    loaded = timm.create_model("sslkit_vit_test", reg_tokens=2, init_values=1e-5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    got = loaded.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    x = torch.randn(2, 3, 32, 32)
    masked = torch.rand(2, 64) < 0.3
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x, masked), src.forward_features(x, masked))
        assert torch.equal(loaded.forward_packed(crops())[1], src.forward_packed(crops())[1])
    with_head = timm.create_model("sslkit_vit_test", reg_tokens=2, init_values=1e-5, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path)), num_classes=6)
    assert with_head.head.weight.shape == (6, DIM) and torch.equal(with_head.pos_embed, src.pos_embed)
