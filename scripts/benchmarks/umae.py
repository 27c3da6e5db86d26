"""``umae``: UM-MAE vs the SimMIM-dense baseline on paper-sized PVT-S and Swin-T, 256 px.

One training step = forward + backward + AdamW step, batch 8 by default. Metrics per (model,
variant): ``images_per_s`` (median step; all variants of a model built in one process and stepped
round-robin, so load drift hits them alike), ``peak_mem_mb`` (max RSS of a process running that variant
alone), ``activation_mem_mb`` (peak during the steps minus the RSS with model + optimizer state allocated).
With ``--official PATH`` (a checkout of the official UM-MAE code), its models are measured side by
side as variants ``official_umae`` / ``official_simmim`` (needs ``pip install einops``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import (interleaved_medians, peak_rss_mb, print_table, register, reset_peak_rss, row, rss_mb, run_isolated,
                          time_steps)

from sslkit.config import compose
from sslkit.methods import build_method
from sslkit.optim import build_optimizer

MODELS = {"pvt_small": "pvt_small", "swin_tiny": "swin_tiny"}


def _official_shims() -> None:
    """The parity script's shims that let the 2022 official code run under timm 1.0 / NumPy 2 (one copy:
    scripts/parity/umae_fixtures.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
    from umae_fixtures import _shims

    _shims()


def _official_method(repo: str, model: str, variant: str) -> tuple[torch.nn.Module, Any]:
    sys.path.insert(0, repo)
    _official_shims()
    B_grid = 16
    if variant == "official_umae":
        import models_mae_pvt
        import models_mae_swin

        mod = models_mae_pvt.mae_pvt_small_256 if model == "pvt_small" else models_mae_swin.mae_swin_tiny_256
        net = mod(norm_pix_loss=True, vis_mask_ratio=0.25)
        from mask_transform import RandomMaskingGenerator

        gen = RandomMaskingGenerator(B_grid, 0.75, regular=True)
        return net, lambda B: (torch.stack([torch.from_numpy(gen()) for _ in range(B)]).bool(),)
    import models_simmim_pvt
    import models_simmim_swin

    mod = models_simmim_pvt if model == "pvt_small" else models_simmim_swin
    fn = [getattr(mod, n) for n in dir(mod) if n.startswith("simmim_") and "256" in n][0]
    net = fn()
    return net, lambda B: ((torch.rand(B, B_grid * B_grid).argsort(1) < int(0.75 * B_grid * B_grid)),)


def _build(model: str, variant: str, batch: int, official: str | None) -> tuple[Any, Any, Any]:
    """(module, optimizer, step fn) for one variant; the step is forward + backward + AdamW."""
    images = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    if variant.startswith("official"):
        net, make_mask = _official_method(official, model, variant)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)

        def forward() -> torch.Tensor:
            out = net(images, *make_mask(batch))
            return out[0] if isinstance(out, (tuple, list)) else out
    else:

        cfg = compose([f"experiment={variant}_{model}"])
        net = build_method(cfg)
        opt = build_optimizer(net, cfg.optim, 1e-4)
        masking = net.masking()
        g = torch.Generator().manual_seed(0)

        def forward() -> torch.Tensor:
            return net({"images": images, **masking(batch, g)})["loss"]
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    return net, opt, step


def measure_memory(model: str, variant: str, batch: int, threads: int, official: str | None) -> dict[str, float]:
    """Max RSS and activation memory of one variant, alone in its process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, opt, step = _build(model, variant, batch, official)
    for p in net.parameters():  # allocate AdamW state: the baseline is model + optimizer
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    baseline, hwm_init = rss_mb(), peak_rss_mb()
    reset_peak_rss()
    time_steps(step, 1, 2)
    peak = peak_rss_mb()
    return {"peak_mem_mb": max(hwm_init, peak), "activation_mem_mb": peak - baseline}


def measure_speed(model: str, variants: list[str], batch: int, threads: int, warmup: int, iters: int,
                  official: str | None) -> dict[str, float]:
    """Step time of every variant in one process, interleaved round-robin (robust to load drift)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    steps = {v: _build(model, v, batch, official)[2] for v in variants}
    return {v: batch / t for v, t in interleaved_medians(steps, warmup, iters).items()}


@register("umae")
def bench_umae(args: argparse.Namespace) -> list[dict[str, Any]]:
    batch = args.batch or 8
    models = args.models.split(",") if args.models else list(MODELS)
    variants = ["umae", "simmim"] + (["official_umae", "official_simmim"] if args.official else [])
    units = {"images_per_s": "img/s", "peak_mem_mb": "MB", "activation_mem_mb": "MB"}
    rows: list[dict[str, Any]] = []
    for model in models:
        res = {v: run_isolated(measure_memory, model, v, batch, args.threads, args.official) for v in variants}
        speed = run_isolated(measure_speed, model, variants, batch, args.threads, args.warmup, args.iters,
                             args.official)
        for v in variants:
            res[v]["images_per_s"] = speed[v]
            print(f"  {model} {v}: {res[v]}", flush=True)
            rows += [row("umae", model, v, m, res[v][m], u) for m, u in units.items()]
        rows.append(row("umae", model, "umae/simmim", "speedup", res["umae"]["images_per_s"] / res["simmim"]["images_per_s"], "x"))
        rows.append(row("umae", model, "umae/simmim", "activation_ratio",
                        res["umae"]["activation_mem_mb"] / max(1e-9, res["simmim"]["activation_mem_mb"]), "x"))
        if args.official:
            for ours in ("umae", "simmim"):
                rows.append(row("umae", model, f"{ours}/official_{ours}", "speedup",
                                res[ours]["images_per_s"] / res[f"official_{ours}"]["images_per_s"], "x"))
            rows.append(row("umae", model, "official_umae/official_simmim", "speedup",
                            res["official_umae"]["images_per_s"] / res["official_simmim"]["images_per_s"], "x"))
    print_table("umae", rows, {"batch": batch, "img": 256, "step": "fwd+bwd+AdamW"})
    return rows
