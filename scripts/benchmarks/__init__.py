"""Benchmark harness (``scripts/benchmark.py``). Each benchmark is a function returning rows.

Every measured configuration runs in a fresh subprocess (so max-RSS figures are not polluted by the
previous one), sequentially, inside one invocation: side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {}


def register(name: str):
    def deco(fn):
        BENCHMARKS[name] = fn
        return fn
    return deco


def row(benchmark: str, model: str, variant: str, metric: str, value: float, unit: str) -> dict[str, Any]:
    return {"benchmark": benchmark, "model": model, "variant": variant, "metric": metric,
            "value": round(float(value), 4), "unit": unit}


# ----------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024.0


def reset_peak_rss() -> None:
    """Reset the high-water mark to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def time_steps(step: Callable[[], None], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def interleaved_medians(steps: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of every step fn, called round-robin so load drift hits all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(iters):
        for v, fn in steps.items():
            times[v] += time_steps(fn, 0, 1)
    return {v: median(t) for v, t in times.items()}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh spawned process and return its result."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def print_table(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    print(f"\n== benchmark {name} | {platform.node()} {platform.machine()} cpus={os.cpu_count()} | "
          f"torch {torch.__version__} threads={torch.get_num_threads()} | "
          + " ".join(f"{k}={v}" for k, v in extra.items()))
    w = [max([width] + [len(str(r[k])) + 1 for r in rows]) for k, width in (("model", 14), ("variant", 18), ("metric", 20))]
    print(f"{'model':<{w[0]}}{'variant':<{w[1]}}{'metric':<{w[2]}}{'value':>12}  unit")
    for r in rows:
        print(f"{r['model']:<{w[0]}}{r['variant']:<{w[1]}}{r['metric']:<{w[2]}}{r['value']:>12.4g}  {r['unit']}")


def main(argv: list[str] | None = None) -> None:
    from benchmarks import dinov2, dropblock, loader, quality, umae  # noqa: F401  (registers)

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--out", default=None, help="write the rows as a JSON list")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default=None, help="comma-separated subset of models")
    p.add_argument("--official", default=None,
                   help="(umae) path to a checkout of the official UM-MAE code to measure side by side")
    p.add_argument("--data", default=None, help="(quality) the CIFAR-10 tar (default ../shared/data/cifar10-train.tar)")
    p.add_argument("--runs", default=None, help="(quality) where the pretraining runs go (default runs/quality)")
    p.add_argument("--budgets", default=None, help="(quality) pretraining budgets in epochs, e.g. 1,2,4,8 (default), or per "
                   "model: 'umae=1,2,4,8;dinov2=1,2,3'")
    p.add_argument("--override", action="append", help="(quality) extra pretraining config override, repeatable")
    p.add_argument("--finetune-epochs", type=float, default=0,
                   help="(quality) fine-tune the last UM-MAE checkpoint and from scratch for N epochs (0: skip)")
    p.add_argument("--finetune-override", action="append", help="(quality) extra fine-tuning override, repeatable")
    p.add_argument("--images", type=int, default=None, help="(loader) how many 500x375 JPEGs to generate (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="(loader) round-robin passes over the variants (median kept)")
    p.add_argument("--plot", default=None, help="(quality) the curves' PNG (default: --out with .png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = BENCHMARKS[args.name](args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.out}")
