"""Where DropBlock goes in a backbone, and its schedule (``method.dropblock`` of fine-tuning).

Presets (``DropBlockConfig.preset``):

``resnet_paper``  Ghiasi et al. 2018 on a timm ResNet: groups 3 and 4 (``layer3``, ``layer4``), block
    size 7, the scheduled rate in group 4 and a quarter of it in group 3. In every residual block,
    after each conv + BN (+ ReLU): Bottleneck ``act1`` (conv1), ``aa`` (conv2 + BN + ReLU [+ anti-alias],
    an ``nn.Identity`` in plain ResNets), ``bn3`` (conv3 + BN, before the residual add); BasicBlock
    ``aa`` (conv1) and ``bn2`` (conv2); and on the skip connection: after the projection (the
    ``downsample`` output) where there is one, else on the identity (the block's empty ``downsample``
    slot is filled with the DropBlock, which timm's forward then applies to the shortcut only).
``resnet_timm``  timm's own placement (``timm.models.resnet.drop_blocks``): one DropBlock per residual
    block, in the block's ``drop_block`` slot, i.e. after conv2 + BN, before its ReLU (Bottleneck; after
    conv1 + BN in a BasicBlock); ``layer3`` block size 5 at a quarter of the rate (timm's
    ``gamma_scale=0.25``, the seed rate being linear in the drop rate), ``layer4`` block size 3 at the full
    rate; our paper-correct :class:`DropBlock2d` instead of timm's.
``custom``  any backbone with 2-D feature maps: the outputs of the modules whose ``named_modules()``
    name matches one of ``targets`` (``fnmatch``: ``*`` also crosses dots, ``stages.[23]`` is exact).
    Output layouts: ``nchw`` conv maps, ``nhwc`` (timm Swin stages, sslkit PVT / Swin), ``tokens``
    ``(B, N, C)`` sequences of pyramid ViTs (viewed as a square ``sqrt(N) x sqrt(N)`` map; a non-square
    ``N``, e.g. with a class token, fails with the fix), or ``auto`` (3-D -> tokens; 4-D -> whichever of
    NCHW / NHWC has equal spatial sides, failing when ambiguous). A tuple output ``(x, ...)`` gets
    DropBlock on ``x``. Block size 7 unless set.
``none``  (default) nothing; the right choice for plain transformers.

The state-dict keys never change (pretrained checkpoints load as before): DropBlock2d has no parameters
or buffers, the hooked sites use forward hooks, and every inserted module is also registered as a child
of the model (``model.dropblock``, a ``ModuleList``), so ``.train()`` / ``.eval()`` reach it.

Schedule: each inserted module keeps its ``rate_factor`` (0.25 in group 3); ``set_drop_prob(modules, p)``
sets ``drop_prob = p * rate_factor`` and ``dropblock_schedule`` is the scheduled ``p`` as a pure function
of the step (the method's ``begin`` / ``after_step`` hooks apply it, so a resumed run gets the same rate).
"""

from __future__ import annotations

import math
from fnmatch import fnmatch
from typing import Any, Sequence

import torch
from torch import nn

from sslkit.errors import ConfigError
from sslkit.layers.dropblock import DropBlock2d, dropblock_drop_prob

__all__ = ["PRESETS", "LAYOUTS", "SCHEDULES", "ScheduledDropBlock2d", "apply_dropblock", "set_drop_prob",
           "dropblock_schedule", "validate_dropblock_config"]

PRESETS = ("none", "resnet_paper", "resnet_timm", "custom")
LAYOUTS = ("auto", "nchw", "nhwc", "tokens")
SCHEDULES = ("linear", "warmup", "constant")
CONTAINER = "dropblock"  # child of the model holding every inserted module


