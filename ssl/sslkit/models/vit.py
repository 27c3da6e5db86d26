"""Plain ViT backbone for DINOv2-style training: packed multi-crop forward + efficient stochastic depth.

State-dict names follow ``timm.models.vision_transformer.VisionTransformer`` (``cls_token``,
``reg_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``, ``head``) plus ``mask_token`` (iBOT masking).

Token layout ``[cls, reg_1 .. reg_R, patch_1 .. patch_N]``. ``pos_embed`` has ``1 + N`` entries (cls +
patch grid at ``img_size``); registers get no position embedding (as in DINOv2). With ``reg_tokens=0``
this is exactly timm's layout (``class_token=True, no_embed_class=False``) and a state dict loads
``strict=True`` into timm's ``VisionTransformer`` (minus ``mask_token``) with identical outputs. timm puts
position embeddings on the registers too (``no_embed_class=False``: ``1 + R + N`` entries) or on no prefix
token at all (``no_embed_class=True``, e.g. timm's DINOv2-with-registers ports); both are converted
exactly by :func:`checkpoint_filter_fn` (register positions folded into ``reg_token``, a zero position
prepended for the class token).

Packed ("nested") multi-crop forward -- :meth:`VisionTransformer.forward_packed`
-----------------------------------------------------------------------------------
DINOv2 runs the student on crop groups of different resolutions (2 global crops at 224 px -> 197
tokens, 8 local crops at 96 px -> 37 tokens per image). They cannot be stacked along the batch dim, and
running the backbone once per group doubles the number of (small) kernel launches. Instead all groups'
tokens are flattened and concatenated into ONE ``(T, C)`` matrix, ``T = sum_g B_g * N_g``::

    group 0: (B_0, N_0, C) --reshape--> (B_0*N_0, C) --+
    group 1: (B_1, N_1, C) --reshape--> (B_1*N_1, C) --+--cat--> (T, C)   (PackLayout remembers
                                                                            [(B_0, N_0), (B_1, N_1)])

Token-wise ops (LayerNorms, qkv / proj linears, the MLP, LayerScale, residual adds) run once on the
whole ``(T, C)`` matrix. Attention is the only op that mixes tokens: for each group the rows of its
slice of ``qkv`` are viewed as ``(B_g, heads, N_g, head_dim)`` and ``F.scaled_dot_product_attention``
runs on that group alone, so a token only ever attends to the tokens of its own crop. Results are
concatenated back to ``(T, C)`` for the output projection. The final ``norm`` output is split back into
``[(B_g, 1 + R + N_g, C)]``. This equals calling :meth:`~VisionTransformer.forward_features` per group.
The packing helpers (``PackLayout``, ``pack_groups``, ``unpack_groups``) live in ``sslkit.layers.packing``
and are re-exported here.

Efficient stochastic depth (``drop_path_mode="efficient"``, the default)
-----------------------------------------------------------------------
Implemented in ``sslkit.layers.stochastic_depth`` (``drop_add_residual`` for ``(B, N, C)``,
``drop_add_residual_packed`` for the packed matrix). Per block and per branch (attention and MLP draw
independently), each group ``g`` draws its own subset of ``k_g = keep_count(B_g, d)`` samples. The kept
rows of all groups are gathered into one packed matrix (``index_select`` of their tokens), the branch
runs on that smaller matrix only (token-wise ops once, attention per group), and the output is added
back with ``index_add`` scaled by ``B_g / k_g``. Dropped samples cost nothing, forward or backward. The
rate is the SAME for every block (``drop_path_rate``, uniform as in DINOv2, not timm's linear ramp).
``drop_path_mode="mask"`` is timm's ``DropPath`` (branch computed for every sample, multiplied by a
per-sample Bernoulli mask / keep_prob; ``drop_path_residual_packed`` when packed) for comparison. In
eval or with rate 0 both are the plain residual ``x + f(x)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers import drop_path as timm_drop_path
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sslkit.layers.packing import PackLayout, pack_groups, unpack_groups
from sslkit.layers.stochastic_depth import drop_add_residual, drop_add_residual_packed, drop_path_residual_packed
from sslkit.errors import ConfigError
from sslkit.models._common import new_head, pyramid_cfg

__all__ = [
    "VisionTransformer",
    "PackedBlock",
    "PackedAttention",
    "Mlp",
    "LayerScale",
    "PackLayout",  # (from sslkit.layers.packing)
    "pack_groups",
    "unpack_groups",
    "checkpoint_filter_fn",
]

DROP_PATH_MODES = ("efficient", "mask")
GLOBAL_POOLS = ("token", "avg", "")


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"ViT: global_pool must be one of {GLOBAL_POOLS} ('token': CLS, 'avg': mean of the patch "
                          f"tokens, '': no pooling), got {global_pool!r}")
    return global_pool


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (parameter name ``gamma`` as in timm)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (timm ``Mlp`` parameter names), token-wise: any ``(..., C)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PackedAttention(nn.Module):
    """Multi-head self-attention (``qkv``, ``proj``; SDPA) with a dense and a packed multi-group forward."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, C) -> (B, N, C)``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # 3 x (B, h, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))  # (B, N, C)

    def forward_packed(self, x: Tensor, layout: PackLayout) -> Tensor:
        """``(T, C) -> (T, C)``; attention only within each sequence of each group."""
        t, c = x.shape
        h, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x)  # (T, 3C), one GEMM for all groups
        outs = []
        for part, (b, n) in zip(qkv.split(layout.sizes, dim=0), layout.shapes):
            q, k, v = part.view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B_g, h, N_g, hd)
            o = F.scaled_dot_product_attention(q, k, v)  # (B_g, h, N_g, hd)
            outs.append(o.transpose(1, 2).reshape(b * n, c))  # (B_g*N_g, C)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (T, C)
        return self.proj(out)  # (T, C), one GEMM for all groups


