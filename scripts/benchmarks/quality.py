"""Quality on real data: ``python scripts/benchmark.py quality [--data cifar10-train.tar] [--out r.json]``.

Learning curves on the CIFAR-10 tar's fixed train / val split (never in CI):

- **Pretraining curves.** For each of ``--models`` (default ``umae,dinov2,lightly``) one run of
  ``experiment=cifar10_<method>`` whose schedules (lr, wd, EMA, ...) span the largest of ``--budgets``
  epochs (default 1,2,4,8); the run stops at each budget (``trainer.stop_after``), its frozen features are
  evaluated (weighted kNN k=20 T=0.07 and the linear probe of ``sslkit-eval linear``, fit on train, top-1
  on val) and it goes on. So the points are snapshots of one schedule: the last one is a complete
  (annealed) run, the earlier ones are the same run part-way, not shorter runs of their own.
- **Baselines**: the same backbone at its random initialization (seeded like the run) per method, and
  raw pixels (32 px, mean-centred) once.
- **Peer** (``lightly``): lightly 1.6's DINOv2 components (``benchmarks.peer``) in sslkit's loop with
  ``experiment=cifar10_dinov2``'s everything else: same tiny ViT (timm's class, sslkit's initial
  weights), crops, batch, steps, optimizer, schedules and data.
- **Fine-tuning** (``--finetune-epochs N``, 0 = skip): ``experiment=finetune_cifar10_pvt`` from the last
  UM-MAE checkpoint and from scratch (random init), same model, recipe and budget; top-1 on val.

Rows (the harness's format: benchmark, model, variant, metric, value, unit): variant ``pretrained@<b>ep``
(``lightly@<b>ep`` for the peer) with ``knn_top1`` / ``linear_top1`` / top-5s, ``steps``,
``images_seen``, ``cpu_s`` and ``wall_s`` (cumulative pretraining cost at that budget, data workers
included; ``cost_estimated_steps``: steps of a killed process, counted at the resumed segment's rate);
``random_init`` / ``raw_pixels`` with the probe metrics; ``finetune_pretrained`` /
``finetune_scratch`` with ``top1``, ``top5``, ``cpu_s``. ``--plot`` (default: ``--out`` with ``.png``)
draws the curves.

Everything is resumable: the runs are ordinary run directories in ``--runs`` (default ``runs/quality``)
and each finished point is cached in ``<run>/quality_points.json``; a re-run skips what is done.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import open_dict

from benchmarks import print_table, register, row

from sslkit import checkpoint as ckpt_io
from sslkit.config import compose, derive
from sslkit.data import build_source
from sslkit.engine import train
from sslkit.evaluation import knn_classify, linear_probe, raw_pixels, split_features
from sslkit.methods import build_method
from sslkit.tasks import run_finetune

DEFAULT_DATA = "../shared/data/cifar10-train.tar"
DEFAULT_BUDGETS = "1,2,4,8"
# --models key -> (row model, row variant prefix, experiment, method.name override)
MODELS: dict[str, tuple[str, str, str, Optional[str]]] = {
    "umae": ("umae_pvt", "pretrained", "cifar10_umae", None),
    "dinov2": ("dinov2_vit", "pretrained", "cifar10_dinov2", None),
    "lightly": ("dinov2_vit", "lightly", "cifar10_dinov2", "lightly_dinov2"),
}
PROBE_METRICS = ("knn_top1", "linear_top1", "knn_top5", "linear_top5")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its (finished) children, e.g. data workers."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def evaluate_encoders(embeds: dict[str, Callable[[torch.Tensor], torch.Tensor]], data_cfg: Any, size: int, *,
                      linear_epochs: int = 100, seed: int = 0) -> dict[str, dict[str, float]]:
    """kNN and linear-probe top-1 / top-5 on val (fit on train) of every encoder in ``embeds``."""
    feats, classes = split_features(embeds, data_cfg, size)
    out = {}
    for name, (trf, try_, vf, vy) in feats.items():
        knn = knn_classify(trf, try_, vf, vy, k=20, temperature=0.07)
        lin = linear_probe(trf, try_, vf, vy, num_classes=len(classes), epochs=linear_epochs, seed=seed)
        out[name] = {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": lin["top1"],
                     "linear_top5": lin["top5"], "linear_lr": lin["lr"], "feature_dim": trf.shape[1]}
        print(f"[quality] {name:<14} kNN top-1 {knn['top1']:.2f}%  linear top-1 {lin['top1']:.2f}% "
              f"(lr {lin['lr']:g}, dim {trf.shape[1]})", flush=True)
    return out


def _load_points(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_points(path: Path, points: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(points, indent=1))
    tmp.replace(path)


def pretrain_config(key: str, data: str, max_epochs: float, extra: list[str]) -> Any:
    """The composed config of ``--models`` entry ``key`` with schedules spanning ``max_epochs``."""
    _, _, experiment, method_name = MODELS[key]
    cfg = compose([f"experiment={experiment}", f"data.path={data}", "logger.wandb.mode=disabled",
                   "trainer.progress=false", f"trainer.epochs={max_epochs:g}", *extra])
    if method_name is not None:
        from benchmarks import peer  # noqa: F401  (registers lightly_dinov2; needs the bench extra)

        with open_dict(cfg):
            cfg.method.name = method_name
    return cfg


def _features_of(cfg: Any, checkpoint: Optional[Path]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The method's evaluation features with the checkpoint's weights (or at its seeded initialization)."""
    torch.manual_seed(int(cfg.trainer.seed))
    method = build_method(cfg)
    if checkpoint is not None:
        method.load_state_dict(ckpt_io.load(checkpoint)["model"])
    method.eval()
    return method.features


