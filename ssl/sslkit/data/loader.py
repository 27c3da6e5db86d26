"""Pretraining and evaluation loaders: deterministic order, seeded views, masks made in the workers.

Pretraining order. The sample stream is the concatenation of epoch permutations: epoch ``e``'s order
is a permutation of the source seeded from (seed, e), the same on every rank. A *global batch* is the
next ``G = batch_size x world_size`` entries of it; rank r takes every ``world_size``-th entry of the
global batch, starting at r (so ranks see disjoint samples, and the union of the ranks' batches is
exactly the batch a single process with ``batch_size x world_size`` would get). An epoch ends when
fewer than G unused entries are left (drop_last: ``n // G`` global batches per epoch). Global batch
counter ``g = 0, 1, 2, ...`` runs across epochs and is the same on every rank.

Batches. The view (``views.build_view``, chosen by ``view.kind``) maps each image to one tensor or
to a dict of stacked crops. Single-view (``mae``): ``{"images": (B, 3, S, S), "labels": (B,),
"index": (B,), **masks}``. Multi-crop (``multicrop``): each crop key is stacked *view-major*, row
``v * B + b`` = crop v of sample b: ``{"global_crops": (n_global*B, 3, S, S), "local_crops":
(n_local*B, 3, s, s), "labels": (B,), "index": (B,), **masks}``; no ``images`` key, and a crop key
with 0 crops (``n_local=0``) is left out. Masks come from ``mask_fn(B, generator)`` either way (a
multi-crop mask function such as ``masking.BlockMasking`` returns its n_global*B rows itself, in
the same view-major order).

Reproducibility, rank-independent. The sampler yields one *batch key* ``(g, sample indices, their
positions in the global batch)`` per step; a worker turns the key into the whole batch: each
sample's view is drawn with torch's CPU generator seeded from (seed, g, position in the global
batch), and the masks are made for the whole global batch from a ``torch.Generator`` seeded from
(seed, g), of which the rank keeps its samples' rows. So a sample's view and mask do not depend on
the rank or the world size (at equal global batch): W ranks with batch B see exactly the samples,
crops and masks of one process with batch ``W x B`` (each rank makes the global batch's masks, a
cheap W-fold redundancy). A batch is a pure function of (source, config, seed, rank, world_size,
g): the same with 0 or N workers and after a resume, with nothing replayed or skipped. The worker's
global RNG state is restored after each batch, so a ``num_workers=0`` loader leaves the training
process's RNG untouched.

Resume (``state_dict()``, ``start_state=``). The state counts what was handed to the caller
(prefetched batches don't count): ``batches_consumed`` (global batches, = g), ``epoch`` and
``sample_in_epoch`` (global samples of that epoch already consumed, by all ranks together),
``samples_consumed`` (global samples since the start of the run), ``seed``, ``batch_size`` and
``world_size``. A new loader built with ``start_state=`` continues at (epoch, sample_in_epoch):

- same global batch (``batch_size x world_size``): exactly the batches an uninterrupted run yields;
- a different world size or batch size: the rest of the current epoch's permutation, cut into the new
  global batches (no sample of the epoch is repeated; the tail shorter than one new global batch is
  dropped), then the next epochs as usual. ``g`` keeps counting, so views and masks stay seeded per
  global batch (they differ from those of an uninterrupted run in the old geometry, which is
  inherent: the batches themselves differ).

``start_batch=k`` (same geometry only) is shorthand for k global batches consumed from the start.

Unreadable images (``data.on_error``): ``raise`` fails at once naming the file; ``skip`` substitutes
the next readable index (deterministic) and logs a warning naming the file and the running count of
distinct skipped files. The count is shared by all worker processes through a
``multiprocessing.Value`` plus a shared byte map of known-bad indices (so a file is counted and
warned about once, whichever worker meets it first, and known-bad files are not re-read). More
than ``data.max_errors`` skipped files fails with a ``DataError`` naming the limit and the last file.
The count restarts when a new loader is built (e.g. on resume).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sslkit.schemas import DataConfig, MultiCropViewConfig, ViewConfig
from sslkit.data.sources import UnreadableImageError
from sslkit.data.views import View, ViewOutput, build_eval_view, build_view
from sslkit.errors import ConfigError, DataError
from sslkit.preemption import ignore_in_worker

log = logging.getLogger("sslkit.data")

MaskFn = Callable[[int, torch.Generator], dict[str, torch.Tensor]]
AnyViewConfig = Union[ViewConfig, MultiCropViewConfig]

# stream tags keep the seeds of different random uses apart
_EPOCH, _VIEW, _MASK, _LOADER = 1, 2, 3, 4
_M64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (splitmix64 chain): distinct inputs give unrelated seeds."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & _M64)) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h >> 1


# ----------------------------------------------------------------------------------------- errors
class ErrorPolicy:
    """Reads samples under ``data.on_error``; picklable into worker processes (shared counters)."""

    def __init__(self, on_error: str, max_errors: int, num_samples: int) -> None:
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        if int(max_errors) < 0:
            raise ConfigError(f"data.max_errors must be >= 0, got {max_errors}")
        self.on_error = on_error
        self.max_errors = int(max_errors)
        self._count = mp.Value("q", 0)  # distinct unreadable files met so far, all processes
        self._bad = mp.RawArray("B", max(1, num_samples))  # 1 = index known unreadable

    @property
    def skipped(self) -> int:
        return int(self._count.value)

    def read(self, source: Any, i: int) -> tuple[Any, int, int]:
        """(image, label, index actually read): ``i`` or, if unreadable, the next readable index."""
        n = len(source)
        j = int(i)
        for _ in range(n):
            if not self._bad[j]:
                try:
                    img, label = source[j]
                    return img, int(label), j
                except UnreadableImageError as e:
                    if self.on_error == "raise":
                        raise
                    self._record(j, e.file or f"sample {j}", e)
            j = (j + 1) % n
        raise DataError(f"none of the {n} images of the data source is readable; check data.path")

    def _record(self, j: int, name: str, err: Exception) -> None:
        with self._count.get_lock():
            if self._bad[j]:  # another worker recorded it first
                return
            self._bad[j] = 1
            self._count.value += 1
            count = int(self._count.value)
        cause = err.__cause__ if err.__cause__ is not None else err
        if count > self.max_errors:
            raise DataError(
                f"more than data.max_errors={self.max_errors} unreadable images skipped ({count}); the last "
                f"was {name} ({type(cause).__name__}: {cause}). Fix: repair or remove the broken files, "
                f"or raise data.max_errors"
            )
        log.warning(
            "skipped unreadable image %s (%s: %s); %d skipped so far (limit data.max_errors=%d); "
            "using the next readable image instead", name, type(cause).__name__, cause, count, self.max_errors,
        )


# ----------------------------------------------------------------------------------------- pretrain
class _BatchKeys(Sampler):
    """Endless batch keys ``(g, indices, positions)`` from the start state on (see the module docstring).

    ``positions``: where each of this rank's samples sits in the global batch (``rank + world_size * i``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = n // self.global_batch
        self.start = (0, 0, 0)  # (g, epoch, sample_in_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """(n,) int64: the whole epoch's order, the same on every rank."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH, epoch))
        return torch.randperm(self.n, generator=gen)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """(n // world_size,) int64: this rank's samples of ``epoch`` in order (from the epoch's start)."""
        per_rank = self.n // self.world_size
        return self.permutation(epoch)[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        g, epoch, offset = self.start
        G, W, r = self.global_batch, self.world_size, self.rank
        positions = tuple(range(r, G, W))
        while True:
            order = self.permutation(epoch)
            while offset + G <= self.n:
                yield g, tuple(order[offset + r : offset + G : W].tolist()), positions
                g += 1
                offset += G
            epoch, offset = epoch + 1, 0


class _PretrainBatches(Dataset):
    """Batch key -> batch dict; runs in the worker (decode, views, stack, masks)."""

    def __init__(self, source: Any, view: View, mask_fn: Optional[MaskFn], policy: ErrorPolicy,
                 seed: int, world_size: int) -> None:
        self.source, self.view, self.mask_fn, self.policy = source, view, mask_fn, policy
        self.seed, self.world_size = seed, world_size

    def __getitem__(self, key: tuple[int, tuple[int, ...], tuple[int, ...]]) -> dict[str, torch.Tensor]:
        g, indices, positions = key
        B = len(indices)
        views, labels, used = [], [], []
        # a two-stage view (multi-crop) makes each sample's crops and draws their parameters here, and
        # runs its per-pixel stage once on the stacked batch (``finish``): the same result, less overhead
        per_sample = getattr(self.view, "crops", self.view)
        rng_state = torch.get_rng_state()  # views use the global CPU generator: restore it after
        try:
            for i, pos in zip(indices, positions):
                img, label, j = self.policy.read(self.source, i)
                # the 0 stands where the rank was: views are rank-independent (single-process streams unchanged)
                torch.default_generator.manual_seed(derive_seed(self.seed, _VIEW, 0, g, pos))
                views.append(per_sample(img))  # (3, S, S) float32, or {key: (n_k, ...)}
                labels.append(label)
                used.append(j)
        finally:
            torch.set_rng_state(rng_state)
        stacked = stack_views(views)
        if per_sample is not self.view:
            stacked = self.view.finish(stacked)
        batch = {
            **stacked,  # images (B, 3, S, S) | global_crops (n_global*B, ...), local_crops ...
            "labels": torch.tensor(labels, dtype=torch.int64),  # (B,)
            "index": torch.tensor(used, dtype=torch.int64),  # (B,)
        }
        if self.mask_fn is not None:
            GB = B * self.world_size
            gen = torch.Generator().manual_seed(derive_seed(self.seed, _MASK, 0, g))
            masks = self.mask_fn(GB, gen)  # the global batch's masks: rows (k * GB, ...), view-major
            if self.world_size > 1:
                pos = torch.tensor(positions, dtype=torch.int64)
                for k, m in masks.items():
                    assert m.shape[0] % GB == 0, f"mask {k!r} has {m.shape[0]} rows, not a multiple of {GB}"
                    masks[k] = m.view(m.shape[0] // GB, GB, *m.shape[1:])[:, pos].reshape(-1, *m.shape[1:])
            assert not set(masks) & set(batch), f"mask keys {sorted(masks)} clash with the batch keys"
            batch.update(masks)
        return batch

    def __len__(self) -> int:  # not used for sampling (the sampler is endless)
        return len(self.source)


def stack_views(views: list[ViewOutput]) -> dict[str, torch.Tensor]:
    """Per-sample view outputs -> the batch's image tensors.

    Tensors (3, S, S) -> ``{"images": (B, 3, S, S)}``. Dicts of (n_k, 3, S_k, S_k) crops -> one
    view-major tensor per key, ``(n_k * B, 3, S_k, S_k)`` with row ``v * B + b`` = crop v of sample b;
    keys with n_k = 0 are left out.
    """
    if isinstance(views[0], torch.Tensor):
        return {"images": torch.stack(views)}  # (B, 3, S, S)
    B = len(views)
    out = {}
    for k, first in views[0].items():
        if first.shape[0] == 0:
            continue
        x = torch.stack([v[k] for v in views], dim=1)  # (n_k, B, 3, S_k, S_k)
        out[k] = x.reshape(first.shape[0] * B, *first.shape[1:])  # (n_k*B, 3, S_k, S_k), view-major
    return out


def _identity(x: Any) -> Any:
    return x


class PretrainLoader:
    """Endless iterable of pretraining batch dicts (see the module docstring for order and resume).

    ``state_dict()`` describes the batches *yielded to the caller* (prefetched ones don't count); build a
    new loader with ``start_state=state`` to resume (exactly, at the same global batch; without
    repeating the epoch's consumed samples at another world size / batch size). One active iterator at
    a time: a new ``iter()`` continues after the last batch handed out.
    """

    def __init__(self, source: Any, cfg: DataConfig, view: AnyViewConfig, mask_fn: Optional[MaskFn], *,
                 seed: int, start_batch: int, device: str, rank: int, world_size: int,
                 start_state: Optional[dict[str, Any]] = None) -> None:
        n = len(source)
        B = int(cfg.batch_size)
        if B <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {B}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_batch < 0:
            raise ConfigError(f"start_batch must be >= 0, got {start_batch}")
        num_workers = int(cfg.num_workers)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.seed = int(seed)
        self.batch_size = B
        self.rank, self.world_size = rank, world_size
        self._sampler = _BatchKeys(n, B, self.seed, rank, world_size)
        if self._sampler.batches_per_epoch == 0:
            raise DataError(
                f"the data source has {n} images, fewer than one batch per rank (data.batch_size={B} x "
                f"world_size={world_size}). Fix: lower data.batch_size or use more data"
            )
        self.policy = ErrorPolicy(str(cfg.on_error), int(cfg.max_errors), n)
        self._dataset = _PretrainBatches(source, build_view(view, cfg.mean, cfg.std), mask_fn,
                                         self.policy, self.seed, world_size)
        G = self._sampler.global_batch
        if start_state is not None:
            self._g, self._epoch, self._offset, self._samples = _resume_point(start_state, n, G)
        else:
            epoch, b = divmod(int(start_batch), self.batches_per_epoch)
            self._g, self._epoch, self._offset, self._samples = int(start_batch), epoch, b * G, int(start_batch) * G
        self._loader = DataLoader(
            self._dataset,
            batch_size=None,  # the dataset returns whole batches
            sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=str(device).startswith("cuda"),
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_in_worker,  # SIGTERM/USR1/USR2 to the process group: the main process stops
            # DataLoader draws its worker base seed from this, not from the global RNG (unused by us)
            generator=torch.Generator().manual_seed(derive_seed(self.seed, _LOADER, rank)),
        )

    @property
    def batches_per_epoch(self) -> int:
        return self._sampler.batches_per_epoch

    @property
    def batches_consumed(self) -> int:
        return self._g

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order in ``epoch`` (before any skip substitution), from the epoch's start."""
        return self._sampler.epoch_indices(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._sampler.start = (self._g, self._epoch, self._offset)
        G, n = self._sampler.global_batch, self._sampler.n
        for batch in self._loader:
            self._g += 1
            self._samples += G
            self._offset += G
            if self._offset + G > n:  # the sampler moves on to the next epoch
                self._epoch, self._offset = self._epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        G = self._sampler.global_batch
        return {"epoch": self._epoch, "batch_in_epoch": self._offset // G, "batches_consumed": self._g,
                "sample_in_epoch": self._offset, "samples_consumed": self._samples, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def close(self) -> None:
        """Stop the persistent worker processes (they also stop when the loader is garbage collected)."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None

    def __enter__(self) -> "PretrainLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _resume_point(state: dict[str, Any], n: int, global_batch: int) -> tuple[int, int, int, int]:
    """(g, epoch, sample_in_epoch, samples_consumed) to continue from a ``state_dict()`` (older states
    without ``sample_in_epoch`` were written by one process: ``batch_in_epoch x batch_size``)."""
    g = int(state["batches_consumed"])
    epoch = int(state["epoch"])
    if "sample_in_epoch" in state:
        offset = int(state["sample_in_epoch"])
    else:
        offset = int(state["batch_in_epoch"]) * int(state.get("batch_size", global_batch)) * int(state.get("world_size", 1))
    samples = int(state.get("samples_consumed", g * global_batch))
    if offset + global_batch > n:  # the rest of the epoch is shorter than one (new) global batch
        epoch, offset = epoch + 1, 0
    return g, epoch, offset, samples


def _describe(source: Any, i: int) -> str:
    return source.describe(i) if hasattr(source, "describe") else f"sample {i}"


def _first_native_size(source: Any, policy: ErrorPolicy) -> tuple[int, int]:
    """Native (H, W) of the first readable image (following ``data.on_error``)."""
    if not hasattr(source, "native_size"):  # e.g. a torch Subset: decode the first image
        img = policy.read(source, 0)[0]
        return (img.height, img.width) if hasattr(img, "height") else tuple(img.shape[-2:])
    last: Optional[Exception] = None
    for i in range(min(len(source), 1000)):
        try:
            return source.native_size(i)
        except UnreadableImageError as e:
            if policy.on_error == "raise":
                raise
            last = e
    assert last is not None
    raise last


def check_size(source: Any, cfg: DataConfig, size: int, policy: ErrorPolicy) -> None:
    """Fail (or warn once) when the first image is smaller than the view ``size`` (the global crop size
    for multi-crop views; local crops are smaller)."""
    h, w = _first_native_size(source, policy)
    if min(h, w) >= size:
        return
    if not cfg.allow_upscale:
        raise DataError(
            f"images are {h}x{w} (first: {_describe(source, 0)}), smaller than the view size {size}, and "
            f"data.allow_upscale=false. Fix: set data.allow_upscale=true to upsample them, or lower "
            f"method.view.size to at most {min(h, w)}"
        )
    log.warning("images are %dx%d, smaller than the view size %d: views upsample them (data.allow_upscale=true)",
                h, w, size)


def build_pretrain_loader(source: Any, cfg: DataConfig, view: AnyViewConfig, mask_fn: Optional[MaskFn] = None, *,
                          seed: int, start_batch: int = 0, device: str = "cpu", rank: int = 0,
                          world_size: int = 1, start_state: Optional[dict[str, Any]] = None) -> PretrainLoader:
    """The endless, resumable pretraining loader over ``source`` (see ``PretrainLoader``).

    Batches, with ``B = data.batch_size`` and ``S = view.size``:

    - single view (``view.kind="mae"``): ``{"images": (B, 3, S, S) float32, "labels": (B,) int64,
      "index": (B,) int64, **mask_fn(B, generator)}``;
    - multi-crop (``view.kind="multicrop"``): ``{"global_crops": (n_global*B, 3, S, S) float32,
      "local_crops": (n_local*B, 3, s, s) float32, "labels": (B,) int64, "index": (B,) int64,
      **mask_fn(B, generator)}`` with ``s = view.local_size``; crops are view-major (row ``v * B + b``
      is crop v of sample b) and ``local_crops`` is absent when ``n_local = 0``.

    ``rank`` / ``world_size``: this process's share of each global batch (``batch_size x world_size``);
    ``start_state``: a ``state_dict()`` to resume from (any world size), else ``start_batch`` global
    batches of this geometry are skipped.
    """
    loader = PretrainLoader(source, cfg, view, mask_fn, seed=seed, start_batch=start_batch, device=device,
                            rank=rank, world_size=world_size, start_state=start_state)
    check_size(source, cfg, int(view.size), loader.policy)
    return loader


# ----------------------------------------------------------------------------------------- eval
class _EvalSamples(Dataset):
    def __init__(self, source: Any, view: View, policy: ErrorPolicy) -> None:
        self.source, self.view, self.policy = source, view, policy

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, label, j = self.policy.read(self.source, i)
        return {"images": self.view(img), "labels": label, "index": j}


def _collate_eval(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "images": torch.stack([s["images"] for s in samples]),  # (B, 3, S, S)
        "labels": torch.tensor([s["labels"] for s in samples], dtype=torch.int64),  # (B,)
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),  # (B,)
    }


def build_eval_loader(source: Any, cfg: DataConfig, size: int, *, batch_size: Optional[int] = None,
                      num_workers: Optional[int] = None) -> DataLoader:
    """Deterministic loader over all of ``source`` in order: resize(size) + center crop(size).

    Yields ``{"images": (B, 3, size, size) float32, "labels": (B,) int64, "index": (B,) int64}``;
    no shuffle, no drop_last. Unreadable images follow ``data.on_error`` like pretraining.
    """
    bs = int(batch_size if batch_size is not None else cfg.batch_size)
    nw = int(num_workers if num_workers is not None else cfg.num_workers)
    if bs <= 0 or nw < 0:
        raise ConfigError(f"eval loader needs batch_size > 0 and num_workers >= 0, got {bs}, {nw}")
    if len(source) == 0:
        raise DataError("the evaluation data source is empty; check data.path and data.split")
    policy = ErrorPolicy(str(cfg.on_error), int(cfg.max_errors), len(source))
    dataset = _EvalSamples(source, build_eval_view(size, cfg.mean, cfg.std), policy)
    return DataLoader(dataset, batch_size=bs, shuffle=False, drop_last=False, num_workers=nw,
                      collate_fn=_collate_eval, worker_init_fn=ignore_in_worker)