class PackedBlock(nn.Module):
    """Pre-norm ViT block (timm ``Block`` names) with a packed forward and stochastic depth.

    ``forward(x)``: ``(B, N, C)``; ``forward_packed(x, layout)``: packed ``(T, C)``. ``drop_path`` is
    this block's rate; ``drop_path_mode`` ``"efficient"`` (sample subset, dropped samples do no compute:
    :func:`~sslkit.layers.stochastic_depth.drop_add_residual` / ``drop_add_residual_packed``) or ``"mask"``
    (timm DropPath: ``timm.layers.drop_path`` / ``drop_path_residual_packed``). The attention and MLP
    branches draw independently. With ``init_values`` the branches are scaled by :class:`LayerScale`.
    In eval (or rate 0) numerically the same as ``timm.models.vision_transformer.Block(dim, num_heads,
    mlp_ratio, qkv_bias, init_values=init_values)``, whose state dict loads with ``strict=True``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        drop_path_mode: str = "efficient",
    ) -> None:
        super().__init__()
        if drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {drop_path_mode!r}")
        if not 0.0 <= float(drop_path) <= 1.0:
            raise ValueError(f"drop_path must be in [0, 1], got {drop_path}")
        self.drop_path = float(drop_path)
        self.drop_path_mode = drop_path_mode
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PackedAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    # branches ------------------------------------------------------------------------------
    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))  # (B, N, C)

    def mlp_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))  # token-wise: any (..., C)

    def attn_residual_packed(self, x: Tensor, layout: PackLayout) -> Tensor:
        return self.ls1(self.attn.forward_packed(self.norm1(x), layout))  # (T, C)

    def mlp_residual_packed(self, x: Tensor, layout: PackLayout) -> Tensor:
        return self.mlp_residual(x)  # (T, C)

    # forwards ------------------------------------------------------------------------------
    def _residual(self, x: Tensor, branch: Callable[[Tensor], Tensor], generator: Optional[torch.Generator]) -> Tensor:
        if self.drop_path_mode == "efficient":
            return drop_add_residual(x, branch, self.drop_path, self.training, generator)
        return x + timm_drop_path(branch(x), self.drop_path, self.training)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(B, N, C) -> (B, N, C)``. ``generator`` only affects the efficient subset draw."""
        x = self._residual(x, self.attn_residual, generator)
        return self._residual(x, self.mlp_residual, generator)

    def _residual_packed(
        self,
        x: Tensor,
        layout: PackLayout,
        branch: Callable[[Tensor, PackLayout], Tensor],
        generator: Optional[torch.Generator],
    ) -> Tensor:
        if self.drop_path_mode == "efficient":
            return drop_add_residual_packed(x, layout, branch, self.drop_path, self.training, generator)
        return drop_path_residual_packed(x, layout, branch, self.drop_path, self.training)

    def forward_packed(
        self, x: Tensor, layout: PackLayout, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Packed ``(T, C) -> (T, C)`` (see :func:`pack_groups`). In training with efficient stochastic
        depth, each group draws its own kept subset per branch; only kept rows are computed."""
        x = self._residual_packed(x, layout, self.attn_residual_packed, generator)
        return self._residual_packed(x, layout, self.mlp_residual_packed, generator)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}, mode={self.drop_path_mode}"


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v}")
    return v  # type: ignore[return-value]


def _resize_grid(pos: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """``(1, h0*w0, C) -> (1, h*w, C)`` bicubic (align_corners=False, antialias off), differentiable."""
    if old == new:
        return pos
    c = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2).float()  # (1, C, h0, w0)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], c).to(pos.dtype)  # (1, h*w, C)


class PatchEmbed(nn.Module):
    """Non-overlapping conv stem: ``(B, C_in, H, W) -> (B, H/p * W/p, C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


# timm VisionTransformer kwargs that describe exactly what this model does: accepted, ignored.
_COMPATIBLE_KWARGS: dict[str, Callable[[Any], bool]] = {
    "class_token": lambda v: v is True,
    "no_embed_class": lambda v: v is False,
    "dynamic_img_size": lambda v: True,  # always dynamic
    "dynamic_img_pad": lambda v: v is False,
    "pre_norm": lambda v: v is False,
    "fc_norm": lambda v: v in (None, False),
    "qk_norm": lambda v: v is False,
    "drop_rate": lambda v: v == 0,
    "pos_drop_rate": lambda v: v == 0,
    "patch_drop_rate": lambda v: v == 0,
    "proj_drop_rate": lambda v: v == 0,
    "attn_drop_rate": lambda v: v == 0,
    "weight_init": lambda v: v in ("", "skip"),
    "um_pretrain": lambda v: v is False,  # sslkit's backbone convention (classify passes False); no UM-MAE ViT
}


class VisionTransformer(nn.Module):
    """ViT backbone with timm state-dict names, a packed multi-crop forward and efficient SD.

    The classifier (``head``) is built and re-built by ``reset_classifier`` like every sslkit backbone's
    (``_common.new_head``: trunc-normal std 2e-5, zero bias, the MAE fine-tuning convention).

    Args:
        img_size: nominal input size; ``pos_embed`` covers its patch grid. Other sizes (multiples of
            ``patch_size``) are served by bicubic interpolation of the patch part.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: architecture.
        num_classes: head outputs (0: ``head`` is Identity).
        init_values: LayerScale init (DINOv2: 1e-5); ``None`` disables LayerScale.
        reg_tokens: number of register tokens (no position embedding).
        drop_path_rate: stochastic-depth rate, the SAME for every block (DINOv2 convention, not the
            linear ramp of timm).
        drop_path_mode: ``"efficient"`` (sample-subset, dropped samples do no compute) or ``"mask"``
            (timm DropPath, for comparison).
        global_pool: ``"token"`` (CLS), ``"avg"`` (mean of the normalized patch tokens; NB timm's
            ``avg`` uses ``fc_norm`` after pooling instead of ``norm`` before) or ``""`` (no pooling).
        **kwargs: timm ViT kwargs whose value matches this model (e.g. ``class_token=True``,
            ``dynamic_img_size``, ``drop_rate=0``) are accepted and ignored; anything else raises.
    """

    drop_path_schedule = "uniform"  # the same rate in every block (DINOv2); PVT / Swin / ResNet: "linear"

    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        reg_tokens: int = 0,
        drop_path_rate: float = 0.0,
        drop_path_mode: str = "efficient",
        global_pool: str = "token",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        for k, v in kwargs.items():
            ok = _COMPATIBLE_KWARGS.get(k)
            if ok is None:
                raise TypeError(f"VisionTransformer: unexpected keyword argument {k!r}")
            if not ok(v):
                raise ValueError(f"VisionTransformer: {k}={v!r} is not supported")
        _check_pool(global_pool)
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_reg_tokens = int(reg_tokens)
        self.num_prefix_tokens = 1 + self.num_reg_tokens
        self.has_class_token = True
        self.dynamic_img_size = True
        self.drop_path_rate = float(drop_path_rate)
        self.drop_path_mode = drop_path_mode
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, self.num_reg_tokens, embed_dim)) if reg_tokens else None
        n = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, embed_dim))  # cls + patch grid
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            PackedBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, drop_path_rate, drop_path_mode)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()
        self.head = new_head(self, embed_dim, num_classes)  # after init_weights: the reset_classifier head

    def init_weights(self) -> None:
        """timm's default ViT init: trunc-normal(0.02) pos_embed and Linear weights (zero bias),
        normal(1e-6) cls / register tokens, zero mask_token, PyTorch default for the patch conv."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------ timm convention
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed|^mask_token",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (non-reentrant; RNG state is restored, so the stochastic
        depth subsets are the same in the recomputation)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = new_head(self, self.num_features, num_classes)

    # --------------------------------------------------------------------------------- tokens
    def pos_embed_for(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """(cls position ``(1, 1, C)``, patch positions ``(1, h*w, C)``) for an ``h x w`` patch grid."""
        return self.pos_embed[:, :1], _resize_grid(self.pos_embed[:, 1:], self.grid_size, (h, w))

    def prepare_tokens(self, x: Tensor, masked: Optional[Tensor] = None) -> Tensor:
        """``(B, C_in, H, W) [+ (B, N) bool] -> (B, 1 + R + N, C)`` tokens before the blocks.

        Masked patches are replaced by ``mask_token`` before the position embedding is added."""
        b, _, hh, ww = x.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"input size {hh}x{ww} is not a multiple of patch_size {p}")
        h, w = hh // p, ww // p
        t = self.patch_embed(x)  # (B, N, C)
        if masked is not None:
            if masked.dtype != torch.bool or tuple(masked.shape) != (b, h * w):
                raise ValueError(f"masked must be a bool tensor of shape {(b, h * w)}, got "
                                 f"{masked.dtype} {tuple(masked.shape)}")
            t = torch.where(masked.unsqueeze(-1), self.mask_token.to(t.dtype), t)  # (B, N, C)
        cls_pos, patch_pos = self.pos_embed_for(h, w)
        t = t + patch_pos  # (B, N, C)
        prefix = [(self.cls_token + cls_pos).expand(b, -1, -1)]  # (B, 1, C)
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))  # (B, R, C)
        return torch.cat(prefix + [t.to(prefix[0].dtype)], dim=1)  # (B, 1+R+N, C)

    # -------------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor, masked: Optional[Tensor] = None) -> Tensor:
        """``(B, C_in, H, W) [+ masked (B, N) bool] -> (B, 1 + R + N, C)`` normalized tokens."""
        x = self.prepare_tokens(x, masked)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)  # (B, 1+R+N, C)
        return self.norm(x)

    def last_attention(self, x: Tensor) -> Tensor:
        """The last block's CLS attention: ``(B, C_in, H, W) -> (B, heads, 1 + R + N)``, the softmax of
        ``q_cls . k / sqrt(head_dim)`` over every token (each row sums to 1; ``[..., num_prefix_tokens:]`` are
        the patch tokens in raster order), from the last block's ``norm1`` + ``attn.qkv`` on the tokens
        entering it. In eval mode these are exactly the weights its SDPA applies (the forward returns none)."""
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)  # (B, 1+R+N, C)
        last = self.blocks[-1]
        b, n, _ = t.shape
        h, hd = last.attn.num_heads, last.attn.head_dim
        q, k, _ = last.attn.qkv(last.norm1(t)).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)[:, :, 0]  # (B, h, 1+R+N)

    def forward_packed(
        self, crops: Sequence[Tensor], masked: Optional[Sequence[Optional[Tensor]]] = None
    ) -> list[Tensor]:
        """All crop groups through the backbone in ONE packed pass.

        Args:
            crops: ``[(B_g, C_in, H_g, W_g)]``, e.g. ``[global (2B, 3, 224, 224), local (8B, 3, 96, 96)]``.
            masked: optional per-group ``(B_g, N_g)`` bool masks (``None`` entries: unmasked).

        Returns:
            ``[(B_g, 1 + R + N_g, C)]`` normalized tokens -- equal to ``forward_features`` per group
            (the groups' tokens share every token-wise op, attention stays within each crop).
        """
        crops = list(crops)
        if not crops:
            raise ValueError("forward_packed: need at least one crop group")
        masks = list(masked) if masked is not None else [None] * len(crops)
        if len(masks) != len(crops):
            raise ValueError(f"forward_packed: {len(masks)} masks for {len(crops)} crop groups")
        x, layout = pack_groups([self.prepare_tokens(c, m) for c, m in zip(crops, masks)])  # (T, C)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk.forward_packed, x, layout, use_reentrant=False)
            else:
                x = blk.forward_packed(x, layout)  # (T, C)
        return unpack_groups(self.norm(x), layout)  # [(B_g, 1+R+N_g, C)]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, 1+R+N, C)``: ``token`` -> CLS, ``avg`` -> mean of the patch tokens; then ``head``."""
        if self.global_pool == "token":
            x = x[:, 0]  # (B, C)
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------- checkpoints
def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Adapt a sslkit or timm ``VisionTransformer`` state dict (class token required) to ``model``.

    - missing ``mask_token`` (plain timm checkpoints) -> zeros;
    - ``pos_embed`` with ``1 + R + N`` entries (timm ``no_embed_class=False`` with registers): the
      register positions are folded into ``reg_token`` (exact: registers only ever get them added);
    - ``pos_embed`` with ``N`` entries (timm ``no_embed_class=True``): a zero class position is prepended
      (exact);
    - patch grid differing from the model's: bicubic resample (antialias off).
    """
    sd = dict(state_dict)
    if "mask_token" not in sd:
        sd["mask_token"] = torch.zeros_like(model.mask_token)
    pe = sd.get("pos_embed")
    if pe is None or "cls_token" not in sd:
        return sd
    r = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    n_model = model.grid_size[0] * model.grid_size[1]
    length = pe.shape[1]
    if length == 1 + n_model:
        layout = "ours"
    elif r and length == 1 + r + n_model:
        layout = "timm_reg"
    elif length == n_model:
        layout = "no_embed_class"
    elif r and _is_square(length - 1 - r):
        layout = "timm_reg"
    elif _is_square(length - 1):
        layout = "ours"
    elif _is_square(length):
        layout = "no_embed_class"
    else:
        raise ValueError(f"checkpoint_filter_fn: cannot interpret pos_embed of {length} entries ({r} registers)")
    if layout == "timm_reg":
        sd["reg_token"] = sd["reg_token"] + pe[:, 1 : 1 + r]
        pe = torch.cat([pe[:, :1], pe[:, 1 + r :]], dim=1)
    elif layout == "no_embed_class":
        pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
    n = pe.shape[1] - 1
    if n != n_model:
        g = math.isqrt(n)
        pe = torch.cat([pe[:, :1], _resize_grid(pe[:, 1:], (g, g), model.grid_size)], dim=1)
    sd["pos_embed"] = pe
    return sd


# ------------------------------------------------------------------------------------ registry
def _cfg(**kwargs: Any) -> dict:
    return pyramid_cfg(**{"input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9, **kwargs})


default_cfgs = generate_default_cfgs(
    {
        "sslkit_vit_tiny": _cfg(),
        "sslkit_vit_small": _cfg(),
        "sslkit_vit_base": _cfg(),
        "sslkit_vit_large": _cfg(),
        "sslkit_vit_test": _cfg(input_size=(3, 32, 32)),
    }
)


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


def _make(variant: str, pretrained: bool, arch: dict, kwargs: dict) -> VisionTransformer:
    return _create_vit(variant, pretrained, **dict(arch, **kwargs))


@register_model
def sslkit_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: 192 dim, 12 blocks, 3 heads."""
    return _make("sslkit_vit_tiny", pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def sslkit_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16: 384 dim, 12 blocks, 6 heads."""
    return _make("sslkit_vit_small", pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def sslkit_vit_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16: 768 dim, 12 blocks, 12 heads."""
    return _make("sslkit_vit_base", pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def sslkit_vit_large(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16: 1024 dim, 24 blocks, 16 heads."""
    return _make("sslkit_vit_large", pretrained, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def sslkit_vit_test(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Tiny ViT for tests: 32 px, patch 4 (8x8 grid), 48 dim, 2 blocks, 3 heads, mlp_ratio 2."""
    arch = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
    return _make("sslkit_vit_test", pretrained, arch, kwargs)
