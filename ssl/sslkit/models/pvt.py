"""PVT backbone (the "PVT-S" of UM-MAE) with uniform-masking pretraining support.

Architecture (as in the UM-MAE reference code): non-overlapping conv stem (k = s = ``patch_size``),
four stages of pre-norm transformer blocks whose attention takes keys/values from a spatially reduced
map (``avg_pool2d(sr_ratio)`` -> 1x1 conv -> LayerNorm), and a non-overlapping 2x2 conv
(``PatchMerge``) at the start of stages 2..S. A fixed 2-D sin-cos position embedding, evaluated at the
*original* coordinates of each stem token (``pos``), is added to the stem tokens.

Tokens stay NHWC ``(B, H, W, C)`` throughout: LayerNorm / Linear act on the last dim, SR pooling
runs on a channels-last NCHW *view* of the same memory, the 2x2 merge is a space-to-depth + Linear,
so there are no layout round trips between blocks.

UM-MAE pretraining (``um_pretrain=True``) feeds the compacted, half-resolution visible tokens; the
spatial-reduction ratios are halved (``[8, 4, 2, 1] -> [4, 2, 1, 1]``) so keys/values keep the count
they have at full resolution. Parameter shapes do not depend on the ratios (the reduction conv is
1x1), so pretraining weights load unchanged into the fine-tuning model
(:func:`convert_um_pretrain_to_finetune` checks this explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from sslkit.errors import ConfigError
from sslkit.models._common import (
    PyramidClassifierMixin,
    check_global_pool,
    convert_exact,
    linear_drop_path_rates,
    pyramid_cfg,
)
from sslkit.models.pos_embed import grid_coords, sincos_2d

__all__ = ["PVT", "convert_um_pretrain_to_finetune", "backbone_keys"]

# The reference code builds block / spatial-reduction norms with nn.LayerNorm's default eps (1e-5):
# its ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` only reaches the final norm.
BLOCK_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6


def _um_sr_ratios(sr_ratios: Sequence[int]) -> tuple[int, ...]:
    """Spatial-reduction ratios for UM pretraining: halved (min 1) for the half-resolution input."""
    return tuple(max(r // 2, 1) for r in sr_ratios)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SRAttention(nn.Module):
    """Multi-head attention whose keys/values come from an average-pooled (spatially reduced) map.

    ``sr_ratio`` is clamped to the map size, and a map not divisible by the ratio is pooled with
    ``ceil_mode`` (the last window averages only the tokens it covers), so any map size works. For
    divisible maps this is exactly ``avg_pool2d(x, sr_ratio)``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"PVT: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)  # run as a Linear on NHWC tokens
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, H * W, nh, hd).transpose(1, 2)  # (B, nh, N, hd)

        r = min(self.sr_ratio, H, W)
        if r > 1:
            # channels-last NCHW view -> pooled channels-last -> NHWC view: no layout copy
            kv_in = F.avg_pool2d(x.permute(0, 3, 1, 2), r, ceil_mode=True).permute(0, 2, 3, 1)
        else:
            kv_in = x  # (B, h, w, C)
        kv_in = self.norm(F.linear(kv_in, self.sr.weight.flatten(1), self.sr.bias))  # (B, h, w, C)
        k, v = self.kv(kv_in).view(B, -1, 2, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, M, hd)

        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, H, W, C))  # (B, H, W, C)


