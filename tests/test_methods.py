"""UM-MAE and SimMIM on the tiny registered backbones: shapes, hand-derived losses, secondary masking,
and the every-parameter-gets-a-gradient contract."""

import pytest
import torch

from sslkit.config import compose
from sslkit.errors import ConfigError
from sslkit.masking import blocks_to_grid
from sslkit.methods import build_method
from sslkit.models.um import gather_kept_units, patchify

TINY = ["sslkit_pvt_test", "sslkit_swin_test"]


def make(method: str, model: str, *extra: str):
    ov = [f"model={model}", "model.kwargs.patch_size=2", "method.unit=8", "method.view.size=64"]
    if method == "umae":
        ov.insert(0, "method=umae_tiny")
    else:
        ov.insert(0, "method=simmim")
    cfg = compose(ov + list(extra))
    return build_method(cfg), cfg


def batch_for(m, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 64, 64, generator=g)
    return {"images": images, **m.masking()(B, g)}


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", ["umae", "simmim"])
def test_every_parameter_gets_a_gradient(method, model):
    m, _ = make(method, model)
    m.train()
    out = m(batch_for(m))
    assert set(out) >= {"loss", "loss_rec"} and out["loss"].ndim == 0
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == [], missing


def test_umae_loss_hand_derived_zero_decoder():
    """Zero predictor -> loss = mean squared (normalized) target over removed units only."""
    m, _ = make("umae", "sslkit_pvt_test", "method.norm_pix_loss=false")
    torch.nn.init.zeros_(m.decoder_pred.weight), torch.nn.init.zeros_(m.decoder_pred.bias)
    b = batch_for(m, B=3)
    with torch.no_grad():
        loss = m(b)["loss"]
    target = patchify(b["images"], 8)  # (B, 64, 192)
    manual = target[b["masked"]].pow(2).mean()  # removed units only
    assert torch.allclose(loss, manual, rtol=1e-5)

    # with norm_pix_loss every target patch has mean 0 and (unbiased) variance 1:
    # mean of squares = (P - 1) / P * var / (var + 1e-6), P = 8*8*3
    m2, _ = make("umae", "sslkit_pvt_test")
    torch.nn.init.zeros_(m2.decoder_pred.weight), torch.nn.init.zeros_(m2.decoder_pred.bias)
    with torch.no_grad():
        loss2 = m2(b)["loss"]
    P = 8 * 8 * 3
    assert loss2.item() == pytest.approx((P - 1) / P, rel=1e-4)


def test_umae_loss_ignores_kept_units_and_sees_removed_ones():
    m, _ = make("umae", "sslkit_pvt_test")
    b = batch_for(m, B=2)
    L = 64
    masked_idx = b["masked"].nonzero()[:, 1].view(2, -1)
    pred = torch.randn(2, masked_idx.shape[1], 192)
    images = b["images"].clone().requires_grad_(True)
    m.loss(images, pred, masked_idx).backward()
    g = patchify(images.grad, 8).abs().sum(-1)  # (B, L) gradient mass per unit
    assert (g[~b["masked"]] == 0).all()  # kept units never enter the loss
    assert (g[b["masked"]] > 0).all()  # every removed unit does
    assert masked_idx.shape[1] == 3 * L // 4


def test_secondary_masking_replaces_exactly_the_sm_units():
    m, _ = make("umae", "sslkit_pvt_test")
    b = batch_for(m, B=2)
    seen = {}
    orig = m.backbone.forward_tokens

    def spy(x, pos=None):
        seen["x"], seen["pos"] = x.detach().clone(), pos
        return orig(x, pos)

    m.backbone.forward_tokens = spy
    with torch.no_grad():
        m(b)
    x = seen["x"]  # (B, 16, 16, C0): 4x4 kept units of 4x4 stem tokens each (unit 8, stem 2)
    stem = m.backbone.stem(gather_kept_units(b["images"], b["keep_offset"], 8))
    r = 4
    tok = m.vis_mask_token.view(-1)
    for bi in range(2):
        for n in range(16):
            i, j = divmod(n, 4)
            tile = x[bi, i * r:(i + 1) * r, j * r:(j + 1) * r]
            if b["sm_masked"][bi, n]:
                assert torch.equal(tile, tok.expand_as(tile))
            else:
                assert torch.equal(tile, stem[bi, i * r:(i + 1) * r, j * r:(j + 1) * r])
    assert int(b["sm_masked"].sum(1)[0]) == 16 - int(16 * 0.75)


def test_stem_on_gathered_pixels_equals_gathered_stem():
    m, _ = make("umae", "sslkit_pvt_test")
    b = batch_for(m, B=2)
    full = m.backbone.stem(b["images"])  # (B, 32, 32, C0)
    packed = m.backbone.stem(gather_kept_units(b["images"], b["keep_offset"], 8))  # (B, 16, 16, C0)
    keep_idx = blocks_to_grid(b["keep_offset"], (8, 8))
    r = 4
    for bi in range(2):
        for n in range(16):
            ur, uc = divmod(int(keep_idx[bi, n]), 8)
            i, j = divmod(n, 4)
            torch.testing.assert_close(packed[bi, i * r:(i + 1) * r, j * r:(j + 1) * r],
                                       full[bi, ur * r:(ur + 1) * r, uc * r:(uc + 1) * r])


def test_simmim_loss_hand_derived_zero_decoder():
    m, _ = make("simmim", "sslkit_pvt_test")
    torch.nn.init.zeros_(m.decoder.weight), torch.nn.init.zeros_(m.decoder.bias)
    b = batch_for(m, B=2)
    with torch.no_grad():
        loss = m(b)["loss"]
    px = b["masked"].view(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 8, 8, 8).reshape(2, 3, 64, 64)
    manual = b["images"].abs()[px].mean()
    assert torch.allclose(loss, manual, rtol=1e-4)


def test_umae_encoder_shapes():
    for model in TINY:
        m, _ = make("umae", model)
        b = batch_for(m, B=2)
        z = m.forward_encoder(b["images"], b["keep_offset"], b["sm_masked"])
        assert z.shape == (2, 2, 2, m.backbone.num_features)  # 64 px, unit 8: 4x4 kept units -> stride 2


def test_unit_mismatch_and_odd_grid_fail_at_build():
    with pytest.raises(ConfigError, match="method.unit"):
        make("umae", "sslkit_pvt_test", "method.unit=16")
    with pytest.raises(ConfigError, match="even"):
        make("umae", "sslkit_pvt_test", "method.view.size=72")


def test_decoder_block_partial_output_equals_full_rows():
    from sslkit.methods.umae import DecoderBlock

    blk = DecoderBlock(32, 4, 2.0).eval()
    x = torch.randn(3, 20, 32)
    full = blk(x)
    part = blk(x, 15)
    assert part.shape == (3, 15, 32)
    torch.testing.assert_close(part, full[:, 5:], rtol=1e-5, atol=1e-6)
    # and the reference: a plain softmax attention block written out by hand
    y = blk.norm1(x)
    q, k, v = blk.qkv(y).view(3, 20, 3, 4, 8).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) / 8 ** 0.5).softmax(-1) @ v
    ref = x + blk.proj(a.transpose(1, 2).reshape(3, 20, 32))
    ref = ref + blk.mlp(blk.norm2(ref))
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
