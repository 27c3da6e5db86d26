"""DINOv2 parity fixtures: run facebookresearch/dinov2's losses, masking collate and schedules on seeded
inputs and record inputs and outputs (``tests/fixtures/dinov2_*.safetensors``).

Called by ``make_fixtures.py --dinov2 PATH``; ``make(repo, out)`` imports the reference from ``repo``
(nothing of it is copied here). What each file holds:

- ``dinov2_losses.safetensors``: the DINO CLS-token loss (softmax centering with the EMA center, before
  and after its update, and Sinkhorn-Knopp), the iBOT masked-patch loss with the collate's masks,
  ``masks_weight`` and ``n_masked_patches`` (both target modes), KoLeo (random rows, a near-duplicate and
  an exact duplicate), and the total as ``SSLMetaArch.forward_backward`` composes it (loss scales and
  term counts), at K=64 prototypes, B=4 images, 2 global + 4 local crops, an 8x8 patch grid.
- ``dinov2_masking.safetensors``: statistics (counts, not masks) of ``collate_data_and_cast`` with the
  ``MaskingGenerator`` of ``train.py`` on the 14x14 grid of a 224/16 ViT, ratio [0.1, 0.5], probability
  0.5, per-GPU batch 128, over 1000 seeded batches; and how many crops get a mask per batch size.
- ``dinov2_schedules.safetensors``: ``build_schedulers`` of ``train.py`` for the ViT-S/16 recipe (the
  default config, ``vit_small``, 8 GPUs x 128 images, the sqrt lr scaling rule) at selected steps.

No process group is started: the reference's losses check ``dist.is_initialized()`` and run
single-process, except ``iBOTPatchLoss.sinkhorn_knopp_teacher``, which all-reduces its
``n_masked_patches_tensor`` unconditionally; for that call the module's ``dist`` is replaced by a
single-process stand-in whose ``all_reduce`` is the identity (the all-reduce over a world of one).
"""

from __future__ import annotations

import contextlib
import random
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from common import commit_of, on_path, write_fixture

REFERENCE = "facebookresearch/dinov2"

# --- the loss cases
K = 64  # prototypes
B = 4  # images
N_GLOBAL, N_LOCAL = 2, 4
LOSS_GRID = (8, 8)  # patch grid of the iBOT loss case
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.055  # inside the recipe's warm-up range 0.04 -> 0.07
CENTER_MOMENTUM = 0.9
KOLEO_WEIGHT = 0.1
MASK_RATIO = (0.1, 0.5)
MASK_PROBABILITY = 0.5

# --- the masking statistics (ViT-S/16 recipe)
IMG_SIZE, PATCH_SIZE = 224, 16
MASK_BATCH = 128  # images per GPU (8 x 128 = 1024)
MASK_DRAWS = 1000  # batches
RULE_BATCHES = (1, 2, 3, 4, 5, 7, 8, 64, 128)  # batch sizes for the "how many crops get a mask" rule

# --- the schedules (ViT-S/16 recipe: ssl_default_config + these)
RECIPE_OVERRIDES = {"student": {"arch": "vit_small", "patch_size": 16}, "train": {"batch_size_per_gpu": 128}}
RECIPE_GPUS = 8


class _SingleProcessDist:
    """``torch.distributed`` as one process without a group sees it: nothing is initialized, the world has
    one rank, and an all-reduce over it leaves the tensor as it is."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def get_world_size() -> int:
        return 1

    @staticmethod
    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _reference(repo: Path) -> Iterator[None]:
    """The reference importable from ``repo``; its modules are dropped from ``sys.modules`` afterwards.

    ``dinov2.train.train`` (for ``build_schedulers``) imports ``SSLMetaArch``, whose module needs xFormers
    (``from xformers.ops import fmha`` or an AssertionError) and CUDA. Nothing here uses it, so that one
    module is replaced by an empty stand-in; xFormers is not installed.
    """
    stub = types.ModuleType("dinov2.train.ssl_meta_arch")
    stub.SSLMetaArch = None  # type: ignore[attr-defined]  # stand-in: the real one needs xFormers
    with on_path(repo):
        sys.modules["dinov2.train.ssl_meta_arch"] = stub
        try:
            yield
        finally:
            for name in [n for n in sys.modules if n == "dinov2" or n.startswith("dinov2.")]:
                del sys.modules[name]


def _cosine_logits(latent: torch.Tensor, noise: float, protos: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Head-like logits: cosine similarities (in [-1, 1]) of noisy latents with the prototypes."""
    z = F.normalize(latent + noise * torch.randn(latent.shape, generator=g), dim=-1)
    return z @ protos.T


