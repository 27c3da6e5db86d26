"""The built-in synthetic source: procedurally generated, class-structured images.

Each class is one (shape, texture) pair: the shape's silhouette (circle, square, triangle, ...) is
filled with a two-colour texture (stripes, checker, dots, ...). Everything else is nuisance that
varies per image: the two foreground colours, position (anywhere the shape fits), scale (radius
0.5-0.9 of the half image), rotation (+-20 deg), texture frequency and phase, pixel noise, and the
background: a smooth random colour field (bilinear over a 4 x 4 grid of random colours), so the
background's colour differs from place to place and from crop to crop of one image and is not a
shortcut for a method that compares crops. Raw pixels are dominated by the nuisance: in the demos'
summaries (4000 -> 1000 evaluation images, 8 classes, chance 12.5%) raw-pixel kNN is 22.5% (64 px) /
23.5% (32 px) and a linear probe on raw pixels 17.2% / 18.3%, so a probe on a pretrained encoder's
features is a meaningful check.

Images are a pure function of (seed, index, num_classes, image_size), independent of chunking,
workers and access order: each image draws its parameters and pixel noise from its own stream.
Rendering is vectorized numpy over chunks of indices (~0.27 ms per 64x64 image), cached lazily per
process.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sslkit.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "frame", "halfdisc")
TEXTURES = ("hstripes", "vstripes", "diagonal", "checker", "dots", "solid", "grain", "rings")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_GRAIN = 6  # grain texture: a GRAIN x GRAIN grid of random cells
_BG_CELLS = 4  # the background colour field: bilinear over a BG_CELLS x BG_CELLS grid of random colours
_N_PARAMS = 12 + _GRAIN * _GRAIN + 3 * _BG_CELLS * _BG_CELLS  # uniforms drawn per image
_CACHE_BYTES = 512 * 2**20  # cache the whole set per process when it is at most this big
# nuisance ranges
R_MIN, R_MAX = 0.5, 0.9  # shape radius, fraction of the half image
POS_RANGE = 1.0  # centre offset, fraction of the room left by the radius (1: anywhere the shape fits)
BG_MID, BG_RANGE = 0.5, 1.0  # background cell colours = MID + RANGE * (U - 0.5)
FG_MID, FG_RANGE = 0.5, 1.0  # first foreground colour, same form
NOISE = 12.0  # pixel noise: uniform in +-NOISE grey levels


def class_family(c: int) -> tuple[int, int]:
    """Class ``c`` -> (shape id, texture id). Classes 0..7 use each shape and each texture once;
    later classes combine them differently, so up to 64 classes are distinct pairs."""
    s, t = len(SHAPES), len(TEXTURES)
    q, r = divmod(c, s)
    return r, (r + q) % t


_FAMILIES = np.array([class_family(c) for c in range(MAX_CLASSES)], dtype=np.int64)  # (64, 2)


def class_names(num_classes: int) -> list[str]:
    out = []
    for c in range(num_classes):
        s, t = class_family(c)
        out.append(f"{SHAPES[s]}-{TEXTURES[t]}")
    return out


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) bilinear weights from cell centres to pixel centres (clamped at the edges)."""
    t = np.clip((np.arange(size, dtype=np.float32) + 0.5) * (cells / size) - 0.5, 0, cells - 1)
    lo = np.minimum(np.floor(t).astype(np.int64), cells - 2)
    frac = t - lo
    w = np.zeros((size, cells), np.float32)
    w[np.arange(size), lo] = 1 - frac
    w[np.arange(size), lo + 1] += frac
    return w