class ScheduledDropBlock2d(DropBlock2d):
    """:class:`DropBlock2d` that remembers its ``rate_factor`` (relative to the scheduled target), its
    ``site`` (the module name it acts on) and the ``layout`` of the tensors it gets there."""

    def __init__(self, drop_prob: float, block_size: int, mode: str = "paper", rate_factor: float = 1.0,
                 layout: str = "nchw", site: str = "") -> None:
        super().__init__(drop_prob * rate_factor, block_size, mode)
        if layout not in LAYOUTS:
            raise ConfigError(f"method.dropblock.layout={layout!r}: use one of {list(LAYOUTS)}")
        self.rate_factor = float(rate_factor)
        self.layout = layout
        self.site = site

    def _layout_of(self, x: torch.Tensor) -> str:
        if self.layout != "auto":
            want = 3 if self.layout == "tokens" else 4
            if x.dim() != want:
                raise ConfigError(f"DropBlock at {self.site!r}: layout={self.layout} expects a {want}-D tensor, got "
                                  f"shape {tuple(x.shape)}; set method.dropblock.layout to match (one of {list(LAYOUTS)})")
            return self.layout
        if x.dim() == 3:
            return "tokens"
        if x.dim() == 4:
            nchw, nhwc = x.shape[2] == x.shape[3], x.shape[1] == x.shape[2]
            if nchw != nhwc:
                return "nchw" if nchw else "nhwc"
            raise ConfigError(f"DropBlock at {self.site!r}: cannot tell whether shape {tuple(x.shape)} is NCHW or NHWC; "
                              f"set method.dropblock.layout=nchw (conv maps) or nhwc (channels-last, e.g. Swin stages)")
        raise ConfigError(f"DropBlock at {self.site!r}: needs a 2-D feature map (NCHW / NHWC) or (B, N, C) tokens, "
                          f"got shape {tuple(x.shape)}; pick other method.dropblock.targets")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        layout = self._layout_of(x)  # checked from the first training step on, even at drop_prob 0
        if self.drop_prob <= 0.0 and layout != "tokens":
            return x
        if layout == "nchw":
            return super().forward(x)
        if layout == "nhwc":
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        b, n, c = x.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(
                f"DropBlock at {self.site!r}: {n} tokens (shape {tuple(x.shape)}) are not a square map. DropBlock on "
                f"(B, N, C) tokens needs N = H * W with H == W and no class / register tokens: target a module whose "
                f"output is the 2-D map (a pyramid stage or block, layout nchw / nhwc), not one with extra tokens")
        if self.drop_prob <= 0.0:
            return x
        m = x.transpose(1, 2).reshape(b, c, side, side)  # (B, C, H, W)
        return super().forward(m).reshape(b, c, n).transpose(1, 2)  # (B, N, C)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rate_factor={self.rate_factor}, layout={self.layout!r}, site={self.site!r}"


class _OutputHook:
    """Forward hook replacing a module's output ``y`` (or ``y[0]`` of a tuple) by ``block(y)``. A class (not a
    closure) so that ``copy.deepcopy(model)`` re-points the copy's hook at the copied block."""

    def __init__(self, block: ScheduledDropBlock2d) -> None:
        self.block = block

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            return type(output)([self.block(output[0]), *output[1:]])
        return self.block(output)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def validate_dropblock_config(cfg: Any) -> None:
    """ConfigError (with the options) for an unknown preset / mode / layout / schedule or a bad rate."""
    preset, mode, layout, schedule = (str(_get(cfg, k, d)) for k, d in
                                      (("preset", "none"), ("mode", "paper"), ("layout", "auto"), ("schedule", "linear")))
    if preset not in PRESETS:
        raise ConfigError(f"method.dropblock.preset={preset!r} is unknown; use one of {list(PRESETS)} "
                          f"(resnet_paper: Ghiasi et al. 2018 on a timm ResNet; resnet_timm: timm's placement; "
                          f"custom: method.dropblock.targets=[module-name patterns])")
    if mode not in ("paper", "fast"):
        raise ConfigError(f"method.dropblock.mode={mode!r}: use paper (a mask per sample and channel) or fast")
    if layout not in LAYOUTS:
        raise ConfigError(f"method.dropblock.layout={layout!r}: use one of {list(LAYOUTS)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"method.dropblock.schedule={schedule!r}: use one of {list(SCHEDULES)} (linear: keep_prob "
                          f"1 -> 1 - drop_prob over the run; warmup: over method.dropblock.warmup_epochs; constant)")
    p = float(_get(cfg, "drop_prob", 0.1))
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"method.dropblock.drop_prob={p} must be in [0, 1] (it is 1 - keep_prob; paper: 0.1)")
    bs = _get(cfg, "block_size")
    if bs is not None and int(bs) < 1:
        raise ConfigError(f"method.dropblock.block_size={bs} must be >= 1")


def _resnet_stages(model: nn.Module, preset: str) -> list[tuple[str, nn.Module]]:
    from timm.layers import DropBlock2d as TimmDropBlock2d

    stages = [(n, getattr(model, n, None)) for n in ("layer3", "layer4")]
    if any(s is None for _, s in stages):
        raise ConfigError(f"method.dropblock.preset={preset} needs a timm ResNet (modules layer3 / layer4); "
                          f"{type(model).__name__} has none: use preset=custom with method.dropblock.targets=[...]")
    if any(isinstance(m, TimmDropBlock2d) for m in model.modules()):
        raise ConfigError("the model already has timm DropBlock layers (model.kwargs.drop_block_rate > 0): remove "
                          "drop_block_rate, method.dropblock places and schedules DropBlock")
    return stages  # type: ignore[return-value]


