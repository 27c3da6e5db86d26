"""Task functions: what a command does with a composed config, callable from Python alike.

``run_pretrain`` trains, summarizes and draws the end-of-run pictures, ``run_finetune`` trains a classifier
and reports its val accuracy, ``visualize_checkpoint`` draws a checkpoint's pictures. The console scripts
(``cli``), Hydra sweeps and launchers call these; so can notebooks::

    from sslkit.config import compose
    from sslkit.tasks import run_pretrain
    result = run_pretrain(compose(["experiment=dinov2_demo"]), "runs/demo")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from sslkit import checkpoint as ckpt_io
from sslkit.engine import TrainResult, build_pictures, picture_images, train
from sslkit.evaluation import evaluate_classifier, summarize
from sslkit.methods import Method, build_method
from sslkit.runlog import RunLogger
from sslkit.visualize import make_pictures, plot_curves


def run_pretrain(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """Train (``engine.train``); then, with ``trainer.summary``, rank 0 prints and saves what was learned and
    writes the end-of-run pictures (``end_pictures``), both also sent to the trackers."""

    def finish(method: Method, step: int, log: RunLogger) -> None:
        if cfg.trainer.summary:
            log.summary(summarize(cfg, method, run_dir))
            end_pictures(cfg, Path(run_dir), step, method, log)

    return train(cfg, run_dir, finish)


def end_pictures(cfg: DictConfig, run_dir: Path, step: int, method: Method,
                 log: Optional[RunLogger] = None) -> list[Path]:
    """The pictures of the last ``step`` in ``<run_dir>/pictures/`` (unless ``trainer.visualize_every`` already
    wrote them) and ``curves.png``, logged through ``log``; prints where they are."""
    out = run_dir / "pictures"
    paths = sorted(out.glob(f"step_{step}_*.png"))
    if paths:  # written by trainer.visualize_every at the last step, with the curves up to it (and logged)
        paths += [out / "curves.png"] if (out / "curves.png").is_file() else []
    else:
        paths = build_pictures(cfg, run_dir, log)(step, method, final=True)
    print(f"[sslkit] pictures: {out}/ ({', '.join(p.name for p in paths)})")
    return paths


def run_finetune(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train with method=classify, then report top-1 / top-5 on data.split=val (``finetune.json``)."""
    result = train(cfg, run_dir)
    res = {**evaluate_classifier(cfg, result.method), "step": result.step}
    ema = f" | EMA weights: top-1 {res['top1_ema']:.2f}%  top-5 {res['top5_ema']:.2f}%" if "top1_ema" in res else ""
    print(f"[sslkit] fine-tuned {result.method.model_config['name']}: val top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}% on {res['val_images']} images{ema}")
    (Path(run_dir) / "finetune.json").write_text(json.dumps(res, indent=2))
    return res


def visualize_checkpoint(checkpoint: str | Path, out: Optional[str | Path] = None, n: int = 4,
                         data: Optional[DictConfig] = None, threshold: Optional[float] = None,
                         seed: int = 0) -> list[Path]:
    """The method's pictures of an sslkit ``checkpoint`` (the method rebuilt from its config, its weights
    loaded) on ``n`` held-out images of the evaluation split of ``data`` (default: the checkpoint's own data
    config), plus ``curves.png`` from the run dir's ``metrics.jsonl`` when there is one, in ``out`` (default:
    ``<run dir>/pictures``). ``threshold``: DINOv2's foreground PCA. Returns the paths written."""
    ckpt = ckpt_io.load(checkpoint)
    cfg = OmegaConf.create(ckpt["config"])
    if cfg.method.get("init_from"):
        cfg.method.init_from = None  # the weights come from the checkpoint
    method = build_method(cfg)
    method.load_state_dict(ckpt["model"])
    data_cfg = data if data is not None else cfg.data
    run_dir = Path(checkpoint).resolve().parent.parent
    out = Path(out) if out else run_dir / "pictures"
    images = picture_images(data_cfg, int(cfg.method.view.size), int(n))
    options = {} if threshold is None else {"threshold": float(threshold)}
    paths = make_pictures(method, images, torch.Generator().manual_seed(int(seed)), out, f"step_{ckpt['step']}",
                          mean=data_cfg.mean, std=data_cfg.std, **options)
    if (run_dir / "metrics.jsonl").is_file():
        paths.append(plot_curves(run_dir / "metrics.jsonl", out / "curves.png"))
    print(f"[sslkit] pictures of {checkpoint} (step {ckpt['step']}, {ckpt['method']}): {out}/ "
          f"({', '.join(p.name for p in paths)})")
    return paths
