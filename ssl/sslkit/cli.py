"""Console entry points: ``sslkit-pretrain`` (Hydra), ``sslkit-eval``, ``sslkit-export``.

``scripts/*.py`` are thin wrappers around the same functions.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sslkit.config import register_configs
from sslkit.errors import CheckpointError, ConfigError, SSLKitError
from sslkit.preemption import Preempted

CONFIG_NAME = "pretrain"


def config_dir() -> str:
    """The packaged configs (works from a source checkout, an editable install and a wheel)."""
    return str(importlib.resources.files("sslkit.configs"))


def compose(overrides: list[str] | None = None, config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose a config like the CLI does, without running it (tests, notebooks, sweeps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


# ----------------------------------------------------------------------------------------- pretrain
def run_pretrain(cfg: DictConfig, run_dir: str | Path) -> Any:
    from sslkit.engine import train

    result = train(cfg, run_dir)
    if cfg.trainer.summary and result.is_main:  # distributed runs: rank 0 summarizes
        summarize(cfg, result)
    return result


def summarize(cfg: DictConfig, result: Any) -> Optional[dict[str, float]]:
    """Print what the run learned: the training loss over the run, the loss on held-out images (methods
    whose loss takes single images), and kNN accuracy of the frozen encoder on held-out labelled data,
    against a randomly initialized encoder and raw pixels."""
    from sslkit.data import SubsetSource, build_eval_loader, build_source
    from sslkit.evaluation import extract_features, knn_classify, raw_pixels
    from sslkit.methods import build_method

    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    if rows:
        print(f"[sslkit] training loss: {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> "
              f"{rows[-1]['loss']:.4f} (step {rows[-1]['step']})")
    name = str(cfg.data.name)
    train_cfg, test_cfg = copy.deepcopy(cfg.data), copy.deepcopy(cfg.data)
    with open_dict(train_cfg), open_dict(test_cfg):
        if name == "synthetic":
            train_cfg.num_samples = min(int(cfg.data.num_samples), 2048)
            test_cfg.num_samples, test_cfg.seed = 512, int(cfg.data.seed) + 1000
        elif name == "image_folder":
            train_cfg.split, test_cfg.split = "train", "val"
        else:
            print(f"[sslkit] no kNN summary for data.name={name} (use sslkit-eval knn)")
            return None
    size = int(cfg.method.view.size)
    device = next(result.method.parameters()).device
    train_src, test_src = build_source(train_cfg), build_source(test_cfg)
    if name == "image_folder":  # cap the summary's cost on big folders
        train_src = SubsetSource(train_src, list(range(0, len(train_src), max(1, len(train_src) // 5000))))
        test_src = SubsetSource(test_src, list(range(0, len(test_src), max(1, len(test_src) // 1000))))
    loaders = [build_eval_loader(s, cfg.data, size) for s in (train_src, test_src)]
    torch.manual_seed(int(cfg.trainer.seed))
    random_init = build_method(cfg).to(device).eval()
    result.method.eval()
    out: dict[str, float] = {}
    # 1) the training loss on held-out images (same masks for both models), where it takes single images
    for label, m in [("pretrained", result.method), ("random_init", random_init)]:
        g, tot, n = torch.Generator().manual_seed(0), 0.0, 0
        with torch.no_grad():
            for batch in loaders[1]:
                b = m.heldout_batch(batch["images"].to(device), g)
                if b is None:
                    break
                tot += float(m(b)["loss"]) * len(batch["images"])
                n += len(batch["images"])
        if n:
            out[f"heldout_loss_{label}"] = tot / n
    # 2) kNN on frozen features
    for label, embed in [("pretrained", result.method.features), ("random_init", random_init.features),
                         ("raw_pixels", raw_pixels)]:
        (trf, try_), (tef, tey) = [extract_features(embed, ld, device) for ld in loaders]
        out[f"knn_top1_{label}"] = knn_classify(trf, try_, tef, tey)["top1"]
    n_cls = len(test_src.classes)
    if "heldout_loss_pretrained" in out:
        print(f"[sslkit] held-out {result.method.name} loss ({len(test_src)} images): after pretraining "
              f"{out['heldout_loss_pretrained']:.4f} | same model at random init {out['heldout_loss_random_init']:.4f}")
    print(f"[sslkit] kNN top-1 (k=20, cosine, frozen {result.method.name} encoder features) on the same images: after pretraining "
          f"{out['knn_top1_pretrained']:.1f}% | random init {out['knn_top1_random_init']:.1f}% | raw pixels "
          f"{out['knn_top1_raw_pixels']:.1f}% | chance {100.0 / max(1, n_cls):.1f}%")
    (Path(result.run_dir) / "summary.json").write_text(json.dumps(out, indent=2))
    return out


def _hydra_pretrain(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = cfg.get("run_dir") or HydraConfig.get().runtime.output_dir
    try:
        run_pretrain(cfg, run_dir)
    except Preempted as e:  # checkpoint written: submitit requeues, else exit 128 + signum (sslkit.preemption)
        e.exit()
    except SSLKitError as e:
        print(f"\n[sslkit] error: {e}", file=sys.stderr)
        sys.exit(2)


def pretrain_main() -> None:
    import hydra

    register_configs()
    hydra.main(version_base=None, config_path=config_dir(), config_name=CONFIG_NAME)(_hydra_pretrain)()


# ----------------------------------------------------------------------------------------- finetune
def run_finetune(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train with method=classify, then report top-1 / top-5 on data.split=val (and ``top1_ema`` /
    ``top5_ema`` of the EMA weights with method.model_ema=true)."""
    from sslkit.data import build_eval_loader, build_source
    from sslkit.engine import train

    result = train(cfg, run_dir)
    val_cfg = copy.deepcopy(cfg.data)
    with open_dict(val_cfg):
        val_cfg.split = "val"
    loader = build_eval_loader(build_source(val_cfg), val_cfg, int(cfg.method.view.size))
    model = result.method.eval()
    device = next(model.parameters()).device
    predictors = {"": model.predict}
    if getattr(model, "model_ema", None) is not None:
        predictors["_ema"] = model.predict_ema
    hits = {s: [0, 0] for s in predictors}  # suffix -> [top-1, top-5] hits
    n = 0
    with torch.no_grad():
        for batch in loader:
            images, y = batch["images"].to(device), batch["labels"]
            for s, predict in predictors.items():
                logits = predict(images).cpu()
                pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits[s][0] += int((pred[:, 0] == y).sum())
                hits[s][1] += int((pred == y[:, None]).any(1).sum())
            n += len(y)
    res: dict[str, Any] = {}
    for s, (h1, h5) in hits.items():
        res[f"top1{s}"], res[f"top5{s}"] = 100.0 * h1 / max(1, n), 100.0 * h5 / max(1, n)
    res.update(val_images=n, step=result.step)
    ema = f" | EMA weights: top-1 {res['top1_ema']:.2f}%  top-5 {res['top5_ema']:.2f}%" if "_ema" in hits else ""
    print(f"[sslkit] fine-tuned {result.method.model_config['name']}: val top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}% on {n} images{ema}")
    (Path(run_dir) / "finetune.json").write_text(json.dumps(res, indent=2))
    return res


