"""The one checkpoint format: a versioned plain dict, loadable with ``torch.load(weights_only=True)``.

Its keys are the ``Checkpoint`` TypedDict below (the writer builds one, ``load`` checks them). Written
by rank 0 only, to a temp file in the same directory, fsync'ed, then renamed, so a crash never leaves
a half-written ``last.pt``; ``save_training_state`` refuses anything ``weights_only`` could not read
back, so a good checkpoint is never replaced by an unloadable one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, Optional, TypedDict

import numpy as np
import torch

from sslkit.errors import CheckpointError

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
DEFAULT_BACKBONE_PREFIX = "backbone."


class ModelSpec(TypedDict):
    """What rebuilds the backbone: ``timm.create_model(name, **kwargs)``."""

    name: str
    kwargs: dict[str, Any]


class _CheckpointOptional(TypedDict, total=False):
    backbone_prefix: str  # where the backbone's weights are in ``model``; absent in older files: "backbone."
    rng_ranks: list[dict[str, Any]]  # every rank's RNG state; absent in older files
    tracker_ids: dict[str, str]  # run ids of the trackers that have them ({"mlflow": ...}); absent in older files


class Checkpoint(_CheckpointOptional):
    """The one checkpoint format (``format_version`` 1)."""

    format_version: int
    sslkit_version: str
    method: str  # the registered method's name
    model_config: ModelSpec
    model: dict[str, torch.Tensor]  # unwrapped state dict of the method module (full, also after FSDP)
    optimizer: dict[str, Any]  # Optimizer.state_dict() format (parameter indices), also after FSDP
    scaler: dict[str, Any]
    step: int  # optimizer steps done
    data_state: dict[str, int]  # the loader's state_dict: consumed global batches / samples, epoch position
    rng: dict[str, Any]  # rank 0's RNG state (rng_state())
    config: dict[str, Any]  # the resolved config, plain
    derived: dict[str, Any]  # config.Derived as a dict
    wandb_id: Optional[str]
    metrics: dict[str, float]  # the last logged metrics


REQUIRED_KEYS = frozenset(Checkpoint.__required_keys__)
KEYS = REQUIRED_KEYS | frozenset(Checkpoint.__optional_keys__)


def backbone_state(ckpt: Checkpoint) -> tuple[str, dict[str, torch.Tensor]]:
    """The backbone's prefix and its weights (prefix stripped) from a checkpoint's ``model``."""
    prefix = str(ckpt.get("backbone_prefix", DEFAULT_BACKBONE_PREFIX))
    return prefix, {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint (weights_only). Raises CheckpointError with the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path, or use trainer.resume=never "
                              f"to start a new run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if found or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} contains pickled Python objects that are not tensors or plain containers "
                f"({', '.join(found) or 'a disallowed global'}); sslkit only loads "
                f"checkpoints with torch.load(weights_only=True) and will not execute arbitrary pickles. If you "
                f"trust the file, re-save its tensors as a plain dict (or safetensors) and load that") from e
        raise CheckpointError(f"checkpoint {path} cannot be read (UnpicklingError: {e}); it is corrupt or "
                              f"truncated: use an older checkpoints/step_<N>.pt") from e
    except Exception as e:  # truncated / corrupt / not a torch file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                              f"truncated: use an older checkpoints/step_<N>.pt") from e
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not an sslkit checkpoint (no format_version): for a bare state dict "
                              f"use the fine-tune loader, for a timm file timm.create_model(pretrained_cfg_overlay=...)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {ckpt['format_version']}, this sslkit reads "
                              f"version {FORMAT_VERSION}: use the sslkit release that wrote it")
    missing = sorted(REQUIRED_KEYS - set(ckpt))
    if missing:
        raise CheckpointError(f"{path} (format_version {FORMAT_VERSION}) lacks the keys {missing}: it is damaged or was "
                              f"not written by sslkit")
    return ckpt  # type: ignore[return-value]


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(ckpt_dir).glob("step_*.pt"):
        m = _STEP_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(run_dir: Path, resume: str) -> Optional[Checkpoint]:
    """``auto``: newest readable checkpoint in ``run_dir/checkpoints`` (last.pt, else step_<N>.pt,
    newest first, warning about unreadable ones); ``never``: None; otherwise a path that must load."""
    if resume == "never":
        return None
    if resume != "auto":
        return load(resume)
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidates = [ckpt_dir / "last.pt"] + [p for _, p in reversed(step_checkpoints(ckpt_dir))]
    best: Optional[Checkpoint] = None
    for p in candidates:
        if not p.exists():
            continue
        m = _STEP_RE.match(p.name)
        if best is not None and m and int(m.group(1)) <= best["step"]:
            break  # step files come newest first: none of the rest is newer, do not load them
        try:
            ckpt = load(p)
        except CheckpointError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
            continue
        if best is None or ckpt["step"] > best["step"]:
            best = ckpt
    return best


_PLAIN = (torch.Tensor, int, float, str, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse (e.g. an OmegaConf
    ListConfig), so an unloadable checkpoint is never written over a good one."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only "
                        f"tensors, numbers, strings and plain lists/dicts (convert configs with OmegaConf.to_container)")


def save_training_state(path: Path, state: Checkpoint) -> None:
    """Write ``state`` atomically after checking it has exactly the format's keys and only plain values."""
    state = {"format_version": FORMAT_VERSION, **state}  # type: ignore[assignment]
    missing, unknown = sorted(REQUIRED_KEYS - set(state)), sorted(set(state) - KEYS)
    if missing or unknown:
        raise TypeError(f"not a checkpoint of format {FORMAT_VERSION}: missing keys {missing}, unknown keys {unknown} "
                        f"(the format is checkpoint.Checkpoint)")
    check_plain(state)
    atomic_save(state, path)  # type: ignore[arg-type]


def prune(ckpt_dir: Path, keep_last: int, keep_permanent_every: Optional[int] = None) -> None:
    """Keep the newest ``keep_last`` periodic step_<N>.pt files (0 keeps all), plus every one whose step
    is a multiple of ``keep_permanent_every`` (milestones that are never deleted)."""
    if keep_last <= 0:
        return
    for step, p in step_checkpoints(ckpt_dir)[:-keep_last]:
        if not (keep_permanent_every and step % keep_permanent_every == 0):
            p.unlink(missing_ok=True)
