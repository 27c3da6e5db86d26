"""Typed config schemas: what a composed config may contain, its types, choices and ranges.

Every YAML option in ``configs/<group>/`` extends one of these dataclasses through its defaults list
(``sslkit.config.register_configs`` stores them in Hydra's ConfigStore), so

- an unknown key or a wrongly typed value fails at compose time (Hydra / OmegaConf name the key);
- a string choice is an ``Enum`` (``Precision``, ``Strategy``, ...): an unknown choice fails at compose
  time naming the key and the accepted values;
- a range (``checked(default, gt(0))``) is checked right after composing by ``validate(cfg)``
  (``sslkit.config.compose`` and every command call it), which names the key, the value and the rule.

A method's own schema lives next to the method (``methods/<name>.py``, a ``MethodConfig`` subclass).
This module imports nothing else of sslkit but the errors, so data, models and methods can use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from sslkit.errors import ConfigError


# ----------------------------------------------------------------------------------------- choices
class Choice(str, Enum):
    """A string choice of a config key. Members compare (and hash) equal to their string, and
    ``str()`` / f-strings give the bare value, so code may treat them as plain strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Precision(Choice):
    auto = "auto"  # bf16 on CUDA if supported (else fp16), fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # CUDA only (GradScaler)


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(Choice):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"  # FSDP2 fully_shard


class SourceName(Choice):
    synthetic = "synthetic"
    image_folder = "image_folder"
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    stl10 = "stl10"
    imagenet = "imagenet"
    hf = "hf"
    webdataset = "webdataset"


class Split(Choice):
    all = "all"
    train = "train"
    val = "val"


# functional form: "raise" is a keyword, but a fine member name (OnError["raise"])
OnError = Choice("OnError", [("skip", "skip"), ("raise", "raise")])


class Interpolation(Choice):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"


class ViewKind(Choice):
    mae = "mae"
    multicrop = "multicrop"


class LrScaling(Choice):
    linear = "linear"  # MAE: blr x global batch / lr_ref_batch
    sqrt = "sqrt"  # DINOv2: blr x sqrt(global batch / lr_ref_batch)


class OptimizerName(Choice):
    adamw = "adamw"


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Objective(Choice):
    """What a run reports as its objective (``trainer.objective``; ``tasks.pretrain_objective``)."""

    knn_top1 = "knn_top1"  # the summary's kNN top-1 of the pretrained encoder (else the last online kNN)
    linear_top1 = "linear_top1"  # the summary's linear-probe top-1 of the pretrained encoder
    loss = "loss"  # the mean training loss over the last 10% of the steps (metrics.jsonl)


OBJECTIVE_DIRECTIONS = {"knn_top1": "maximize", "linear_top1": "maximize", "loss": "minimize"}  # a sweep's default


# ----------------------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Check:
    """A range rule of one key: ``ok(value)`` and the rule in words (``"> 0"``)."""

    ok: Callable[[Any], bool]
    rule: str


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def gt(lo: float) -> Check:
    return Check(lambda v: _num(v) and v > lo, f"> {lo}")


def ge(lo: float) -> Check:
    return Check(lambda v: _num(v) and v >= lo, f">= {lo}")