def _hydra_finetune(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run_finetune(cfg, cfg.get("run_dir") or HydraConfig.get().runtime.output_dir)
    except Preempted as e:  # as in _hydra_pretrain
        e.exit()
    except SSLKitError as e:
        print(f"\n[sslkit] error: {e}", file=sys.stderr)
        sys.exit(2)


def finetune_main() -> None:
    import hydra

    register_configs()
    hydra.main(version_base=None, config_path=config_dir(), config_name="finetune")(_hydra_finetune)()


# ----------------------------------------------------------------------------------------- export
def load_backbone(checkpoint: str | Path, for_finetune: bool = True, **overrides: Any) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild the pretrained encoder from an sslkit checkpoint. With ``for_finetune`` the pretraining
    adaptations (e.g. UM's halved spatial reduction / window 8) are converted to the fine-tuning shapes."""
    import timm

    import sslkit.models as models
    from sslkit import checkpoint as ckpt_io

    ckpt = ckpt_io.load(checkpoint)
    mc = ckpt["model_config"]
    prefix = str(ckpt.get("backbone_prefix", "backbone."))
    sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{checkpoint} holds no '{prefix}*' weights; it is not a pretraining checkpoint")
    kwargs = dict(mc["kwargs"])
    if for_finetune and kwargs.get("um_pretrain"):
        sd = models.convert_um_pretrain_to_finetune(mc["name"], sd)
        kwargs["um_pretrain"] = False
    kwargs.update(overrides)
    model = timm.create_model(mc["name"], **kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: backbone {mc['name']} does not match the checkpoint "
                              f"(missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]})")
    return model, ckpt, kwargs


EXPORT_NOTES = {
    "umae": "Backbone only (no head). UM pretraining adaptations were converted to fine-tuning shapes (PVT "
            "spatial-reduction ratios 4,2,1,1 -> 8,4,2,1; Swin window 8 -> 16, continuous position bias MLPs "
            "kept). The method's mask tokens and decoder are not exported.",
    "simmim": "Backbone only (no head); the SimMIM mask token and decoder are not exported.",
    "dinov2": "The EMA teacher's backbone (what DINOv2 evaluates), no head; the DINO/iBOT heads and the student "
              "are not exported. mask_token is included (unused outside iBOT).",
}


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` (loadable with timm's pretrained_cfg_overlay)."""
    from safetensors.torch import save_file

    model, ckpt, kwargs = load_backbone(checkpoint, for_finetune=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "backbone.safetensors"), metadata={"format": "pt"})
    meta = {
        "model_name": ckpt["model_config"]["name"],
        "create_kwargs": {k: v for k, v in kwargs.items() if k not in ("num_classes",)},
        "method": ckpt["method"], "step": ckpt["step"], "source_checkpoint": str(checkpoint),
        "sslkit_version": ckpt.get("sslkit_version"),
        "load_with": f"timm.create_model('{ckpt['model_config']['name']}', pretrained=True, "
                     f"pretrained_cfg_overlay=dict(file='{out / 'backbone.safetensors'}'), num_classes=N)",
        "backbone_prefix": str(ckpt.get("backbone_prefix", "backbone.")),
        "notes": EXPORT_NOTES.get(ckpt["method"], "Backbone only (no head)."),
    }
    (out / "backbone.json").write_text(json.dumps(meta, indent=2))
    print(f"[sslkit] wrote {out / 'backbone.safetensors'} ({len(sd)} tensors) and backbone.json")
    return out


def _kv_args(argv: list[str]) -> DictConfig:
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments must be key=value, got {bad}")
    return OmegaConf.from_dotlist(argv)


def export_main(argv: list[str] | None = None) -> None:
    args = _kv_args(sys.argv[1:] if argv is None else argv)
    try:
        if "checkpoint" not in args:
            raise ConfigError("usage: sslkit-export checkpoint=<run>/checkpoints/last.pt [out=<dir>]")
        ckpt = Path(str(args.checkpoint))
        export(ckpt, args.get("out") or ckpt.parent.parent / "export")
    except SSLKitError as e:
        print(f"[sslkit] error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------- eval
class EvalFeatures(NamedTuple):
    """Frozen features of a checkpoint's backbone on the train and val splits (L2-normalized, CPU)."""

    train_f: torch.Tensor  # (N, C)
    train_y: torch.Tensor  # (N,) int64
    val_f: torch.Tensor  # (M, C)
    val_y: torch.Tensor  # (M,) int64
    classes: list[str]
    ckpt: dict[str, Any]
    data: dict[str, Any]  # the data config the splits were built from


def split_features(embeds: dict[str, Any], data_cfg: DictConfig, size: int,
                   device: torch.device = torch.device("cpu")) -> tuple[dict[str, tuple[torch.Tensor, ...]], list[str]]:
    """Features of every ``embeds[name]`` ((B, 3, S, S) -> (B, C)) on the train and val splits, decoding
    the images once: ``{name: (train_f, train_y, val_f, val_y)}`` (L2-normalized, CPU) and the class names."""
    from sslkit.data import build_eval_loader, build_source
    from sslkit.evaluation import eval_split_configs, extract_features_multi

    per_split, classes = [], []
    for c in eval_split_configs(data_cfg).values():
        src = build_source(c)  # DataError for an empty split
        classes = list(src.classes)
        per_split.append(extract_features_multi(embeds, build_eval_loader(src, c, size), device))
    (tr, try_), (va, vy) = per_split
    return {k: (tr[k], try_, va[k], vy) for k in embeds}, classes


def eval_features(checkpoint: str | Path, data_overrides: list[str]) -> EvalFeatures:
    """Load the backbone of ``checkpoint`` and extract its pooled pre-logit features (``embed``) on the
    train and val splits (``eval_split_configs``) of the checkpoint's data config, or of ``data=...`` /
    ``data.*`` overrides (then composed from the packaged defaults, not merged with the checkpoint's).
    Shared by kNN and linear."""
    from sslkit.methods.base import embed

    model, ckpt, _ = load_backbone(checkpoint, for_finetune=False)  # CheckpointError if missing / not ours
    model.eval()
    data_cfg = compose(list(data_overrides)).data if data_overrides else OmegaConf.create(ckpt["config"]["data"])
    size = int(ckpt["config"]["method"]["view"]["size"])
    feats, classes = split_features({"model": lambda x: embed(model, x)}, data_cfg, size)
    return EvalFeatures(*feats["model"], classes, ckpt, OmegaConf.to_container(data_cfg, resolve=True))


def eval_knn(checkpoint: str | Path, data_overrides: list[str], k: int = 20, temperature: float = 0.07,
             out: Optional[str | Path] = None) -> dict[str, float]:
    """Weighted kNN on frozen features: train split -> val split of the checkpoint's data config
    (or of ``data=...`` overrides)."""
    from sslkit.evaluation import check_eval_labels, knn_classify

    f = eval_features(checkpoint, data_overrides)
    check_eval_labels(f.train_y, f.val_y, len(f.classes), f.classes, what="kNN")
    res = knn_classify(f.train_f, f.train_y, f.val_f, f.val_y, k=k, temperature=temperature)
    print(f"[sslkit] kNN (k={k}, T={temperature}): top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
    if out:
        Path(out).write_text(json.dumps({"checkpoint": str(checkpoint), "k": k, **res}, indent=2))
    return res


def eval_linear(checkpoint: str | Path, data_overrides: list[str], lrs: Optional[list[float]] = None,
                epochs: int = 100, out: Optional[str | Path] = None, *, batch_size: int = 256,
                weight_decay: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Linear probe on frozen features (``evaluation.linear_probe``): train split -> val split, like
    ``eval_knn``. The lr is chosen on held-out train samples; val is only reported. Writes the result
    (checkpoint, protocol, chosen lr, top-1 / top-5, every lr's held-out and val accuracy) to ``out``."""
    from sslkit.evaluation import DEFAULT_LRS, linear_probe

    f = eval_features(checkpoint, data_overrides)
    res = linear_probe(f.train_f, f.train_y, f.val_f, f.val_y, num_classes=len(f.classes),
                       lrs=tuple(lrs) if lrs else DEFAULT_LRS, epochs=epochs, batch_size=batch_size,
                       weight_decay=weight_decay, seed=seed, class_names=f.classes)
    p = res["protocol"]
    print(f"[sslkit] linear probe ({len(p['lrs'])} lrs at once, SGD+cosine, {epochs} epochs, lr chosen on "
          f"{p['holdout_samples']} held-out train images): val top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}% "
          f"on {p['val_samples']} images (lr {res['lr']:g}, held-out top-1 {res['holdout_top1']:.2f}%)")
    if res["lr_at_grid_edge"]:
        print(f"[sslkit] note: the chosen lr {res['lr']:g} is at the edge of the grid {p['lrs']}; "
              f"a wider lrs=[...] may do better")
    diverged = [d["lr"] for d in res["per_lr"] if d["diverged"]]
    if diverged:
        print(f"[sslkit] note: lrs {diverged} diverged (never selected)")
    report = {"checkpoint": str(checkpoint), "method": f.ckpt.get("method"), "step": f.ckpt.get("step"),
              "model": f.ckpt["model_config"]["name"], "data": f.data, "eval": "linear",
              "features": "backbone pooled pre-logits (CLS for ViT, mean-pooled last stage for PVT/Swin), "
                          "L2-normalized", **res}
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    return report


EVAL_USAGE = (
    "usage: sslkit-eval knn checkpoint=<ckpt> [data=<group> data.path=...] [k=20] [t=0.07] [out=r.json]\n"
    "       sslkit-eval linear checkpoint=<ckpt> [data=<group> data.path=...] [epochs=100] "
    "[lrs=[0.001,0.01,0.1]] [batch_size=256] [wd=0] [seed=0] [out=r.json]"
)
_EVAL_KEYS = {"knn": {"checkpoint", "k", "t", "out"},
              "linear": {"checkpoint", "epochs", "lrs", "batch_size", "wd", "seed", "out"}}


def eval_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] not in _EVAL_KEYS:
            got = f"unknown subcommand {argv[0]!r}; " if argv else ""
            raise ConfigError(f"{got}{EVAL_USAGE}")
        cmd = argv[0]
        data = [a for a in argv[1:] if a.startswith(("data=", "data."))]
        args = _kv_args([a for a in argv[1:] if not a.startswith(("data=", "data."))])
        unknown = sorted(set(args) - _EVAL_KEYS[cmd])
        if unknown:
            raise ConfigError(f"sslkit-eval {cmd} does not take {unknown}; {EVAL_USAGE}")
        if "checkpoint" not in args:
            raise ConfigError(f"sslkit-eval {cmd} needs checkpoint=<path>; {EVAL_USAGE}")
        if cmd == "knn":
            eval_knn(str(args.checkpoint), data, k=int(args.get("k", 20)), temperature=float(args.get("t", 0.07)),
                     out=args.get("out"))
        else:
            lrs = args.get("lrs")
            if lrs is not None:
                lrs = list(lrs) if OmegaConf.is_list(lrs) else [lrs]
                try:
                    lrs = [float(v) for v in lrs]
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"lrs must be a list of numbers like lrs=[0.001,0.01,0.1], got {lrs}") from e
            eval_linear(str(args.checkpoint), data, lrs=lrs, epochs=int(args.get("epochs", 100)),
                        out=args.get("out"), batch_size=int(args.get("batch_size", 256)),
                        weight_decay=float(args.get("wd", 0.0)), seed=int(args.get("seed", 0)))
    except SSLKitError as e:
        print(f"[sslkit] error: {e}", file=sys.stderr)
        sys.exit(2)
