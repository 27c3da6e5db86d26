"""Batched photometric augmentation for the multi-crop view: the same results as torchvision's per-crop
transforms, computed once per batch.

On CPU, DINOv2's view spends most of its time in per-crop Python overhead: every one of the 6-10 crops
of an image runs ColorJitter (four ops, the hue one through HSV), RandomGrayscale, GaussianBlur and
RandomSolarize as separate small-tensor calls. Here each crop *draws* its parameters exactly as
torchvision's transforms would (same generator calls in the same order, so the same numbers), and the
ops run afterwards on the stacked crops of the whole batch with per-crop factors. Every op reproduces
torchvision 0.29's uint8 kernel arithmetic (``adjust_*_image``, ``rgb_to_grayscale``, ``gaussian_blur``
with reflect padding and rounding, ``solarize``), so a batch equals the per-crop pipeline's output
(tested exactly).

Parameters of one crop, a float32 row of ``N_PARAMS`` (``PARAM`` names the columns)::

    jitter (0/1), order of the four jitter ops (4 ints, a permutation: 0 brightness, 1 contrast,
    2 saturation, 3 hue), brightness, contrast, saturation, hue factors (neutral when not drawn),
    grayscale (0/1), blur (0/1), blur sigma, solarize (0/1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import to_dtype
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv  # torchvision's own HSV round trip

N_PARAMS = 13
PARAM = {"jitter": 0, "order": slice(1, 5), "brightness": 5, "contrast": 6, "saturation": 7, "hue": 8,
         "gray": 9, "blur": 10, "sigma": 11, "solarize": 12}
_NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing


def _range(value: float, center: float, bound: Optional[tuple[float, float]] = None) -> Optional[tuple[float, float]]:
    """torchvision ColorJitter's ``_check_input`` for a scalar: the factor range, or None when it is a no-op."""
    lo, hi = center - value, center + value
    if bound is not None:
        lo = max(lo, bound[0])
    return None if lo == hi == center else (lo, hi)


@dataclass(frozen=True)
class Photometric:
    """One crop branch's photometric settings (as ``views._crop_transform`` builds them)."""

    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue strengths
    jitter_p: float
    gray_p: float
    blur_p: float
    sigma: tuple[float, float]
    solarize_p: float
    kernel_size: int

    def ranges(self) -> list[Optional[tuple[float, float]]]:
        b, c, s, h = self.jitter
        return [_range(b, 1.0, (0.0, float("inf"))), _range(c, 1.0, (0.0, float("inf"))),
                _range(s, 1.0, (0.0, float("inf"))), _range(h, 0.0)]

    def draw(self) -> Tensor:
        """This crop's parameters from torch's global generator, drawn with the calls torchvision makes
        (RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur), RandomSolarize) -> (N_PARAMS,)."""
        p = torch.zeros(N_PARAMS)
        p[PARAM["order"]] = torch.arange(4, dtype=torch.float32)
        p[5:9] = torch.tensor(_NEUTRAL)
        if torch.rand(1) < self.jitter_p:  # RandomApply: skipped when rand >= p
            p[PARAM["jitter"]] = 1.0
            p[PARAM["order"]] = torch.randperm(4).float()
            for k, r in enumerate(self.ranges()):
                if r is not None:
                    p[5 + k] = float(torch.empty(1).uniform_(r[0], r[1]).item())
        p[PARAM["gray"]] = float(not torch.rand(1) >= self.gray_p)
        if torch.rand(1) < self.blur_p:
            p[PARAM["blur"]] = 1.0
            p[PARAM["sigma"]] = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        if self.solarize_p > 0.0:  # the transform is only in the pipeline then
            p[PARAM["solarize"]] = float(not torch.rand(1) >= self.solarize_p)
        return p


# ----------------------------------------------------------------------------------------- ops on uint8
def _gray_float(x: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 -> (N, 1, H, W) float32 luma, as torchvision's ``_rgb_to_grayscale_image``."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's ``_blend`` with a per-crop ratio (N,): x * r + other * (1 - r), clamped, to uint8. The
    second term is added crop by crop with ``add_(alpha=)`` as torchvision does (its kernel may fuse the
    multiply-add, so a separate multiply can differ by one grey level after truncation)."""
    out = x.mul(ratio.view(-1, 1, 1, 1))  # (N, 3, H, W) float32
    for i, r in enumerate(ratio.tolist()):
        out[i].add_(other[i], alpha=1.0 - r)
    return out.clamp_(0, 255).to(torch.uint8)


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return x.mul(f.view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)


def contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray_float(x).floor_().mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    return _blend(x, mean, f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray_float(x).floor_(), f)


def hue(x: Tensor, f: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(to_dtype(x, torch.float32, scale=True))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(f.view(-1, 1, 1)).remainder_(1.0)
    return to_dtype(_hsv_to_rgb(torch.stack((h, s, v), dim=-3)), torch.uint8, scale=True)


def grayscale(x: Tensor) -> Tensor:
    return _gray_float(x).to(torch.uint8).expand(x.shape).contiguous()


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-crop sigma: one depthwise conv over all crops' channels, reflect padding, rounded to uint8."""
    n, c, hgt, wid = x.shape
    lim = (kernel_size - 1) / (2.0 * 2.0 ** 0.5)
    pts = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32)
    k1 = torch.softmax(pts.view(1, -1).div(sigma.view(-1, 1)).pow(2).neg(), dim=1)  # (N, k), per crop
    k2 = (k1.unsqueeze(-1) * k1.unsqueeze(-2)).repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k)
    pad = kernel_size // 2
    y = F.pad(x.to(torch.float32).reshape(1, n * c, hgt, wid), [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(y, k2, groups=n * c).reshape(n, c, hgt, wid).round_().to(torch.uint8)


def solarize(x: Tensor) -> Tensor:
    return torch.where(x >= 128, 255 - x, x)


_JITTER_OPS = (brightness, contrast, saturation, hue)


def apply(x: Tensor, params: Tensor, kernel_size: int) -> Tensor:
    """Crops (N, 3, H, W) uint8 with their parameter rows (N, N_PARAMS) -> (N, 3, H, W) uint8."""
    x = x.clone()
    jitter = params[:, PARAM["jitter"]] > 0
    order = params[:, PARAM["order"]].long()  # (N, 4)
    for pos in range(4):  # ColorJitter's random order, crop by crop
        for op_id, op in enumerate(_JITTER_OPS):
            sel = (jitter & (order[:, pos] == op_id)).nonzero().flatten()
            if len(sel):
                x[sel] = op(x[sel], params[sel, 5 + op_id])
    sel = (params[:, PARAM["gray"]] > 0).nonzero().flatten()
    if len(sel):
        x[sel] = grayscale(x[sel])
    sel = (params[:, PARAM["blur"]] > 0).nonzero().flatten()
    if len(sel):
        x[sel] = gaussian_blur(x[sel], params[sel, PARAM["sigma"]], kernel_size)
    sel = (params[:, PARAM["solarize"]] > 0).nonzero().flatten()
    if len(sel):
        x[sel] = solarize(x[sel])
    return x