def between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    """``lo <= v <= hi`` (strict at an ``open_*`` end)."""
    return Check(lambda v: _num(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi),
                 f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


def each(check: Check, n: Optional[int] = None) -> Check:
    """Every element of a list / tuple passes ``check`` (and there are ``n`` of them)."""
    return Check(lambda v: (n is None or len(v) == n) and all(check.ok(x) for x in v),
                 f"{f'{n} numbers, ' if n else ''}each {check.rule}")


def ordered_pair(check: Check) -> Check:
    """``[lo, hi]`` with ``lo <= hi``, both passing ``check``."""
    return Check(lambda v: len(v) == 2 and all(check.ok(x) for x in v) and v[0] <= v[1],
                 f"[min, max] with min <= max, each {check.rule}")


def checked(default: Any = MISSING, *checks: Check, default_factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field whose value ``validate`` checks against ``checks`` (``None`` always passes)."""
    meta = {"checks": checks}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def positive(default: Any = MISSING) -> Any:
    return checked(default, gt(0))


def nonneg(default: Any = MISSING) -> Any:
    return checked(default, ge(0))


def prob(default: Any = MISSING) -> Any:
    return checked(default, between(0.0, 1.0))


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _problems(node: DictConfig, path: str) -> Iterator[str]:
    schema = OmegaConf.get_type(node)
    if schema is not None and dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            if f.name not in node or OmegaConf.is_missing(node, f.name):
                continue
            value = _plain(node[f.name])
            for c in f.metadata.get("checks", ()):
                if value is not None and not c.ok(value):
                    yield f"{path}{f.name}={value}: must be {c.rule}"
        cross = getattr(schema, "cross_checks", None)
        if cross is not None:
            yield from (f"{path}{msg}" for msg in cross(node))
    for key in node:
        if path == "" and key == "hydra":  # Hydra's own node (compose(return_hydra_config=True)): resolvable in a run only
            continue
        if isinstance(key, str) and not OmegaConf.is_missing(node, key):
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                yield from _problems(child, f"{path}{key}.")


def validate(cfg: DictConfig) -> DictConfig:
    """Check every range rule and cross-key rule of a composed config; raise one ConfigError listing
    every violation (key, value, rule). Returns ``cfg``."""
    problems = list(_problems(cfg, ""))
    if problems:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(problems))
    return cfg


# ----------------------------------------------------------------------------------------- data
@dataclass
class ViewConfig:
    """One augmented view: RandomResizedCrop(size, scale, ratio) + flip (MAE-style methods)."""

    kind: ViewKind = ViewKind.mae  # the view family (data/views.py VIEWS)
    size: int = positive(256)
    scale: tuple[float, float] = checked((0.2, 1.0), ordered_pair(between(0.0, 1.0, open_lo=True)))
    ratio: tuple[float, float] = checked((3.0 / 4.0, 4.0 / 3.0), ordered_pair(gt(0)))
    interpolation: Interpolation = Interpolation.bicubic
    hflip: float = prob(0.5)


@dataclass
class MultiCropViewConfig:
    """DINO-style multi-crop: ``n_global`` crops of ``size`` px and ``n_local`` crops of ``local_size`` px.

    Photometric recipe of DINOv2: colour jitter (brightness, contrast, saturation, hue) with probability
    ``color_jitter_prob``, grayscale, Gaussian blur with probability ``blur_prob`` = (first global crop,
    other global crops, local crops), solarization of the second global crop.
    """

    kind: ViewKind = ViewKind.multicrop
    size: int = positive(224)  # global crop size (px); a multiple of the patch size
    local_size: int = positive(96)  # local crop size (px); a multiple of the patch size (98 at patch 14)
    n_global: int = checked(2, ge(2))  # the DINO loss compares each crop with the *other* global crops
    n_local: int = nonneg(8)
    global_scale: tuple[float, float] = checked((0.32, 1.0), ordered_pair(between(0.0, 1.0, open_lo=True)))
    local_scale: tuple[float, float] = checked((0.05, 0.32), ordered_pair(between(0.0, 1.0, open_lo=True)))
    ratio: tuple[float, float] = checked((3.0 / 4.0, 4.0 / 3.0), ordered_pair(gt(0)))
    interpolation: Interpolation = Interpolation.bicubic
    hflip: float = prob(0.5)
    color_jitter: tuple[float, float, float, float] = checked((0.4, 0.4, 0.2, 0.1), each(ge(0), 4))
    color_jitter_prob: float = prob(0.8)
    grayscale_prob: float = prob(0.2)
    blur_prob: tuple[float, float, float] = checked((1.0, 0.1, 0.5), each(between(0.0, 1.0), 3))  # global 1, other globals, locals
    blur_sigma: tuple[float, float] = checked((0.1, 2.0), ordered_pair(gt(0)))
    solarize_prob: float = prob(0.2)  # second global crop only


@dataclass
class DataConfig:
    name: SourceName = SourceName.synthetic
    path: Optional[str] = None  # folder, uncompressed .tar, torchvision root, HF dataset, WebDataset shards
    split: Split = Split.all  # all | train | val: per class, the last val_fraction of sorted files are val
    val_fraction: float = checked(0.1, between(0.0, 1.0))  # CIFAR-10 tar: images 4500-4999 of each class = val
    batch_size: int = positive(32)  # per device, per micro-step
    num_workers: int = nonneg(2)
    on_error: OnError = OnError["skip"]  # skip | raise  (corrupt / unreadable images)
    max_errors: int = nonneg(100)  # run-level limit of skipped images before failing
    allow_upscale: bool = True  # images smaller than the view size: upsample (True) or fail at start
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = checked((0.229, 0.224, 0.225), each(gt(0), 3))
    # hf source only (data=hf): the image / label columns (label null: unlabelled), a DatasetDict's split
    image_column: str = "image"
    label_column: Optional[str] = "label"
    hf_split: Optional[str] = None
    # webdataset source only (data=webdataset): the member with the label (cls | json:<field> | null)
    label_key: Optional[str] = "cls"
    # synthetic source only
    num_samples: int = positive(2048)
    num_classes: int = positive(8)
    image_size: int = positive(64)
    seed: int = 0


# ----------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """A timm-registered backbone and its ``create_model`` arguments.

    ``drop_path_rate`` follows the family's convention (the model class's ``drop_path_schedule``):
    ViT (``sslkit_vit_*``) ``uniform``, the same rate in every block (DINOv2); PVT, Swin and ResNet
    ``linear``, ramped from 0 in the first block to the rate in the last (timm / official code).
    """

    name: str = MISSING  # a timm-registered backbone, e.g. sslkit_pvt_small
    img_size: int = positive(256)
    drop_path_rate: float = checked(0.0, between(0.0, 1.0))
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs


# ----------------------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """Base of every method's schema (``methods/<name>.py``); ``name`` selects the registered method."""

    name: str = MISSING
    view: ViewConfig = field(default_factory=ViewConfig)


# ----------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    blr: float = positive(1.5e-4)  # base lr; effective lr = blr * scale(global batch / lr_ref_batch)
    lr_scaling: LrScaling = LrScaling.linear  # linear | sqrt  (DINOv2: sqrt with lr_ref_batch 1024)
    lr_ref_batch: int = positive(256)
    lr: Optional[float] = positive(None)  # absolute lr; overrides blr scaling when set
    lr_mult: dict[str, float] = field(default_factory=dict)  # extra lr factor for params whose name contains the key
    min_lr: float = nonneg(0.0)
    weight_decay: float = nonneg(0.05)
    weight_decay_end: Optional[float] = nonneg(None)  # cosine wd schedule end (None: constant)
    betas: tuple[float, float] = checked((0.9, 0.95), each(between(0.0, 1.0, open_hi=True), 2))
    eps: float = positive(1e-8)
    layer_decay: float = checked(1.0, between(0.0, 1.0, open_lo=True))  # layer-wise lr decay (1.0 = off)
    warmup_epochs: float = nonneg(10.0)
    warmup_steps: Optional[int] = nonneg(None)  # overrides warmup_epochs when set
    clip_grad: Optional[float] = positive(None)

    @staticmethod
    def cross_checks(node: DictConfig) -> Iterator[str]:
        bad = {k: v for k, v in (node.get("lr_mult") or {}).items() if not (_num(v) and v > 0)}
        if bad:
            yield f"lr_mult={bad}: every factor must be > 0"


# ----------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    max_steps: Optional[int] = positive(None)  # overrides epochs when set
    stop_after: Optional[int] = positive(None)  # end this invocation (with a checkpoint) at this step; schedules still span max_steps
    epochs: float = positive(200.0)
    accum_steps: int = positive(1)
    seed: int = 0
    precision: Precision = Precision.auto  # auto: bf16 on CUDA if supported, fp32 on CPU
    device: Device = Device.auto
    strategy: Strategy = Strategy.single  # ddp / fsdp (FSDP2): launch several processes with torchrun / srun
    ddp_find_unused: bool = True  # DDP find_unused_parameters (DINOv2 detaches its last head layer in epoch 1)
    compile: bool = False
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    log_every: int = positive(10)
    ckpt_every: int = positive(1000)  # write checkpoints/last.pt every N steps (and at the end)
    keep_every: Optional[int] = positive(None)  # also keep checkpoints/step_<N>.pt every N steps
    keep_last: int = nonneg(2)  # how many periodic step_<N>.pt to keep (0 = keep all)
    keep_permanent_every: Optional[int] = positive(None)  # step_<N>.pt with N a multiple of this are never pruned
    progress: bool = True
    deterministic: bool = True  # torch.use_deterministic_algorithms(warn_only) on CPU
    summary: bool = True  # print "what it learned" (held-out loss, kNN on the eval split) at the end
    knn_every: Optional[int] = positive(None)  # online kNN of the frozen encoder every N steps (logged); None = off
    knn_train_samples: int = positive(4000)  # the eval split's size for online kNN and the summary (even
    knn_val_samples: int = positive(1000)  # stride per class, evaluation.eval_sources; 1000: +-1.5 points)
    visualize_every: Optional[int] = positive(None)  # pictures (+ curves.png) in <run_dir>/pictures every N steps; None = off
    # the value the run returns (to a sweeper: hydra/sweeper=optuna): knn_top1 | linear_top1 (the end-of-run
    # summary's, of the pretrained encoder; knn_top1 without summary: the last online kNN) | loss (the mean
    # training loss of the last 10% of the steps); None = none
    objective: Optional[Objective] = None

    @staticmethod
    def cross_checks(node: DictConfig) -> Iterator[str]:
        objective = node.get("objective")
        if objective == "linear_top1" and not node.get("summary"):
            yield "objective=linear_top1: the linear probe is the end-of-run summary's: set trainer.summary=true"
        if objective == "knn_top1" and not node.get("summary") and not node.get("knn_every"):
            yield ("objective=knn_top1: needs the end-of-run summary (trainer.summary=true) or online kNN "
                   "(trainer.knn_every=N)")


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "sslkit"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # event files in <run_dir>/tensorboard (tensorboard --logdir <run_dir>)


@dataclass
class MLflowConfig:
    enabled: bool = False
    tracking_uri: Optional[str] = None  # None: sqlite:///<run_dir>/mlflow.db (mlflow ui --backend-store-uri ...)
    experiment: str = "sslkit"
    run_name: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


# ----------------------------------------------------------------------------------------- primary configs
@dataclass
class PretrainConfig:
    method: Any = MISSING  # a registered method's schema (typed by its group option)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    run_dir: Optional[str] = None  # default: hydra.run.dir


@dataclass
class FinetuneConfig(PretrainConfig):
    checkpoint: Optional[str] = None  # sslkit-finetune checkpoint=...: alias of method.checkpoint


@dataclass
class EvalKNNConfig:
    """``sslkit-eval knn``: weighted kNN (DINO protocol) of a checkpoint's frozen backbone, train -> val split."""

    checkpoint: str = MISSING  # an sslkit checkpoint (its backbone: the teacher's for DINOv2)
    model: Optional[str] = None  # the sslkit model to build, for a foreign checkpoint (e.g. sslkit_vit_small)
    img_size: Optional[int] = positive(None)  # eval resolution; default: the checkpoint's view size / the model's
    data: Optional[DataConfig] = None  # default: the checkpoint's own data config; or data=<group> data.path=...
    k: int = positive(20)  # neighbours
    t: float = positive(0.07)  # temperature of the vote weights exp(sim / t)
    out: Optional[str] = None  # write the result as JSON here


@dataclass
class EvalLinearConfig:
    """``sslkit-eval linear``: linear probe (one-pass lr sweep, lr chosen on held-out train images)."""

    checkpoint: str = MISSING
    model: Optional[str] = None  # the sslkit model to build, for a foreign checkpoint (e.g. sslkit_vit_small)
    img_size: Optional[int] = positive(None)  # eval resolution; default: the checkpoint's view size / the model's
    data: Optional[DataConfig] = None  # default: the checkpoint's own data config; or data=<group> data.path=...
    epochs: int = positive(100)
    lrs: Optional[list[float]] = checked(None, each(gt(0)))  # default: evaluation.DEFAULT_LRS (1e-4 ... 1)
    batch_size: int = positive(256)
    wd: float = nonneg(0.0)
    seed: int = 0
    out: Optional[str] = None  # write the result (protocol, chosen lr, every lr's accuracy) as JSON here


@dataclass
class ExportConfig:
    """``sslkit-export``: the backbone of a checkpoint in timm's Hugging Face Hub layout (``config.json`` +
    ``model.safetensors``; ``timm.create_model("local-dir:<out>", pretrained=True)`` loads it)."""

    checkpoint: str = MISSING
    out: Optional[str] = None  # default: <run dir>/export
    model: Optional[str] = None  # the sslkit model to build, for a foreign checkpoint (e.g. sslkit_pvt_small)


@dataclass
class ShardConfig:
    """``sslkit-data shard``: write a source's ``split`` as WebDataset shards (``data=webdataset`` reads them)."""

    data: DataConfig = field(default_factory=DataConfig)  # the source: data=<group> data.path=...
    out: str = MISSING  # the shard directory
    split: Split = Split.train  # what goes in the shards; train keeps the val split (data.val_fraction) out
    val: bool = True  # also write the val split as <out>/val-*.tar (its own index), for evaluation
    shard_size: int = positive(10000)  # samples per shard (at most)
    max_shard_bytes: float = positive(3e9)  # bytes per shard (at most)
    shuffle: bool = True  # write in a seeded random order (streaming readers see mixed classes)
    seed: int = 0
    progress: bool = True


@dataclass
class VisualizeConfig:
    """``sslkit-visualize``: the method's pictures of a checkpoint (``Method.visualize``: UM-MAE / SimMIM
    reconstructions, DINOv2 PCA and attention maps) on held-out images, and the run's ``curves.png``."""

    checkpoint: str = MISSING  # an sslkit checkpoint (<run>/checkpoints/last.pt)
    out: Optional[str] = None  # where the PNGs go; default: <run dir>/pictures
    n: int = positive(4)  # images: the evaluation split's val part, evenly over classes (evaluation.eval_sources)
    data: Optional[DataConfig] = None  # default: the checkpoint's own data config; or data=<group> data.path=...
    threshold: Optional[float] = checked(None, between(0.0, 1.0))  # DINOv2: foreground PCA (first component > threshold)
    seed: int = 0  # the masks (UM-MAE, SimMIM)
