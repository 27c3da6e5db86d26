"""DINOv2 multi-crop views: crop shapes and recipe, view-major batches, determinism, config errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sslkit.config import DataConfig, MultiCropViewConfig, ViewConfig
from sslkit.data import VIEWS, build_multicrop_view, build_pretrain_loader, build_source, build_view
from sslkit.data.loader import _VIEW, derive_seed
from sslkit.data.views import blur_kernel_size
from sslkit.errors import ConfigError
from sslkit.masking import BlockMasking

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIEW = MultiCropViewConfig(size=32, local_size=16, n_global=2, n_local=3)
# every augmentation off and the crop = the whole image: crops are deterministic resizes
PLAIN = replace(VIEW, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0), solarize_prob=0.0)


def _synthetic(n: int = 64, batch_size: int = 4, num_workers: int = 0) -> tuple[object, DataConfig]:
    cfg = DataConfig(name="synthetic", num_samples=n, image_size=32, batch_size=batch_size, num_workers=num_workers)
    return build_source(cfg), cfg


from tests.data.test_loader import _assert_same, _take  # noqa: E402  (shared loader-test helpers)


def _crops(view_cfg: MultiCropViewConfig, img: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_multicrop_view(view_cfg, MEAN, STD)(img)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalized -> [0, 255] floats."""
    return (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255.0


# ----------------------------------------------------------------------------------------- the view
def test_view_shapes_and_dtypes() -> None:
    src, _ = _synthetic()
    out = _crops(VIEW, src[0][0])
    assert set(out) == {"global_crops", "local_crops"}
    assert out["global_crops"].shape == (2, 3, 32, 32) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (3, 3, 16, 16) and out["local_crops"].dtype == torch.float32
    assert type(out["global_crops"]) is torch.Tensor  # plain tensors, not tv_tensors.Image
    assert not torch.equal(out["global_crops"][0], out["global_crops"][1])  # independent crops
    # same generator state -> same crops; PIL input gives the same as the uint8 tensor
    assert torch.equal(_crops(VIEW, src[0][0])["local_crops"], out["local_crops"])
    from torchvision.transforms.v2.functional import to_pil_image
    pil = _crops(VIEW, to_pil_image(src[0][0]))
    assert torch.equal(pil["global_crops"], out["global_crops"])
    none = _crops(replace(VIEW, n_local=0), src[0][0])
    assert none["local_crops"].shape == (0, 3, 16, 16)


def test_plain_view_is_normalized_resize() -> None:
    src, _ = _synthetic()
    img = src[3][0]  # (3, 32, 32) uint8
    out = _crops(PLAIN, img, seed=5)
    for v in range(2):
        assert torch.allclose(_unnormalize(out["global_crops"][v]), img.float(), atol=1e-3)
    assert torch.equal(out["local_crops"][0], out["local_crops"][2])  # the same 16-px resize


def test_blur_probabilities_per_crop() -> None:
    """blur_prob = (first global, other globals, locals): each entry changes exactly its crops."""
    src, _ = _synthetic()
    img = src[1][0]
    base = replace(VIEW, n_global=3, blur_prob=(0.0, 0.0, 0.0), blur_sigma=(1.0, 2.0))  # visible blurs
    ref = _crops(base, img, seed=3)

    def changed(blur: tuple[float, float, float]) -> tuple[list[bool], list[bool]]:
        out = _crops(replace(base, blur_prob=blur), img, seed=3)
        return ([not torch.equal(out["global_crops"][i], ref["global_crops"][i]) for i in range(3)],
                [not torch.equal(out["local_crops"][i], ref["local_crops"][i]) for i in range(3)])

    assert changed((1.0, 0.0, 0.0)) == ([True, False, False], [False] * 3)
    assert changed((0.0, 1.0, 0.0)) == ([False, True, True], [False] * 3)
    assert changed((0.0, 0.0, 1.0)) == ([False] * 3, [True] * 3)
    # and it is a blur: less pixel-to-pixel variation than the unblurred crop
    out = _crops(replace(base, blur_prob=(1.0, 0.0, 0.0)), img, seed=3)
    tv = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(out["global_crops"][0]) < 0.8 * tv(ref["global_crops"][0])


def test_solarize_second_global_crop_only() -> None:
    src, _ = _synthetic()
    img = src[2][0]
    three = replace(PLAIN, n_global=3)
    ref = _crops(three, img)
    out = _crops(replace(three, solarize_prob=1.0), img)
    assert torch.equal(out["global_crops"][0], ref["global_crops"][0])
    assert torch.equal(out["global_crops"][2], ref["global_crops"][2])
    assert torch.equal(out["local_crops"], ref["local_crops"])
    x = img.float()
    expected = torch.where(x >= 128, 255.0 - x, x)  # solarize: invert pixels >= 128 (of 255)
    assert torch.allclose(_unnormalize(out["global_crops"][1]), expected, atol=1e-3)
    assert not torch.equal(out["global_crops"][1], ref["global_crops"][1])
    # with the full recipe, solarize_prob changes the second global crop only, too
    a, b = _crops(VIEW, img, seed=9), _crops(replace(VIEW, solarize_prob=1.0), img, seed=9)
    assert torch.equal(a["global_crops"][0], b["global_crops"][0]) and torch.equal(a["local_crops"], b["local_crops"])


def test_blur_kernel_size() -> None:
    assert [blur_kernel_size(s) for s in (16, 32, 96, 98, 224)] == [3, 3, 9, 9, 23]


def test_build_view_dispatch() -> None:
    assert set(VIEWS) == {"mae", "multicrop"}
    src, _ = _synthetic()
    assert build_view(ViewConfig(size=24), MEAN, STD)(src[0][0]).shape == (3, 24, 24)
    assert isinstance(build_view(VIEW, MEAN, STD)(src[0][0]), dict)
    with pytest.raises(ConfigError, match=r"method.view.kind must be one of \['mae', 'multicrop'\]"):
        build_view(replace(VIEW, kind="simclr"), MEAN, STD)


@pytest.mark.parametrize("change,match", [
    ({"size": 0}, r"method.view.size must be >= 1"),
    ({"local_size": -16}, r"method.view.local_size must be >= 1"),
    ({"n_global": 0}, r"method.view.n_global must be >= 1"),
    ({"n_local": -1}, r"method.view.n_local must be >= 0"),
    ({"global_scale": (0.0, 1.0)}, r"method.view.global_scale .*0 < min <= max <= 1"),
    ({"local_scale": (0.5, 0.2)}, r"method.view.local_scale"),
    ({"local_scale": (0.5, 1.5)}, r"method.view.local_scale"),
    ({"ratio": (1.5, 1.0)}, r"method.view.ratio"),
    ({"hflip": 1.5}, r"method.view.hflip is a probability: set it in \[0, 1\]"),
    ({"color_jitter_prob": -0.1}, r"method.view.color_jitter_prob"),
    ({"grayscale_prob": 2.0}, r"method.view.grayscale_prob"),
    ({"blur_prob": (1.0, 0.1, 1.5)}, r"method.view.blur_prob is a probability"),
    ({"blur_prob": (1.0, 0.1)}, r"method.view.blur_prob needs 3 numbers"),
    ({"solarize_prob": 1.2}, r"method.view.solarize_prob"),
    ({"blur_sigma": (0.0, 1.0)}, r"method.view.blur_sigma"),
    ({"color_jitter": (0.4, 0.4, 0.2, 0.7)}, r"method.view.color_jitter .*hue <= 0.5"),
    ({"interpolation": "lanczos"}, r"method.view.interpolation"),
])
def test_config_errors(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_multicrop_view(replace(VIEW, **change), MEAN, STD)


# ----------------------------------------------------------------------------------------- loader
def test_batch_format_and_masks() -> None:
    src, cfg = _synthetic(batch_size=4)
    mask = BlockMasking(grid=(4, 4), n_global=2, mask_probability=0.5, min_patches=1)
    with build_pretrain_loader(src, cfg, VIEW, mask, seed=0) as ld:
        b = _take(ld, 1)[0]
    assert set(b) == {"global_crops", "local_crops", "labels", "index", "masked"}
    assert b["global_crops"].shape == (8, 3, 32, 32) and b["global_crops"].dtype == torch.float32
    assert b["local_crops"].shape == (12, 3, 16, 16) and b["local_crops"].dtype == torch.float32
    assert b["labels"].shape == (4,) and b["index"].shape == (4,)
    assert b["masked"].shape == (8, 16) and b["masked"].dtype == torch.bool
    assert int(b["masked"].any(1).sum()) == 4
    with build_pretrain_loader(src, cfg, replace(VIEW, n_local=0), None, seed=0) as ld:
        b = _take(ld, 1)[0]
    assert set(b) == {"global_crops", "labels", "index"}  # no empty local_crops key


def test_view_major_order_plain() -> None:
    """Crops are deterministic resizes: row v * B + b must come from sample b."""
    src, cfg = _synthetic(batch_size=4)
    with build_pretrain_loader(src, cfg, PLAIN, None, seed=0) as ld:
        b = _take(ld, 1)[0]
    view = build_multicrop_view(PLAIN, MEAN, STD)
    for pos, i in enumerate(b["index"].tolist()):
        ref = view(src[i][0])
        for v in range(2):
            assert torch.equal(b["global_crops"][v * 4 + pos], ref["global_crops"][v])
        for v in range(3):
            assert torch.equal(b["local_crops"][v * 4 + pos], ref["local_crops"][v])


def test_view_major_order_with_augmentations() -> None:
    """Full recipe: each sample's crops are the view under its (seed, rank, g, position) seed."""
    src, cfg = _synthetic(batch_size=4)
    with build_pretrain_loader(src, cfg, VIEW, None, seed=11) as ld:
        batches = _take(ld, 2)
    view = build_multicrop_view(VIEW, MEAN, STD)
    for g, b in enumerate(batches):
        for pos, i in enumerate(b["index"].tolist()):
            torch.manual_seed(derive_seed(11, _VIEW, 0, g, pos))
            ref = view(src[i][0])
            for v in range(2):
                assert torch.equal(b["global_crops"][v * 4 + pos], ref["global_crops"][v])
            for v in range(3):
                assert torch.equal(b["local_crops"][v * 4 + pos], ref["local_crops"][v])


def test_workers_do_not_change_batches() -> None:
    src, cfg = _synthetic(batch_size=4)
    mask = BlockMasking(grid=(4, 4), min_patches=1)
    with build_pretrain_loader(src, cfg, VIEW, mask, seed=1) as ld:
        a = _take(ld, 3)
    with build_pretrain_loader(src, replace(cfg, num_workers=2), VIEW, mask, seed=1) as ld:
        b = _take(ld, 3)
    _assert_same(a, b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(num_workers: int) -> None:
    src, cfg = _synthetic(n=24, batch_size=4, num_workers=num_workers)  # 6 batches per epoch
    mask = BlockMasking(grid=(4, 4), min_patches=1)
    N, M = 4, 4  # crosses the epoch boundary
    with build_pretrain_loader(src, cfg, VIEW, mask, seed=7) as ld:
        full = _take(ld, N + M)
    with build_pretrain_loader(src, cfg, VIEW, mask, seed=7) as ld:
        head = _take(ld, N)
        start = ld.state_dict()["batches_consumed"]
    with build_pretrain_loader(src, cfg, VIEW, mask, seed=7, start_batch=start) as ld:
        tail = _take(ld, M)
    _assert_same(full, head + tail)


def test_global_rng_untouched() -> None:
    src, cfg = _synthetic(batch_size=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with build_pretrain_loader(src, cfg, VIEW, None, seed=0) as ld:
        _take(ld, 2)
    assert torch.equal(torch.get_rng_state(), state)
