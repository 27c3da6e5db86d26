"""DINOv2-style student / EMA-teacher pretraining (Oquab et al. 2023): DINO + iBOT + KoLeo.

One step, with ``B`` images, ``G`` global and ``L`` local crops each (batch keys from the multi-crop
view, rows view-major: row ``v * B + b`` is crop ``v`` of image ``b``)::

    student: ONE packed forward over [global_crops (G*B), local_crops (L*B)], iBOT-masked patches of
             the global crops replaced by the mask token, efficient stochastic depth per crop group
             -> CLS of every crop -> DINO head;  masked patch tokens -> iBOT head
    teacher: EMA copy, eval mode, no grad, global crops only, unmasked
             -> CLS -> DINO head -> Sinkhorn-Knopp (or softmax - EMA center) at the teacher temp
             -> patch tokens at the masked positions -> iBOT head -> same centering
    loss = w_dino * DINO(student crops vs the *other* global teacher crops)
         + w_ibot * iBOT(masked patches) + w_koleo * sum_g KoLeo(student CLS of global crop g)

The per-step hook ``after_step`` updates the teacher (EMA, momentum cosine 0.992 -> 1) and the step
that drives the teacher temperature warm-up and the first-epoch freeze of the DINO head's last layer;
``begin`` gives it the run's lengths once. The teacher backbone is what evaluation / export use
(``backbone_prefix = "teacher.backbone."``); ``backbone`` (the student's) is what the optimizer
groups for layer-wise lr decay.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from omegaconf import DictConfig

from sslkit.errors import ConfigError
from sslkit.masking import BlockMasking
from sslkit.methods import dino_losses as L
from sslkit.methods.base import (Method, create_backbone, embed, heatmap, init_backbone, register_method, tile, to_uint8,
                                 to_unit_rgb)
from sslkit.methods.ema import ema_update, freeze
from sslkit.schedules import cosine, linear
from sslkit.schemas import (Choice, MethodConfig, MultiCropViewConfig, between, checked, ge, nonneg, ordered_pair, positive,
                            prob)

log = logging.getLogger("sslkit")


class Centering(Choice):
    sinkhorn_knopp = "sinkhorn_knopp"
    softmax = "softmax"  # softmax of (logits - EMA center)


@dataclass
class DINOv2Config(MethodConfig):
    """DINOv2-style student / EMA-teacher pretraining (DINO + iBOT + KoLeo)."""

    name: str = "dinov2"
    view: MultiCropViewConfig = field(default_factory=MultiCropViewConfig)
    init_from: Optional[str] = None  # continued pretraining: a checkpoint whose backbone initializes student and teacher
    # heads
    prototypes: int = checked(65536, ge(2))  # K of the DINO head (and of the iBOT head when shared)
    head_hidden_dim: int = positive(2048)
    head_bottleneck_dim: int = positive(256)
    head_layers: int = positive(3)
    ibot_separate_head: bool = False
    ibot_prototypes: int = checked(65536, ge(2))  # used when ibot_separate_head
    # losses
    dino_loss_weight: float = nonneg(1.0)
    ibot_loss_weight: float = nonneg(1.0)
    koleo_loss_weight: float = nonneg(0.1)
    student_temp: float = positive(0.1)
    teacher_temp: float = positive(0.07)
    warmup_teacher_temp: float = positive(0.04)
    warmup_teacher_temp_epochs: float = nonneg(30.0)
    centering: Centering = Centering.sinkhorn_knopp
    center_momentum: float = prob(0.9)
    sinkhorn_iterations: int = positive(3)
    # iBOT masks (global crops, made in the data workers)
    mask_probability: float = prob(0.5)  # share of global crops that get a mask
    mask_ratio: tuple[float, float] = checked((0.1, 0.5), ordered_pair(between(0.0, 1.0)))  # stratified over the masked crops
    mask_min_patches: int = nonneg(4)
    # teacher
    ema_momentum: float = prob(0.992)  # cosine to ema_momentum_end over the run
    ema_momentum_end: float = prob(1.0)
    freeze_last_layer_epochs: float = nonneg(1.0)
    recipe_batch: int = positive(1024)  # warn when the global batch is far below this

    @staticmethod
    def cross_checks(node: DictConfig) -> Iterator[str]:
        if node.ema_momentum > node.ema_momentum_end:
            yield f"ema_momentum={node.ema_momentum}: must be <= ema_momentum_end={node.ema_momentum_end}"


class DINOHead(nn.Module):
    """MLP (``layers`` linears, GELU, hidden ``hidden_dim``) -> bottleneck -> L2-normalize ->
    weight-normalized linear to ``prototypes`` (no bias): ``W = g * v / ||v||`` row-wise, g init 1.

    ``forward(x, freeze_last_layer=True)`` uses the last layer's weights detached, so they get no
    gradient (and the optimizer skips them: no update, no weight decay), as DINO does in epoch one.
    """

    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"method.head_layers must be >= 1, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.weight_v = nn.Parameter(torch.empty(prototypes, bottleneck_dim))  # (K, D) direction
        self.weight_g = nn.Parameter(torch.ones(prototypes, 1))  # (K, 1) norm
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)  # (N, D)
        v, g = (self.weight_v.detach(), self.weight_g.detach()) if freeze_last_layer else (self.weight_v, self.weight_g)
        w = g * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (K, D)
        return z @ w.to(z.dtype).T  # (N, K)


def _pca(x: Tensor, k: int) -> Tensor:
    """Rows of ``x`` (n, C) on their first ``k`` principal components, each min-max scaled to [0, 1] over the
    rows: (n, k) float64. Deterministic: each component's sign makes its largest-magnitude loading positive."""
    xc = x - x.mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh(xc.T @ xc)  # ascending eigenvalues
    v = vecs[:, -min(k, x.shape[1]):].flip(-1)  # (C, k') largest first
    sign = v.gather(0, v.abs().argmax(dim=0, keepdim=True)).sign()
    p = xc @ (v * torch.where(sign == 0, 1.0, sign))  # (n, k')
    p = (p - p.min(dim=0).values) / (p.max(dim=0).values - p.min(dim=0).values).clamp_min(1e-12)
    return F.pad(p, (0, k - p.shape[1]))