def _resume_step(run_dir: Path) -> int:
    """The step a run in ``run_dir`` resumes from (0 for a new run)."""
    last = run_dir / "checkpoints" / "last.pt"
    return int(ckpt_io.load(last)["step"]) if last.is_file() else 0


def _add_segment(cost: dict[str, Any], start: int, end: int, cpu_s: float, wall_s: float) -> dict[str, Any]:
    """The cumulative cost after a training segment that ran steps ``start`` .. ``end``. A run killed between
    two points resumes from its last checkpoint, past the step the cached cost covers: the steps in between
    were paid by the killed process and are counted at this segment's rate, and reported as
    ``estimated_steps``."""
    gap = max(0, start - int(cost["steps"]))
    rate = 1.0 + gap / max(1, end - start)
    return {"steps": end, "estimated_steps": int(cost["estimated_steps"]) + gap,
            "cpu_s": cost["cpu_s"] + cpu_s * rate, "wall_s": cost["wall_s"] + wall_s * rate}


def run_curve(key: str, data: str, runs: Path, budgets: list[float], extra: list[str]) -> list[dict[str, Any]]:
    """Pretrain ``key`` with snapshots at ``budgets`` epochs; rows for every snapshot and its random init."""
    model, prefix = MODELS[key][:2]
    run_dir = runs / f"cifar10_{key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    points_path = run_dir / "quality_points.json"
    points = _load_points(points_path)
    cfg = pretrain_config(key, data, max(budgets), extra)
    size = int(cfg.method.view.size)
    d = derive(cfg, len(build_source(cfg.data)))
    covered = max([int(p["steps"]) for p in points.values() if "steps" in p], default=0)  # caches without cost.steps
    cost = {"steps": covered, "estimated_steps": 0, "cpu_s": 0.0, "wall_s": 0.0, **points.get("cost", {})}
    rows: list[dict[str, Any]] = []
    for b in sorted(budgets):
        stop = min(d.total_steps, int(round(b * d.steps_per_epoch)))
        tag = f"{prefix}@{b:g}ep"
        if tag not in points:
            cfg.trainer.stop_after = stop
            start = _resume_step(run_dir)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            result = train(cfg, run_dir)
            cost = _add_segment(cost, start, result.step, _cpu_seconds() - c0, time.perf_counter() - t0)
            print(f"[quality] {key} @ {b:g} epochs: step {result.step} of {d.total_steps}, {cost['cpu_s'] / 60:.1f} "
                  f"CPU-min so far", flush=True)
            snap = run_dir / "checkpoints" / f"budget_{b:g}ep.pt"
            shutil.copyfile(run_dir / "checkpoints" / "last.pt", snap)
            res = evaluate_encoders({tag: _features_of(cfg, snap)}, cfg.data, size)[tag]
            points[tag] = {**res, "images_seen": result.step * d.global_batch, **cost}
            points["cost"] = cost
            _save_points(points_path, points)
        p = points[tag]
        rows += [row("quality", model, tag, m, p[m], "%") for m in PROBE_METRICS]
        rows += [row("quality", model, tag, "steps", p["steps"], "steps"),
                 row("quality", model, tag, "images_seen", p["images_seen"], "images"),
                 row("quality", model, tag, "cpu_s", p["cpu_s"], "s"), row("quality", model, tag, "wall_s", p["wall_s"], "s"),
                 row("quality", model, tag, "cost_estimated_steps", p.get("estimated_steps", 0), "steps")]
    if prefix == "pretrained":  # the peer shares the sslkit backbone's initialization: one random-init row
        if "random_init" not in points:
            points["random_init"] = evaluate_encoders({"random_init": _features_of(cfg, None)}, cfg.data, size)["random_init"]
            _save_points(points_path, points)
        rows += [row("quality", model, "random_init", m, points["random_init"][m], "%") for m in PROBE_METRICS]
    return rows


