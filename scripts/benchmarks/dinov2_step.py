"""``dinov2`` step rows: one whole DINOv2 training step, sslkit vs a peer built from lightly's components.

Both variants train ViT-S/16 on 2 x 224 + 8 x 96 crops of ``B`` images (default 8) with the DINOv2
recipe: 65536 shared DINO/iBOT prototypes (head 384 -> 2048 -> 2048 -> 256 -> 65536), LayerScale 1e-5,
stochastic depth 0.4 (the same rate in every block), iBOT block masks on the global crops (the SAME
precomputed masks for both), KoLeo 0.1, EMA teacher on the global crops. One step = forward + backward
+ clip-grad 3.0 + AdamW step + EMA teacher update, with the SAME optimizer for both
(``sslkit.optim.build_optimizer``: fused AdamW, no weight decay on norms / biases / tokens / LayerScale,
layer-wise lr decay 0.9, patch-embed lr x 0.2).

- ``sslkit``: :class:`sslkit.methods.dinov2.DINOv2` from ``experiment=dinov2_vits16`` -- one packed
  student forward over all crops with efficient stochastic depth (dropped samples do no work),
  Sinkhorn-Knopp teacher targets, one student-head call for CLS + masked patches.
- ``lightly``: the recipe of lightly's ``examples/pytorch/dinov2.py`` built from lightly 1.6's parts:
  timm ``vit_small_patch16_224`` in ``MaskedVisionTransformerTIMM`` (student; teacher a frozen copy),
  ``update_drop_path_rate(mode="uniform")`` (timm's mask-based ``DropPath``), ``DINOv2ProjectionHead``
  shared by DINO and iBOT, ``DINOLoss`` / ``IBOTPatchLoss`` (softmax centering: lightly's losses have no
  Sinkhorn-Knopp), ``KoLeoLoss``, ``update_momentum``. The student runs once per resolution (global
  crops with the masks, then local crops) and its head once per output (global CLS, masked patches,
  local CLS), as in lightly's example.

Recipe differences kept on purpose (lightly's example / components do it this way): softmax-center
vs Sinkhorn-Knopp teacher targets, iBOT loss scale (lightly divides by the G*B masked-or-not crops;
sslkit multiplies that by ``n_global`` as DINOv2 does), mask-based vs efficient stochastic depth.
Changed from lightly's example for a like-for-like step: its per-step ``random_block_mask`` call and its
plain ``AdamW(model.parameters())`` are replaced by the shared precomputed masks and the shared
optimizer; stochastic depth 0.4 instead of the example's 0.1 (same as the sslkit side).

Both variants start at step ``START_STEP`` (past the first epoch, so the DINO head's last layer is
trained, as for 99% of a run). Metrics: ``images_per_s`` / ``step_ms`` (median step; both variants in
one process, stepped round-robin after warm-up), ``peak_mem_mb`` (each variant alone in a fresh
process: max RSS during the steps on CPU, ``torch.cuda.max_memory_allocated`` on CUDA),
``activation_mem_mb`` (that peak minus the memory with model + optimizer state allocated), and on the
sslkit row ``speedup_vs_lightly``. On CUDA both run under bf16 autocast and steps are synchronized.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import warnings
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from benchmarks import (interleaved_medians, peak_rss_mb, print_table, reset_peak_rss, row, rss_mb, run_isolated,
                          time_steps)

from sslkit.config import compose
from sslkit.masking import BlockMasking
from sslkit.methods import build_method
from sslkit.optim import build_optimizer

BENCH = "dinov2"
MODEL = "vit_small_dinov2_step"
VARIANTS = ("sslkit", "lightly")
DROP_PATH = 0.4
STEPS_PER_EPOCH = 100
TOTAL_STEPS = 100 * STEPS_PER_EPOCH
START_STEP = 2 * STEPS_PER_EPOCH  # past freeze_last_layer_epochs=1: the head's last layer trains
DESCRIPTIONS = {
    "sslkit": "sslkit DINOv2 (experiment=dinov2_vits16): sslkit_vit_small, packed multi-crop student forward, "
              f"efficient stochastic depth {DROP_PATH}, Sinkhorn-Knopp, shared head called once, fused AdamW + EMA",
    "lightly": "lightly 1.6 DINOv2 parts (as examples/pytorch/dinov2.py): timm vit_small_patch16_224 in "
               f"MaskedVisionTransformerTIMM, timm DropPath {DROP_PATH} uniform, student per resolution, "
               "DINOv2ProjectionHead x3 calls, DINOLoss/IBOTPatchLoss (softmax center), KoLeoLoss, update_momentum",
}


# ----------------------------------------------------------------------------------------- setup
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _config(batch: int, device: torch.device) -> Any:

    return compose(["experiment=dinov2_vits16", f"model.drop_path_rate={DROP_PATH}", f"trainer.device={device.type}",
                    f"data.batch_size={batch}", "logger=none"])


def _lr(cfg: Any, batch: int) -> float:
    o = cfg.optim
    ratio = batch / float(o.lr_ref_batch)
    scale = {"sqrt": math.sqrt(ratio), "linear": ratio}.get(str(o.lr_scaling), 1.0)
    return float(o.blr) * scale


def _inputs(cfg: Any, batch: int, device: torch.device) -> dict[str, Tensor]:
    """Random crops (view-major, as the multi-crop loader) and the method's block masks, seeded."""

    m, v = cfg.method, cfg.method.view
    g = torch.Generator().manual_seed(0)
    size, lsize, patch = int(v.size), int(v.local_size), 16
    # the same masks as DINOv2.masking() (built here so the lightly process never builds the sslkit model)
    masking = BlockMasking((size // patch, size // patch), n_global=int(v.n_global),
                           mask_probability=float(m.mask_probability),
                           ratio=(float(m.mask_ratio[0]), float(m.mask_ratio[1])), min_patches=int(m.mask_min_patches))
    masked = masking(batch, torch.Generator().manual_seed(0))["masked"]
    return {"global_crops": torch.randn(int(v.n_global) * batch, 3, size, size, generator=g).to(device),
            "local_crops": torch.randn(int(v.n_local) * batch, 3, lsize, lsize, generator=g).to(device),
            "masked": masked.to(device)}


class _Variant(SimpleNamespace):
    """module (everything with parameters), opt, step() -> None, losses: list of detached loss tensors."""


# ----------------------------------------------------------------------------------------- sslkit
def _build_sslkit(batch: int, device: torch.device) -> _Variant:

    cfg = _config(batch, device)
    method = build_method(cfg).to(device)
    inputs = _inputs(cfg, batch, device)
    masks = method.masking()(batch, torch.Generator().manual_seed(0))["masked"].to(device)
    if not torch.equal(masks, inputs["masked"]):
        raise RuntimeError("the benchmark's masks differ from DINOv2.masking(): update _inputs")
    opt = build_optimizer(method, cfg.optim, _lr(cfg, batch))
    clip = float(cfg.optim.clip_grad)
    method.begin(START_STEP, SimpleNamespace(steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL_STEPS,
                                             micro_batch=batch, global_batch=batch, world_size=1))
    method.train()
    v = _Variant(module=method, opt=opt, losses=[], state={"step": START_STEP})

    def step() -> None:
        with _autocast(device):
            out = method(inputs)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        v.state["step"] += 1
        method.after_step(v.state["step"], TOTAL_STEPS)
        v.losses.append(out["loss"].detach())
        _sync(device)

    v.step = step
    return v


# ----------------------------------------------------------------------------------------- lightly
class LightlyDINOv2(nn.Module):
    """DINOv2 from lightly 1.6's components, wired as lightly's ``examples/pytorch/dinov2.py``.

    ``backbone`` (the student's timm ViT) lets ``sslkit.optim.build_optimizer`` form the same
    layer-wise-lr-decay groups as for the sslkit method.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        import timm
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate

        m = cfg.method
        vit = timm.create_model("vit_small_patch16_224", drop_path_rate=DROP_PATH, init_values=1e-5, num_classes=0,
                                dynamic_img_size=True)
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        # lightly's example: the DINOv2 rate in every block (timm's create_model gives a linear ramp)
        update_drop_path_rate(self.student_backbone.vit, drop_path_rate=DROP_PATH, mode="uniform")
        dim, k = int(vit.embed_dim), int(m.prototypes)

        def head() -> nn.Module:
            with warnings.catch_warnings():  # DINOv2ProjectionHead uses the deprecated nn.utils.weight_norm
                warnings.simplefilter("ignore", FutureWarning)
                return DINOv2ProjectionHead(input_dim=dim, hidden_dim=int(m.head_hidden_dim),
                                            bottleneck_dim=int(m.head_bottleneck_dim), output_dim=k)

        # shared DINO / iBOT head (ibot_separate_head=False); weight_norm modules cannot be deep-copied, so
        # the teacher head is built anew and loaded with the student's weights
        self.student_head = head()
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for mod in (self.teacher_backbone, self.teacher_head):
            for p in mod.parameters():
                p.requires_grad = False
            mod.eval()
        self.dino_criterion = DINOLoss(output_dim=k, student_temp=float(m.student_temp))
        self.ibot_criterion = IBOTPatchLoss(output_dim=k, student_temp=float(m.student_temp))
        self.koleo_criterion = KoLeoLoss()
        self.koleo_weight = float(m.koleo_loss_weight)
        self.n_global = int(m.view.n_global)

    @property
    def backbone(self) -> nn.Module:
        return self.student_backbone.vit

    def train(self, mode: bool = True) -> "LightlyDINOv2":
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self

    def forward(self, g_crops: Tensor, l_crops: Tensor, masked: Tensor, teacher_temp: float) -> Tensor:
        n_views = self.n_global + l_crops.shape[0] * self.n_global // g_crops.shape[0]
        mask = nn.functional.pad(masked, (1, 0))  # (G*B, 1+N): the CLS token is never masked
        h, w = self.teacher_backbone.vit.patch_embed.grid_size
        block_mask = masked.view(-1, h, w)

        with torch.no_grad():
            t_feat = self.teacher_backbone.encode(g_crops)
            t_cls_out = self.teacher_head(t_feat[:, 0])
            t_masked_out = self.teacher_head(t_feat[mask])

        s_feat = self.student_backbone.encode(g_crops, mask=mask)
        s_g_cls = s_feat[:, 0]
        s_g_cls_out = self.student_head(s_g_cls)
        s_g_masked_out = self.student_head(s_feat[mask])
        s_l_cls_out = self.student_head(self.student_backbone.encode(l_crops)[:, 0])
        s_cls_out = torch.cat([s_g_cls_out, s_l_cls_out])

        dino = self.dino_criterion(teacher_out=list(t_cls_out.chunk(self.n_global)),
                                   student_out=list(s_cls_out.chunk(n_views)), teacher_temp=teacher_temp)
        ibot = self.ibot_criterion(teacher_out=t_masked_out, student_out=s_g_masked_out, mask=block_mask,
                                   teacher_temp=teacher_temp)
        koleo = self.koleo_weight * sum(self.koleo_criterion(t) for t in s_g_cls.chunk(self.n_global))
        return dino + ibot + koleo


def _build_lightly(batch: int, device: torch.device) -> _Variant:
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule


    cfg = _config(batch, device)
    model = LightlyDINOv2(cfg).to(device)
    inputs = _inputs(cfg, batch, device)
    opt = build_optimizer(model, cfg.optim, _lr(cfg, batch))
    clip = float(cfg.optim.clip_grad)
    m = cfg.method
    warm = int(round(float(m.warmup_teacher_temp_epochs) * STEPS_PER_EPOCH))
    model.train()
    v = _Variant(module=model, opt=opt, losses=[], state={"step": START_STEP})

    def step() -> None:
        s = v.state["step"]
        temp = linear_warmup_schedule(step=s, warmup_steps=warm, start_value=float(m.warmup_teacher_temp),
                                      end_value=float(m.teacher_temp))
        with _autocast(device):
            loss = model(inputs["global_crops"], inputs["local_crops"], inputs["masked"], temp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        momentum = cosine_schedule(step=s, max_steps=TOTAL_STEPS, start_value=float(m.ema_momentum),
                                   end_value=float(m.ema_momentum_end))
        update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
        update_momentum(model.student_head, model.teacher_head, m=momentum)
        v.state["step"] = s + 1
        v.losses.append(loss.detach())
        _sync(device)

    v.step = step
    return v


BUILDERS: dict[str, Callable[[int, torch.device], _Variant]] = {"sslkit": _build_sslkit, "lightly": _build_lightly}


# ----------------------------------------------------------------------------------------- measure
def _check_finite(variant: str, v: _Variant) -> list[float]:
    losses = [float(x) for x in v.losses]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"dinov2 step benchmark: {variant} loss is not finite: {losses}")
    return losses


def measure_memory(variant: str, batch: int, threads: int) -> dict[str, float]:
    """Peak memory of one variant alone in its process (CPU: max RSS; CUDA: max allocated)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = _device()
    v = BUILDERS[variant](batch, device)
    for p in v.module.parameters():  # allocate the AdamW state: the baseline is model + optimizer
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        time_steps(v.step, 1, 2)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        baseline = rss_mb()
        reset_peak_rss()
        time_steps(v.step, 1, 2)
        peak = peak_rss_mb()
    _check_finite(variant, v)
    return {"peak_mem_mb": peak, "activation_mem_mb": peak - baseline}


def measure_speed(batch: int, threads: int, warmup: int, iters: int) -> dict[str, dict[str, Any]]:
    """Median step time of every variant, built in one process and stepped round-robin."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = _device()
    built = {name: BUILDERS[name](batch, device) for name in VARIANTS}
    med = interleaved_medians({name: v.step for name, v in built.items()}, warmup, iters)
    return {name: {"step_s": med[name], "losses": _check_finite(name, v)} for name, v in built.items()}


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    batch = args.batch or 8
    threads = getattr(args, "threads", None) or min(2, os.cpu_count() or 1)
    for name in VARIANTS:
        print(f"  {name}: {DESCRIPTIONS[name]}", flush=True)
    mem = {name: run_isolated(measure_memory, name, batch, threads) for name in VARIANTS}
    speed = run_isolated(measure_speed, batch, threads, args.warmup, args.iters)
    rows: list[dict[str, Any]] = []
    for name in VARIANTS:
        t = speed[name]["step_s"]
        losses = speed[name]["losses"]
        print(f"  {name}: step {1000 * t:.0f} ms, {batch / t:.3g} img/s, peak {mem[name]['peak_mem_mb']:.0f} MB, "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (finite)", flush=True)
        rows += [row(BENCH, MODEL, name, "images_per_s", batch / t, "img/s"),
                 row(BENCH, MODEL, name, "step_ms", 1000 * t, "ms"),
                 row(BENCH, MODEL, name, "peak_mem_mb", mem[name]["peak_mem_mb"], "MB"),
                 row(BENCH, MODEL, name, "activation_mem_mb", mem[name]["activation_mem_mb"], "MB")]
    rows.append(row(BENCH, MODEL, "sslkit", "speedup_vs_lightly",
                    speed["lightly"]["step_s"] / speed["sslkit"]["step_s"], "x"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=None, help="write the rows as a JSON list")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks import dinov2_step  # by module name, so the spawned workers can unpickle the functions

    rows = dinov2_step.step_rows(args)
    print_table(BENCH, rows, {"batch": args.batch or 8, "crops": "2x224+8x96", "device": _device().type,
                              "step": "fwd+bwd+clip+AdamW+EMA"})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