def _swap_global(x: torch.Tensor) -> torch.Tensor:
    """Teacher rows of the two global crops swapped, as ``forward_backward`` orders them (A matched to B)."""
    a, b = x.chunk(2)
    return torch.cat((b, a))


def _losses(commit: str, out: Path) -> Path:
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator
    from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
    from dinov2.loss import ibot_patch_loss as ibot_module

    g = torch.Generator().manual_seed(0)
    d = 16
    protos = F.normalize(torch.randn(K, d, generator=g), dim=-1)
    latent = torch.randn(B, d, generator=g)  # (B, d) one per image
    student = torch.cat([_cosine_logits(latent, 0.6, protos, g) for _ in range(N_GLOBAL + N_LOCAL)])  # ((G+L)B, K)
    teacher = torch.cat([_cosine_logits(latent, 0.3, protos, g) for _ in range(N_GLOBAL)])  # (GB, K)
    s_global, s_local = student[: N_GLOBAL * B], student[N_GLOBAL * B:]
    n_terms = (N_GLOBAL - 1) * N_GLOBAL + max(N_LOCAL * N_GLOBAL, 1)  # forward_backward's term counts
    t: dict[str, torch.Tensor] = {"dino_student": student, "dino_teacher": teacher}

    def dino_total(loss: DINOLoss, targets_swapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward_backward: local crops vs both teacher crops, global crops vs the other one (x 2)."""
        tv = targets_swapped.view(N_GLOBAL, -1, K)
        local = loss(student_output_list=s_local.chunk(N_LOCAL), teacher_out_softmaxed_centered_list=tv) / n_terms
        glob = loss(student_output_list=[s_global], teacher_out_softmaxed_centered_list=[tv.flatten(0, 1)]) * 2 / n_terms
        return local, glob

    # DINO, softmax centering: the center is applied lazily (before the next targets), so set it, take the
    # targets, queue the update with this batch's teacher logits and apply it.
    dino = DINOLoss(K, student_temp=STUDENT_TEMP, center_momentum=CENTER_MOMENTUM)
    center0 = 0.1 * torch.randn(1, K, generator=g)
    dino.center.copy_(center0)
    tgt_sw = dino.softmax_center_teacher(_swap_global(teacher), teacher_temp=TEACHER_TEMP)
    dino.update_center(_swap_global(teacher))
    dino.apply_center_update()
    local, glob = dino_total(dino, tgt_sw)
    t.update(dino_center_before=center0, dino_center_after=dino.center.clone(),
             dino_softmax_targets=_swap_global(tgt_sw), dino_softmax_loss=local + glob,
             dino_softmax_loss_local=local, dino_softmax_loss_global=glob)
    # DINO, Sinkhorn-Knopp
    tgt_sw = dino.sinkhorn_knopp_teacher(_swap_global(teacher), teacher_temp=TEACHER_TEMP, n_iterations=3)
    local, glob = dino_total(dino, tgt_sw)
    t.update(dino_sk_targets=_swap_global(tgt_sw), dino_sk_loss=local + glob)
    # ... and on logits whose largest value is exactly 0 (where subtracting the max before exp changes nothing)
    teacher0 = teacher - teacher.max()
    tgt_sw = dino.sinkhorn_knopp_teacher(_swap_global(teacher0), teacher_temp=TEACHER_TEMP, n_iterations=3)
    t.update(dino_sk_max0_teacher=teacher0, dino_sk_max0_targets=_swap_global(tgt_sw))

    # iBOT: masks, masks_weight and n_masked_patches from the collate (global `random`, seeded)
    gh, gw = LOSS_GRID
    n_tok = gh * gw
    random.seed(0)
    crop = torch.zeros(1)
    samples = [({"global_crops": [crop] * N_GLOBAL, "local_crops": [crop] * N_LOCAL}, ()) for _ in range(B)]
    gen = MaskingGenerator(input_size=LOSS_GRID, max_num_patches=0.5 * n_tok)
    col = collate_data_and_cast(samples, MASK_RATIO, MASK_PROBABILITY, torch.float32, n_tokens=n_tok,
                                mask_generator=gen)
    masks, idx = col["collated_masks"], col["mask_indices_list"]  # (GB, N) bool, (M,)
    n_masked = int(idx.shape[0])
    img_of = idx // n_tok  # (M,) the crop row of each masked token
    s_patch = _cosine_logits(latent.repeat(N_GLOBAL, 1)[img_of], 0.8, protos, g)  # (M, K)
    t_patch = _cosine_logits(latent.repeat(N_GLOBAL, 1)[img_of], 0.5, protos, g)
    loss_scale = 2 * (1.0 / N_GLOBAL)  # forward_backward: loss_scales * ibot_loss_scale
    t.update(ibot_masks=masks, ibot_masks_weight=col["masks_weight"], ibot_n_masked_patches=col["n_masked_patches"],
             ibot_student=s_patch, ibot_teacher=t_patch)

    ibot = iBOTPatchLoss(K, student_temp=STUDENT_TEMP, center_momentum=CENTER_MOMENTUM)
    icenter0 = 0.1 * torch.randn(1, 1, K, generator=g)
    ibot.center.copy_(icenter0)
    th = t_patch.unsqueeze(0)  # (1, M, K) as forward_backward passes it
    tgt = ibot.softmax_center_teacher(th[:, :n_masked], teacher_temp=TEACHER_TEMP).squeeze(0)
    ibot.update_center(th[:n_masked])
    ibot.apply_center_update()
    loss = ibot.forward_masked(s_patch, tgt, student_masks_flat=masks, n_masked_patches=n_masked,
                               masks_weight=col["masks_weight"]) * loss_scale
    t.update(ibot_center_before=icenter0.view(1, K), ibot_center_after=ibot.center.view(1, K).clone(),
             ibot_softmax_targets=tgt, ibot_softmax_loss=loss)
    with _patched(ibot_module, "dist", _SingleProcessDist):
        tgt = ibot.sinkhorn_knopp_teacher(t_patch, teacher_temp=TEACHER_TEMP,
                                          n_masked_patches_tensor=col["n_masked_patches"].clone(), n_iterations=3)
    loss = ibot.forward_masked(s_patch, tgt, student_masks_flat=masks, n_masked_patches=n_masked,
                               masks_weight=col["masks_weight"]) * loss_scale
    t.update(ibot_sk_targets=tgt, ibot_sk_loss=loss)
    t_patch0 = t_patch - t_patch.max()
    with _patched(ibot_module, "dist", _SingleProcessDist):
        tgt = ibot.sinkhorn_knopp_teacher(t_patch0, teacher_temp=TEACHER_TEMP,
                                          n_masked_patches_tensor=col["n_masked_patches"].clone(), n_iterations=3)
    t.update(ibot_sk_max0_teacher=t_patch0, ibot_sk_max0_targets=tgt)

    # KoLeo: random rows; a near-duplicate pair; an exact duplicate pair
    koleo = KoLeoLoss()
    x = torch.randn(16, 32, generator=g)
    x_near = x.clone()
    x_near[5] = x_near[3] + 1e-3 * torch.randn(32, generator=g)
    x_dup = x.clone()
    x_dup[7] = x_dup[2]
    for name, v in (("random", x), ("near_duplicate", x_near), ("duplicate", x_dup)):
        t[f"koleo_{name}_input"], t[f"koleo_{name}_loss"] = v, koleo(v)
    # KoLeo as forward_backward applies it: per global crop on the student CLS (here: the student logits)
    t["koleo_forward"] = KOLEO_WEIGHT * sum(koleo(p) for p in s_global.chunk(2))
    # the total of forward_backward (loss weights 1, 1 and KOLEO_WEIGHT), per centering mode
    for mode in ("softmax", "sk"):
        t[f"total_{mode}_loss"] = t[f"dino_{mode}_loss"] + t["koleo_forward"] + t[f"ibot_{mode}_loss"]

    meta = dict(prototypes=K, images=B, n_global=N_GLOBAL, n_local=N_LOCAL, grid=list(LOSS_GRID),
                student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, center_momentum=CENTER_MOMENTUM,
                sinkhorn_iterations=3, koleo_weight=KOLEO_WEIGHT, mask_ratio=list(MASK_RATIO),
                mask_probability=MASK_PROBABILITY, n_loss_terms=n_terms, ibot_loss_scale=loss_scale,
                layout=("rows view-major (crop v of image b at v*B+b), global crops first; targets in that natural "
                        "order (the reference computed them on the swapped teacher rows, as forward_backward does); "
                        "ibot_* rows are the masked tokens in mask_indices_list order; koleo_forward = "
                        "koleo_weight * sum over the 2 global crops of KoLeo(student logits of that crop); total_* = dino + "
                        "koleo_forward + ibot as forward_backward accumulates them (weights 1, 1); *_max0_*: Sinkhorn-Knopp "
                        "on the teacher logits shifted so that their largest value is 0"))
    return write_fixture(out / "dinov2_losses.safetensors", t, reference=REFERENCE, commit=commit, **meta)


def _masking(commit: str, out: Path) -> Path:
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator

    side = IMG_SIZE // PATCH_SIZE
    n_tok = side * side
    gen = MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * IMG_SIZE // PATCH_SIZE * IMG_SIZE // PATCH_SIZE)
    requested: list[tuple[int, int]] = []

    def recording(num_masking_patches: int = 0) -> Any:
        m = gen(num_masking_patches)
        if num_masking_patches:
            requested.append((int(num_masking_patches), int(m.sum())))
        return m

    def batch(b: int) -> torch.Tensor:
        crop = torch.zeros(1)
        samples = [({"global_crops": [crop, crop], "local_crops": [crop]}, ()) for _ in range(b)]
        return collate_data_and_cast(samples, MASK_RATIO, MASK_PROBABILITY, torch.float32, n_tokens=n_tok,
                                     mask_generator=recording)["collated_masks"]

    random.seed(0)
    counts, per_batch, position = [], [], torch.zeros(n_tok, dtype=torch.int64)
    for _ in range(MASK_DRAWS):
        m = batch(MASK_BATCH)  # (2 * 128, 196) bool
        c = m.sum(dim=1)
        counts.append(c)
        per_batch.append(int((c > 0).sum()))
        position += m.sum(dim=0)
    counts_t = torch.cat(counts)
    req = torch.tensor(requested, dtype=torch.int64)  # (masked crops, 2): target, masked count
    short = req[:, 0] - req[:, 1]
    rule = [int((batch(b).sum(dim=1) > 0).sum()) for b in RULE_BATCHES]
    # a rectangle as tall as the grid: the only one this generator can propose (area 14, aspect 14 -> 14 x 1)
    # is rejected 10 times (it needs h < height), so the mask stays empty
    tall = MaskingGenerator(input_size=(side, side), min_num_patches=side, max_num_patches=n_tok // 2,
                            min_aspect=float(side), max_aspect=float(side))
    full_height = int(tall(side).sum())
    t = {"count_hist": torch.bincount(counts_t, minlength=n_tok + 1),
         "target_hist": torch.bincount(req[:, 0], minlength=n_tok + 1),
         "shortfall_hist": torch.bincount(short),
         "masked_crops_per_batch_hist": torch.bincount(torch.tensor(per_batch), minlength=2 * MASK_BATCH + 1),
         "position_hist": position.view(side, side),
         "rule_batch_sizes": torch.tensor(RULE_BATCHES, dtype=torch.int64),
         "rule_masked_crops": torch.tensor(rule, dtype=torch.int64),
         "full_height_count": torch.tensor(full_height, dtype=torch.int64)}
    meta = dict(grid=[side, side], ratio=list(MASK_RATIO), mask_probability=MASK_PROBABILITY, batch=MASK_BATCH,
                crops_per_batch=2 * MASK_BATCH, draws=MASK_DRAWS, min_num_patches=gen.min_num_patches,
                max_num_patches=gen.max_num_patches, log_aspect_ratio=list(gen.log_aspect_ratio), seed=0,
                layout=("count_hist[k]: crops (masked or not) with k masked patches; target_hist[k]: masked crops whose "
                        "requested count was k; shortfall_hist[k]: masked crops that ended k patches below it; "
                        "position_hist: times each patch was masked; rule_masked_crops[i]: crops with a mask in one "
                        "batch of rule_batch_sizes[i] images (2 global crops each); full_height_count: patches masked by "
                        "MaskingGenerator((14, 14), min_num_patches=14, max_num_patches=98, min_aspect=max_aspect=14)(14)"))
    return write_fixture(out / "dinov2_masking.safetensors", t, reference=REFERENCE, commit=commit, **meta)


def _schedules(commit: str, out: Path) -> Path:
    from omegaconf import OmegaConf

    import dinov2.distributed as distributed
    from dinov2.configs import dinov2_default_config
    from dinov2.train.train import build_schedulers
    from dinov2.utils.config import apply_scaling_rules_to_cfg

    cfg = OmegaConf.merge(OmegaConf.create(dinov2_default_config), OmegaConf.create(RECIPE_OVERRIDES))
    with _patched(distributed, "get_global_size", lambda: RECIPE_GPUS):
        apply_scaling_rules_to_cfg(cfg)  # lr = base_lr * sqrt(128 * 8 / 1024)
    lr, wd, mom, temp, last = build_schedulers(cfg)
    epoch = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    total = int(cfg.optim.epochs) * epoch
    warm = int(cfg.optim.warmup_epochs) * epoch
    twarm = int(cfg.teacher.warmup_teacher_temp_epochs) * epoch
    freeze = int(cfg.optim.freeze_last_layer_epochs) * epoch
    steps = {0, 1, 2, 100, 5000, total // 2, total - 2, total - 1, total, 25000, 50000, 90000, 110000}
    for edge in (warm, twarm, freeze, 2 * epoch):
        steps |= {edge - 1, edge, edge + 1}
    steps_t = torch.tensor(sorted(steps), dtype=torch.int64)
    t = {"steps": steps_t}
    for name, sched in (("lr", lr), ("wd", wd), ("momentum", mom), ("teacher_temp", temp), ("last_layer_lr", last)):
        t[name] = torch.tensor([float(sched[int(s)]) for s in steps_t], dtype=torch.float64)
    meta = dict(overrides=OmegaConf.to_container(OmegaConf.create(RECIPE_OVERRIDES)), gpus=RECIPE_GPUS,
                global_batch=int(cfg.train.batch_size_per_gpu) * RECIPE_GPUS, official_epoch_length=epoch,
                epochs=int(cfg.optim.epochs), total_steps=total, warmup_steps=warm, teacher_temp_warmup_steps=twarm,
                freeze_last_layer_steps=freeze, base_lr=float(cfg.optim.base_lr), lr=float(cfg.optim.lr),
                scaling_rule=str(cfg.optim.scaling_rule), min_lr=float(cfg.optim.min_lr),
                weight_decay=[float(cfg.optim.weight_decay), float(cfg.optim.weight_decay_end)],
                momentum_teacher=[float(cfg.teacher.momentum_teacher), float(cfg.teacher.final_momentum_teacher)],
                teacher_temp=[float(cfg.teacher.warmup_teacher_temp), float(cfg.teacher.teacher_temp)],
                layout="values at iteration steps[i] (train.py reads schedule[iteration] before that iteration's step)")
    return write_fixture(out / "dinov2_schedules.safetensors", t, reference=REFERENCE, commit=commit, **meta)


def make(repo: Path, out: Path) -> list[Path]:
    """Write the DINOv2 fixtures into ``out``; returns their paths."""
    commit = commit_of(repo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions (and bytes) on any machine
    try:
        with _reference(repo):
            return [_losses(commit, out), _masking(commit, out), _schedules(commit, out)]
    finally:
        torch.set_num_threads(threads)
