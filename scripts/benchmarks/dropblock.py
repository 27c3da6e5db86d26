"""``dropblock``: sslkit DropBlock2d (paper / fast) vs timm's DropBlock2d, Dropout2d and identity.

One step = forward + backward of the layer alone on a fixed input that requires grad (the upstream
gradient is a preallocated tensor, so no loss op is timed), drop rate 0.1, block size 7, training mode.
Shapes (N, C, H, W) = (B, 256, 56, 56) and (B, 1024, 14, 14), B = ``--batch`` (default 64; the
(64, 256, 56, 56) activations are 205 MB each, a step allocates ~1 GB, so on a small machine use
``--batch 16``). All variants of a shape are built in one spawned process and stepped round-robin
(robust to load drift). Metrics per (shape, variant): ``ms`` (median step) and ``x_identity``
(``ms`` / ``ms`` of the identity layer, whose step is just the autograd pass-through).

Variants: ``paper`` (sslkit, independent mask per sample and channel), ``fast`` (sslkit, one mask per
sample shared by the channels), ``timm_per_channel`` (``timm.layers.DropBlock2d(0.1, 7,
couple_channels=False)``), ``timm_shared`` (``couple_channels=True``), ``dropout2d``
(``nn.Dropout2d(0.1)``), ``identity`` (``nn.Identity``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks import interleaved_medians, print_table, register, row, run_isolated

from sslkit.layers import DropBlock2d

SHAPES = {"256x56x56": (256, 56, 56), "1024x14x14": (1024, 14, 14)}
VARIANTS = ["paper", "fast", "timm_per_channel", "timm_shared", "dropout2d", "identity"]


def _layer(variant: str) -> torch.nn.Module:
    from timm.layers import DropBlock2d as TimmDropBlock2d


    return {
        "paper": lambda: DropBlock2d(0.1, 7, mode="paper"),
        "fast": lambda: DropBlock2d(0.1, 7, mode="fast"),
        "timm_per_channel": lambda: TimmDropBlock2d(0.1, 7, couple_channels=False),
        "timm_shared": lambda: TimmDropBlock2d(0.1, 7, couple_channels=True),
        "dropout2d": lambda: torch.nn.Dropout2d(0.1),
        "identity": lambda: torch.nn.Identity(),
    }[variant]().train()


def measure(shape: tuple[int, int, int, int], variants: list[str], threads: int, warmup: int,
            iters: int) -> dict[str, float]:
    """Median fwd+bwd ms of every variant, one process, interleaved round-robin."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(*shape).requires_grad_()
    grad = torch.randn(*shape)

    def make(layer: torch.nn.Module):
        def step() -> None:
            x.grad = None
            out = layer(x)
            if out is x:  # identity: give autograd something to pass through
                out = out.view_as(out)
            out.backward(grad)
        return step

    steps = {v: make(_layer(v)) for v in variants}
    return {v: 1e3 * t for v, t in interleaved_medians(steps, warmup, iters).items()}


@register("dropblock")
def bench_dropblock(args: argparse.Namespace) -> list[dict[str, Any]]:
    batch = args.batch or 64
    shapes = args.models.split(",") if args.models else list(SHAPES)
    rows: list[dict[str, Any]] = []
    for name in shapes:
        shape = (batch, *SHAPES[name])
        model = "x".join(map(str, shape))
        res = run_isolated(measure, shape, VARIANTS, args.threads, args.warmup, args.iters)
        print(f"  {model}: " + " ".join(f"{v}={ms:.1f}ms" for v, ms in res.items()), flush=True)
        for v in VARIANTS:
            rows.append(row("dropblock", model, v, "ms", res[v], "ms"))
            rows.append(row("dropblock", model, v, "x_identity", res[v] / res["identity"], "x"))
        rows.append(row("dropblock", model, "timm_per_channel/paper", "speedup",
                        res["timm_per_channel"] / res["paper"], "x"))
        rows.append(row("dropblock", model, "timm_shared/fast", "speedup", res["timm_shared"] / res["fast"], "x"))
        rows.append(row("dropblock", model, "dropout2d/fast", "speedup", res["dropout2d"] / res["fast"], "x"))
    print_table("dropblock", rows, {"batch": batch, "drop": 0.1, "block": 7, "step": "fwd+bwd"})
    return rows


if __name__ == "__main__":  # standalone: cd scripts && python -m benchmarks.dropblock [--batch 16]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default=None, help=f"comma-separated subset of {list(SHAPES)}")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bench_dropblock(a)
