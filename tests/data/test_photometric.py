"""The batched photometric stage of the multi-crop view equals torchvision's per-crop transforms exactly:
each op against torchvision's functional kernel, the whole view against the per-crop v2.Compose pipeline
it replaced (same seeds, same draws), and a loader batch against the per-image view."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from sslkit.config import compose
from sslkit.data import photometric as P
from sslkit.data.loader import stack_views
from sslkit.data.views import _to_plain, blur_kernel_size, build_view, interpolation

N = 48


@pytest.fixture(scope="module")
def crops():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(N, 3, 12, 12, generator=g) * 256).clamp(0, 255).to(torch.uint8)
    x[0] = 0  # flat crops (hue / contrast edge cases)
    x[1] = 255
    x[2] = x[2, :1]  # grey
    return x, g


def _per_crop(fn, x, factors):
    return torch.stack([fn(x[i], float(factors[i])) for i in range(len(x))])


@pytest.mark.parametrize("name, ours, theirs, lo, hi", [
    ("brightness", P.brightness, TF.adjust_brightness, 0.6, 1.4),
    ("contrast", P.contrast, TF.adjust_contrast, 0.0, 2.0),
    ("saturation", P.saturation, TF.adjust_saturation, 0.0, 2.0),
    ("hue", P.hue, TF.adjust_hue, -0.5, 0.5),
])
def test_jitter_ops_equal_torchvision(crops, name, ours, theirs, lo, hi):
    x, g = crops
    f = torch.empty(N).uniform_(lo, hi, generator=g)
    assert torch.equal(ours(x, f), _per_crop(theirs, x, f)), name


def test_grayscale_blur_solarize_equal_torchvision(crops):
    x, g = crops
    assert torch.equal(P.grayscale(x), torch.stack([TF.rgb_to_grayscale(c, 3) for c in x]))
    assert torch.equal(P.solarize(x), torch.stack([TF.solarize(c, 128) for c in x]))
    sigma = torch.empty(N).uniform_(0.1, 2.0, generator=g)
    for k in (3, 5):
        ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(N)])
        assert torch.equal(P.gaussian_blur(x, sigma, k), ref)


def _torchvision_branches(vc, mean, std):
    """The per-crop pipeline the view had before (torchvision transforms, one Compose per crop)."""
    ratio, interp = tuple(vc.ratio), interpolation(vc.interpolation)

    def branch(size, scale, blur_p, sol_p):
        steps = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interp, antialias=True),
                 v2.RandomHorizontalFlip(vc.hflip), v2.RandomApply([v2.ColorJitter(*vc.color_jitter)], p=vc.color_jitter_prob),
                 v2.RandomGrayscale(vc.grayscale_prob),
                 v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=tuple(vc.blur_sigma))], p=blur_p)]
        if sol_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=sol_p))
        return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), _to_plain])

    out = [branch(vc.size, tuple(vc.global_scale), vc.blur_prob[0] if i == 0 else vc.blur_prob[1],
                  vc.solarize_prob if i == 1 else 0.0) for i in range(vc.n_global)]
    return out + [branch(vc.local_size, tuple(vc.local_scale), vc.blur_prob[2], 0.0) for _ in range(vc.n_local)]


@pytest.mark.parametrize("overrides", [
    [],
    ["method.view.color_jitter=[0.4,0.4,0.4,0.5]", "method.view.color_jitter_prob=1.0", "method.view.grayscale_prob=0.5",
     "method.view.solarize_prob=0.5", "method.view.n_local=2"],
    ["method.view.n_local=0", "method.view.color_jitter=[0.0,0.3,0.0,0.0]"],
])
def test_view_equals_the_per_crop_torchvision_pipeline(overrides):
    cfg = compose(["experiment=dinov2_demo", *overrides])
    vc, mean, std = cfg.method.view, list(cfg.data.mean), list(cfg.data.std)
    view, branches = build_view(vc, mean, std), _torchvision_branches(vc, mean, std)
    g = torch.Generator().manual_seed(1)
    for t in range(60):
        img = (torch.rand(3, 40, 36, generator=g) * 256).clamp(0, 255).to(torch.uint8)
        torch.manual_seed(t)
        ours = view(img)
        torch.manual_seed(t)
        seeds = torch.randint(0, 2**62, (len(branches),)).tolist()
        ref = []
        for seed, b in zip(seeds, branches):
            torch.default_generator.manual_seed(seed)
            ref.append(b(v2.functional.to_image(img)))
        assert torch.equal(ours["global_crops"], torch.stack(ref[: vc.n_global]))
        if vc.n_local:
            assert torch.equal(ours["local_crops"], torch.stack(ref[vc.n_global:]))
        else:
            assert ours["local_crops"].shape == (0, 3, vc.local_size, vc.local_size)


def test_a_batch_equals_the_per_image_view():
    cfg = compose(["experiment=dinov2_demo"])
    view = build_view(cfg.method.view, list(cfg.data.mean), list(cfg.data.std))
    imgs = [(torch.rand(3, 32, 32) * 255).to(torch.uint8) for _ in range(6)]
    per_image, stages = [], []
    for i, img in enumerate(imgs):
        torch.manual_seed(i)
        per_image.append(view(img))
        torch.manual_seed(i)
        stages.append(view.crops(img))
    batch = view.finish(stack_views(stages))
    assert set(batch) == {"global_crops", "local_crops"}  # the parameter rows are consumed
    assert torch.equal(batch["global_crops"], stack_views(per_image)["global_crops"])
    assert torch.equal(batch["local_crops"], stack_views(per_image)["local_crops"])
