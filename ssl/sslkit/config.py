"""Typed config schemas (Hydra ConfigStore) and the one place where derived values are computed.

Every YAML option in ``configs/<group>/`` starts from one of these dataclasses (through its defaults
list), so an unknown key or a wrongly typed value fails at compose time with Hydra's message naming
the key. ``resolve(cfg)`` turns the composed config into a ``RunSpec``: the plain config plus the
derived values (effective lr, steps per epoch, total steps), computed once, logged and saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sslkit.errors import ConfigError


# ----------------------------------------------------------------------------------------- data
@dataclass
class ViewConfig:
    """One augmented view (MAE-style methods use exactly one)."""

    kind: str = "mae"  # the view family (data/views.py VIEWS)
    size: int = 256
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip: float = 0.5


@dataclass
class MultiCropViewConfig:
    """DINO-style multi-crop: ``n_global`` crops of ``size`` px and ``n_local`` crops of ``local_size`` px.

    Photometric recipe of DINOv2: colour jitter (brightness, contrast, saturation, hue) with probability
    ``color_jitter_prob``, grayscale, Gaussian blur with probability ``blur_prob`` = (first global crop,
    other global crops, local crops), solarization of the second global crop.
    """

    kind: str = "multicrop"
    size: int = 224  # global crop size (px); a multiple of the patch size
    local_size: int = 96  # local crop size (px); a multiple of the patch size (98 at patch 14)
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, other globals, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2  # second global crop only


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | image_folder | cifar10 | cifar100 | stl10 | imagenet
    path: Optional[str] = None  # folder, uncompressed .tar, or torchvision root
    split: str = "all"  # all | train | val: per class, the last val_fraction of sorted files are val
    val_fraction: float = 0.1  # CIFAR-10 tar: images 4500-4999 of each class = val (shared convention)
    batch_size: int = 32  # per device, per micro-step
    num_workers: int = 2
    on_error: str = "skip"  # skip | raise  (corrupt / unreadable images)
    max_errors: int = 100  # run-level limit of skipped images before failing
    allow_upscale: bool = True  # images smaller than the view size: upsample (True) or fail at start
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # synthetic source only
    num_samples: int = 2048
    num_classes: int = 8
    image_size: int = 64
    seed: int = 0


# ----------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING  # a timm-registered backbone, e.g. sslkit_pvt_small
    img_size: int = 256
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs


# ----------------------------------------------------------------------------------------- methods
@dataclass
class MethodConfig:
    name: str = MISSING
    view: ViewConfig = field(default_factory=ViewConfig)


@dataclass
class UMMAEConfig(MethodConfig):
    name: str = "umae"
    unit: int = 16  # patch unit in pixels (the pyramid's final stride / 2)
    mask_ratio: float = 0.75  # fixed by uniform sampling (one of every 2x2 kept)
    secondary_mask_ratio: float = 0.25
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0


@dataclass
class SimMIMConfig(MethodConfig):
    name: str = "simmim"
    unit: int = 16
    mask_ratio: float = 0.75


@dataclass
class DropBlockConfig:
    """DropBlock placement + schedule (layers/dropblock_placement.py); off by default."""

    preset: str = "none"  # none | resnet_paper (Ghiasi et al. 2018) | resnet_timm (timm's placement) | custom
    drop_prob: float = 0.1  # target rate = 1 - keep_prob (paper: keep_prob 0.9); group 3 gets a quarter
    block_size: Optional[int] = None  # None: the preset's (resnet_paper 7, resnet_timm 5 / 3, custom 7)
    mode: str = "paper"  # paper (a mask per sample and channel) | fast (one per sample)
    targets: list[str] = field(default_factory=list)  # custom: fnmatch patterns on model.named_modules() names
    layout: str = "auto"  # custom: auto | nchw | nhwc | tokens ((B, N, C) as a square map)
    schedule: str = "linear"  # linear (keep_prob 1 -> 1 - drop_prob over the run) | warmup | constant
    warmup_epochs: float = 0.0  # schedule=warmup: length of the ramp


@dataclass
class MixupConfig:
    """Mixup / CutMix of fine-tuning batches (soft-target cross-entropy while active); off by default."""

    mixup_alpha: float = 0.0  # lam ~ Beta(a, a); 0 = no mixup (DeiT / MAE fine-tuning: 0.8)
    cutmix_alpha: float = 0.0  # 0 = no cutmix (DeiT / MAE: 1.0)
    prob: float = 1.0  # probability that a batch is mixed
    switch_prob: float = 0.5  # both on: probability of cutmix instead of mixup


@dataclass
class ClassifyConfig(MethodConfig):
    """Supervised fine-tuning / training of a classifier (the same loop and checkpoint format)."""

    name: str = "classify"
    checkpoint: Optional[str] = None  # an sslkit pretraining checkpoint; None = from scratch
    num_classes: int = MISSING
    label_smoothing: float = 0.1
    mixup: MixupConfig = field(default_factory=MixupConfig)
    dropblock: DropBlockConfig = field(default_factory=DropBlockConfig)
    model_ema: bool = False  # keep an EMA of the weights (evaluated at the end as top1_ema)
    model_ema_decay: float = 0.9998


@dataclass
class DINOv2Config:
    """DINOv2-style student / EMA-teacher pretraining (DINO + iBOT + KoLeo), see methods/dinov2.py."""

    name: str = "dinov2"
    view: MultiCropViewConfig = field(default_factory=MultiCropViewConfig)
    # heads
    prototypes: int = 65536  # K of the DINO head (and of the iBOT head when shared)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False
    ibot_prototypes: int = 65536  # used when ibot_separate_head
    # losses
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | softmax (EMA center)
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    # iBOT masks (global crops, made in the data workers)
    mask_probability: float = 0.5  # share of global crops that get a mask
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # stratified over the masked crops
    mask_min_patches: int = 4
    # teacher
    ema_momentum: float = 0.992  # cosine to ema_momentum_end over the run
    ema_momentum_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    recipe_batch: int = 1024  # warn when the global batch is far below this


# ----------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    name: str = "adamw"
    blr: float = 1.5e-4  # base lr; effective lr = blr * scale(global batch / lr_ref_batch)
    lr_scaling: str = "linear"  # linear | sqrt  (DINOv2: sqrt with lr_ref_batch 1024)
    lr_ref_batch: int = 256
    lr: Optional[float] = None  # absolute lr; overrides blr scaling when set
    lr_mult: dict[str, float] = field(default_factory=dict)  # extra lr factor for params whose name contains the key
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None  # cosine wd schedule end (None: constant)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    layer_decay: float = 1.0  # layer-wise lr decay (1.0 = off)
    warmup_epochs: float = 10.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    clip_grad: Optional[float] = None


# ----------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    max_steps: Optional[int] = None  # overrides epochs when set
    stop_after: Optional[int] = None  # end this invocation (with a checkpoint) at this step; schedules still span max_steps
    epochs: float = 200.0
    accum_steps: int = 1
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16  (auto: bf16 on CUDA if supported, fp32 on CPU)
    device: str = "auto"  # auto | cpu | cuda
    strategy: str = "single"  # single | ddp | fsdp (FSDP2); launch several processes with torchrun / srun
    ddp_find_unused: bool = True  # DDP find_unused_parameters (DINOv2 detaches its last head layer in epoch 1)
    compile: bool = False
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    log_every: int = 10
    ckpt_every: int = 1000  # write checkpoints/last.pt every N steps (and at the end)
    keep_every: Optional[int] = None  # also keep checkpoints/step_<N>.pt every N steps
    keep_last: int = 2  # how many periodic step_<N>.pt to keep (0 = keep all)
    keep_permanent_every: Optional[int] = None  # step_<N>.pt with N a multiple of this are never pruned
    progress: bool = True
    deterministic: bool = True  # torch.use_deterministic_algorithms(warn_only) on CPU
    summary: bool = True  # print "what it learned" (kNN on the data's labels) at the end
    knn_every: Optional[int] = None  # online kNN of the frozen encoder every N steps (logged); None = off
    knn_train_samples: int = 2000  # labelled train / val images of the online kNN (even stride per split)
    knn_val_samples: int = 500


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "sslkit"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PretrainConfig:
    method: Any = MISSING  # UMMAEConfig | SimMIMConfig | ... (typed by its group option)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    run_dir: Optional[str] = None  # default: hydra.run.dir


@dataclass
class FinetuneConfig(PretrainConfig):
    checkpoint: Optional[str] = None  # sslkit-finetune checkpoint=...: alias of method.checkpoint


def register_configs() -> None:
    """Register the schemas; the YAML options extend them through their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)
    cs.store(group="method", name="umae_schema", node=UMMAEConfig)
    cs.store(group="method", name="simmim_schema", node=SimMIMConfig)
    cs.store(group="method", name="classify_schema", node=ClassifyConfig)
    cs.store(group="method", name="dinov2_schema", node=DINOv2Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


# ----------------------------------------------------------------------------------------- derived
@dataclass
class Derived:
    world_size: int
    micro_batch: int  # images per device per forward (data.batch_size)
    global_batch: int  # batch_size * accum_steps * world_size
    lr: float  # effective peak lr
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    warmup_steps: int
    dataset_size: int


def derive(cfg: DictConfig, dataset_size: int, world_size: int = 1) -> Derived:
    """Compute the derived values once. ``dataset_size`` comes from the built data source."""
    b = int(cfg.data.batch_size)
    accum = int(cfg.trainer.accum_steps)
    if b <= 0 or accum <= 0:
        raise ConfigError(f"data.batch_size and trainer.accum_steps must be positive, got {b}, {accum}")
    global_batch = b * accum * world_size
    steps_per_epoch = dataset_size // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {dataset_size} images, fewer than one global batch of {global_batch} "
            f"(data.batch_size={b} x trainer.accum_steps={accum} x world_size={world_size}); "
            f"lower data.batch_size or use more data"
        )
    if cfg.trainer.max_steps is not None:
        total = int(cfg.trainer.max_steps)
    else:
        total = int(math.ceil(float(cfg.trainer.epochs) * steps_per_epoch))
    if total <= 0:
        raise ConfigError(f"training would run {total} steps: set trainer.max_steps or trainer.epochs > 0")
    scaling = str(cfg.optim.lr_scaling)
    if scaling not in ("linear", "sqrt"):
        raise ConfigError(f"optim.lr_scaling={scaling!r}: use linear (MAE: blr x batch/256) or sqrt (DINOv2)")
    ratio = global_batch / float(cfg.optim.lr_ref_batch)
    lr = float(cfg.optim.lr) if cfg.optim.lr is not None else float(cfg.optim.blr) * (
        ratio if scaling == "linear" else math.sqrt(ratio))
    if cfg.optim.warmup_steps is not None:
        warm = int(cfg.optim.warmup_steps)
    else:
        warm = int(round(float(cfg.optim.warmup_epochs) * steps_per_epoch))
    warm = min(warm, total)
    return Derived(world_size, b, global_batch, lr, steps_per_epoch, total, warm, dataset_size)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (for checkpoints and config.yaml)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
