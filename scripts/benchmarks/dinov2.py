"""``dinov2``: efficient stochastic depth and the packed multi-crop ViT forward (``sslkit.models.vit``).

One step = forward + backward (no optimizer), the upstream gradients are preallocated tensors (no loss
op is timed). Speed: all variants of a model are built in one spawned process and stepped round-robin
(``interleaved_medians``: load drift hits them alike), ``step_ms`` is the median after ``--warmup``
rounds over ``--iters`` rounds. Variants whose first step is > 2.5x slower than ``packed``'s (on CPU:
``dense_mask``, ``njt``) are stepped in a second, short round-robin together with ``packed`` (no
warm-up, ``min(iters, 2)`` rounds) and their ``packed/<v>`` speedup comes from that pass. Speed
processes use glibc's default malloc, which re-mmaps (hence re-page-faults) every tensor > 32 MB on
every step -- at B=8 that hits only the packed variants (MLP hidden 34 MB); ``packed`` vs
``per_group`` is therefore also reported with large allocations recycled as with jemalloc / tcmalloc
(``*_recycle`` rows, see ``_set_malloc``). Memory: each variant alone in a fresh process with a fixed
128 KiB mmap threshold (RSS follows the live tensors): model + inputs allocated, ``malloc_trim``,
baseline RSS, high-water mark reset, one step -> ``peak_mem_mb`` (max RSS) and ``activation_mem_mb``
(peak minus baseline); ``compile`` compiles in a step before that window. The same process checks the
multi-crop variants against ``per_group`` (``max_abs_err``) and reports failures (unsupported op,
timeout) as ``skipped`` rows with a ``note``. On a shared machine (other processes competing for the
cores) the OpenMP-synchronised small ops (gather / index_add) suffer disproportionately: run it idle.

1. ``vits_blocks``: a ViT-S block stack, 4 blocks, dim 384, 6 heads, mlp 4, LayerScale 1e-5, input
   ``(32, 197, 384)`` (batch 32 of 224 px / patch 16 sequences) that requires grad, training mode.
   Variants ``efficient_sd@d`` (``sslkit.models.vit.PackedBlock``, sample-subset stochastic depth: the
   branches run on ``k = int(32 (1 - d))`` samples) and ``droppath@d`` (``timm...vision_transformer.Block``
   with timm ``DropPath``: branches on all 32 samples, then masked) for d in 0.1, 0.2, 0.4. Extra metric
   ``speedup_vs_droppath`` (droppath ms / efficient ms at the same d).
2. ``vit_small``: full ViT-S/16 student (12 blocks, LayerScale, drop_path 0 -- isolates the packing),
   DINOv2 multi-crop for ``--batch`` B images (default 8): 2B global crops 224 px (197 tokens) + 8B local
   crops 96 px (37 tokens), outputs = normalized tokens of every crop. Variants:

   - ``packed``: ``forward_packed`` (token-wise ops once on all 5520 tokens at B=8, attention per group);
   - ``per_group``: ``forward_features`` once per crop group;
   - ``dense_mask``: every token of every crop in ONE sequence, SDPA with a block-diagonal boolean
     ``attn_mask`` (same weights);
   - ``njt``: ``torch.nested`` jagged tensors, one jagged sequence per crop, SDPA on nested tensors;
   - ``compile``: ``torch.compile(model.forward_packed)`` (compile time reported, not in ``step_ms``).

   Extra rows ``packed/<variant>`` metric ``speedup`` (variant ms / packed ms), ``compile_s``.

Runs unchanged on CUDA (device = cuda if available; timing synchronizes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import (interleaved_medians, peak_rss_mb, print_table, register, reset_peak_rss, row, rss_mb,
                          run_isolated)

from sslkit.models.vit import PackedBlock, VisionTransformer, pack_groups, unpack_groups

STEP_MODEL = "vit_small_dinov2_step"  # needs lightly (pip install -e ".[bench]") for its peer variant
MODELS = ["vits_blocks", "vit_small", STEP_MODEL]
BLOCKS = dict(dim=384, heads=6, mlp_ratio=4.0, depth=4, tokens=197, batch=32, init_values=1e-5)
RATES = (0.1, 0.2, 0.4)
BLOCK_VARIANTS = [f"{v}@{d}" for d in RATES for v in ("efficient_sd", "droppath")]
CROP_VARIANTS = ["packed", "per_group", "dense_mask", "njt", "compile"]
COMPILE_TIMEOUT_S = 900.0  # compile + one step
SLOW_TIMEOUT_S = 1200.0  # one eager step + the reference check
SLOW_FACTOR = 2.5  # first step > 2.5x packed's -> measured in the short second pass


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_malloc(mode: str) -> bool:
    """Pin glibc malloc's mmap threshold (call first thing in a fresh process; False if not glibc).

    glibc's default threshold is dynamic and capped at 32 MB: tensors above the cap (the packed MLP hidden
    at B=8: 5520 x 1536 fp32 = 34 MB) are mmapped and munmapped on every step, i.e. page-faulted again
    every step, smaller ones are recycled from the heap (per_group: 0 page faults per step, packed:
    30-70k). ``"default"``: leave glibc alone. ``"recycle"``: 1 GiB threshold and no heap trimming --
    every tensor is recycled, as with jemalloc / tcmalloc (recommended by the PyTorch CPU tuning guides).
    ``"exact"`` (memory runs): 128 KiB fixed threshold -- every large tensor is its own mapping, returned
    to the OS when freed, so RSS follows the live tensors and the high-water mark is their peak.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if mode == "recycle":
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    if mode == "exact":
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 << 10))
    return mode == "default"