def _sdf(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like value (negative inside) in shape-local units; u, v: (n, S, S)."""
    au, av = np.abs(u), np.abs(v)
    if shape == 0:  # circle
        return np.sqrt(u * u + v * v) - 0.95
    if shape == 1:  # square
        return np.maximum(au, av) - 0.8
    if shape == 2:  # triangle, apex up (v grows downwards)
        return np.maximum(v - 0.55, (math.sqrt(3.0) * au - v) * 0.5 - 0.55)
    if shape == 3:  # cross
        return np.minimum(np.maximum(au - 0.3, av - 0.95), np.maximum(av - 0.3, au - 0.95))
    if shape == 4:  # ring
        return np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.27
    if shape == 5:  # diamond
        return (au + av - 1.05) * (1.0 / math.sqrt(2.0))
    if shape == 6:  # square frame
        return np.abs(np.maximum(au, av) - 0.65) - 0.2
    if shape == 7:  # half disc (flat side up)
        return np.maximum(np.sqrt(u * u + v * v) - 1.0, -v - 0.1)
    raise AssertionError(shape)


def _wave(a: np.ndarray, sharp: float = 3.0) -> np.ndarray:
    """Soft-edged square wave of phase ``a`` (in cycles), in [0, 1] (a clipped triangle wave)."""
    tri = np.abs((a - np.floor(a)) * 4.0 - 2.0) - 1.0  # [-1, 1]
    return np.clip(tri * sharp + 0.5, 0.0, 1.0)


def _texture(tex: int, u: np.ndarray, v: np.ndarray, freq: np.ndarray, phase: np.ndarray,
             grain: np.ndarray) -> np.ndarray:
    """Mixing weight in [0, 1] between the two foreground colours.

    u, v: (n, S, S) shape-local coordinates; freq, phase: (n, 1, 1); grain: (n, GRAIN*GRAIN).
    """
    if tex == 0:  # horizontal stripes
        return _wave(freq * v * 0.5 + phase)
    if tex == 1:  # vertical stripes
        return _wave(freq * u * 0.5 + phase)
    if tex == 2:  # diagonal stripes
        return _wave(freq * (u + v) * 0.3536 + phase)
    if tex == 3:  # checker
        a, b = freq * u * 0.25 + phase, freq * v * 0.25 + phase
        a = (np.abs((a - np.floor(a)) * 4.0 - 2.0) - 1.0) * (np.abs((b - np.floor(b)) * 4.0 - 2.0) - 1.0)
        return np.clip(a * 4.0 + 0.5, 0.0, 1.0)
    if tex == 4:  # dots on a lattice
        du, dv = freq * u * 0.5 + phase, freq * v * 0.5 + phase
        du, dv = du - np.floor(du) - 0.5, dv - np.floor(dv) - 0.5
        return np.clip((0.3 - np.sqrt(du * du + dv * dv)) * 12.0 + 0.5, 0.0, 1.0)
    if tex == 5:  # solid
        return np.ones_like(u)
    if tex == 6:  # random blocky grain
        iu = np.clip(((u + 1.0) * (0.5 * _GRAIN)).astype(np.int64), 0, _GRAIN - 1)
        iv = np.clip(((v + 1.0) * (0.5 * _GRAIN)).astype(np.int64), 0, _GRAIN - 1)
        return np.take_along_axis(grain, (iv * _GRAIN + iu).reshape(len(u), -1), axis=1).reshape(u.shape)
    if tex == 7:  # concentric rings
        return _wave(freq * np.sqrt(u * u + v * v) * 0.5 + phase)
    raise AssertionError(tex)


def render(seed: int, indices: np.ndarray, num_classes: int, size: int) -> np.ndarray:
    """Render images ``indices`` -> (n, 3, size, size) uint8. Label of index i is ``i % num_classes``.

    Image i is a pure function of (seed, i, num_classes, size): its parameters and its pixel noise
    come from its own random stream.
    """
    n = len(indices)
    f32 = np.float32
    streams = [np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, int(i)]) for i in indices]
    p = np.stack([g.random(_N_PARAMS, dtype=f32) for g in streams]).reshape(n, _N_PARAMS)  # (n, P)
    fam = _FAMILIES[np.asarray(indices) % num_classes]  # (n, 2) shape id, texture id
    col = lambda j: p[:, j].reshape(n, 1, 1)  # noqa: E731

    # nuisance parameters: (n, 1, 1) scalars, (n, 3) colours
    r = R_MIN + (R_MAX - R_MIN) * col(0)  # shape radius, fraction of the half image
    cx = (2 * col(1) - 1) * (1 - r) * POS_RANGE
    cy = (2 * col(2) - 1) * (1 - r) * POS_RANGE
    theta = (2 * col(3) - 1) * f32(math.radians(20))
    freq = 3.0 + 3.0 * col(4)  # texture cycles per shape diameter
    phase = col(5)
    fg1 = FG_MID + FG_RANGE * (p[:, 6:9] - 0.5)  # first foreground colour
    fg2 = 1.0 - p[:, 9:12] * 0.6 - fg1 * 0.4  # second, roughly complementary: textures stay visible
    g_end = 12 + _GRAIN * _GRAIN
    grain = p[:, 12:g_end]  # (n, GRAIN*GRAIN)
    cells = BG_MID + BG_RANGE * (p[:, g_end:].reshape(n, 3, _BG_CELLS, _BG_CELLS) - 0.5)  # background grid

    lin = ((np.arange(size, dtype=f32) + 0.5) * (2.0 / size) - 1.0).astype(f32)
    y, x = lin.reshape(1, size, 1), lin.reshape(1, 1, size)
    dx, dy = x - cx, y - cy  # (n, S, S)
    c, s = np.cos(theta) / r, np.sin(theta) / r
    u = dx * c + dy * s  # shape-local coordinates, (n, S, S)
    v = dy * c - dx * s

    d = np.empty((n, size, size), f32)
    t = np.empty((n, size, size), f32)
    for k in np.unique(fam[:, 0]).tolist():
        sel = fam[:, 0] == k
        d[sel] = _sdf(k, u[sel], v[sel])
    for k in np.unique(fam[:, 1]).tolist():
        sel = fam[:, 1] == k
        t[sel] = _texture(k, u[sel], v[sel], freq[sel], phase[sel], grain[sel])
    mask = np.clip(0.5 - d * (r * (size / 2.0)), 0.0, 1.0).reshape(n, 1, -1)  # (n, 1, S*S) ~1 px soft edge

    # img = background * (1 - mask) + mask * (fg2 + t * (fg1 - fg2)), in grey levels: the foreground as one
    # batched matmul of per-image colour coefficients (n, 3, 2) with planes (n, 2, S*S)
    w = _interp_matrix(size, _BG_CELLS)  # (S, BG_CELLS)
    background = np.einsum("sc,nkcd,td->nkst", w, cells, w).reshape(n, 3, -1)  # (n, 3, S*S)
    planes = np.concatenate([mask, mask * t.reshape(n, 1, -1)], axis=1)  # (n, 2, S*S)
    coef = np.stack([fg2, fg1 - fg2], axis=2)  # (n, 3, 2)
    img = (np.matmul(coef, planes) + background * (1 - mask)) * f32(255.0)  # (n, 3, S*S)
    # uniform pixel noise in +-NOISE grey levels from each image's own stream (bytes: cheapest draw)
    noise = np.frombuffer(b"".join(g.bytes(3 * size * size) for g in streams), np.uint8).reshape(img.shape)
    img += noise * f32(2 * NOISE / 255) + f32(0.5 - NOISE)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3, size, size)


class SyntheticSource:
    """``num_samples`` images of ``image_size`` px in ``num_classes`` classes (label = index % K).

    ``__getitem__`` returns a (3, H, W) uint8 tensor. Images are rendered in aligned chunks (about
    1 Mpixel each) and cached per process when the whole set fits in the cache budget; otherwise
    one at a time. Either way image i depends only on (seed, i, num_classes, image_size).
    """

    def __init__(self, num_samples: int, num_classes: int = 8, image_size: int = 64, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ConfigError(f"data.num_samples must be positive, got {num_samples}")
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ConfigError(
                f"data.num_classes must be in [2, {MAX_CLASSES}] for the synthetic source, got {num_classes}"
            )
        if image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8 for the synthetic source, got {image_size}")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.classes = class_names(self.num_classes)
        fits = self.num_samples * 3 * self.image_size**2 <= _CACHE_BYTES
        self._chunk_size = max(1, min(256, (1 << 20) // self.image_size**2)) if fits else 1
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _chunk(self, k: int) -> np.ndarray:
        """Images of chunk ``k``: (n, 3, S, S) uint8."""
        arr = self._cache.get(k)
        if arr is None:
            cs = self._chunk_size
            idx = np.arange(k * cs, min((k + 1) * cs, self.num_samples))
            arr = render(self.seed, idx, self.num_classes, self.image_size)
            if cs > 1:
                self._cache[k] = arr
        return arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} synthetic images")
        k, j = divmod(i, self._chunk_size)
        return torch.from_numpy(self._chunk(k)[j].copy()), i % self.num_classes  # (3, S, S) uint8

    def labels(self) -> np.ndarray:
        """(N,) int64 labels, without rendering."""
        return np.arange(self.num_samples, dtype=np.int64) % self.num_classes

    def describe(self, i: int) -> str:
        return f"synthetic image {int(i)} (seed {self.seed})"

    def native_size(self, i: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # workers render (and cache) their own chunks
        return state
