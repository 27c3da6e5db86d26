"""Pictures (sslkit.visualize, Method.visualize): shapes and ranges, a perfect predictor pastes back to the
input (UM-MAE with and without norm_pix_loss, SimMIM), DINOv2's PCA is deterministic and follows the images,
its foreground option, the CLS attention is the softmax SDPA applies, curves.png, trainer.visualize_every
leaves the run bit-identical, the end-of-run pictures, and sslkit-visualize on a checkpoint."""

import functools
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import sslkit.tasks
from sslkit import checkpoint as ck
from sslkit.cli import visualize_main
from sslkit.config import compose
from sslkit.masking import blocks_to_grid
from sslkit.methods import METHODS, build_method
from sslkit.methods.base import GAP
from sslkit.methods.dinov2 import pca_rgb
from sslkit.models.um import patchify, upsample_units
from sslkit.runlog import RunLogger
from sslkit.tasks import end_pictures, run_pretrain
from sslkit.visualize import make_pictures, plot_curves
from tests.test_engine import tiny

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _cfg(name: str, *extra: str):
    return compose([*METHODS[name].test_overrides, "logger.wandb.mode=disabled", *extra])


def _method(name: str, *extra: str):
    torch.manual_seed(0)
    return build_method(_cfg(name, *extra)).eval()


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalized images whose pixels are inside [0, 1] (no clamping when shown)."""
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _panel(pic: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    y, x = row * (size + GAP), col * (size + GAP)
    return pic[y:y + size, x:x + size].astype(np.int64)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name,pictures", [("umae", {"reconstruction": 5}), ("simmim", {"reconstruction": 4}),
                                           ("dinov2", {"pca": 3, "attention": 4})])
def test_pictures_are_named_rgb_uint8_grids(name, pictures, tmp_path):
    m = _method(name)
    size, b = int(_cfg(name).method.view.size), 3
    m.train()
    paths = make_pictures(m, _images(b, size), _gen(), tmp_path, "step_7", mean=MEAN, std=STD, threshold=0.5)
    assert m.training  # restored
    assert sorted(p.name for p in paths) == sorted(f"step_7_{k}.png" for k in pictures)
    pics = m.eval().visualize(_images(b, size), _gen(), MEAN, STD, threshold=0.5)
    for k, cols in pictures.items():
        pic = pics[k]
        assert pic.dtype == np.uint8 and pic.shape == (b * size + (b - 1) * GAP, cols * size + (cols - 1) * GAP, 3)
        assert 0 < pic.std()
        png = np.asarray(Image.open(tmp_path / f"step_7_{k}.png"))
        f = png.shape[1] // pic.shape[1]  # saved enlarged by an integer factor
        assert png.shape == (pic.shape[0] * f, pic.shape[1] * f, 3) and np.array_equal(png[::f, ::f], pic)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_umae_perfect_prediction_pasted_back_is_the_input(norm_pix):
    m = _method("umae", f"method.norm_pix_loss={norm_pix}")
    x, u, size = _images(2, 64), m.unit, 64

    def perfect(z, keep_idx, masked_idx):  # the training target of the removed units
        t = patchify(x, u).gather(1, masked_idx[..., None].expand(-1, -1, u * u * 3))
        if norm_pix:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        return t

    m.forward_decoder = perfect
    pic = m.visualize(x, _gen(), MEAN, STD)["reconstruction"]
    masks = m.masking()(2, _gen())  # the same masks: the same generator
    removed = upsample_units(masks["masked"], m.grid, u)[..., 0].numpy()  # (B, H, W)
    hidden_units = torch.zeros_like(masks["masked"]).scatter(1, blocks_to_grid(masks["keep_offset"], m.grid),
                                                              masks["sm_masked"])
    hidden = upsample_units(hidden_units, m.grid, u)[..., 0].numpy()
    for b in range(2):
        orig, kept, sm, pred, pasted = [_panel(pic, b, j, size) for j in range(5)]
        assert np.abs(pasted - orig).max() <= (1 if norm_pix else 0)
        rm, hd = removed[b], hidden[b]
        assert np.abs(pred[rm] - orig[rm]).max() <= (1 if norm_pix else 0)
        grey = kept[rm][0, 0]
        assert (kept[rm] == grey).all() and (kept[~rm] == orig[~rm]).all() and (pred[~rm] == grey).all()
        assert hd.any() and (sm[hd] != grey).all() and (sm[~hd] == kept[~hd]).all() and (sm[hd] == sm[hd][0, 0]).all()


def test_simmim_perfect_reconstruction_pasted_back_is_the_input():
    m = _method("simmim")
    x = _images(2, 64)
    m.reconstruct = lambda images, masked: x  # SimMIM's target: the normalized pixels themselves
    pic = m.visualize(x, _gen(), MEAN, STD)["reconstruction"]
    removed = upsample_units(m.masking()(2, _gen())["masked"], m.grid, m.unit)[..., 0].numpy()
    for b in range(2):
        orig, kept, pred, pasted = [_panel(pic, b, j, 64) for j in range(4)]
        assert (pasted == orig).all() and (pred[removed[b]] == orig[removed[b]]).all()
        assert (kept[removed[b]] == pred[~removed[b]][0, 0]).all()
    m.reconstruct = lambda images, masked: torch.zeros_like(x)  # a wrong prediction shows
    pic = m.visualize(x, _gen(), MEAN, STD)["reconstruction"]
    assert (_panel(pic, 0, 3, 64) != _panel(pic, 0, 0, 64)).any()


def test_dinov2_pictures_are_deterministic_and_follow_the_images():
    m = _method("dinov2")
    x = _images(4, 32)
    a, b = m.visualize(x, _gen(), MEAN, STD), m.visualize(x, _gen(), MEAN, STD)
    assert a.keys() == b.keys() == {"pca", "attention"} and all(np.array_equal(a[k], b[k]) for k in a)
    perm = [2, 0, 3, 1]
    p = m.visualize(x[perm], _gen(), MEAN, STD)
    for k in a:
        for row, src in enumerate(perm):
            got, want = [pic[r * (32 + GAP):r * (32 + GAP) + 32].astype(int) for pic, r in ((p[k], row), (a[k], src))]
            assert np.abs(got - want).max() <= 1, (k, row)


def test_pca_is_sign_fixed_min_max_scaled_and_permutation_equivariant():
    f = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    rgb = pca_rgb(f)
    assert rgb.shape == (3, 16, 3) and torch.equal(rgb, pca_rgb(f))
    flat = rgb.reshape(-1, 3)
    assert torch.allclose(flat.min(0).values, torch.zeros(3)) and torch.allclose(flat.max(0).values, torch.ones(3))
    assert torch.allclose(pca_rgb(f[[2, 0, 1]]), rgb[[2, 0, 1]], atol=1e-6)
    assert torch.allclose(pca_rgb(f[:, torch.randperm(16)].flip(0)).reshape(-1, 3).sort(0).values,
                          flat.sort(0).values, atol=1e-6)  # patch order does not matter either
    assert torch.allclose(pca_rgb(f[..., [3, 1, 0, 7, 2, 6, 5, 4]]), rgb, atol=1e-6)  # signs: not eigh's whim


def test_pca_foreground_option_refits_on_the_foreground_and_blacks_out_the_rest():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 16, 8, generator=g)
    fg = torch.zeros(2, 16, dtype=torch.bool)
    fg[:, :6] = True
    f[..., 0] += torch.where(fg, 10.0, -10.0)  # the first component separates foreground from background
    out = pca_rgb(f, threshold=0.5)
    assert (out[~fg] == 0).all()
    ref = pca_rgb(f[fg].view(1, -1, 8))[0]  # the PCA of the foreground patches alone
    assert torch.allclose(out[fg], ref, atol=1e-6) and torch.allclose(out[fg].max(0).values, torch.ones(3))
    assert not torch.allclose(out[fg], pca_rgb(f)[fg], atol=1e-3)  # refitted, not the full PCA masked
    assert (pca_rgb(f, threshold=1.0) == 0).all()  # nothing above the threshold: all background


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_last_attention_is_the_softmax_sdpa_applies(reg_tokens):
    net = timm.create_model("sslkit_vit_test", reg_tokens=reg_tokens).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = net.last_attention(x)
        seen = {}
        net.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.setdefault("t", args[0]))
        net.forward_features(x)
    assert a.shape == (2, 3, 1 + reg_tokens + 64)
    assert torch.allclose(a.sum(-1), torch.ones(2, 3), atol=1e-6)
    blk, t = net.blocks[-1], seen["t"]  # (B, N, C) tokens entering the last block
    y = F.layer_norm(t, (48,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    q, k, v = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(48, dim=-1)
    for h in range(3):
        s = slice(16 * h, 16 * (h + 1))
        logits = torch.einsum("bc,bnc->bn", q[:, 0, s], k[:, :, s]) / math.sqrt(16)
        assert torch.allclose(a[:, h], logits.exp() / logits.exp().sum(-1, keepdim=True), atol=1e-6)
        heads = [z[:, :, s].unsqueeze(1) for z in (q, k, v)]
        sdpa = F.scaled_dot_product_attention(*heads)[:, 0, 0]  # the CLS row SDPA computes
        assert torch.allclose(torch.einsum("bn,bnc->bc", a[:, h], v[:, :, s]), sdpa, atol=1e-5)


def test_curves_png_from_metrics_jsonl(tmp_path):
    rows = [{"step": s, "time": 0.0, "loss": 1.0 / s, "loss_rec": 1.0 / s, "lr": 1e-3 * s, "wd": 0.05,
             "images_per_s": 100.0 + s, "epoch": s / 4, "teacher_entropy": 5.0 - s / 10,
             **({"knn_top1": 10.0 * s, "knn_top5": 20.0 * s} if s % 2 == 0 else {})} for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "pics" / "curves.png")
    img = Image.open(out)
    assert out.is_file() and img.format == "PNG" and img.size[0] > 600 and img.size[1] > 300
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png").is_file()


def test_visualize_every_writes_pictures_and_leaves_training_bit_identical(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(RunLogger, "log_images", lambda self, step, pics: logged.append((step, sorted(pics))))
    base = tiny("model.drop_path_rate=0.2", "trainer.log_every=2", "trainer.max_steps=4")  # drop path: the RNG
    run_pretrain(compose(base), tmp_path / "off")
    run_pretrain(compose(base + ["trainer.visualize_every=3"]), tmp_path / "on")
    pics = tmp_path / "on" / "pictures"
    assert sorted(p.name for p in pics.iterdir()) == ["curves.png", "step_3_reconstruction.png",
                                                      "step_4_reconstruction.png"]  # every 3 and at the end
    assert logged == [(3, ["curves", "reconstruction"]), (4, ["curves", "reconstruction"])]
    assert not (tmp_path / "off" / "pictures").exists()
    a = ck.load(tmp_path / "off" / "checkpoints" / "last.pt")["model"]
    b = ck.load(tmp_path / "on" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("off", "on")]
    assert [json.loads(r)["loss"] for r in rows[0]] == [json.loads(r)["loss"] for r in rows[1]]


def test_run_pretrain_ends_saying_where_the_pictures_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sslkit.tasks, "summarize", lambda *a, **k: {})  # (tested elsewhere; slow)
    ov = [x for x in tiny("trainer.max_steps=2") if x != "trainer.summary=false"]
    cfg = compose(ov)
    result = run_pretrain(cfg, tmp_path)
    said = f"[sslkit] pictures: {tmp_path / 'pictures'}/ (step_2_reconstruction.png, curves.png)"
    assert said in capsys.readouterr().out
    first = (tmp_path / "pictures" / "step_2_reconstruction.png").stat().st_mtime_ns
    end_pictures(cfg, result.run_dir, result.step, result.method)  # already there (as trainer.visualize_every leaves them): not drawn again
    assert said in capsys.readouterr().out
    assert first == (tmp_path / "pictures" / "step_2_reconstruction.png").stat().st_mtime_ns


@pytest.fixture(scope="module")
def dinov2_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("dino")
    run_pretrain(compose(tiny("experiment=dinov2_demo", "data.num_samples=16", "trainer.max_steps=1")), d)
    return d / "checkpoints" / "last.pt"


def test_sslkit_visualize_writes_a_checkpoints_pictures(dinov2_ckpt, tmp_path, capsys):
    visualize_main([f"checkpoint={dinov2_ckpt}", f"out={tmp_path / 'pics'}", "n=2", "threshold=0.5"])
    names = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert names == ["curves.png", "step_1_attention.png", "step_1_pca.png"]
    pca = np.asarray(Image.open(tmp_path / "pics" / "step_1_pca.png"))
    f = pca.shape[0] // (2 * 32 + GAP)  # 2 images, 3 panels (original | PCA | foreground PCA)
    assert pca.shape[:2] == ((2 * 32 + GAP) * f, (3 * 32 + 2 * GAP) * f)
    assert "[sslkit] pictures of" in capsys.readouterr().out
    visualize_main([f"checkpoint={dinov2_ckpt}", "n=1", "data.num_samples=8", "data.num_workers=0"])  # default out
    assert (dinov2_ckpt.parent.parent / "pictures" / "step_1_pca.png").is_file()
    with pytest.raises(SystemExit) as e:
        visualize_main([f"checkpoint={dinov2_ckpt}", "k=3"])
    assert e.value.code == 2 and "does not take ['k']" in capsys.readouterr().err


def test_visualize_sits_between_the_methods_and_evaluation():
    from tests.test_architecture import import_graph

    graph = import_graph()
    assert "sslkit.methods" in graph["sslkit.visualize"]
    above = {"sslkit.config", "sslkit.evaluation", "sslkit.engine", "sslkit.tasks", "sslkit.cli", "sslkit.export"}
    assert not graph["sslkit.visualize"] & above
    assert not any("sslkit.visualize" in graph[m] for m in graph if m.startswith(("sslkit.methods", "sslkit.models")))