def _trim() -> None:
    """Return freed heap memory to the OS so the baseline RSS is not inflated by malloc caches."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ----------------------------------------------------------------------------- 1. block stack
def _block_step(variant: str, device: torch.device) -> Callable[[], None]:
    from timm.models.vision_transformer import Block


    name, d = variant.split("@")
    rate = float(d)
    c, h, r, iv = BLOCKS["dim"], BLOCKS["heads"], BLOCKS["mlp_ratio"], BLOCKS["init_values"]
    torch.manual_seed(0)
    if name == "efficient_sd":
        blocks = [PackedBlock(c, h, r, True, iv, rate, "efficient") for _ in range(BLOCKS["depth"])]
    elif name == "droppath":
        blocks = [Block(c, h, r, qkv_bias=True, init_values=iv, drop_path=rate) for _ in range(BLOCKS["depth"])]
    else:
        raise ValueError(variant)
    stack = nn.Sequential(*blocks).to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BLOCKS["batch"], BLOCKS["tokens"], c, generator=g).to(device).requires_grad_()
    grad = torch.randn(x.shape, generator=g).to(device)

    def step() -> None:
        x.grad = None
        stack.zero_grad(set_to_none=True)
        stack(x).backward(grad)  # (B, N, C)
        _sync(device)

    return step


# ---------------------------------------------------------------------- 2. multi-crop ViT-S
def _dense_mask_forward(model: nn.Module, crops: list[Tensor], mask_cache: dict) -> list[Tensor]:
    """All crops' tokens in one (1, T, C) sequence; block-diagonal bool mask keeps crops apart."""

    x, layout = pack_groups([model.prepare_tokens(c) for c in crops])  # (T, C)
    if layout not in mask_cache:  # built once (like xFormers' cached BlockDiagonalMask)
        lens = torch.tensor([n for b, n in layout.shapes for _ in range(b)], device=x.device)
        seg = torch.repeat_interleave(torch.arange(len(lens), device=x.device), lens)  # (T,)
        mask_cache.clear()
        mask_cache[layout] = seg[:, None] == seg[None, :]  # (T, T) bool
    mask = mask_cache[layout]
    t, c = x.shape
    x = x[None]  # (1, T, C)
    for blk in model.blocks:
        a = blk.attn
        qkv = a.qkv(blk.norm1(x)).view(1, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (1, h, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, h, T, hd)
        x = x + blk.ls1(a.proj(o.transpose(1, 2).reshape(1, t, c)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))  # (1, T, C)
    return unpack_groups(model.norm(x[0]), layout)


def _njt_forward(model: nn.Module, crops: list[Tensor]) -> list[Tensor]:
    """One jagged sequence per crop (torch.nested, layout=torch.jagged); SDPA on nested tensors."""

    x, layout = pack_groups([model.prepare_tokens(c) for c in crops])  # (T, C)
    lens = torch.tensor([n for b, n in layout.shapes for _ in range(b)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(x.device)
    nt = torch.nested.nested_tensor_from_jagged(x, offsets)  # (S, j, C) jagged
    for blk in model.blocks:
        a = blk.attn
        h, hd = a.num_heads, a.head_dim
        qkv = a.qkv(blk.norm1(nt))  # (S, j, 3C)
        # SDPA on jagged tensors needs q/k/v contiguous in (S, j, h, hd) before the transpose
        q, k, v = (t.unflatten(-1, (h, hd)).contiguous().transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v)  # (S, h, j, hd)
        nt = nt + blk.ls1(a.proj(o.transpose(1, 2).flatten(-2)))  # (S, j, C)
        nt = nt + blk.ls2(blk.mlp(blk.norm2(nt)))
    return unpack_groups(model.norm(nt).values(), layout)  # values: (T, C)


def _crop_setup(batch: int, device: torch.device) -> tuple[nn.Module, list[Tensor], list[Tensor]]:
    import timm


    torch.manual_seed(0)
    model = timm.create_model("sslkit_vit_small", drop_path_rate=0.0, init_values=1e-5).to(device).train()
    assert isinstance(model, VisionTransformer)
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(2 * batch, 3, 224, 224, generator=g).to(device),
             torch.randn(8 * batch, 3, 96, 96, generator=g).to(device)]
    grads = [torch.randn(2 * batch, 197, 384, generator=g).to(device),
             torch.randn(8 * batch, 37, 384, generator=g).to(device)]
    return model, crops, grads


def _crop_forward(variant: str, model: nn.Module) -> Callable[[list[Tensor]], list[Tensor]]:
    if variant == "packed":
        return model.forward_packed
    if variant == "per_group":
        return lambda crops: [model.forward_features(c) for c in crops]
    if variant == "dense_mask":
        cache: dict = {}
        return lambda crops: _dense_mask_forward(model, crops, cache)
    if variant == "njt":
        return lambda crops: _njt_forward(model, crops)
    if variant == "compile":
        return torch.compile(model.forward_packed)
    raise ValueError(variant)


def _crop_step(variant: str, model: nn.Module, crops: list[Tensor], grads: list[Tensor],
               device: torch.device) -> Callable[[], None]:
    fwd = _crop_forward(variant, model)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        outs = fwd(crops)  # [(B_g, 1+N_g, C)]
        torch.autograd.backward(outs, grads)
        _sync(device)

    return step


def _reference_error(variant: str, model: nn.Module, crops: list[Tensor]) -> float:
    """Max |variant - per_group| over the output tokens (sanity: all variants compute the same)."""
    with torch.no_grad():
        ref = [model.forward_features(c) for c in crops]
        out = _crop_forward(variant, model)(crops)
        return max(float((a - b).abs().max()) for a, b in zip(out, ref))


# --------------------------------------------------------------------------------- measuring
def _timed(step: Callable[[], None]) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def measure_memory(model_name: str, variant: str, batch: int, threads: int) -> dict[str, Any]:
    """One variant alone in its process: memory of one step, first-step time, and (multi-crop) the max
    deviation from ``per_group``. Never raises: a failure is returned as ``{"ok": False, "note": ...}``.

    Memory window: model + inputs allocated, heap trimmed, RSS baseline, high-water mark reset, one
    step. ``compile`` first runs one (compiling) step outside the window.
    """
    _set_malloc("exact")
    torch.set_num_threads(threads)
    device = _device()
    try:
        if model_name == "vits_blocks":
            step, model, crops = _block_step(variant, device), None, None
        else:
            model, crops, grads = _crop_setup(batch, device)
            step = _crop_step(variant, model, crops, grads, device)
        out: dict[str, Any] = {"ok": True}
        if variant == "compile":
            out["compile_s"] = _timed(step)
        _trim()
        baseline = rss_mb()
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_cuda = torch.cuda.memory_allocated(device)
        out["first_step_s"] = _timed(step)
        peak = peak_rss_mb()
        out.update(peak_mem_mb=peak, activation_mem_mb=peak - baseline)
        if device.type == "cuda":  # device memory is what matters there
            top = torch.cuda.max_memory_allocated(device)
            out.update(peak_mem_mb=top / 2**20, activation_mem_mb=(top - base_cuda) / 2**20)
        if model is not None:
            out["max_abs_err"] = _reference_error(variant, model, crops)
        return out
    except Exception as e:  # noqa: BLE001  (any failure -> reported as a skip with its reason)
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return {"ok": False, "note": f"{type(e).__name__}: {msg}"}


def measure_speed(model_name: str, variants: list[str], slow: list[str], batch: int, threads: int,
                  warmup: int, iters: int, malloc: str = "default") -> dict[str, float]:
    """Median ms per step, one process, round-robin. ``variants``: ``warmup`` + ``iters`` rounds (after
    one untimed first call each: compilation, lazy init). ``slow`` variants (several times slower than
    ``packed``) run a second round-robin with ``packed`` as the in-pass reference: no warm-up,
    ``min(iters, 2)`` rounds; their ratio to packed is returned as ``"<v>/packed"``. ``malloc``: see
    :func:`_set_malloc`."""
    _set_malloc(malloc)
    torch.set_num_threads(threads)
    device = _device()
    if model_name == "vits_blocks":
        steps = {v: _block_step(v, device) for v in variants + slow}
    else:
        model, crops, grads = _crop_setup(batch, device)
        steps = {v: _crop_step(v, model, crops, grads, device) for v in variants + slow}
    for v in variants:
        steps[v]()
    res = {v: 1e3 * t for v, t in interleaved_medians({v: steps[v] for v in variants}, warmup, iters).items()}
    if slow:
        ref = "packed" if "packed" in variants else variants[0]
        second = interleaved_medians({v: steps[v] for v in [ref] + slow}, 0, max(1, min(iters, 2)))
        for v in slow:
            res[v] = 1e3 * second[v]
            res[f"{v}/packed"] = second[v] / second[ref]
    return res


def _isolated_with_timeout(timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(1)
    try:
        return pool.apply_async(fn, args).get(timeout)
    except mp.TimeoutError:
        return {"ok": False, "note": f"did not finish within {timeout:.0f} s on this machine"}
    finally:
        pool.terminate()
        pool.join()


@register("dinov2")
def bench_dinov2(args: argparse.Namespace) -> list[dict[str, Any]]:
    batch = args.batch or 8
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"dinov2: unknown models {unknown}; choose from {MODELS}")
    b = "dinov2"
    rows: list[dict[str, Any]] = []
    for model in models:
        if model == STEP_MODEL:  # the whole DINOv2 training step, sslkit vs lightly (bench/dinov2_step.py)
            from benchmarks.dinov2_step import step_rows

            rows += step_rows(args)
            continue
        candidates = BLOCK_VARIANTS if model == "vits_blocks" else CROP_VARIANTS
        mem: dict[str, dict[str, Any]] = {}
        for v in candidates:
            timeout = COMPILE_TIMEOUT_S if v == "compile" else SLOW_TIMEOUT_S
            mem[v] = _isolated_with_timeout(timeout, measure_memory, model, v, batch, args.threads)
            print(f"  {model} {v}: {mem[v]}", flush=True)
        ok = [v for v in candidates if mem[v]["ok"]]
        for v in candidates:
            if not mem[v]["ok"]:
                print(f"  SKIP {model} {v}: {mem[v]['note']}", flush=True)
                rows.append({**row(b, model, v, "skipped", 1, "flag"), "note": mem[v]["note"]})
        ref_first = mem.get("packed", {}).get("first_step_s")
        slow = [v for v in ok if ref_first and v not in ("packed", "per_group", "compile")
                and mem[v]["first_step_s"] > SLOW_FACTOR * ref_first]
        fast = [v for v in ok if v not in slow]
        ms = run_isolated(measure_speed, model, fast, slow, batch, args.threads, args.warmup, args.iters)
        print(f"  {model}: " + " ".join(f"{v}={t:.4g}" for v, t in ms.items()), flush=True)
        if model == "vit_small" and {"packed", "per_group"} <= set(fast):  # allocator sensitivity
            rec = run_isolated(measure_speed, model, ["packed", "per_group"], [], batch, args.threads,
                               args.warmup, args.iters, "recycle")
            print(f"  {model} (malloc recycling large blocks): " + " ".join(f"{v}={t:.4g}" for v, t in rec.items()))
            rows += [row(b, model, v, "step_ms_recycle", rec[v], "ms") for v in ("packed", "per_group")]
            rows.append(row(b, model, "packed/per_group", "speedup_recycle", rec["per_group"] / rec["packed"], "x"))
        for v in ok:
            rows.append(row(b, model, v, "step_ms", ms[v], "ms"))
            rows.append(row(b, model, v, "peak_mem_mb", mem[v]["peak_mem_mb"], "MB"))
            rows.append(row(b, model, v, "activation_mem_mb", mem[v]["activation_mem_mb"], "MB"))
            if v.startswith("efficient_sd@"):
                ref = "droppath@" + v.split("@")[1]
                if ref in ok:
                    rows.append(row(b, model, v, "speedup_vs_droppath", ms[ref] / ms[v], "x"))
                    rows.append(row(b, model, v, "act_mem_vs_droppath",
                                    mem[v]["activation_mem_mb"] / max(1e-9, mem[ref]["activation_mem_mb"]), "x"))
            if "max_abs_err" in mem[v]:
                rows.append(row(b, model, v, "max_abs_err", mem[v]["max_abs_err"], "abs"))
            if "compile_s" in mem[v]:
                rows.append(row(b, model, v, "compile_s", mem[v]["compile_s"], "s"))
        if model == "vit_small" and "packed" in ok:
            for v in ok:
                if v != "packed":  # slow variants: ratio from their own pass (packed stepped alongside)
                    ratio = ms[f"{v}/packed"] if v in slow else ms[v] / ms["packed"]
                    rows.append(row(b, model, f"packed/{v}", "speedup", ratio, "x"))
    print_table(b, rows, {"blocks": f"{BLOCKS['depth']}xViT-S,B={BLOCKS['batch']},N={BLOCKS['tokens']}",
                          "crops": f"B={batch}:2x224+8x96", "step": "fwd+bwd", "device": _device().type,
                          "iters": args.iters, "warmup": args.warmup})
    for r in rows:
        if "note" in r:
            print(f"  note {r['model']} {r['variant']}: {r['note']}")
    return rows


def main(argv: Optional[list[str]] = None) -> None:  # standalone: cd scripts && python -m benchmarks.dinov2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default=None, help=f"comma-separated subset of {MODELS}")
    p.add_argument("--out", default=None, help="write the rows as a JSON list")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = bench_dinov2(a)
    if a.out:
        import json

        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
