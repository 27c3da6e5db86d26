"""Swin Transformer with a continuous relative position bias, as used by UM-MAE (Li et al., 2022).

Differences from the original Swin: downsampling is a LayerNorm + non-overlapping 2x2 conv at the start
of each stage after the first, and the relative position bias is a small per-block MLP evaluated on
log-spaced offsets ``sign(d) * log(1 + |d|)`` between the tokens' *original* (row, col) positions. The
positions enter at the stem (``pos``, in stem-token units) and are subsampled with the tokens
(``pos[:, ::2, ::2] / 2``), so under uniform masking (UM-MAE) the compacted visible tokens keep their
true geometry. The bias is then per sample and per window; on the regular grid it is shared by the batch.

Fast exact bias: offsets take few distinct values, so the MLP is evaluated once on the table of distinct
(dh, dw) pairs and gathered (see :func:`build_rel_pos_index`); the result equals the all-pairs evaluation
of the official code. The shift / padding mask is folded into the same gather as ``-inf`` entries.

Window 8 for UM pretraining (``um_pretrain=True``, compacted 32x32 stem grid at 256 px), 16 for
fine-tuning at 256 px; the window is clamped (and the shift disabled) when a feature map fits in one
window. The weights are independent of the window size, so the conversion only validates keys.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
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
from sslkit.models.pos_embed import grid_coords

__all__ = [
    "SwinUM",
    "RelPosIndex",
    "build_rel_pos_index",
    "backbone_keys",
    "convert_um_pretrain_to_finetune",
    "sslkit_swin_tiny",
    "sslkit_swin_test",
]

_LayerNorm = functools.partial(nn.LayerNorm, eps=1e-6)  # stem, merges, final norm (the reference's norm_layer)
# The reference builds its blocks' norm1 / norm2 with nn.LayerNorm's default eps (1e-5): its
# norm_layer=partial(nn.LayerNorm, eps=1e-6) never reaches SwinBlock (found by the parity fixtures).
_BlockLayerNorm = functools.partial(nn.LayerNorm, eps=1e-5)


# ------------------------------------------------------------------------------- window helpers
def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, ws*ws, C), windows in raster order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(B, (H // ws) * (W // ws), ws * ws, C)


def _window_reverse(x: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B, nW, ws*ws, C) -> (B, H, W, C)."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, H // ws, W // ws, ws, ws, C).transpose(2, 3)  # (B, H/ws, ws, W/ws, ws, C)
    return x.reshape(B, H, W, C)


def _effective_window(H: int, W: int, window_size: int, shift_size: int) -> tuple[int, int]:
    """Official rule: if the map fits in one window (min(H, W) <= window), window = min(H, W), no shift."""
    if min(H, W) <= window_size:
        return min(H, W), 0
    return window_size, shift_size


@functools.lru_cache(maxsize=64)
def _window_mask(H: int, W: int, ws: int, shift: int, device: torch.device) -> torch.Tensor | None:
    """(nW, N, N) bool, True = blocked, for a (H, W) map padded to multiples of ``ws`` then rolled by
    ``-shift``: tokens attend only within their shift region and padding only to padding. None if
    nothing is blocked. Cached; never modify the result."""
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    if shift == 0 and (Hp, Wp) == (H, W):
        return None
    with torch.inference_mode(False), torch.no_grad():
        label = torch.zeros(Hp, Wp, dtype=torch.long)
        if shift > 0:
            cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            for i, hs in enumerate(cuts):
                for j, wsl in enumerate(cuts):
                    label[hs, wsl] = 3 * i + j
        pad = torch.ones(Hp, Wp, dtype=torch.long)
        pad[:H, :W] = 0
        pad = torch.roll(pad, shifts=(-shift, -shift), dims=(0, 1))
        label = _window_partition((2 * label + pad)[None, :, :, None], ws)[0, :, :, 0]  # (nW, N)
        return (label[:, :, None] != label[:, None, :]).to(device)  # (nW, N, N)


# ---------------------------------------------------------------------- continuous position bias
def log_spaced(d: torch.Tensor) -> torch.Tensor:
    """``sign(d) * log(1 + |d|)`` (the official formula, kept bit-identical)."""
    return torch.sign(d) * torch.log(1.0 + d.abs())


class RelPosIndex(NamedTuple):
    """Gather plan for the relative position bias of one (positions, window, shift, heads) setting.

    ``coords``: (T, 2) log-spaced distinct (dh, dw) offsets; the MLP is evaluated on these only.
    ``index``: (Bp, nW*heads, N, N) long into ``cat([table.t().flatten(), -inf])`` (heads*T + 1 entries,
    the last one is the mask). Bp is 1 (shared by the batch) or B.
    """

    coords: torch.Tensor
    index: torch.Tensor
    num_heads: int


def build_rel_pos_index(
    pos: torch.Tensor, window_size: int, shift_size: int, num_heads: int, masked: bool = True
) -> RelPosIndex:
    """Index for the bias ``bias[b, w*heads + h, i, j] = MLP_h(log_spaced(pos_j - pos_i))``.

    ``pos``: (Bp, H, W, 2) float original coordinates; ``window_size`` / ``shift_size`` are the effective
    ones (see :func:`_effective_window`). Padding to multiples of the window and the cyclic shift follow
    the token layout of :class:`SwinBlock`. Exact: each offset is the same float subtraction as in the
    all-pairs evaluation; the distinct values are found with ``unique`` on the per-token coordinates
    (small) and on their pairwise differences, never on the B*nW*N*N pairs. ``masked=False`` leaves the
    shift / padding mask out (for tests).
    """
    ws, shift = window_size, shift_size
    Bp, H, W, _ = pos.shape
    ph, pw = (-H) % ws, (-W) % ws
    with torch.no_grad():
        p = pos.detach().float()
        if ph or pw:
            p = F.pad(p, (0, 0, 0, pw, 0, ph))  # padded tokens are masked
        if shift:
            p = torch.roll(p, shifts=(-shift, -shift), dims=(1, 2))
        p = _window_partition(p, ws)  # (Bp, nW, N, 2)
        nW, N = p.shape[1], p.shape[2]
        n_pairs = Bp * nW * N * N
        idx_c, offs_c = [], []
        for c in range(2):
            vals, inv = torch.unique(p[..., c], return_inverse=True)  # (P,), (Bp, nW, N)
            P = vals.numel()
            if P * P <= n_pairs:  # usual case (grid-like positions): P is small
                diff = vals[None, :] - vals[:, None]  # (P, P): [a, b] = vals[b] - vals[a]
                offs, pair_map = torch.unique(diff, return_inverse=True)  # (U,), (P, P)
                pair = inv[..., :, None] * P + inv[..., None, :]  # (Bp, nW, N, N): query i, key j
                idx_c.append(pair_map.view(-1)[pair])
            else:  # scattered positions: unique over the pairs themselves
                pc = p[..., c]
                offs, pair_idx = torch.unique(pc[..., None, :] - pc[..., :, None], return_inverse=True)
                idx_c.append(pair_idx)  # (Bp, nW, N, N)
            offs_c.append(offs)
        Uh, Uw = offs_c[0].numel(), offs_c[1].numel()
        idx = idx_c[0] * Uw + idx_c[1]  # (Bp, nW, N, N) into the (Uh, Uw) table
        if Uh * Uw <= n_pairs:
            T = Uh * Uw
            coords = torch.stack(torch.meshgrid(offs_c[0], offs_c[1], indexing="ij"), dim=-1).view(T, 2)
        else:  # the full (Uh, Uw) table would exceed the number of pairs: keep the (dh, dw) that occur
            used, idx = torch.unique(idx, return_inverse=True)
            T = used.numel()
            coords = torch.stack([offs_c[0][used // Uw], offs_c[1][used % Uw]], dim=-1)  # (T, 2)
        head_off = torch.arange(num_heads, device=idx.device).view(1, 1, num_heads, 1, 1) * T
        index = idx[:, :, None] + head_off  # (Bp, nW, heads, N, N)
        if masked:
            mask = _window_mask(H, W, ws, shift, pos.device)
            if mask is not None:
                index.masked_fill_(mask[None, :, None], num_heads * T)
        index = index.view(Bp, nW * num_heads, N, N)
    return RelPosIndex(log_spaced(coords), index, num_heads)


@functools.lru_cache(maxsize=64)
def _grid_rel_pos_index(H: int, W: int, ws: int, shift: int, num_heads: int, device: torch.device) -> RelPosIndex:
    """Cached :func:`build_rel_pos_index` for the regular grid (pos=None), batch dim 1."""
    with torch.inference_mode(False):
        pos = grid_coords(H, W, device=device)[None]  # (1, H, W, 2)
        return build_rel_pos_index(pos, ws, shift, num_heads)


class PosMLP(nn.Module):
    """Continuous bias MLP 2 -> hidden -> ReLU -> heads (the official 1x1 convs, as Linear)."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        # no bias: a per-head constant added to every logit of a window cancels in the softmax, so it
        # would never receive a gradient (the official 1x1 conv has one; SwinV2's CPB MLP does not)
        self.fc2 = nn.Linear(hidden, num_heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., 2) -> (..., heads)
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with the continuous relative position bias."""

    def __init__(self, dim: int, num_heads: int, posmlp_dim: int = 32, qkv_bias: bool = True) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos_mlp = PosMLP(posmlp_dim, num_heads)

    def rel_pos_bias(self, rel: RelPosIndex) -> torch.Tensor:
        """(Bp, nW*heads, N, N) additive bias, -inf where masked."""
        assert rel.num_heads == self.num_heads
        table = self.pos_mlp(rel.coords)  # (T, heads)
        flat = torch.cat([table.t().reshape(-1), table.new_full((1,), float("-inf"))])  # (heads*T + 1,)
        return flat.index_select(0, rel.index.view(-1)).view(rel.index.shape)

    def forward(self, x: torch.Tensor, rel: RelPosIndex) -> torch.Tensor:
        B, nW, N, C = x.shape  # windows of every sample
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, nW, N, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
        q, k, v = qkv.reshape(3, B, nW * h, N, d).unbind(0)  # (B, nW*h, N, d) each
        bias = self.rel_pos_bias(rel).to(q.dtype)  # (Bp, nW*h, N, N), Bp in {1, B}
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nW*h, N, d)
        x = x.view(B, nW, h, N, d).transpose(2, 3).reshape(B, nW, N, C)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block on NHWC maps; odd blocks of a stage shift."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        posmlp_dim: int = 32,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = _BlockLayerNorm,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, posmlp_dim=posmlp_dim, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, ws: int, shift: int, rel: RelPosIndex) -> torch.Tensor:
        B, H, W, C = x.shape
        shortcut = x
        x = self.norm1(x)
        ph, pw = (-H) % ws, (-W) % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        x = self.attn(_window_partition(x, ws), rel)  # (B, nW, N, C)
        x = _window_reverse(x, ws, H + ph, W + pw)  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if ph or pw:
            x = x[:, :H, :W]
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, H, W, C)


class PatchEmbed(nn.Module):
    """Non-overlapping conv stem + LayerNorm: (B, C, H, W) -> (B, H/s, W/s, D)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/s, W/s, D)