class Block(nn.Module):
    """Pre-norm block: x + DropPath(SRAttention(LN(x))), then x + DropPath(Mlp(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SRAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping conv stem: (B, C_in, H, W) -> (B, H/s, W/s, C) NHWC, no norm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.patch_size
        if x.shape[-2] % s or x.shape[-1] % s:
            raise ConfigError(f"PVT stem: image size {tuple(x.shape[-2:])} is not divisible by the stem stride {s}")
        # channels-last input makes the conv output channels-last, i.e. a contiguous NHWC view
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class PatchMerge(nn.Module):
    """Non-overlapping 2x2 conv downsampling on NHWC tokens: (B, H, W, C) -> (B, H/2, W/2, C').

    Run as space-to-depth + Linear (same result as the stride-2 conv, measurably faster on CPU in
    fwd+bwd); the parameter keeps the conv shape (C', C, 2, 2).
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // 2, W // 2, 4 * C)
        w = self.proj.weight.permute(0, 2, 3, 1).reshape(-1, 4 * C)  # (C', C, kh, kw) -> (C', kh*kw*C)
        return F.linear(x, w, self.proj.bias)  # (B, H/2, W/2, C')


class Stage(nn.Module):
    """Optional PatchMerge followed by one block per entry of ``drop_path``."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerge(in_dim, dim) if downsample else None
        self.blocks = nn.ModuleList(Block(dim, num_heads, sr_ratio, mlp_ratio, dp) for dp in drop_path)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class PVT(PyramidClassifierMixin, nn.Module):
    """Pyramid Vision Transformer implementing ``docs/backbone_interface.md``.

    Args:
        embed_dims, depths, num_heads, mlp_ratios: per-stage architecture.
        sr_ratios: fine-tuning (full-resolution) spatial-reduction ratios; halved when ``um_pretrain``.
        patch_size: stem stride (``stem_stride``).
        um_pretrain: UM-MAE pretraining adaptation (halved spatial-reduction ratios).
        img_size: informational only (nominal input size); any size divisible by ``reduction`` works.
        num_classes: head outputs (0: ``head`` is Identity). The head is initialized trunc-normal(2e-5),
            zero bias, here and by ``reset_classifier`` (:func:`sslkit.models._common.init_head`).
        global_pool: ``"avg"`` (mean over the last stage) or ``""`` (no pooling); see
            :class:`~sslkit.models._common.PyramidClassifierMixin` for ``forward_head`` /
            ``reset_classifier``.
        drop_rate: dropout before the head (timm's ``drop_rate``).
        pos_embed: ``"sincos"`` (default): the fixed 2-D sin-cos embedding of each stem token's original
            coordinates (UM-MAE pretraining, and fine-tuning as sslkit does it); ``"learned"``: a parameter
            ``pos_embed`` (1, h*w, C0) initialized with that table at ``img_size`` (bicubic-resampled to
            other grids), as the UM-MAE reference fine-tuning model has (its checkpoints load into it).
        fc_norm: ``False`` (default): the final LayerNorm ``norm`` acts on every token before pooling;
            ``True``: ``norm`` is Identity and ``fc_norm`` normalizes the pooled feature (the UM-MAE / MAE
            reference fine-tuning head).
        drop_path_rate: stochastic depth, ramped LINEARLY over all blocks of all stages
            (``drop_path_schedule = "linear"``, timm / official PVT convention): block ``i`` of ``n``
            (in order, across stages) drops its residual branches with probability
            ``drop_path_rate * i / (n - 1)``, i.e. 0 for the first block and ``drop_path_rate`` for the
            last. (The sslkit ViT uses the same rate in every block instead.)
    """

    drop_path_schedule: str = "linear"  # per-block rates: see drop_path_rate above

    def __init__(
        self,
        img_size: int | Sequence[int] = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        um_pretrain: bool = False,
        pos_embed: str = "sincos",
        fc_norm: bool = False,
    ) -> None:
        super().__init__()
        S = len(depths)
        if pos_embed not in ("sincos", "learned"):
            raise ConfigError(f"PVT: pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if pos_embed == "learned" and um_pretrain:
            raise ConfigError("PVT: UM-MAE pretraining needs pos_embed='sincos' (positions of the kept tokens)")
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == S):
            raise ConfigError("PVT: embed_dims, depths, num_heads, mlp_ratios, sr_ratios need one entry per stage")
        if embed_dims[0] % 4:
            raise ConfigError(f"PVT: embed_dims[0]={embed_dims[0]} must be a multiple of 4 (sin-cos pos. embedding)")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = check_global_pool(global_pool, "PVT")
        self.drop_rate = float(drop_rate)
        self.drop_path_rate = float(drop_path_rate)
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.depths = tuple(int(d) for d in depths)
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.stem_stride = int(patch_size)
        self.reduction = self.stem_stride * 2 ** (S - 1)
        self.um_pretrain = bool(um_pretrain)
        self.sr_ratios = _um_sr_ratios(sr_ratios) if um_pretrain else tuple(int(r) for r in sr_ratios)

        self.patch_embed = PatchEmbed(self.stem_stride, in_chans, self.embed_dims[0])
        dpr = linear_drop_path_rates(drop_path_rate, sum(depths))
        stages, k = [], 0
        for i in range(S):
            stages.append(
                Stage(
                    self.embed_dims[i - 1] if i else self.embed_dims[0],
                    self.embed_dims[i],
                    num_heads[i],
                    self.sr_ratios[i],
                    mlp_ratios[i],
                    dpr[k : k + depths[i]],
                    downsample=i > 0,
                )
            )
            k += depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(self.num_features, eps=FINAL_NORM_EPS)
        self.fc_norm = nn.LayerNorm(self.num_features, eps=FINAL_NORM_EPS) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.pos_embed: nn.Parameter | None = None
        if pos_embed == "learned":
            gh, gw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            gh, gw = gh // self.stem_stride, gw // self.stem_stride
            self.pos_grid = (gh, gw)
            table = sincos_2d(grid_coords(gh, gw), self.embed_dims[0]).reshape(1, gh * gw, self.embed_dims[0])
            self.pos_embed = nn.Parameter(table.clone())  # (1, h*w, C0)
        self._init_weights()
        self.head = self._new_head(num_classes)  # after the backbone init: same init as reset_classifier

    # ----------------------------------------------------------------------------------- init
    def _init_weights(self) -> None:
        """Reference backbone init: xavier-uniform Linear, fan-out normal Conv2d, stem like a Linear.
        (The head is built afterwards by ``_new_head``.)"""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # ------------------------------------------------------------------------ timm convention
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The learned position embedding (if any); the sin-cos one is not a parameter, and 1-D params are
        excluded by the optimizer factory."""
        return {"pos_embed"} if self.pos_embed is not None else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then one group per block (coarse: per stage). A stage's PatchMerge joins its first
        block (as in the reference layer-decay), the final norm joins the last block, the head is last."""
        return dict(
            stem=r"^patch_embed|^pos_embed",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm|^fc_norm", (99999,)),  # timm MATCH_PREV_GROUP
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    # get_classifier / reset_classifier / forward_head: PyramidClassifierMixin

    # -------------------------------------------------------------------------------- forward
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/s, W/s, C0) NHWC stem tokens, no position information."""
        return self.patch_embed(x)

    def forward_tokens(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w, C0) stem tokens [+ (B, h, w, 2) original (row, col) coords] -> (B, h/2^(S-1), w/2^(S-1), C)."""
        B, h, w, C0 = x.shape
        m = 2 ** (len(self.stages) - 1)
        if h % m or w % m:
            raise ConfigError(
                f"PVT: token map {h}x{w} is not divisible by {m} (input sizes must be multiples of "
                f"reduction={self.reduction} pixels)"
            )
        if self.pos_embed is not None:
            assert pos is None, "a learned position embedding takes no token coordinates"
            x = x + self._learned_pos(h, w).to(x.dtype)  # (1, h, w, C0)
        else:
            if pos is None:
                pos = grid_coords(h, w, device=x.device)  # (h, w, 2), broadcast over B
            else:
                assert pos.shape[-3:] == (h, w, 2) and pos.ndim in (3, 4), f"pos {tuple(pos.shape)} vs tokens {(B, h, w)}"
            x = x + sincos_2d(pos, C0).to(x.dtype)  # (B, h, w, C0)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)  # (B, h/m, w/m, C)

    def _learned_pos(self, h: int, w: int) -> torch.Tensor:
        """The learned table as (1, h, w, C0), bicubic-resampled when the grid is not ``img_size``'s."""
        gh, gw = self.pos_grid
        pe = self.pos_embed.reshape(1, gh, gw, -1)
        if (h, w) != (gh, gw):
            pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
            pe = pe.permute(0, 2, 3, 1)
        return pe

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------- checkpoints
_BLOCK_PARAMS = (
    "norm1.weight", "norm1.bias",
    "attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias", "attn.proj.weight", "attn.proj.bias",
    "attn.sr.weight", "attn.sr.bias", "attn.norm.weight", "attn.norm.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip


def backbone_keys(depths: Sequence[int]) -> list[str]:
    """All state-dict keys of a PVT backbone (no head) with the given per-stage depths."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i, d in enumerate(depths):
        if i:
            keys += [f"stages.{i}.downsample.proj.weight", f"stages.{i}.downsample.proj.bias"]
        keys += [f"stages.{i}.blocks.{j}.{p}" for j in range(d) for p in _BLOCK_PARAMS]
    return keys + ["norm.weight", "norm.bias"]


def convert_um_pretrain_to_finetune(
    state_dict: Mapping[str, torch.Tensor], depths: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Convert a PVT backbone state dict from the UM-pretraining model to the fine-tuning model.

    The two differ only in spatial-reduction *ratios*; with avg-pool + 1x1-conv reduction every
    parameter has the same shape, so tensors pass through unchanged (not copied). The conversion checks
    that: the key set must be exactly :func:`backbone_keys` (``depths`` given, or inferred from the
    ``stages.i.blocks.j`` keys) and every ``attn.sr.weight`` must be a 1x1 conv.

    Raises:
        CheckpointError: unknown keys (e.g. ``head.*``, decoder or prefixed keys — strip them first),
            missing keys, or a spatial-reduction conv that is not 1x1.
    """

    def check(k: str, t: torch.Tensor) -> str | None:
        if k.endswith("attn.sr.weight") and (t.ndim != 4 or t.shape[-2:] != (1, 1)):
            return ("expected a 1x1 conv (avg-pool + 1x1 spatial reduction). Strided-conv SR (original PVT) "
                    "cannot be converted.")
        return None

    return convert_exact(state_dict, depths, "PVT", backbone_keys, check)


# ------------------------------------------------------------------------------------ registry
default_cfgs = generate_default_cfgs(
    {
        "sslkit_pvt_small": pyramid_cfg(),
        "sslkit_pvt_test": pyramid_cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PVT:
    return build_model_with_cfg(PVT, variant, pretrained, **kwargs)


@register_model
def sslkit_pvt_small(pretrained: bool = False, **kwargs) -> PVT:
    """PVT-S as used by UM-MAE: dims 64-128-320-512, depths 3-4-6-3, sr 8-4-2-1 (4-2-1-1 pretraining)."""
    args = dict(
        embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8),
        mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), img_size=256,
    )  # fmt: skip
    return _create_pvt("sslkit_pvt_small", pretrained, **dict(args, **kwargs))


@register_model
def sslkit_pvt_test(pretrained: bool = False, **kwargs) -> PVT:
    """Tiny PVT for tests: dims 16-32-48-64, one block per stage."""
    args = dict(
        embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
        mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), img_size=64,
    )  # fmt: skip
    return _create_pvt("sslkit_pvt_test", pretrained, **dict(args, **kwargs))
