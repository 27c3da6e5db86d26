"""Task functions: what a command does with a composed config, callable from Python alike.

``run_pretrain`` trains and summarizes, ``run_finetune`` trains a classifier and reports its val
accuracy. The console scripts (``cli``), Hydra sweeps and launchers call these; so can notebooks::

    from sslkit.config import compose
    from sslkit.tasks import run_pretrain
    result = run_pretrain(compose(["experiment=dinov2_demo"]), "runs/demo")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sslkit.engine import TrainResult, train
from sslkit.evaluation import evaluate_classifier, summarize


def run_pretrain(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """Train (``engine.train``); then, with ``trainer.summary``, rank 0 prints and saves what was learned."""
    result = train(cfg, run_dir)
    if cfg.trainer.summary and result.is_main:
        summarize(cfg, result.method, result.run_dir)
    return result


def run_finetune(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train with method=classify, then report top-1 / top-5 on data.split=val (``finetune.json``)."""
    result = train(cfg, run_dir)
    res = {**evaluate_classifier(cfg, result.method), "step": result.step}
    ema = f" | EMA weights: top-1 {res['top1_ema']:.2f}%  top-5 {res['top5_ema']:.2f}%" if "top1_ema" in res else ""
    print(f"[sslkit] fine-tuned {result.method.model_config['name']}: val top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}% on {res['val_images']} images{ema}")
    (Path(run_dir) / "finetune.json").write_text(json.dumps(res, indent=2))
    return res