def raw_pixel_rows(data: str, runs: Path) -> list[dict[str, Any]]:
    path = runs / "raw_pixels.json"
    points = _load_points(path)
    if "raw_pixels" not in points:
        cfg = compose(["experiment=cifar10_umae", f"data.path={data}"])
        points["raw_pixels"] = evaluate_encoders({"raw_pixels": raw_pixels}, cfg.data, 32)["raw_pixels"]
        _save_points(path, points)
    return [row("quality", "pixels", "raw_pixels", m, points["raw_pixels"][m], "%") for m in PROBE_METRICS]


def finetune_rows(data: str, runs: Path, epochs: float, extra: list[str]) -> list[dict[str, Any]]:
    """Fine-tune from the last UM-MAE checkpoint and from scratch: same model, recipe and budget."""
    pretrained = runs / "cifar10_umae" / "checkpoints" / "last.pt"
    if not pretrained.is_file():
        raise SystemExit(f"quality: fine-tuning needs the UM-MAE run ({pretrained}): include umae in --models")
    rows = []
    for variant, checkpoint in (("finetune_pretrained", str(pretrained.resolve())), ("finetune_scratch", "null")):
        run_dir = runs / f"cifar10_{variant}"
        done = run_dir / "quality_point.json"
        if not done.is_file():
            cfg = compose(["experiment=finetune_cifar10_pvt", f"data.path={data}", f"checkpoint={checkpoint}",
                           f"trainer.epochs={epochs:g}", "logger.wandb.mode=disabled", "trainer.progress=false",
                           *extra], config_name="finetune")
            t0, c0 = time.perf_counter(), _cpu_seconds()
            res = run_finetune(cfg, run_dir)
            res.update(cpu_s=_cpu_seconds() - c0, wall_s=time.perf_counter() - t0, epochs=epochs)
            _save_points(done, res)
        res = _load_points(done)
        rows += [row("quality", "umae_pvt", variant, "top1", res["top1"], "%"),
                 row("quality", "umae_pvt", variant, "top5", res["top5"], "%"),
                 row("quality", "umae_pvt", variant, "epochs", res["epochs"], "epochs"),
                 row("quality", "umae_pvt", variant, "cpu_s", res["cpu_s"], "s")]
    return rows