class PatchMerge(nn.Module):
    """UM-MAE downsampling: LayerNorm, then a non-overlapping 2x2 conv. (B, H, W, C) -> (B, H/2, W/2, D)."""

    def __init__(self, in_dim: int, dim: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm = norm_layer(in_dim)
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm(x).permute(0, 3, 1, 2))  # (B, D, H/2, W/2)
        return x.permute(0, 2, 3, 1)


class SwinStage(nn.Module):
    """Optional PatchMerge, then ``depth`` blocks alternating regular / shifted windows."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        posmlp_dim: int,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.grad_checkpointing = False
        self.downsample = PatchMerge(in_dim, dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, j % 2 == 1, mlp_ratio, qkv_bias, posmlp_dim, drop_path[j])  # block eps 1e-5
            for j in range(depth)
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(self.downsample, nn.Identity):
            x = self.downsample(x)  # (B, H/2, W/2, C)
            if pos is not None:
                pos = pos[:, 0::2, 0::2] / 2.0  # (Bp, H/2, W/2, 2), official subsampling
        _, H, W, _ = x.shape
        plans: dict[int, tuple[int, int, RelPosIndex]] = {}  # shared by the blocks with the same shift
        for blk in self.blocks:
            key = int(blk.shifted)
            if key not in plans:
                ws, shift = _effective_window(H, W, self.window_size, self.window_size // 2 if blk.shifted else 0)
                if pos is None:
                    rel = _grid_rel_pos_index(H, W, ws, shift, self.num_heads, x.device)
                else:
                    rel = build_rel_pos_index(pos, ws, shift, self.num_heads)
                plans[key] = (ws, shift, rel)
            ws, shift, rel = plans[key]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, ws, shift, rel, use_reentrant=False)
            else:
                x = blk(x, ws, shift, rel)
        return x, pos


# ------------------------------------------------------------------------------------- backbone
class SwinUM(PyramidClassifierMixin, nn.Module):
    """UM-MAE Swin backbone (see the module docstring). Implements ``docs/backbone_interface.md``.

    Args:
        embed_dim, depths, num_heads, mlp_ratio, qkv_bias, posmlp_dim: architecture (stage ``i`` has
            ``embed_dim * 2**i`` channels; ``posmlp_dim`` is the width of the bias MLPs).
        patch_size: stem stride (``stem_stride``).
        window_size: attention window (default 8 with ``um_pretrain``, else 16).
        um_pretrain: UM-MAE pretraining adaptation (window 8).
        img_size: informational only (nominal input size); any size divisible by ``reduction`` works.
        num_classes: head outputs (0: ``head`` is Identity). The head is initialized trunc-normal(2e-5),
            zero bias, here and by ``reset_classifier`` (:func:`sslkit.models._common.init_head`).
        global_pool: ``"avg"`` (mean over the last stage) or ``""`` (no pooling); see
            :class:`~sslkit.models._common.PyramidClassifierMixin` for ``forward_head`` /
            ``reset_classifier``.
        drop_rate: dropout before the head (timm's ``drop_rate``).
        fc_norm: ``False`` (default): the final LayerNorm ``norm`` acts on every token before pooling;
            ``True``: ``norm`` is Identity and ``fc_norm`` normalizes the pooled feature (the UM-MAE / MAE
            reference fine-tuning head; its checkpoints load into it).
        drop_path_rate: stochastic depth, ramped LINEARLY over all blocks of all stages
            (``drop_path_schedule = "linear"``, timm / official Swin convention): block ``i`` of ``n``
            (in order, across stages) drops its residual branches with probability
            ``drop_path_rate * i / (n - 1)``, i.e. 0 for the first block and ``drop_path_rate`` for the
            last. (The sslkit ViT uses the same rate in every block instead.)
    """

    drop_path_schedule: str = "linear"  # per-block rates: see drop_path_rate above

    def __init__(
        self,
        img_size: int | tuple[int, int] = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        posmlp_dim: int = 32,
        window_size: int | None = None,
        um_pretrain: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fc_norm: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ConfigError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.um_pretrain = um_pretrain
        self.window_size = int(window_size) if window_size is not None else (8 if um_pretrain else 16)
        self.img_size = img_size  # informational: any size divisible by `reduction` works
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = check_global_pool(global_pool, "SwinUM")
        self.drop_rate = drop_rate
        self.drop_path_rate = float(drop_path_rate)
        S = len(depths)
        self.embed_dims = tuple(embed_dim * 2**i for i in range(S))
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.stem_stride = patch_size
        self.reduction = patch_size * 2 ** (S - 1)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, _LayerNorm)
        dpr = linear_drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i in range(S):
            first = sum(depths[:i])
            self.stages.append(
                SwinStage(
                    self.embed_dims[max(i - 1, 0)], self.embed_dims[i], depths[i], num_heads[i], self.window_size,
                    downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, posmlp_dim=posmlp_dim,
                    drop_path=dpr[first:first + depths[i]], norm_layer=_LayerNorm,
                )
            )  # fmt: skip
        self.norm = nn.Identity() if fc_norm else _LayerNorm(self.num_features)
        self.fc_norm = _LayerNorm(self.num_features) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self._init_weights()
        self.head = self._new_head(num_classes)  # after the backbone init: same init as reset_classifier

    def _init_weights(self) -> None:
        """Official UM-MAE backbone init: xavier Linear, fan-out normal conv (incl. the bias MLP, 1x1 convs
        there), xavier on the flattened stem conv. (The head is built afterwards by ``_new_head``.)"""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, PosMLP):
                for fc in (m.fc1, m.fc2):
                    nn.init.normal_(fc.weight, 0.0, math.sqrt(2.0 / fc.out_features))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))

    # ---------------------------------------------------------------------------- timm surface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing beyond 1-D params (the official code decays the bias-MLP weights too)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm|^fc_norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    # get_classifier / reset_classifier / forward_head: PyramidClassifierMixin

    # -------------------------------------------------------------------------------- forward
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/s, W/s, C0), no position information."""
        return self.patch_embed(x)

    def forward_tokens(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w, C0) stem tokens [+ (B|1, h, w, 2) original positions] -> (B, h/2^(S-1), w/2^(S-1), C)."""
        B, h, w, C = x.shape
        f = self.reduction // self.stem_stride
        if C != self.embed_dims[0] or h % f or w % f:
            raise ConfigError(
                f"Swin forward_tokens: got a ({h}, {w}) grid of {C} channels; need {self.embed_dims[0]} "
                f"channels and a grid divisible by {f} (images divisible by {self.reduction} px)"
            )
        if pos is not None:
            if pos.ndim != 4 or pos.shape[0] not in (1, B) or pos.shape[1:] != (h, w, 2):
                raise ValueError(f"pos must be (B or 1, {h}, {w}, 2), got {tuple(pos.shape)}")
            pos = pos.detach().float()
        for stage in self.stages:
            x, pos = stage(x, pos)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------ checkpoint utils
_BLOCK_PARAMS = tuple(
    f"{m}.{p}"
    for m in ("norm1", "attn.qkv", "attn.proj", "attn.pos_mlp.fc1", "attn.pos_mlp.fc2", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
    if f"{m}.{p}" != "attn.pos_mlp.fc2.bias"  # bias-free (see PosMLP)
)


def backbone_keys(depths: Sequence[int]) -> list[str]:
    """All state-dict keys of a Swin backbone (no head) with the given per-stage depths (qkv_bias=True)."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    for i, d in enumerate(depths):
        if i:
            keys += [f"stages.{i}.downsample.{m}.{p}" for m in ("norm", "proj") for p in ("weight", "bias")]
        keys += [f"stages.{i}.blocks.{j}.{p}" for j in range(d) for p in _BLOCK_PARAMS]
    return keys + ["norm.weight", "norm.bias"]


def convert_um_pretrain_to_finetune(
    state_dict: Mapping[str, torch.Tensor], depths: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Convert a Swin backbone state dict from the UM-pretraining model (window 8) to the fine-tuning
    model (window 16).

    The continuous position bias is an MLP of the offsets, so no parameter depends on the window size
    and the model has no buffers (masks / gather plans are recomputed and cached outside the state
    dict): tensors pass through unchanged (not copied). The conversion checks that the key set is
    exactly :func:`backbone_keys` (``depths`` given, or inferred from the ``stages.i.blocks.j`` keys)
    and that every bias MLP takes 2-D offsets.

    Raises:
        CheckpointError: unknown keys (e.g. ``head.*``, decoder or prefixed keys — strip them first;
            table-based ``relative_position_*`` tensors of the original Swin), missing keys, or a bias
            MLP of the wrong input size.
    """

    def check(k: str, t: torch.Tensor) -> str | None:
        if k.endswith("attn.pos_mlp.fc1.weight") and (t.ndim != 2 or t.shape[1] != 2):
            return "expected (hidden, 2) (continuous relative position bias MLP on 2-D offsets)."
        return None

    return convert_exact(state_dict, depths, "Swin (UM-MAE)", backbone_keys, check)


# ------------------------------------------------------------------------------------ registry
default_cfgs = generate_default_cfgs(
    {
        "sslkit_swin_tiny": pyramid_cfg(),
        "sslkit_swin_test": pyramid_cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


def _create_swin(variant: str, pretrained: bool = False, **kwargs) -> SwinUM:
    return build_model_with_cfg(SwinUM, variant, pretrained, **kwargs)


@register_model
def sslkit_swin_tiny(pretrained: bool = False, **kwargs) -> SwinUM:
    """Swin-T as used by UM-MAE: dim 96, depths 2-2-6-2, heads 3-6-12-24, window 16 (8 pretraining)."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0, posmlp_dim=32, img_size=256)
    return _create_swin("sslkit_swin_tiny", pretrained, **dict(args, **kwargs))


@register_model
def sslkit_swin_test(pretrained: bool = False, **kwargs) -> SwinUM:
    """Tiny Swin for tests: dim 16, depths 1-1-2-1, heads 1-1-2-2, mlp 2, bias-MLP width 8."""
    args = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), mlp_ratio=2.0, posmlp_dim=8, img_size=64)
    return _create_swin("sslkit_swin_test", pretrained, **dict(args, **kwargs))
