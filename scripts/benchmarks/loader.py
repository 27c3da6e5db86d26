"""``loader``: images/s per loader worker of every sslkit source against torchvision's ImageFolder.

The images are generated here, never committed: ``--images`` (default 2000) photo-like 500x375 RGB JPEGs at
quality 90 (smooth fields at four scales, shapes, sensor-like noise; ~60 KB each), 10 class folders, in a
temporary directory (``--runs`` to keep them), then the same files as an uncompressed tar, WebDataset shards
(``sslkit-data shard``'s writer) and a Hugging Face ``save_to_disk`` dataset (when those extras are
installed). Page cache warm: this measures decode + views, not the storage.

Views: ``mae_224`` (RandomResizedCrop 224, scale (0.2, 1), bicubic, flip, normalize: MAE / UM-MAE's) and
``dinov2_2x224+8x96`` (``method=dinov2``'s multi-crop: 2 global + 8 local crops with colour jitter,
grayscale, blur, solarize). Variants: ``torchvision_imagefolder`` (the baseline: ``ImageFolder`` + the same
v2 transforms on its PIL images, as usually written: crop/resize on PIL, then ToImage, ToDtype, Normalize;
for multi-crop, the per-crop v2 pipeline of DINOv2's ``DataAugmentationDINO``), ``torchvision_imagefolder_
tensor`` (the same with ToImage first, so crop/resize run on tensors), and sslkit's ``build_pretrain_loader``
over ``image_folder``, ``tar``, ``webdataset``, ``hf``. One variant per fresh process, one thread, no worker
processes (the process is the worker), batch 64, one pass over the images after a warm-up batch; the
variants run round-robin ``--rounds`` times (default 3) and the median is kept.

Rows per (view, variant): ``img_per_s_worker``, ``x_baseline`` (over ``torchvision_imagefolder``) and, for
the MAE view, ``cores_per_gpu`` at the UM-MAE paper's pace (PVT-S, 200 ImageNet epochs in 21.3 h on 8 GPUs
= 3,341 img/s = 418 img/s per GPU). Plus ``parts`` (median ms per image of the MAE view's decode, the baseline's PIL crop + resize, sslkit's
crop + tensor resize, and the per-batch float + normalize), ``draft_share`` (the share of MAE crops downsampled >= 2x on both
sides, where decoding at reduced size would apply) and, with webdataset / wids installed, the raw
sample-read rate (bytes, no decode) of sslkit's shard reader, wids' random access and webdataset's stream.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import median, print_table, register, row, run_isolated

PAPER_IMG_S_PER_GPU = 1_281_167 * 200 / (21.3 * 3600) / 8  # UM-MAE PVT-S: 200 epochs, 21.3 h, 8 GPUs
VIEWS = {"mae_224": ["method=umae", "method.view.size=224"], "dinov2_2x224+8x96": ["method=dinov2"]}
BATCH = 64


# ----------------------------------------------------------------------------------------- data
def photo(rng: np.random.Generator, w: int = 500, h: int = 375) -> bytes:
    """A photo-like JPEG (quality 90, 4:2:0): smooth colour fields at 4 scales + shapes + noise."""
    from PIL import Image, ImageDraw

    img = np.full((h, w, 3), 128.0, np.float32)
    for gw, amp in ((4, 90), (16, 50), (64, 25), (250, 12)):
        gh = max(2, gw * h // w)
        small = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
        img += amp * np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC))
                               for c in range(3)], -1)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 150))]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 5, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int) -> dict[str, str]:
    """The images as a folder, a tar, shards and an HF dataset under ``root``: {variant: data.path}."""
    from sslkit.config import DataConfig
    from sslkit.data import build_source

    folder = root / "folder"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            d = folder / f"class_{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:06d}.jpg").write_bytes(photo(rng))
        import tarfile

        with tarfile.open(root / "images.tar", "w") as tf:
            tf.add(folder, arcname="images")
        src = build_source(DataConfig(name="image_folder", path=str(folder)))
        try:
            from sslkit.data.shards import write_shards

            write_shards(src, root / "shards", shard_size=500, prefix="train", progress=False)
        except ImportError:
            pass
        try:
            import datasets

            rows = {"image": [{"bytes": src._read(i), "path": None} for i in range(len(src))],
                    "label": [int(v) for v in src.labels()]}
            feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=src.classes)})
            datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(root / "hf"))
        except ImportError:
            pass
        (root / "done").write_text("ok")
    paths = {"torchvision_imagefolder": str(folder), "torchvision_imagefolder_tensor": str(folder),
             "image_folder": str(folder), "tar": str(root / "images.tar")}
    if (root / "shards" / "train-index.json").is_file():
        paths["webdataset"] = str(root / "shards" / "train-index.json")
    if (root / "hf").is_dir():
        paths["hf"] = str(root / "hf")
    return paths


# ----------------------------------------------------------------------------------------- baselines
def _baseline_transform(view: str, cfg: Any, tensor_first: bool) -> Any:
    """torchvision v2 on ImageFolder's PIL images: RandomResizedCrop + flip (+ DINOv2's photometric
    transforms per crop) + ToImage + ToDtype + Normalize; ``tensor_first``: ToImage first."""
    from torchvision.transforms import v2

    from sslkit.data.views import blur_kernel_size, interpolation

    vc = cfg.method.view
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    interp = interpolation(vc.interpolation)

    def pipeline(size: int, scale: Any, extra: list) -> v2.Compose:
        geo = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(vc.ratio), interpolation=interp,
                                    antialias=True), v2.RandomHorizontalFlip(float(vc.hflip))]
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if tensor_first:
            return v2.Compose([v2.ToImage(), *geo, *extra, *tail])
        return v2.Compose([*geo, *extra, v2.ToImage(), *tail])

    if view == "mae_224":
        return pipeline(int(vc.size), vc.scale, [])

    def photometric(size: int, blur_p: float, solarize_p: float) -> list:
        b, c, s, h = (float(v) for v in vc.color_jitter)
        out = [v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=float(vc.color_jitter_prob)),
               v2.RandomGrayscale(float(vc.grayscale_prob)),
               v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=tuple(vc.blur_sigma))], p=blur_p)]
        return out + ([v2.RandomSolarize(128, p=solarize_p)] if solarize_p else [])

    bp = [float(p) for p in vc.blur_prob]
    crops = [pipeline(int(vc.size), vc.global_scale, photometric(int(vc.size), bp[0], 0.0)),
             pipeline(int(vc.size), vc.global_scale, photometric(int(vc.size), bp[1], float(vc.solarize_prob)))]
    crops += [pipeline(int(vc.local_size), vc.local_scale, photometric(int(vc.local_size), bp[2], 0.0))] * int(vc.n_local)

    def multicrop(img: Any) -> dict[str, torch.Tensor]:
        out = [c(img) for c in crops]
        return {"global_crops": torch.stack(out[:2]), "local_crops": torch.stack(out[2:])}

    return multicrop


def _measure(variant: str, view: str, path: str, n_images: int) -> float:
    """img/s of one pass over the data (after a warm-up batch), one thread, no worker processes."""
    torch.set_num_threads(1)
    from sslkit.config import compose

    cfg = compose(VIEWS[view])
    if variant.startswith("torchvision_imagefolder"):
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(path, transform=_baseline_transform(view, cfg, variant.endswith("_tensor")))
        loader: Any = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True,
                                 generator=torch.Generator().manual_seed(0))
        batches = iter(loader)
    else:
        from omegaconf import OmegaConf

        from sslkit.config import DataConfig
        from sslkit.data import build_pretrain_loader, build_source

        name = {"tar": "image_folder"}.get(variant, variant)
        data = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": name, "path": path, "batch_size": BATCH,
                                                                 "num_workers": 0})
        batches = iter(build_pretrain_loader(build_source(data), data, cfg.method.view, None, seed=0))
    next(batches)  # warm-up
    steps = n_images // BATCH - 1
    t = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * BATCH / (time.perf_counter() - t)


def _draft_share(n: int = 100_000) -> float:
    """Share of MAE RandomResizedCrop(224, scale (0.2, 1)) boxes of a 500x375 image with both sides >= 2 x 224."""
    from torchvision.transforms import v2

    rrc = v2.RandomResizedCrop(224, scale=(0.2, 1.0))
    torch.manual_seed(0)
    img = torch.empty(1, dtype=torch.uint8).expand(3, 375, 500)
    hits = sum(1 for _ in range(n) if min((p := rrc.make_params([img]))["height"], p["width"]) >= 448)
    return hits / n


def _components(folder: str, n: int = 300) -> dict[str, float]:
    """Median ms per image of the MAE view's parts on the first ``n`` images (1 thread): the decode, the
    baseline's crop + resize on PIL (+ ToImage), sslkit's crop to the box + tensor resize (``MAEView.crops``),
    and the per-batch float + normalize (``MAEView.finish``, per image of a batch of 64)."""
    torch.set_num_threads(1)
    from PIL import Image
    from torchvision.transforms import v2

    from sslkit.config import compose
    from sslkit.data.views import build_mae_view, interpolation

    cfg = compose(VIEWS["mae_224"])
    vc = cfg.method.view
    view = build_mae_view(vc, cfg.data.mean, cfg.data.std)
    pil_rrc = v2.Compose([v2.RandomResizedCrop(int(vc.size), scale=tuple(vc.scale), ratio=tuple(vc.ratio),
                                               interpolation=interpolation(vc.interpolation), antialias=True),
                          v2.ToImage()])
    files = sorted(Path(folder).rglob("*.jpg"))[:n]
    data = [f.read_bytes() for f in files]

    def decode(b: bytes) -> Any:
        im = Image.open(io.BytesIO(b))
        im.load()
        return im

    images = [decode(b) for b in data]
    out: dict[str, list[float]] = {"decode_ms": [], "pil_crop_resize_ms": [], "sslkit_crop_resize_ms": []}
    torch.manual_seed(0)
    for b, im in zip(data, images):
        for key, fn, arg in (("decode_ms", decode, b), ("pil_crop_resize_ms", pil_rrc, im),
                             ("sslkit_crop_resize_ms", view.crops, im)):
            t = time.perf_counter()
            fn(arg)
            out[key].append(1e3 * (time.perf_counter() - t))
    crops = torch.stack([view.crops(im) for im in images[:BATCH]])
    finish = []
    for _ in range(7):
        t = time.perf_counter()
        view.finish({"images": crops.clone()})
        finish.append(1e3 * (time.perf_counter() - t) / len(crops))
    return {**{k: median(v) for k, v in out.items()}, "finish_ms": median(finish)}


def _read_rates(shards_index: str, n: int = 20000) -> dict[str, float]:
    """Samples/s of reading the encoded bytes (no decode), in a random order / a shuffled stream."""
    from sslkit.data.shards import WebDatasetSource

    src = WebDatasetSource(shards_index)
    perm = np.random.default_rng(0).permutation(len(src))
    order = [int(perm[k % len(perm)]) for k in range(n)]
    out: dict[str, float] = {}
    t = time.perf_counter()
    for i in order:
        src._read(i)
    out["sslkit_webdataset"] = n / (time.perf_counter() - t)
    shards, counts = src.shards, np.bincount(src._shard, minlength=len(src.shards)).tolist()
    try:
        import wids

        ds = wids.ShardListDataset([{"url": s, "nsamples": c} for s, c in zip(shards, counts)],
                                   cache_size=len(shards), lru_size=len(shards))
        t = time.perf_counter()
        for i in order:
            ds[i][".jpg"]
        out["wids"] = n / (time.perf_counter() - t)
    except ImportError:
        pass
    import webdataset as wds

    stream = wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False).shuffle(1000)
    t, k = time.perf_counter(), 0
    while k < n:  # epochs until n samples
        for sample in stream:
            sample["jpg"]
            k += 1
            if k == n:
                break
    out["webdataset_stream"] = n / (time.perf_counter() - t)
    return out


@register("loader")
def bench_loader(args: argparse.Namespace) -> list[dict[str, Any]]:
    n = int(args.images or 2000)
    keep = args.runs is not None
    root = Path(args.runs) if keep else Path(tempfile.mkdtemp(prefix="sslkit_loader_"))
    try:
        t = time.perf_counter()
        paths = run_isolated(make_data, root / "loader_data", n)
        print(f"[loader] {n} images (+ tar, shards, hf) in {root / 'loader_data'} ({time.perf_counter() - t:.0f} s)")
        views = [v for v in VIEWS if args.models is None or v in args.models.split(",")]
        rates: dict[tuple[str, str], list[float]] = {}
        for it in range(int(args.rounds)):
            for view in views:
                for variant, path in paths.items():
                    r = run_isolated(_measure, variant, view, path, n)
                    rates.setdefault((view, variant), []).append(r)
                    print(f"[loader] round {it + 1}: {view:<18} {variant:<30} {r:8.1f} img/s", flush=True)
        rows = []
        for view in views:
            base = median(rates[(view, "torchvision_imagefolder")])
            for variant in paths:
                r = median(rates[(view, variant)])
                rows.append(row("loader", view, variant, "img_per_s_worker", r, "img/s"))
                rows.append(row("loader", view, variant, "x_baseline", r / base, "x"))
                if view == "mae_224":
                    rows.append(row("loader", view, variant, "cores_per_gpu", PAPER_IMG_S_PER_GPU / r, "cores"))
        rows.append(row("loader", "mae_224", "500x375", "draft_share", _draft_share(), "share"))
        for metric, ms in run_isolated(_components, paths["image_folder"]).items():
            rows.append(row("loader", "mae_224", "parts", metric, ms, "ms/img"))
        if "webdataset" in paths:
            for reader, r in run_isolated(_read_rates, paths["webdataset"]).items():
                rows.append(row("loader", "read_bytes", reader, "samples_per_s", r, "samples/s"))
        print_table("loader", rows, {"images": f"{n} x 500x375 JPEG q90", "batch": BATCH, "rounds": args.rounds,
                                     "paper_img_s_per_gpu": round(PAPER_IMG_S_PER_GPU, 1)})
        return rows
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