def pca_rgb(features: Tensor, threshold: Optional[float] = None) -> Tensor:
    """Patch features ``(B, N, C)`` -> ``(B, N, 3)`` RGB in [0, 1]: the first three principal components of all
    ``B * N`` patches together, each min-max scaled to [0, 1] (``_pca``: deterministic signs; fitted in float64).

    ``threshold`` (DINOv2's foreground separation): patches whose first component (scaled to [0, 1]) is above
    ``threshold`` are the foreground; the PCA is fitted again on the foreground patches only, the background
    is black."""
    B, N, C = features.shape
    x = features.reshape(B * N, C).double()
    fg = torch.ones(B * N, dtype=torch.bool, device=x.device)
    if threshold is not None:
        fg = _pca(x, 1)[:, 0] > float(threshold)
    out = torch.zeros(B * N, 3, dtype=torch.float64, device=x.device)
    if fg.any():
        out[fg] = _pca(x[fg], 3)
    return out.view(B, N, 3).float()


@register_method
class DINOv2(Method):
    name = "dinov2"
    config_class = DINOv2Config
    export_note = ("The EMA teacher's backbone (what DINOv2 evaluates), no head; the DINO/iBOT heads and the student "
                   "are not exported. mask_token is included (unused outside iBOT).")
    test_overrides = ("method=dinov2_tiny", "model=sslkit_vit_test", "optim=dinov2", "method.freeze_last_layer_epochs=0")
    backbone_prefix = "teacher.backbone."
    probe = "knn"  # DINO / DINOv2 report weighted kNN (k=20, T=0.07) of the teacher's CLS

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        view = cfg.view
        backbone, self.model_config = create_backbone(model_cfg)
        if cfg.init_from:  # continued pretraining (student and teacher for DINOv2: the teacher is a copy)
            init_backbone(backbone, self.model_config, str(cfg.init_from))
        if not hasattr(backbone, "forward_packed"):
            raise ConfigError(f"method=dinov2 needs a ViT backbone with forward_packed (e.g. model=vit_small); "
                              f"{self.model_config['name']} has none")
        patch = int(backbone.patch_size)
        for key, size in (("size", int(view.size)), ("local_size", int(view.local_size))):
            if size % patch:
                raise ConfigError(f"method.view.{key}={size} is not a multiple of the patch size {patch}: use "
                                  f"{max(patch, size // patch * patch)} (DINOv2: 224/96 at patch 16, 224/98 at 14)")
        if int(view.n_global) < 2:
            raise ConfigError(f"method.view.n_global={view.n_global}: the DINO loss compares each crop with the "
                              f"*other* global crops, so it needs at least 2")
        if int(cfg.prototypes) < 2 or (cfg.ibot_separate_head and int(cfg.ibot_prototypes) < 2):
            raise ConfigError(f"method.prototypes={cfg.prototypes} (ibot_prototypes={cfg.ibot_prototypes}): need "
                              f">= 2 prototypes (DINOv2: 65536; small data: 1024-4096)")
        if cfg.centering not in ("sinkhorn_knopp", "softmax"):
            raise ConfigError(f"method.centering={cfg.centering!r}: use sinkhorn_knopp or softmax")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if float(cfg[key]) <= 0:
                raise ConfigError(f"method.{key} must be > 0, got {cfg[key]}")
        if not 0.0 <= float(cfg.ema_momentum) <= float(cfg.ema_momentum_end) <= 1.0:
            raise ConfigError(f"need 0 <= method.ema_momentum <= method.ema_momentum_end <= 1, got "
                              f"{cfg.ema_momentum}, {cfg.ema_momentum_end}")

        dim = int(backbone.num_features)
        head_args = dict(hidden_dim=int(cfg.head_hidden_dim), bottleneck_dim=int(cfg.head_bottleneck_dim),
                         layers=int(cfg.head_layers))
        student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(dim, int(cfg.prototypes), **head_args)})
        if cfg.ibot_separate_head:
            student["ibot_head"] = DINOHead(dim, int(cfg.ibot_prototypes), **head_args)
        self.student = student
        self.teacher = freeze(copy.deepcopy(student))  # EMA of the student; never receives gradients
        self.teacher.eval()
        k_ibot = int(cfg.ibot_prototypes) if cfg.ibot_separate_head else int(cfg.prototypes)
        self.dino_center = L.SoftmaxCenter(int(cfg.prototypes), float(cfg.center_momentum))
        self.ibot_center = L.SoftmaxCenter(k_ibot, float(cfg.center_momentum))
        self.n_global, self.n_local = int(view.n_global), int(view.n_local)
        self.grid = (int(view.size) // patch, int(view.size) // patch)
        self._step, self._steps_per_epoch, self._total = 0, 1, 1

    # ----------------------------------------------------------------------------------- contract
    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.student["backbone"]

    @property
    def fp32_reduce(self) -> tuple[str, ...]:
        """Submodules whose gradients FSDP reduces in fp32 whatever the precision (distributed.shard)."""
        return tuple(f"student.{k}" for k in ("dino_head", "ibot_head") if k in self.student)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The reference clips each student part (backbone, DINO head, iBOT head) to ``optim.clip_grad`` on its own."""
        return [list(m.parameters()) for m in self.student.values()]

    def train(self, mode: bool = True) -> "DINOv2":
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode (no stochastic depth)
        return self

    def masking(self) -> BlockMasking:
        c = self.cfg
        return BlockMasking(self.grid, n_global=self.n_global, mask_probability=float(c.mask_probability),
                            ratio=(float(c.mask_ratio[0]), float(c.mask_ratio[1])),
                            min_patches=int(c.mask_min_patches))

    def begin(self, step: int, derived: Any) -> None:
        trainable = [n for n, p in self.teacher.named_parameters() if p.requires_grad]
        if trainable:
            raise ConfigError(f"teacher parameters {trainable[:4]} require grad: the teacher must only change "
                              f"through the EMA (use sslkit.methods.ema.freeze on it)")
        self._step, self._steps_per_epoch, self._total = int(step), int(derived.steps_per_epoch), int(derived.total_steps)
        if int(derived.micro_batch) < 2:
            raise ConfigError(f"KoLeo needs at least 2 images per device and micro-step, data.batch_size is "
                              f"{derived.micro_batch}: raise data.batch_size (or method.koleo_loss_weight=0 "
                              f"does not help: the loss is still computed)")
        if derived.global_batch * 8 <= int(self.cfg.recipe_batch):
            log.warning("global batch %d is far below the DINOv2 recipe's %d: small batches are the most common "
                        "cause of collapse (watch teacher_entropy and koleo in the logs; lower the prototype count, "
                        "raise warmup_teacher_temp_epochs, or accumulate with trainer.accum_steps)",
                        derived.global_batch, int(self.cfg.recipe_batch))

    # ----------------------------------------------------------------------------------- schedules
    def teacher_temp_at(self, step: int) -> float:
        warm = int(round(float(self.cfg.warmup_teacher_temp_epochs) * self._steps_per_epoch))
        if step < warm:
            return linear(step, warm, float(self.cfg.warmup_teacher_temp), float(self.cfg.teacher_temp))
        return float(self.cfg.teacher_temp)

    def ema_momentum_at(self, step: int) -> float:
        return cosine(step, self._total, float(self.cfg.ema_momentum), float(self.cfg.ema_momentum_end))

    def last_layer_frozen_at(self, step: int) -> bool:
        return step < int(round(float(self.cfg.freeze_last_layer_epochs) * self._steps_per_epoch))

    # ----------------------------------------------------------------------------------- forward
    def _center(self, center: L.SoftmaxCenter, logits: Tensor, temp: float) -> Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return L.sinkhorn_knopp(logits, temp, int(self.cfg.sinkhorn_iterations))
        probs = center.probs(logits, temp)
        if self.training:
            center.update(logits)
        return probs

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        g_crops = batch["global_crops"]  # (G*B, 3, S, S)
        l_crops = batch.get("local_crops")  # (L*B, 3, s, s) or None
        masked = batch["masked"]  # (G*B, N) bool, True = replaced by the mask token
        n_img = g_crops.shape[0] // self.n_global
        temp = self.teacher_temp_at(self._step)
        frozen = self.last_layer_frozen_at(self._step)
        ibot_student_head = self.student["ibot_head"] if "ibot_head" in self.student else self.student["dino_head"]
        ibot_teacher_head = self.teacher["ibot_head"] if "ibot_head" in self.teacher else self.teacher["dino_head"]
        npre = int(self.backbone.num_prefix_tokens)

        # teacher: global crops, unmasked, no grad
        with torch.no_grad():
            t_tok = self.teacher["backbone"].forward_features(g_crops)  # (G*B, 1+R+N, C)
            t_cls_logits = self.teacher["dino_head"](t_tok[:, 0])  # (G*B, K)
            t_patch_logits = ibot_teacher_head(t_tok[:, npre:][masked])  # (M, K')
            t_cls = self._center(self.dino_center, t_cls_logits, temp)
            t_patch = self._center(self.ibot_center, t_patch_logits, temp)

        # student: all crops in one packed forward
        crops = [g_crops] + ([l_crops] if l_crops is not None and l_crops.shape[0] else [])
        outs = self.backbone.forward_packed(crops, [masked] + [None] * (len(crops) - 1))
        s_cls = torch.cat([o[:, 0] for o in outs])  # (G*B + L*B, C)
        s_patch = outs[0][:, npre:][masked]  # (M, C)
        if ibot_student_head is self.student["dino_head"]:  # shared head: one call for CLS and patches
            logits = self.student["dino_head"](torch.cat([s_cls, s_patch]), freeze_last_layer=frozen)
            s_cls_logits, s_patch_logits = logits[: s_cls.shape[0]], logits[s_cls.shape[0]:]
        else:
            s_cls_logits = self.student["dino_head"](s_cls, freeze_last_layer=frozen)
            s_patch_logits = ibot_student_head(s_patch, freeze_last_layer=frozen)

        dino = L.dino_loss(s_cls_logits.split(n_img), t_cls.split(n_img), float(self.cfg.student_temp))
        counts = masked.sum(dim=1, keepdim=True).clamp_min(1)  # (G*B, 1)
        weight = (1.0 / counts).expand_as(masked)[masked]  # (M,) 1/#masked of each token's image
        # DINOv2's scale: per masked image mean, summed, / (G*B) (its loss_scales 2 x ibot_loss_scale 1/G = 1)
        ibot = L.ibot_loss(s_patch_logits, t_patch, weight, masked.shape[0], float(self.cfg.student_temp))
        g_cls = outs[0][:, 0]  # (G*B, C) student CLS of the global crops (backbone output, pre-head)
        koleo = sum(L.koleo_loss(c) for c in g_cls.split(n_img))
        loss = (float(self.cfg.dino_loss_weight) * dino + float(self.cfg.ibot_loss_weight) * ibot
                + float(self.cfg.koleo_loss_weight) * koleo)
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach(),
                "teacher_entropy": L.entropy(t_cls), "teacher_temp": torch.tensor(temp),
                "masked_tokens": torch.tensor(float(masked.sum()))}

    # ----------------------------------------------------------------------------------- hooks
    def after_step(self, step: int) -> dict[str, float]:
        """EMA teacher update after optimizer step ``step - 1``; the next forward runs step ``step``."""
        m = self.ema_momentum_at(step - 1)
        ema_update(self.teacher, self.student, m)
        self._step = int(step)
        return {"ema_momentum": m, "last_layer_frozen": float(self.last_layer_frozen_at(step - 1))}

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Teacher CLS (after the final norm), as DINOv2 evaluates: (B, 3, H, W) -> (B, C)."""
        return embed(self.teacher["backbone"], images)

    def heldout_batch(self, images: Tensor, generator: torch.Generator) -> Optional[dict[str, Tensor]]:
        return None  # the DINO loss needs multi-crop views; the summary reports kNN only

    @torch.no_grad()
    def visualize(self, images: Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float],
                  threshold: Optional[float] = None, **options: Any) -> dict[str, np.ndarray]:
        """Pictures of the teacher backbone (what evaluation reads) on ``images``, one row per image (no masks:
        ``generator`` is unused):

        - ``pca``: original | the first three PCA components of the patch features as RGB (``pca_rgb``, fitted
          on all patches of ``images``) | with ``threshold``: the foreground PCA (background black);
        - ``attention``: original | the last block's CLS attention over the patches, one panel per head
          (``last_attention``; min-max per head, upsampled to the image size)."""
        net = self.teacher["backbone"]
        B, _, H, W = images.shape
        p, npre = int(net.patch_size), int(net.num_prefix_tokens)
        h, w = H // p, W // p

        def up(x: Tensor) -> Tensor:  # (B, h*w, c) -> (B, H, W, c), nearest
            return x.cpu().view(B, h, w, -1).repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)

        orig = to_uint8(to_unit_rgb(images, mean, std))  # (B, H, W, 3)
        feats = net.forward_features(images)[:, npre:]  # (B, N, C)
        cols = [orig, to_uint8(up(pca_rgb(feats)))]
        if threshold is not None:
            cols.append(to_uint8(up(pca_rgb(feats, threshold))))
        attn = net.last_attention(images)[:, :, npre:].float()  # (B, heads, N)
        lo, hi = attn.min(dim=-1, keepdim=True).values, attn.max(dim=-1, keepdim=True).values
        attn = ((attn - lo) / (hi - lo).clamp_min(1e-12)).transpose(1, 2)  # (B, N, heads) in [0, 1]
        heads = to_uint8(heatmap(up(attn)))  # (B, H, W, heads, 3)
        return {"pca": tile([[c[b] for c in cols] for b in range(B)]),
                "attention": tile([[orig[b], *heads[b].transpose(2, 0, 1, 3)] for b in range(B)])}