def plot(rows: list[dict[str, Any]], out_png: str | Path, title: str = "") -> Path:
    """kNN and linear top-1 against the pretraining budget (epochs), baselines as horizontal lines, and the
    fine-tuning rows as bars."""
    from matplotlib.figure import Figure

    def val(model: str, variant: str, metric: str) -> Optional[float]:
        hit = [r["value"] for r in rows if (r["model"], r["variant"], r["metric"]) == (model, variant, metric)]
        return hit[0] if hit else None

    curves: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for r in rows:
        if "@" in r["variant"] and r["metric"] == "knn_top1":
            prefix, b = r["variant"].split("@")
            curves.setdefault((r["model"], prefix), []).append((float(b[:-2]), r["variant"]))
    ft = [r for r in rows if r["variant"].startswith("finetune_") and r["metric"] == "top1"]
    ncols = 3 if ft else 2
    fig = Figure(figsize=(4.6 * ncols, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False).ravel()
    names = {("umae_pvt", "pretrained"): "UM-MAE (PVT)", ("dinov2_vit", "pretrained"): "DINOv2 (ViT)",
             ("dinov2_vit", "lightly"): "lightly DINOv2 (peer)"}
    for ax, metric, label in ((axes[0], "knn_top1", "kNN top-1 (%)"), (axes[1], "linear_top1", "linear probe top-1 (%)")):
        for i, ((model, prefix), pts) in enumerate(sorted(curves.items())):
            pts.sort()
            xs = [b for b, _ in pts]
            ys = [val(model, v, metric) for _, v in pts]
            line = ax.plot(xs, ys, marker="o", label=names.get((model, prefix), f"{model} {prefix}"),
                           linestyle="--" if prefix == "lightly" else "-")[0]
            rand = val(model, "random_init", metric)
            if rand is not None and prefix == "pretrained":
                ax.axhline(rand, color=line.get_color(), linestyle=":", linewidth=1, label=f"{model} random init")
        raw = val("pixels", "raw_pixels", metric)
        if raw is not None:
            ax.axhline(raw, color="k", linestyle="-.", linewidth=1, label="raw pixels")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pretraining budget (epochs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if ft:
        labels = [r["variant"].removeprefix("finetune_") for r in ft]
        bars = axes[2].bar(labels, [r["value"] for r in ft], color=["tab:blue", "tab:gray"][: len(ft)])
        axes[2].bar_label(bars, fmt="%.1f")
        epochs = val("umae_pvt", ft[0]["variant"], "epochs")
        axes[2].set_title(f"PVT fine-tuned {epochs:g} epochs" if epochs is not None else "fine-tuned", fontsize=10)
        axes[2].set_ylabel("val top-1 (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def model_budgets(text: str, models: list[str]) -> dict[str, list[float]]:
    """``--budgets``: one list for every model (``1,2,4,8``) or per model, ``;``-separated, the others
    keeping the default (``umae=1,2,4,8;dinov2=1,2,3``)."""
    if "=" not in text:
        return {m: parse_budgets(text) for m in models}
    out = {m: parse_budgets(DEFAULT_BUDGETS) for m in models}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        if not sep or name.strip() not in MODELS:
            raise SystemExit(f"quality: --budgets {text!r}: write <model>=<epochs>, models {list(MODELS)}")
        out[name.strip()] = parse_budgets(values)
    return out


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = sorted({float(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"quality: --budgets {text!r}: give epochs as numbers, e.g. 1,2,4,8") from None
    if not budgets or budgets[0] <= 0 or any(not math.isfinite(b) for b in budgets):
        raise SystemExit(f"quality: --budgets {text!r}: need positive epochs, e.g. 1,2,4,8")
    return budgets


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
    budgets = model_budgets(args.budgets or DEFAULT_BUDGETS, methods)
    extra = list(args.override or [])
    rows = raw_pixel_rows(data, runs)
    for m in methods:
        rows += run_curve(m, data, runs, budgets[m], extra)
    if args.finetune_epochs:
        rows += finetune_rows(data, runs, float(args.finetune_epochs), list(args.finetune_override or []))
    print_table("quality", rows, {"data": data, "budgets": "; ".join(f"{m} {','.join(f'{b:g}' for b in bs)}"
                                                                      for m, bs in budgets.items()),
                                  "eval": "kNN k=20 T=0.07 + linear probe, val split 5000"})
    png = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if png:
        print(f"[quality] curves: {plot(rows, png, title=f'CIFAR-10 val split, {Path(data).name}')}")
    return rows
