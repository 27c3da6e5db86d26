"""Supervised fine-tuning of a pretrained encoder (or training from scratch) on the backbone's timm head.
Same loop, same checkpoint format, resumable.

Loss: cross-entropy with label smoothing; while mixup / cutmix is on (``method.mixup``), soft-target
cross-entropy on the mixed, smoothed one-hot targets (DeiT / timm ``Mixup`` semantics: the batch is mixed
with its reverse, ``lam ~ Beta(a, a)``, cutmix's ``lam`` corrected to the clipped box's area).

Regularizers: stochastic depth (``model.drop_path_rate``, passed to the backbone), DropBlock
(``method.dropblock``: placement presets in ``sslkit.layers.dropblock_placement``; its rate is set in
``begin`` / ``after_step`` as a pure function of the step and logged as ``dropblock_drop_prob``), and an
EMA of the weights (``method.model_ema``: a frozen copy updated in ``after_step``; it is part of the
method's state dict, so checkpoints and resume carry it; ``sslkit-finetune`` evaluates it as ``top1_ema``).

Randomness of mixup / cutmix: a NumPy generator seeded from (seed, step, micro-batch, rank), ``seed`` being
the torch seed when the method is built (the loop seeds torch with ``trainer.seed`` first), so a resumed
run mixes exactly as an uninterrupted one without touching the global RNGs.

The pretrained weights come in through ``sslkit.pretrained.load_backbone``: key mapping (method wrapper ->
bare timm backbone), the explicit UM -> fine-tune conversion, and a load that fails on any missing or
unexpected key; only the new head is initialized fresh. DropBlock is inserted after loading and never
changes state-dict keys.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from omegaconf import MISSING

from sslkit.errors import ConfigError, DataError
from sslkit.layers.dropblock_placement import apply_dropblock, dropblock_schedule, set_drop_prob
from sslkit.methods.base import Method, backbone_kwargs, create_backbone, register_method
from sslkit.methods.ema import ema_update, freeze
from sslkit.pretrained import load_backbone
from sslkit.schemas import Choice, MethodConfig, between, checked, nonneg, positive, prob


class DropBlockPreset(Choice):
    none = "none"
    resnet_paper = "resnet_paper"  # Ghiasi et al. 2018
    resnet_timm = "resnet_timm"  # timm's placement
    custom = "custom"


class DropBlockMode(Choice):
    paper = "paper"  # a mask per sample and channel
    fast = "fast"  # one per sample


class DropBlockLayout(Choice):
    auto = "auto"
    nchw = "nchw"
    nhwc = "nhwc"
    tokens = "tokens"  # (B, N, C) as a square map


class DropBlockSchedule(Choice):
    linear = "linear"  # keep_prob 1 -> 1 - drop_prob over the run (the paper)
    warmup = "warmup"  # over warmup_epochs, then constant
    constant = "constant"


@dataclass
class DropBlockConfig:
    """DropBlock placement + schedule (layers/dropblock_placement.py); off by default."""

    preset: DropBlockPreset = DropBlockPreset.none
    drop_prob: float = checked(0.1, between(0.0, 1.0, open_hi=True))  # target rate = 1 - keep_prob (paper: keep 0.9)
    block_size: Optional[int] = positive(None)  # None: the preset's (resnet_paper 7, resnet_timm 5 / 3, custom 7)
    mode: DropBlockMode = DropBlockMode.paper
    targets: list[str] = field(default_factory=list)  # custom: fnmatch patterns on model.named_modules() names
    layout: DropBlockLayout = DropBlockLayout.auto  # custom: where the 2-D map is in the output
    schedule: DropBlockSchedule = DropBlockSchedule.linear
    warmup_epochs: float = nonneg(0.0)  # schedule=warmup: length of the ramp


@dataclass
class MixupConfig:
    """Mixup / CutMix of fine-tuning batches (soft-target cross-entropy while active); off by default."""

    mixup_alpha: float = nonneg(0.0)  # lam ~ Beta(a, a); 0 = no mixup (DeiT / MAE fine-tuning: 0.8)
    cutmix_alpha: float = nonneg(0.0)  # 0 = no cutmix (DeiT / MAE: 1.0)
    prob: float = checked(1.0, between(0.0, 1.0))  # probability that a batch is mixed
    switch_prob: float = checked(0.5, between(0.0, 1.0))  # both on: probability of cutmix instead of mixup


@dataclass
class ClassifyConfig(MethodConfig):
    """Supervised fine-tuning / training of a classifier (the same loop and checkpoint format)."""

    name: str = "classify"
    checkpoint: Optional[str] = None  # an sslkit pretraining checkpoint; None = from scratch
    num_classes: int = positive(MISSING)
    label_smoothing: float = checked(0.1, between(0.0, 1.0, open_hi=True))
    mixup: MixupConfig = field(default_factory=MixupConfig)
    dropblock: DropBlockConfig = field(default_factory=DropBlockConfig)
    model_ema: bool = False  # keep an EMA of the weights (evaluated at the end as top1_ema)
    model_ema_decay: float = prob(0.9998)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, K): ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K`` elsewhere."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k targets_k * log_softmax(logits)_k``."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float, cfg: Any,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """Mixup or cutmix of ``images`` (B, 3, H, W) with the reversed batch; returns the mixed images, the
    mixed smoothed targets (B, K), ``lam`` (the weight of the unreversed batch) and the kind
    (``mixup`` | ``cutmix`` | ``none``, the latter with probability ``1 - prob``)."""
    a_mix, a_cut = float(cfg.mixup_alpha), float(cfg.cutmix_alpha)
    lam, kind = 1.0, "none"
    if rng.random() < float(cfg.prob):
        use_cut = a_cut > 0 and (a_mix <= 0 or rng.random() < float(cfg.switch_prob))
        kind = "cutmix" if use_cut else "mixup"
        lam = float(rng.beta(a_cut, a_cut) if use_cut else rng.beta(a_mix, a_mix))
    flipped = images.flip(0)
    if kind == "mixup":
        images = images * lam + flipped * (1.0 - lam)
    elif kind == "cutmix":
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))  # box centre, anywhere; the box is clipped
        y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
        x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    t = smooth_one_hot(labels, num_classes, smoothing)
    return images, t * lam + t.flip(0) * (1.0 - lam), lam, kind


@register_method
class Classifier(Method):
    name = "classify"
    config_class = ClassifyConfig
    export_note = "The classifier's backbone (no head)."
    test_overrides = ("method=classify", "model=sslkit_pvt_test", "method.num_classes=8", "method.view.size=64")

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.label_smoothing = float(cfg.label_smoothing)
        self.num_classes = int(cfg.num_classes)
        if cfg.checkpoint:  # an sslkit checkpoint / export, or a supported foreign one (sslkit.pretrained)
            kwargs = backbone_kwargs(model_cfg, um_pretrain=False)
            self.backbone, pre = load_backbone(cfg.checkpoint, for_finetune=True, model=str(model_cfg.name),
                                               kwargs={k: v for k, v in kwargs.items() if k != "drop_path_rate"},
                                               drop_path_rate=float(model_cfg.drop_path_rate))
            self.model_config = {"name": pre.model_name, "kwargs": {**pre.kwargs, "num_classes": self.num_classes}}
        else:
            self.backbone, self.model_config = create_backbone(model_cfg, um_pretrain=False)
            self.model_config["kwargs"]["num_classes"] = self.num_classes
        self.backbone.reset_classifier(self.num_classes)

        mix = cfg.mixup
        self.mixup_cfg = mix if float(mix.mixup_alpha) > 0 or float(mix.cutmix_alpha) > 0 else None
        if self.mixup_cfg is not None and not 0.0 <= float(mix.prob) <= 1.0:
            raise ConfigError(f"method.mixup.prob={mix.prob} must be in [0, 1]")
        self.mix_seed = int(torch.initial_seed())
        self._step, self._micro = 0, 0

        self.model_ema: Optional[torch.nn.Module] = None
        self.model_ema_decay = float(cfg.model_ema_decay)
        if bool(cfg.model_ema):
            if not 0.0 <= self.model_ema_decay <= 1.0:
                raise ConfigError(f"method.model_ema_decay={self.model_ema_decay} must be in [0, 1] (e.g. 0.9998)")
            self.model_ema = freeze(copy.deepcopy(self.backbone))  # before DropBlock: eval-only, no hooks needed

        self.dropblock_cfg = cfg.dropblock
        self.dropblocks = apply_dropblock(self.backbone, cfg.dropblock)  # [] for preset=none
        self._steps_per_epoch, self._total_steps = 1, 1

    # ------------------------------------------------------------------ hooks
    def dropblock_rate_at(self, step: int) -> float:
        return dropblock_schedule(self.dropblock_cfg, step, self._total_steps, self._steps_per_epoch)

    def begin(self, step: int, derived: Any) -> None:
        self._step, self._micro = int(step), 0
        self._steps_per_epoch, self._total_steps = int(derived.steps_per_epoch), int(derived.total_steps)
        if self.dropblocks:
            set_drop_prob(self.dropblocks, self.dropblock_rate_at(step))

    def after_step(self, step: int) -> dict[str, float]:
        """EMA update; DropBlock rate for the next step. Logs the DropBlock rate the finished step used
        (like ``lr`` in the same row) as ``dropblock_drop_prob``."""
        out: dict[str, float] = {}
        if self.model_ema is not None:
            ema_update(self.model_ema, self.backbone, self.model_ema_decay)
        if self.dropblocks:
            out["dropblock_drop_prob"] = self.dropblock_rate_at(step - 1)
            set_drop_prob(self.dropblocks, self.dropblock_rate_at(step))
        self._step, self._micro = int(step), 0
        return out

    # ------------------------------------------------------------------ forward
    def _mix_rng(self) -> np.random.Generator:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return np.random.default_rng([self.mix_seed, self._step, self._micro, rank])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["images"], batch["labels"]  # (B, 3, H, W), (B,)
        if bool((labels >= self.num_classes).any()):
            raise DataError(f"label {int(labels.max())} is out of range for method.num_classes={self.num_classes}: set "
                            f"method.num_classes to the number of classes of the data")
        if self.training and self.mixup_cfg is not None:
            if bool((labels < 0).any()):
                raise DataError("method.mixup needs a label for every image (got label -1): use labelled data "
                                "or turn mixup / cutmix off")
            images, targets, lam, _ = mix_batch(images, labels, self.num_classes, self.label_smoothing,
                                                self.mixup_cfg, self._mix_rng())
            self._micro += 1
            logits = self.backbone(images)  # (B, num_classes)
            loss = soft_target_cross_entropy(logits, targets)
        else:
            logits = self.backbone(images)  # (B, num_classes)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, ignore_index=-1)
        acc = (logits.argmax(-1) == labels).float().mean()  # against the unmixed labels
        return {"loss": loss, "train_acc": acc.detach()}

    def heldout_batch(self, images: torch.Tensor, generator: torch.Generator) -> None:
        return None  # the loss needs labels; fine-tuning reports val accuracy instead (evaluate_classifier)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    @torch.no_grad()
    def predict_ema(self, images: torch.Tensor) -> torch.Tensor:
        if self.model_ema is None:
            raise ConfigError("predict_ema needs method.model_ema=true")
        return self.model_ema(images)
