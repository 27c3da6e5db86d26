"""Quality on real data: ``python scripts/benchmark.py quality [--data cifar10-train.tar] [--out r.json]``.

For each method (``--models umae,dinov2``) pretrain the ``experiment=cifar10_<method>`` config on the
train split of the CIFAR-10 tar (a fixed budget of optimizer steps: the experiment's epochs, or
``--steps``), then evaluate frozen features on the val split with weighted kNN (k=20, T=0.07) and the
linear probe (``sslkit-eval linear``'s protocol), next to (a) the same backbone randomly initialized
and (b) raw pixels. Rows: ``knn_top1`` / ``linear_top1`` per (model, variant) plus the pretraining
budget (steps, images seen, wall and CPU seconds including the data workers).

The pretraining runs are ordinary runs in ``--runs`` (default ``runs/quality``): they resume if
interrupted, and their checkpoints can be evaluated again with ``sslkit-eval``.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import print_table, register, row

from sslkit.config import compose
from sslkit.engine import train
from sslkit.evaluation import knn_classify, linear_probe, raw_pixels, split_features
from sslkit.methods import build_method
from sslkit.methods.base import embed
from sslkit.pretrained import load_backbone

DEFAULT_DATA = "../shared/data/cifar10-train.tar"
MODELS = {"dinov2": "dinov2_vit", "umae": "umae_pvt"}  # --models key -> row "model"


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its (finished) children, e.g. data workers."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def evaluate_encoders(embeds: dict[str, Any], data_cfg: Any, size: int, *, linear_epochs: int = 100,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """kNN and linear-probe top-1 / top-5 on val (fit on train) of every encoder in ``embeds``."""

    feats, classes = split_features(embeds, data_cfg, size)
    out = {}
    for name, (trf, try_, vf, vy) in feats.items():
        knn = knn_classify(trf, try_, vf, vy, k=20, temperature=0.07)
        lin = linear_probe(trf, try_, vf, vy, num_classes=len(classes), epochs=linear_epochs, seed=seed)
        out[name] = {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": lin["top1"],
                     "linear_top5": lin["top5"], "linear_lr": lin["lr"], "feature_dim": trf.shape[1]}
        print(f"[quality] {name:<12} kNN top-1 {knn['top1']:.2f}%  linear top-1 {lin['top1']:.2f}% "
              f"(lr {lin['lr']:g}, dim {trf.shape[1]})")
    return out


def run_method(method: str, data: str, runs: Path, steps: int | None, extra: list[str],
               with_raw_pixels: bool = True) -> list[dict[str, Any]]:

    run_dir = runs / f"cifar10_{method}"
    overrides = [f"experiment=cifar10_{method}", f"data.path={data}", "logger.wandb.mode=disabled",
                 "trainer.progress=false", *([f"trainer.max_steps={steps}"] if steps else []), *extra]
    cfg = compose(overrides)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = train(cfg, run_dir)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    model = MODELS[method]
    print(f"[quality] {method}: {result.step} steps x {result.derived.global_batch} images in {wall:.0f} s wall, "
          f"{cpu:.0f} s CPU (this invocation; resumed runs count only the rest)")

    pre, _ = load_backbone(run_dir / "checkpoints" / "last.pt", for_finetune=False)
    torch.manual_seed(int(cfg.trainer.seed))
    rand = build_method(cfg).backbone  # the same backbone at its initialization (seeded like the run)
    pre.eval(), rand.eval()
    embeds = {"pretrained": lambda x: embed(pre, x), "random_init": lambda x: embed(rand, x)}
    size = int(cfg.method.view.size)
    res = evaluate_encoders(embeds, cfg.data, size)
    if with_raw_pixels:  # the same for every method: the data's native 32 px
        res["raw_pixels"] = evaluate_encoders({"raw_pixels": raw_pixels}, cfg.data, 32)["raw_pixels"]
    rows = [row("quality", model, "pretrain", "steps", result.step, "steps"),
            row("quality", model, "pretrain", "images_seen", result.step * result.derived.global_batch, "images"),
            row("quality", model, "pretrain", "wall_s", wall, "s"),
            row("quality", model, "pretrain", "cpu_s", cpu, "s")]
    for variant, r in res.items():
        for metric in ("knn_top1", "linear_top1", "knn_top5", "linear_top5"):
            rows.append(row("quality", model, variant, metric, r[metric], "%"))
    return rows


@register("quality")
def quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = args.data or DEFAULT_DATA
    if not Path(data).exists():
        raise SystemExit(f"quality: {data} not found; pass --data <path to cifar10-train.tar> (see ../shared/data)")
    runs = Path(args.runs or "runs/quality")
    methods = args.models.split(",") if args.models else list(MODELS)
    unknown = [m for m in methods if m not in MODELS]
    if unknown:
        raise SystemExit(f"quality: unknown --models {unknown}; choose from {list(MODELS)}")
    rows: list[dict[str, Any]] = []
    for i, m in enumerate(methods):
        rows += run_method(m, data, runs, args.steps, list(args.override or []), with_raw_pixels=i == 0)
    print_table("quality", rows, {"data": data, "eval": "kNN k=20 T=0.07 + linear probe, val split 5000"})
    return rows