def apply_dropblock(model: nn.Module, cfg: Any) -> list[ScheduledDropBlock2d]:
    """Insert DropBlock into ``model`` as ``cfg.preset`` says (see the module docstring); returns the inserted
    modules (each with its ``rate_factor``), initially at ``cfg.drop_prob * rate_factor``. State-dict keys are
    unchanged. ``preset=none`` returns ``[]`` and touches nothing."""
    from timm.models.resnet import BasicBlock, Bottleneck

    validate_dropblock_config(cfg)
    preset = str(_get(cfg, "preset", "none"))
    if preset == "none":
        return []
    if hasattr(model, CONTAINER):
        raise ConfigError(f"{type(model).__name__} already has a '{CONTAINER}' attribute (DropBlock applied twice?)")
    p, mode = float(_get(cfg, "drop_prob", 0.1)), str(_get(cfg, "mode", "paper"))
    bs_cfg = _get(cfg, "block_size")
    inserted: list[ScheduledDropBlock2d] = []

    def make(block_size: int, factor: float, site: str, layout: str = "nchw") -> ScheduledDropBlock2d:
        m = ScheduledDropBlock2d(p, int(bs_cfg) if bs_cfg is not None else block_size, mode, factor, layout, site)
        inserted.append(m)
        return m

    def hook(name: str, block: ScheduledDropBlock2d) -> None:
        model.get_submodule(name).register_forward_hook(_OutputHook(block))

    if preset == "resnet_paper":
        for stage_name, stage in _resnet_stages(model, preset):
            factor = 0.25 if stage_name == "layer3" else 1.0
            for i, blk in enumerate(stage):
                at = f"{stage_name}.{i}"
                if isinstance(blk, Bottleneck):
                    points = ("act1", "aa", "bn3")  # after conv1+bn+relu, conv2+bn+relu(+aa), conv3+bn
                elif isinstance(blk, BasicBlock):
                    points = ("aa", "bn2")  # after conv1+bn+relu(+aa), conv2+bn
                else:
                    raise ConfigError(f"preset=resnet_paper: {at} is a {type(blk).__name__}, not a timm Bottleneck / "
                                      f"BasicBlock; use preset=custom")
                for pt in points:
                    hook(f"{at}.{pt}", make(7, factor, f"{at}.{pt}"))
                if blk.downsample is not None:  # projection shortcut: after its conv + BN
                    hook(f"{at}.downsample", make(7, factor, f"{at}.downsample"))
                else:  # identity shortcut: timm applies `downsample` to the shortcut only
                    blk.downsample = make(7, factor, f"{at}.shortcut")
    elif preset == "resnet_timm":
        for stage_name, stage in _resnet_stages(model, preset):
            block_size, factor = (5, 0.25) if stage_name == "layer3" else (3, 1.0)  # timm drop_blocks()
            for i, blk in enumerate(stage):
                if not isinstance(getattr(blk, "drop_block", None), nn.Identity):
                    raise ConfigError(f"preset=resnet_timm: {stage_name}.{i} ({type(blk).__name__}) has no empty "
                                      f"drop_block slot; use preset=custom")
                blk.drop_block = make(block_size, factor, f"{stage_name}.{i}.drop_block")
    else:  # custom
        targets = [str(t) for t in (_get(cfg, "targets") or [])]
        if not targets:
            raise ConfigError("method.dropblock.preset=custom needs method.dropblock.targets=[...] (fnmatch patterns "
                              "on model.named_modules() names, e.g. ['stages.2', 'stages.3'] or ['layer[34].*.act1'])")
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [t for t in targets if not any(fnmatch(n, t) for n in names)]
        if unmatched:
            raise ConfigError(f"method.dropblock.targets {unmatched} match no module of {type(model).__name__}; "
                              f"module names look like {names[:12]}")
        layout = str(_get(cfg, "layout", "auto"))
        for n in names:
            if any(fnmatch(n, t) for t in targets):
                hook(n, make(7, 1.0, n, layout))
    model.add_module(CONTAINER, nn.ModuleList(inserted))
    return inserted


def set_drop_prob(modules: Sequence[ScheduledDropBlock2d], drop_prob: float) -> None:
    """``drop_prob = drop_prob * rate_factor`` on every module (the scheduled target times its own factor)."""
    for m in modules:
        m.drop_prob = float(drop_prob) * m.rate_factor


def dropblock_schedule(cfg: Any, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The scheduled (group-4 / factor-1) drop rate at ``step``: ``linear`` ramps keep_prob from 1 to
    ``1 - drop_prob`` over the whole run (the paper), ``warmup`` over ``warmup_epochs`` then constant,
    ``constant`` is ``drop_prob`` throughout. A pure function of the step."""
    target, schedule = float(_get(cfg, "drop_prob", 0.1)), str(_get(cfg, "schedule", "linear"))
    if schedule == "constant":
        return target
    if schedule == "linear":
        return dropblock_drop_prob(step, total_steps, target)
    if schedule == "warmup":
        warm = int(round(float(_get(cfg, "warmup_epochs", 0.0)) * steps_per_epoch))
        return dropblock_drop_prob(step, total_steps, target, warmup_steps=warm)
    raise ConfigError(f"method.dropblock.schedule={schedule!r}: use one of {list(SCHEDULES)}")
