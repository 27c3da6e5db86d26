"""Pictures: what a method does (``Method.visualize``), as PNG files and wandb images, and the run's curves.

- ``make_pictures(method, images, generator, out_dir, prefix, mean=, std=)``: the method's named pictures
  (UM-MAE / SimMIM reconstructions, DINOv2 PCA and attention maps; ``methods/base.py`` has the contract) in
  eval mode, ``no_grad``, the RNG state forked, written as ``<out_dir>/<prefix>_<name>.png``.
- ``plot_curves(metrics_path, out_png)``: loss terms, lr, wd, teacher entropy, online kNN, images/s (the keys
  that exist) of a ``metrics.jsonl`` as one PNG (matplotlib's Agg canvas, no display, no pyplot state).
- ``Pictures``: the pretraining hook (``trainer.visualize_every``; built by ``engine.build_run``, called by the
  loop after logging): both of the above every N steps and at the end, logged to wandb through the run logger.
- Helpers: ``grid`` (panels with optional column labels), ``save_png``, ``first_images``.

In the layers this module sits above the methods (it calls them) and below evaluation / engine (which give it
the images of the evaluation split); it never imports them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from sslkit.data import SubsetSource, build_eval_loader
from sslkit.methods import Method
from sslkit.methods.base import GAP, tile

__all__ = ["CURVES", "Pictures", "first_images", "grid", "make_pictures", "plot_curves", "save_png"]


def grid(rows: Sequence[Sequence[np.ndarray]], labels: Optional[Sequence[str]] = None, gap: int = GAP) -> np.ndarray:
    """Panels ``(h, w, 3)`` uint8 row by row into one ``(H, W, 3)`` uint8 picture (``methods.base.tile``), with
    ``labels`` written above the columns when given."""
    body = tile(rows, gap)
    if not labels:
        return body
    strip = Image.new("RGB", (body.shape[1], 14), "white")
    draw, x = ImageDraw.Draw(strip), 0
    for label, panel in zip(labels, rows[0]):
        draw.text((x + 1, 1), str(label), fill=(0, 0, 0))
        x += panel.shape[1] + gap
    return np.concatenate([np.asarray(strip), body], axis=0)


def save_png(image: np.ndarray, path: str | Path, min_width: int = 512) -> Path:
    """Write an ``(H, W, 3)`` uint8 picture as PNG, enlarged by an integer factor (nearest, at most 8) to at
    least ``min_width`` px so that small images stay readable. Returns the path."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"a picture is an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    f = max(1, min(8, math.ceil(min_width / image.shape[1])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.repeat(f, axis=0).repeat(f, axis=1)).save(path)
    return path


def first_images(source: Any, data_cfg: Any, size: int, n: int) -> torch.Tensor:
    """The first ``n`` images of ``source`` in the evaluation view (resize + center crop ``size``, normalized
    with ``data.mean`` / ``data.std``): (n, 3, size, size). Draws nothing from the global RNG."""
    sub = SubsetSource(source, np.arange(min(int(n), len(source))))
    with torch.random.fork_rng(devices=[]):  # the loader draws a base seed
        return next(iter(build_eval_loader(sub, data_cfg, int(size), batch_size=len(sub), num_workers=0)))["images"]


def make_pictures(method: Method, images: torch.Tensor, generator: torch.Generator, out_dir: str | Path,
                  prefix: str = "", *, mean: Sequence[float], std: Sequence[float], **options: Any) -> list[Path]:
    """``method.visualize(images, generator, mean, std, **options)`` in eval mode under ``no_grad`` with the
    RNG state forked (the training run does not notice), each picture written as
    ``<out_dir>/<prefix>_<name>.png``. Returns the paths (none for a method without pictures)."""
    dev = next(method.parameters()).device
    was_training = method.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        method.eval()
        try:
            pics = method.visualize(images.to(dev), generator, tuple(float(v) for v in mean),
                                    tuple(float(v) for v in std), **options)
        finally:
            method.train(was_training)
    return [save_png(img, Path(out_dir) / (f"{prefix}_{name}.png" if prefix else f"{name}.png"))
            for name, img in pics.items()]


def _is_loss(k: str) -> bool:
    return k == "loss" or k.startswith("loss_") or k in ("dino", "ibot", "koleo")


CURVES: tuple[tuple[str, Callable[[str], bool]], ...] = (  # (panel title, which metrics.jsonl keys it plots)
    ("loss terms", _is_loss),
    ("lr", lambda k: k == "lr"),
    ("weight decay", lambda k: k == "wd"),
    ("teacher entropy", lambda k: k == "teacher_entropy"),
    ("online kNN (%)", lambda k: k in ("knn_top1", "knn_top5")),
    ("images / s", lambda k: k == "images_per_s"),
)


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """One PNG of the curves in ``metrics.jsonl`` against the step: a panel per ``CURVES`` entry whose keys
    occur (loss terms, lr, wd, teacher entropy, online kNN, images/s). Returns ``out_png``."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    panels = []
    for title, match in CURVES:
        keys = sorted({k for r in rows for k in r if match(k)}, key=lambda k: (k != "loss", k))
        if keys:
            panels.append((title, keys))
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) <= 20 else None, markersize=3, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0].text(0.5, 0.5, f"no curves in {Path(metrics_path).name} yet", ha="center", va="center")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


class Pictures:
    """The pretraining hook of ``trainer.visualize_every``: ``pictures(step, method, final)`` writes
    ``<out_dir>/step_<step>_<name>.png`` (``make_pictures`` on the fixed ``images``, masks from a generator seeded
    with ``seed``: the same masks every time) and ``curves.png`` (from ``metrics_path``) every ``every`` steps and
    when ``final``, and hands them to ``log_images`` (the run logger: wandb). Other steps: nothing."""

    def __init__(self, images: torch.Tensor, out_dir: str | Path, every: Optional[int], *, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0, metrics_path: Optional[str | Path] = None,
                 log_images: Optional[Callable[[int, dict[str, Any]], None]] = None) -> None:
        self.images, self.out_dir, self.every = images, Path(out_dir), every
        self.mean, self.std, self.seed = tuple(mean), tuple(std), int(seed)
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.log_images = log_images

    def __call__(self, step: int, method: Method, final: bool = False) -> list[Path]:
        if not (final or (self.every and step % self.every == 0)):
            return []
        prefix = f"step_{step}"
        paths = make_pictures(method, self.images, torch.Generator().manual_seed(self.seed), self.out_dir, prefix,
                              mean=self.mean, std=self.std)
        if self.metrics_path is not None and self.metrics_path.is_file():
            paths.append(plot_curves(self.metrics_path, self.out_dir / "curves.png"))
        if self.log_images is not None:
            self.log_images(step, {p.stem.removeprefix(f"{prefix}_"): p for p in paths})
        return paths
