"""Frozen-feature evaluation, one place for all of it.

- The evaluation split (``eval_split_configs`` / ``eval_sources``): train and val sources of a data
  config, optionally thinned evenly per class. The end-of-run summary, online kNN and ``sslkit-eval``
  all use it, so they agree by construction.
- Protocols: weighted kNN (DINO protocol: cosine similarity, k=20, T=0.07) and a linear probe with a
  one-pass lr sweep (DINOv2-style; lr selected on held-out train data, see ``linear_probe`` /
  ``LINEAR_PROTOCOL``).
- Commands on a checkpoint (``eval_knn``, ``eval_linear``), the end-of-run ``summarize`` of
  pretraining, ``OnlineKNN`` during pretraining, and ``evaluate_classifier`` after fine-tuning.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from sslkit.config import compose
from sslkit.data import SubsetSource, build_eval_loader, build_source
from sslkit.data.loader import derive_seed
from sslkit.errors import ConfigError, DataError, TrainingError
from sslkit.methods import Method, build_method, embed
from sslkit.pretrained import Pretrained, load_backbone

@torch.no_grad()
def extract_features(embed: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized features (N, C) of ``embed`` over ``loader`` and the labels (N,)."""
    feats, labels = extract_features_multi({"f": embed}, loader, device)
    return feats["f"], labels


def raw_pixels(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline "encoder": each image flattened and mean-centred, (B, 3, H, W) -> (B, 3HW)."""
    x = images.flatten(1)
    return x - x.mean(1, keepdim=True)


@torch.no_grad()
def extract_features_multi(embeds: dict[str, Callable[[torch.Tensor], torch.Tensor]], loader,
                           device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``extract_features`` for several encoders in one pass over ``loader`` (images decoded once)."""
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in embeds}
    labels = []
    for batch in loader:
        x = batch["images"].to(device)
        for k, fn in embeds.items():
            feats[k].append(F.normalize(fn(x).float(), dim=1).cpu())  # (B, C)
        labels.append(batch["labels"])
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def eval_split_configs(data_cfg: Any) -> dict[str, Any]:
    """The train / val data configs of evaluation. Synthetic data has no split: train = the config's
    images, val = 1000 images of seed + 1000; other sources use ``data.split`` (see ``split_indices``)."""
    out = {}
    for split in ("train", "val"):
        c = copy.deepcopy(data_cfg)
        with open_dict(c):
            if c.name == "synthetic":
                c.seed = int(c.seed) + (1000 if split == "val" else 0)
                c.num_samples = 1000 if split == "val" else c.num_samples
            else:
                c.split = split
        out[split] = c
    return out


