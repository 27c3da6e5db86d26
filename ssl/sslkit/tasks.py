"""Task functions: what a command does with a composed config, callable from Python alike.

``run_pretrain`` trains, summarizes and draws the end-of-run pictures, ``run_finetune`` trains a classifier
and reports its val accuracy, ``visualize_checkpoint`` draws a checkpoint's pictures. The console scripts
(``cli``), Hydra sweeps and launchers call these; so can notebooks::

    from sslkit.config import compose
    from sslkit.tasks import run_pretrain
    result = run_pretrain(compose(["experiment=dinov2_demo"]), "runs/demo")
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from sslkit import checkpoint as ckpt_io
from sslkit.data import build_source, write_shards
from sslkit.engine import TrainResult, build_pictures, picture_images, train
from sslkit.errors import ConfigError
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


LOSS_TAIL = 0.1  # trainer.objective=loss: the mean training loss over this last fraction of the steps


def _metric_rows(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """metrics.jsonl's rows up to ``step``, one per step: a resumed run re-logs the steps a killed invocation
    logged after its last checkpoint, and the later row of a step wins; a torn last line is skipped."""
    rows: dict[int, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", step + 1) <= step:
            rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def pretrain_objective(cfg: DictConfig, result: TrainResult) -> Optional[float]:
    """The value of ``trainer.objective`` for a finished ``run_pretrain`` (what a sweeper optimizes; None without
    an objective, and on ranks other than 0). ``knn_top1`` / ``linear_top1``: the summary's ``<name>_pretrained``
    (``summary.json``); ``knn_top1`` with ``trainer.summary=false``: the last online kNN (``trainer.knn_every``).
    ``loss``: the mean training loss of the ``metrics.jsonl`` rows in the last ``LOSS_TAIL`` of the steps (at least
    the last row; one row per ``trainer.log_every`` steps, each the loss of its step)."""
    objective = cfg.trainer.get("objective")
    if objective is None or not result.is_main:
        return None
    run_dir, name = Path(result.run_dir), str(objective)
    if name in ("knn_top1", "linear_top1") and cfg.trainer.summary:
        return float(json.loads((run_dir / "summary.json").read_text())[f"{name}_pretrained"])
    rows = _metric_rows(run_dir, result.step)
    if name == "knn_top1":
        knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
        if not knn:
            raise ConfigError(f"trainer.objective=knn_top1 without the summary takes the last online kNN, but "
                              f"{run_dir}/metrics.jsonl has none: trainer.knn_every={cfg.trainer.knn_every} is "
                              f"beyond the run's {result.step} steps; lower it or set trainer.summary=true")
        return float(knn[-1])
    losses = [r for r in rows if "loss" in r]
    if not losses:
        raise ConfigError(f"trainer.objective=loss: {run_dir}/metrics.jsonl has no training loss")
    window = max(1, math.ceil(LOSS_TAIL * result.step))
    tail = [float(r["loss"]) for r in losses if r["step"] > result.step - window] or [float(losses[-1]["loss"])]
    return sum(tail) / len(tail)


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


def write_shard_splits(cfg: DictConfig, usage: str = "") -> list[dict[str, Any]]:
    """``sslkit-data shard``: ``cfg.split`` of ``cfg.data`` as WebDataset shards in ``cfg.out`` (``write_shards``),
    and with ``split=train`` and ``val=true`` the val split as ``val-*.tar``. Returns the indexes written."""
    if OmegaConf.is_missing(cfg, "out"):
        raise ConfigError(f"sslkit-data shard needs out=<dir>\n{usage}")
    splits = [str(cfg.split)] + (["val"] if cfg.val and str(cfg.split) == "train" else [])
    out = []
    for split in splits:
        data_cfg = copy.deepcopy(cfg.data)
        data_cfg.split = split
        index = write_shards(build_source(data_cfg), cfg.out, shard_size=int(cfg.shard_size), prefix=split,
                             shuffle=bool(cfg.shuffle), seed=int(cfg.seed), max_shard_bytes=float(cfg.max_shard_bytes),
                             progress=bool(cfg.progress))
        n = sum(s["nsamples"] for s in index["shardlist"])
        print(f"[sslkit] {split}: {n} samples in {len(index['shardlist'])} shard(s) -> {cfg.out}/{split}-index.json "
              f"(data=webdataset data.path={cfg.out}/{split}-index.json)")
        out.append(index)
    return out