def eval_sources(data_cfg: Any, max_train: Optional[int] = None, max_val: Optional[int] = None) -> tuple[Any, Any]:
    """The train and val sources of ``eval_split_configs``, each thinned to at most ``max_*`` samples by
    an even stride over the samples sorted by class, so every class keeps its share."""
    out = []
    for c, cap in zip(eval_split_configs(data_cfg).values(), (max_train, max_val)):
        src = build_source(c)  # DataError for an empty split
        if cap is not None and len(src) > cap:
            by_class = np.argsort(np.asarray(src.labels()), kind="stable")
            src = SubsetSource(src, np.sort(by_class[(np.arange(cap) * len(src)) // cap]))
        out.append(src)
    return out[0], out[1]


class OnlineKNN:
    """kNN top-1 / top-5 (k=20, T=0.07) of ``method.features`` on a small labelled split, every ``every``
    optimizer steps of pretraining: the loop calls ``online_knn(step, method)`` after each step and logs
    what it returns (``{}`` on other steps). Runs in eval mode under ``torch.no_grad`` with the RNG state
    forked, so it does not change the training run (resume stays exact)."""

    def __init__(self, data_cfg: Any, size: int, every: int, max_train: int, max_val: int,
                 k: int = 20, temperature: float = 0.07) -> None:
        if every <= 0:
            raise ConfigError(f"trainer.knn_every={every}: use a positive number of steps, or null to turn it off")
        self.every, self.k, self.temperature = int(every), int(k), float(temperature)
        train_src, val_src = eval_sources(data_cfg, max_train, max_val)
        self.num_classes = len(train_src.classes)
        self.loaders = [build_eval_loader(s, data_cfg, size, num_workers=0) for s in (train_src, val_src)]

    def __call__(self, step: int, method: Any) -> dict[str, float]:
        if step % self.every:
            return {}
        device = next(method.parameters()).device
        was_training = method.training
        with torch.random.fork_rng(devices=[]):  # the eval loaders draw a base seed from the global RNG
            method.eval()
            try:
                (trf, try_), (vf, vy) = [extract_features(method.features, ld, device) for ld in self.loaders]
            finally:
                method.train(was_training)
        res = knn_classify(trf, try_, vf, vy, k=self.k, temperature=self.temperature, num_classes=self.num_classes)
        return {"knn_top1": res["top1"], "knn_top5": res["top5"]}


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> dict[str, float]:
    """Weighted kNN on L2-normalized features. Returns top-1 / top-5 accuracy in percent."""
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    k = min(k, train_f.shape[0])
    top1 = top5 = 0
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.T  # (b, N) cosine similarities
        w, idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], (w / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices  # (b, 5)
        y = test_y[i:i + chunk]
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(dim=1).sum().item()
    n = test_f.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# ----------------------------------------------------------------------------------------- linear probe
# The lr grid of the sweep (SGD, momentum 0.9, per-batch mean cross-entropy on standardized features):
# half-decade steps over 4 decades. On separable / correlated synthetic features the best lr ranged from
# 1e-3 (isotropic noisy features, few samples: small lr = early stopping) to 0.3 (few samples, strongly
# correlated features). Diverged heads are reported and never selected; ``lr_at_grid_edge`` flags a
# selection at either end of the grid (then extend ``lrs``).
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

# seed streams of the probe (split, init, batch order): unrelated generators for one ``seed``
_HOLDOUT, _INIT, _ORDER = 11, 12, 13

LINEAR_PROTOCOL = (
    "Linear probe on frozen features (DINOv2-style sweep): the features (sslkit-eval: the backbone's "
    "pooled pre-logits, L2-normalized by extract_features as for kNN) are standardized per dimension with "
    "the mean / std of the fitting part of train (standardize=True; DINOv2 feeds the raw CLS, which on "
    "small data needs a model-dependent lr grid). One linear classifier (weight N(0, 0.01), bias 0) per lr, "
    "all trained in the same pass over the same shuffled mini-batches: SGD momentum 0.9, per-iteration "
    "cosine decay of each lr to 0, mean cross-entropy, no augmentation, no refit. The lr is selected on a "
    "held-out, stratified, seeded part of the train split (highest held-out top-1, ties: lowest held-out "
    "loss, then the smaller lr); the val split is only used to report top-1 / top-5 of the selected "
    "classifier (and, for transparency, of every lr)."
)


def _seed(seed: int, stream: int) -> int:
    return derive_seed(int(seed), stream)


def holdout_split(y: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of the train samples into (fit indices, held-out indices).

    Per class with ``n >= 2`` samples, ``clamp(round(fraction * n), 1, n - 1)`` random samples are held
    out; a class with one sample stays in the fitting part. Both index tensors are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(_seed(seed, _HOLDOUT))
    hold = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        n = len(idx)
        if n < 2:
            continue
        k = min(max(1, int(math.floor(fraction * n + 0.5))), n - 1)
        hold.append(idx[torch.randperm(n, generator=g)[:k]])
    if not hold:
        raise DataError(f"the train split ({len(y)} samples) has no class with 2 or more samples: nothing can be "
                        f"held out to select the linear probe's lr. Use more train data")
    hold_idx = torch.cat(hold).sort().values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[hold_idx] = False
    return mask.nonzero().flatten(), hold_idx


def linear_batches(n: int, batch_size: int, epochs: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The probe's mini-batches: per epoch a seeded permutation of ``range(n)`` cut into consecutive
    ``batch_size`` chunks (the last one smaller; no drop_last). Shared by every lr of a sweep."""
    for perm in _epoch_orders(n, epochs, seed):
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def _epoch_orders(n: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(_seed(seed, _ORDER))
    for _ in range(epochs):
        yield torch.randperm(n, generator=g)


def cosine_lr(step: int, total: int) -> float:
    """Cosine decay factor from 1 (step 0) towards 0 (step ``total``): ``0.5 * (1 + cos(pi * step / total))``,
    the closed form of ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total, eta_min=0)``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int,
             seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of ``linear_batches`` as (features, labels): one gather per epoch, then slices."""
    for perm in _epoch_orders(len(y), epochs, seed):
        xe, ye = x[perm], y[perm]
        for i in range(0, len(y), batch_size):
            yield xe[i:i + batch_size], ye[i:i + batch_size]


@torch.no_grad()
def train_linear_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], *,
                       epochs: int, batch_size: int, weight_decay: float = 0.0, momentum: float = 0.9,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(lrs)`` linear classifiers at once on ``x`` (N, C) float / ``y`` (N,) int64.

    The L heads are the column blocks of one (C, L*K) weight matrix, so each mini-batch is one matmul
    for all of them. Every head starts from the same init and sees the same batches; its update is
    exactly ``torch.optim.SGD(lr=lrs[l], momentum, weight_decay)`` on the batch-mean cross-entropy
    with the per-iteration cosine schedule (``cosine_lr``): gradients are computed in closed form
    (softmax - one-hot), and the heads never interact (a diverging head does not affect the others).

    Returns (W (L, C, K), b (L, K)). ``epochs=0`` returns the initialization.
    """
    n, C = x.shape
    L, K = len(lrs), int(num_classes)
    if n == 0 or L == 0:
        raise ConfigError(f"train_linear_heads needs samples and lrs, got {n} samples and {L} lrs")
    if batch_size <= 0 or epochs < 0:
        raise ConfigError(f"need batch_size > 0 and epochs >= 0, got {batch_size}, {epochs}")
    x = x.float()
    g = torch.Generator().manual_seed(_seed(seed, _INIT))
    w0 = torch.randn(C, K, generator=g) * 0.01  # DINOv2's LinearClassifier init (std 0.01, bias 0)
    W = w0.repeat(1, L)  # (C, L*K): head l = columns l*K .. (l+1)*K - 1
    b = torch.zeros(L * K)
    bufW, bufb = torch.zeros_like(W), torch.zeros_like(b)
    lr = torch.tensor([float(v) for v in lrs]).repeat_interleave(K)  # (L*K,)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for xb, yb in _batches(x, y, batch_size, epochs, seed):  # = x[idx], y[idx] for linear_batches' idx
        B = len(yb)
        p = torch.softmax((xb @ W + b).view(B, L, K), dim=-1)  # (B, L, K)
        p -= F.one_hot(yb, K).to(p.dtype)[:, None, :]  # d(mean CE)/d(logits) * B
        p = p.view(B, L * K) / B
        gW = xb.T @ p  # (C, L*K)
        gb = p.sum(0)  # (L*K,)
        if weight_decay:
            gW.add_(W, alpha=weight_decay)
            gb.add_(b, alpha=weight_decay)
        bufW.mul_(momentum).add_(gW)
        bufb.mul_(momentum).add_(gb)
        lr_t = lr * cosine_lr(step, total)
        W.sub_(bufW * lr_t)
        b.sub_(bufb * lr_t)
        step += 1
    return W.view(C, L, K).permute(1, 0, 2).contiguous(), b.view(L, K).clone()


@torch.no_grad()
def score_heads(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per head: top-1 / top-5 accuracy (percent) and mean cross-entropy on (x, y). Each (L,)."""
    L, C, K = W.shape
    Wf, bf = W.permute(1, 0, 2).reshape(C, L * K), b.reshape(L * K)
    k = min(5, K)
    top1, top5, loss = torch.zeros(L), torch.zeros(L), torch.zeros(L, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        xc, yc = x[i:i + chunk].float(), y[i:i + chunk]
        logits = (xc @ Wf + bf).view(len(xc), L, K)
        target = yc[:, None, None].expand(len(xc), L, 1)
        loss += (torch.logsumexp(logits, -1) - logits.gather(-1, target).squeeze(-1)).double().sum(0)
        hit = logits.topk(k, dim=-1).indices == target  # (n, L, k)
        top1 += hit[..., 0].sum(0)
        top5 += hit.any(-1).sum(0)
    n = max(1, len(x))
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": (loss / n).float()}


def check_eval_labels(train_y: torch.Tensor, val_y: torch.Tensor, num_classes: int,
                      class_names: Optional[Sequence[str]], what: str = "A linear probe") -> None:
    """DataError (with the fix) for an empty split, unlabelled / out-of-range labels, or a val class
    that never occurs in train (``what`` could never predict it)."""
    def name(c: int) -> str:
        return f"{c} ({class_names[c]})" if class_names is not None and 0 <= c < len(class_names) else str(c)

    for split, y in (("train", train_y), ("val", val_y)):
        if len(y) == 0:
            raise DataError(f"the {split} split is empty: {what.lower()} needs labelled train and val samples")
        bad = sorted(set(y[(y < 0) | (y >= num_classes)].tolist()))
        if bad:
            raise DataError(f"{split} labels {bad[:10]} are outside 0..{num_classes - 1} (negative = unlabelled "
                            f"samples, which {what.lower()} cannot use; use data.split=train / val)")
    missing = sorted(set(val_y.tolist()) - set(train_y.tolist()))
    if missing:
        raise DataError(f"{len(missing)} class(es) of the val split never occur in the train split: "
                        f"{', '.join(name(c) for c in missing[:20])}{' ...' if len(missing) > 20 else ''}. "
                        f"{what} cannot predict a class it never saw in train. Fix: give every class "
                        f"train images (e.g. a smaller data.val_fraction, or more images per class)")


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: Optional[int] = None, lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 100,
                 batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, *,
                 holdout_fraction: float = 0.1, standardize: bool = True,
                 class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Linear probe with an lr sweep in one pass (see ``LINEAR_PROTOCOL``); deterministic given ``seed``.

    ``train_f`` (N, C), ``train_y`` (N,), ``val_f`` (M, C), ``val_y`` (M,). The classifiers are fitted
    on the train samples outside a stratified held-out part (``holdout_fraction``, ``holdout_split``);
    the lr with the best held-out top-1 is selected without looking at val. Returns::

        {"top1", "top5": val accuracy (percent) of the selected classifier, "lr": its lr,
         "holdout_top1": its held-out accuracy, "lr_at_grid_edge": selected the smallest / largest lr, "per_lr": [{"lr", "holdout_top1", "holdout_loss",
         "val_top1", "val_top5", "diverged"} per lr (None metrics for a diverged head)],
         "protocol": {the settings and split sizes}}

    Raises ``DataError`` for an empty split, unusable labels, or val classes absent from train
    (named, with ``class_names``), and ``TrainingError`` when every lr diverged.
    """
    lrs = tuple(float(v) for v in lrs)
    if not lrs or any(not (v > 0 and math.isfinite(v)) for v in lrs):
        raise ConfigError(f"linear probe lrs must be a non-empty list of positive numbers, got {list(lrs)}")
    if len(set(lrs)) != len(lrs):
        raise ConfigError(f"linear probe lrs must be distinct, got {list(lrs)}")
    if epochs <= 0 or batch_size <= 0:
        raise ConfigError(f"linear probe needs epochs > 0 and batch_size > 0, got {epochs}, {batch_size}")
    train_y, val_y = train_y.long(), val_y.long()
    if len(train_f) != len(train_y) or len(val_f) != len(val_y):
        raise DataError(f"features and labels differ in length: train {len(train_f)} vs {len(train_y)}, "
                        f"val {len(val_f)} vs {len(val_y)}")
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1 if len(train_y) and len(val_y) else 1
    num_classes = int(num_classes)
    check_eval_labels(train_y, val_y, num_classes, class_names)
    fit_idx, hold_idx = holdout_split(train_y, holdout_fraction, seed)
    x_fit, x_hold, x_val = train_f[fit_idx].float(), train_f[hold_idx].float(), val_f.float()
    if standardize:
        mean, std = x_fit.mean(0), x_fit.std(0, unbiased=False)
        std = std.clamp_min(max(1e-6 * float(std.max()), 1e-12))  # constant dims -> 0, not inf
        x_fit, x_hold, x_val = [(v - mean) / std for v in (x_fit, x_hold, x_val)]
    W, b = train_linear_heads(x_fit, train_y[fit_idx], num_classes, lrs, epochs=epochs, batch_size=batch_size,
                              weight_decay=weight_decay, seed=seed)
    hold = score_heads(x_hold, train_y[hold_idx], W, b)
    val = score_heads(x_val, val_y, W, b)
    finite = torch.isfinite(W).flatten(1).all(1) & torch.isfinite(b).all(1) & torch.isfinite(hold["loss"])
    per_lr = []
    for i, lr in enumerate(lrs):
        ok = bool(finite[i])
        per_lr.append({"lr": lr, "diverged": not ok,
                       "holdout_top1": float(hold["top1"][i]) if ok else None,
                       "holdout_loss": float(hold["loss"][i]) if ok else None,
                       "val_top1": float(val["top1"][i]) if ok else None,
                       "val_top5": float(val["top5"][i]) if ok else None})
    candidates = [i for i in range(len(lrs)) if finite[i]]
    if not candidates:
        raise TrainingError(f"every linear probe lr diverged ({list(lrs)}): use smaller lrs")
    # best held-out top-1; ties: lowest held-out loss, then the smaller lr
    best = min(candidates, key=lambda i: (-per_lr[i]["holdout_top1"], per_lr[i]["holdout_loss"], lrs[i]))
    return {
        "top1": per_lr[best]["val_top1"], "top5": per_lr[best]["val_top5"], "lr": lrs[best],
        "holdout_top1": per_lr[best]["holdout_top1"], "lr_at_grid_edge": len(lrs) > 1 and lrs[best] in (min(lrs), max(lrs)),
        "per_lr": per_lr,
        "protocol": {
            "description": LINEAR_PROTOCOL, "optimizer": "sgd", "momentum": 0.9, "schedule": "cosine (per iteration, to 0)",
            "epochs": int(epochs), "batch_size": int(batch_size), "weight_decay": float(weight_decay),
            "lrs": list(lrs), "standardize": bool(standardize), "selection": "holdout_top1 on train", "holdout_fraction": float(holdout_fraction),
            "seed": int(seed), "num_classes": num_classes, "feature_dim": int(train_f.shape[1]),
            "fit_samples": len(fit_idx), "holdout_samples": len(hold_idx), "val_samples": len(val_y),
        },
    }


# ----------------------------------------------------------------------------------------- on a checkpoint
class EvalFeatures(NamedTuple):
    """Frozen features of a checkpoint's backbone on the train and val splits (L2-normalized, CPU)."""

    train_f: torch.Tensor  # (N, C)
    train_y: torch.Tensor  # (N,) int64
    val_f: torch.Tensor  # (M, C)
    val_y: torch.Tensor  # (M,) int64
    classes: list[str]
    pretrained: Pretrained  # where the backbone came from (pretrained.ckpt: the sslkit checkpoint, if any)
    data: dict[str, Any]  # the data config the splits were built from


def split_features(embeds: dict[str, Callable[[torch.Tensor], torch.Tensor]], data_cfg: Any, size: int,
                   device: torch.device = torch.device("cpu"), max_train: Optional[int] = None,
                   max_val: Optional[int] = None) -> tuple[dict[str, tuple[torch.Tensor, ...]], list[str]]:
    """Features of every ``embeds[name]`` ((B, 3, S, S) -> (B, C)) on the evaluation split (``eval_sources``),
    decoding the images once: ``{name: (train_f, train_y, val_f, val_y)}`` (L2-normalized, CPU) and the
    class names."""
    per_split = []
    sources = eval_sources(data_cfg, max_train, max_val)  # DataError for an empty split
    for src in sources:
        per_split.append(extract_features_multi(embeds, build_eval_loader(src, data_cfg, size), device))
    (tr, try_), (va, vy) = per_split
    return {k: (tr[k], try_, va[k], vy) for k in embeds}, list(sources[0].classes)


def eval_features(checkpoint: str | Path, data_cfg: Optional[DictConfig] = None, model: Optional[str] = None,
                  img_size: Optional[int] = None) -> EvalFeatures:
    """Load the backbone of ``checkpoint`` (``sslkit.pretrained``: sslkit checkpoints and exports, supported
    foreign layouts with ``model``) and extract its pooled pre-logit features on the evaluation split of
    ``data_cfg`` (default: an sslkit checkpoint's own data config) at ``img_size`` (default: the checkpoint's
    view size, else the model's input size). Shared by kNN and linear."""
    net, pre = load_backbone(checkpoint, for_finetune=False, model=model)  # CheckpointError if unusable
    net.eval()
    if data_cfg is None:
        if pre.ckpt is None:
            raise ConfigError(f"{checkpoint} ({pre.source}) carries no data config: give the data to evaluate on, "
                              f"e.g. data=image_folder data.path=/path/to/images")
        data_cfg = OmegaConf.create(pre.ckpt["config"]["data"])
    if img_size is None:  # the run's view size; else the size the weights were made for; else the model's default
        img_size = int(pre.ckpt["config"]["method"]["view"]["size"]) if pre.ckpt else int(
            pre.kwargs.get("img_size") or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    feats, classes = split_features({"model": lambda x: embed(net, x)}, data_cfg, int(img_size))
    return EvalFeatures(*feats["model"], classes, pre, OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True))


def _data_cfg(data: Optional[DictConfig | Sequence[str]]) -> Optional[DictConfig]:
    """``data`` as a data config: None (the checkpoint's), a config, or ``data=...`` / ``data.*`` overrides
    (composed from the packaged defaults, not merged with the checkpoint's)."""
    if data is None or isinstance(data, DictConfig):
        return data
    return compose(list(data)).data if data else None


def eval_knn(checkpoint: str | Path, data: Optional[DictConfig | Sequence[str]] = None, k: int = 20,
             temperature: float = 0.07, out: Optional[str | Path] = None, *, model: Optional[str] = None,
             img_size: Optional[int] = None) -> dict[str, float]:
    """Weighted kNN on frozen features: train split -> val split of the checkpoint's data config
    (or of ``data``: a data config or ``data=...`` overrides); ``model`` / ``img_size`` as ``eval_features``."""
    f = eval_features(checkpoint, _data_cfg(data), model, img_size)
    check_eval_labels(f.train_y, f.val_y, len(f.classes), f.classes, what="kNN")
    res = knn_classify(f.train_f, f.train_y, f.val_f, f.val_y, k=k, temperature=temperature)
    print(f"[sslkit] kNN (k={k}, T={temperature}): top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
    if out:
        Path(out).write_text(json.dumps({"checkpoint": str(checkpoint), "k": k, **res}, indent=2))
    return res


def eval_linear(checkpoint: str | Path, data: Optional[DictConfig | Sequence[str]] = None,
                lrs: Optional[Sequence[float]] = None, epochs: int = 100, out: Optional[str | Path] = None, *,
                batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, model: Optional[str] = None,
                img_size: Optional[int] = None) -> dict[str, Any]:
    """Linear probe on frozen features (``linear_probe``): train split -> val split, like ``eval_knn``.
    The lr is chosen on held-out train samples; val is only reported. Writes the result (checkpoint,
    protocol, chosen lr, top-1 / top-5, every lr's held-out and val accuracy) to ``out``."""
    f = eval_features(checkpoint, _data_cfg(data), model, img_size)
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
    report = {"checkpoint": str(checkpoint), "method": f.pretrained.meta.get("method"),
              "step": f.pretrained.meta.get("step"), "model": f.pretrained.model_name, "source": f.pretrained.source,
              "data": f.data, "eval": "linear",
              "features": "backbone pooled pre-logits (CLS for ViT, mean-pooled last stage for PVT/Swin), "
                          "L2-normalized", **res}
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------- after training
def summarize(cfg: DictConfig, method: Method, run_dir: str | Path) -> dict[str, float]:
    """Print what a pretraining run learned, on the evaluation split (``eval_sources``, thinned to
    ``trainer.knn_train_samples`` / ``knn_val_samples`` like online kNN): the training loss over the run,
    the loss on held-out val images (methods whose loss takes single images, same masks for both models),
    and two probes of frozen features — a linear probe (``linear_probe``, the MAE papers' protocol) and
    weighted kNN (DINO's) — applied alike to the encoder after pretraining, the same model at random init,
    and raw pixels. Writes ``summary.json``."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if rows:
        print(f"[sslkit] training loss: {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> "
              f"{rows[-1]['loss']:.4f} (step {rows[-1]['step']})")
    size = int(cfg.method.view.size)
    device = next(method.parameters()).device
    train_src, val_src = eval_sources(cfg.data, int(cfg.trainer.knn_train_samples), int(cfg.trainer.knn_val_samples))
    loaders = [build_eval_loader(s, cfg.data, size) for s in (train_src, val_src)]
    base = copy.deepcopy(cfg)  # the baseline is the model at random init, not at its method.init_from weights
    if base.method.get("init_from"):
        base.method.init_from = None
    torch.manual_seed(int(cfg.trainer.seed))
    random_init = build_method(base).to(device).eval()
    method.eval()
    out: dict[str, float] = {}
    for label, m in [("pretrained", method), ("random_init", random_init)]:  # the training loss on held-out images
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
    encoders = {"pretrained": method.features, "random_init": random_init.features, "raw_pixels": raw_pixels}
    (trf, try_), (vaf, vay) = [extract_features_multi(encoders, ld, device) for ld in loaders]  # decoded once
    k = len(train_src.classes)
    for label in encoders:  # the same two probes for every encoder
        out[f"knn_top1_{label}"] = knn_classify(trf[label], try_, vaf[label], vay, num_classes=k)["top1"]
        out[f"linear_top1_{label}"] = linear_probe(trf[label], try_, vaf[label], vay, num_classes=k, epochs=100,
                                                   class_names=list(train_src.classes))["top1"]
    if "heldout_loss_pretrained" in out:
        print(f"[sslkit] held-out {method.name} loss ({len(val_src)} images): after pretraining "
              f"{out['heldout_loss_pretrained']:.4f} | same model at random init {out['heldout_loss_random_init']:.4f}")
    print(f"[sslkit] frozen {method.name} encoder features, {len(train_src)} train -> {len(val_src)} held-out val "
          f"images, chance {100.0 / max(1, k):.1f}%:")
    probes = sorted((("linear", "linear probe"), ("knn", "kNN")), key=lambda p: p[0] != method.probe)
    for probe, name in probes:  # the method's own protocol first
        own = f" ({method.name}'s protocol)" if probe == method.probe else ""
        print(f"[sslkit]   {name}{own} top-1: after pretraining {out[f'{probe}_top1_pretrained']:.1f}% | random init "
              f"{out[f'{probe}_top1_random_init']:.1f}% | raw pixels {out[f'{probe}_top1_raw_pixels']:.1f}%")
    (run_dir / "summary.json").write_text(json.dumps(out, indent=2))
    return out


def evaluate_classifier(cfg: DictConfig, method: Method) -> dict[str, Any]:
    """Top-1 / top-5 of a fine-tuned classifier (``method.predict``) on ``data.split=val`` (and ``top1_ema``
    / ``top5_ema`` of its EMA weights with method.model_ema=true)."""
    val_cfg = copy.deepcopy(cfg.data)
    with open_dict(val_cfg):
        val_cfg.split = "val"
    loader = build_eval_loader(build_source(val_cfg), val_cfg, int(cfg.method.view.size))
    model = method.eval()
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
    res["val_images"] = n
    return res
