"""Pretraining / eval loaders: batch format, exact resume, epochs, sharding, bad images, upscale."""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import replace
from itertools import islice

import pytest
import torch

from sslkit.config import DataConfig, ViewConfig
from sslkit.data import UnreadableImageError, build_eval_loader, build_pretrain_loader, build_source
from sslkit.data.loader import ErrorPolicy
from sslkit.errors import DataError
from sslkit.masking import UniformMasking

from tests.data.conftest import corrupt_files

VIEW = ViewConfig(size=32)
MASK = UniformMasking(grid=(4, 4))


def _synthetic(n: int = 96, batch_size: int = 8, num_workers: int = 0, **kw) -> tuple[object, DataConfig]:
    cfg = DataConfig(num_samples=n, image_size=32, batch_size=batch_size, num_workers=num_workers, **kw)
    return build_source(cfg), cfg


def _take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(islice(iter(loader), n))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_batch_format() -> None:
    src, cfg = _synthetic(batch_size=6)
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=0) as ld:
        b = _take(ld, 1)[0]
    assert b["images"].shape == (6, 3, 32, 32) and b["images"].dtype == torch.float32
    assert b["labels"].shape == (6,) and b["labels"].dtype == torch.int64
    assert b["index"].shape == (6,) and b["index"].dtype == torch.int64
    assert b["masked"].shape == (6, 16) and b["masked"].dtype == torch.bool
    assert b["keep_offset"].shape == (6, 4) and b["sm_masked"].shape == (6, 4)
    assert b["labels"].tolist() == [src[int(i)][1] for i in b["index"]]
    # normalized with data.mean/std: roughly zero-mean, unit-ish spread
    assert -1.0 < b["images"].mean().item() < 1.0 and 0.3 < b["images"].std().item() < 2.0
    # views differ between positions (even for the same image they would: per-position seeds)
    assert not torch.equal(b["images"][0], b["images"][1])
    assert not torch.equal(b["masked"][0], b["masked"][1]) or not torch.equal(b["masked"][1], b["masked"][2])
    # without a mask_fn: just the three keys
    with build_pretrain_loader(src, cfg, VIEW, None, seed=0) as ld:
        assert set(_take(ld, 1)[0]) == {"images", "labels", "index"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(num_workers: int) -> None:
    """N + M batches in one go == N, then a new loader with start_batch=N for M more (crosses an epoch)."""
    src, cfg = _synthetic(n=40, batch_size=8, num_workers=num_workers)  # 5 batches per epoch
    N, M = 3, 5
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=7) as ld:
        full = _take(ld, N + M)
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=7) as ld:
        head = _take(ld, N)
        state = ld.state_dict()
    assert state == {"epoch": 0, "batch_in_epoch": 3, "batches_consumed": 3, "seed": 7, "sample_in_epoch": 24,
                     "samples_consumed": 24, "batch_size": 8, "world_size": 1}
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=7, start_batch=state["batches_consumed"]) as ld:
        tail = _take(ld, M)
        assert ld.state_dict()["batches_consumed"] == N + M
    _assert_same(full, head + tail)


def test_workers_do_not_change_batches() -> None:
    src, cfg = _synthetic(n=48, batch_size=8)
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=1) as ld:
        a = _take(ld, 4)
    with build_pretrain_loader(src, replace(cfg, num_workers=2), VIEW, MASK, seed=1) as ld:
        b = _take(ld, 4)
        # prefetched batches are not counted
        assert ld.state_dict()["batches_consumed"] == 4
    _assert_same(a, b)
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=2) as ld:
        c = _take(ld, 1)
    assert not torch.equal(a[0]["index"], c[0]["index"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reiterating_continues(num_workers: int) -> None:
    src, cfg = _synthetic(n=40, batch_size=8, num_workers=num_workers)
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=0) as ld:
        ref = _take(ld, 4)
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=0) as ld:
        got = _take(ld, 2) + _take(ld, 2)  # a new iter() resumes after the last batch handed out
    _assert_same(ref, got)


def test_global_rng_untouched() -> None:
    src, cfg = _synthetic(n=40, batch_size=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with build_pretrain_loader(src, cfg, VIEW, MASK, seed=0) as ld:
        _take(ld, 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_epoch_rollover() -> None:
    src, cfg = _synthetic(n=42, batch_size=8)  # 5 batches per epoch, 2 samples dropped per epoch
    with build_pretrain_loader(src, cfg, VIEW, None, seed=3) as ld:
        assert ld.batches_per_epoch == 5
        batches = _take(ld, 12)
        assert ld.state_dict() == {"epoch": 2, "batch_in_epoch": 2, "batches_consumed": 12, "seed": 3,
                                   "sample_in_epoch": 16, "samples_consumed": 96, "batch_size": 8, "world_size": 1}
        epochs = [torch.cat([b["index"] for b in batches[e * 5 : (e + 1) * 5]]) for e in range(2)]
        for e, idx in enumerate(epochs):
            assert len(set(idx.tolist())) == 40  # no repeats within an epoch
            assert torch.equal(idx, ld.epoch_indices(e)[:40])
        assert not torch.equal(epochs[0], epochs[1])  # reshuffled
        assert torch.equal(batches[10]["index"], ld.epoch_indices(2)[:8])


def test_rank_sharding_disjoint() -> None:
    src, cfg = _synthetic(n=50, batch_size=4)
    per_rank = []
    for rank in range(3):
        with build_pretrain_loader(src, cfg, VIEW, None, seed=5, rank=rank, world_size=3) as ld:
            assert ld.batches_per_epoch == 4  # 50 // 3 = 16 per rank -> 4 batches
            per_rank.append(torch.cat([b["index"] for b in _take(ld, 4)]).tolist())
    flat = sum(per_rank, [])
    assert len(flat) == len(set(flat)) == 48


def test_too_small_for_a_batch() -> None:
    src, cfg = _synthetic(n=10, batch_size=16)
    with pytest.raises(DataError, match="batch_size"):
        build_pretrain_loader(src, cfg, VIEW, seed=0)


# ----------------------------------------------------------------------------------------- bad images
def _bad_tree(tree, **cfg_kw) -> tuple[object, DataConfig]:
    root = tree({"a": 6, "b": 6}, bad=corrupt_files())
    cfg = DataConfig(name="image_folder", path=str(root), batch_size=4, num_workers=0, **cfg_kw)
    return build_source(cfg), cfg


def test_corrupt_skip(tree, caplog: pytest.LogCaptureFixture) -> None:
    src, cfg = _bad_tree(tree, max_errors=5)
    names = [src.describe(i) for i in range(len(src))]
    bad = {i for i, n in enumerate(names) if n.endswith(("garbage.jpg", "truncated.jpg"))}
    assert len(src) == 14 and len(bad) == 2 and src.classes == ["a", "b"]
    with caplog.at_level(logging.WARNING, logger="sslkit.data"):
        with build_pretrain_loader(src, cfg, ViewConfig(size=16), None, seed=0) as ld:
            batches = _take(ld, 2 * ld.batches_per_epoch)  # two epochs: each bad file met twice
            assert ld.policy.skipped == 2
    used = torch.cat([b["index"] for b in batches]).tolist()
    assert not bad & set(used)  # substituted
    msgs = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert len(msgs) == 2  # warned once per file
    assert any("garbage.jpg" in m for m in msgs) and any("truncated.jpg" in m for m in msgs)
    assert any("2 skipped so far" in m for m in msgs)
    # substitution is deterministic: the next readable index
    with build_pretrain_loader(src, cfg, ViewConfig(size=16), None, seed=0) as ld:
        again = _take(ld, 2 * ld.batches_per_epoch)
    _assert_same(batches, again)


def test_corrupt_limit(tree) -> None:
    src, cfg = _bad_tree(tree, max_errors=1)
    with build_pretrain_loader(src, cfg, ViewConfig(size=16), None, seed=0) as ld:
        with pytest.raises(DataError, match=r"data.max_errors=1.*(garbage|truncated)\.jpg"):
            _take(ld, 2 * ld.batches_per_epoch)


def test_corrupt_limit_across_workers(tree) -> None:
    """Two workers share the count: 2 bad files > max_errors=1 fails in the main process."""
    src, cfg = _bad_tree(tree, max_errors=1)
    with build_pretrain_loader(src, replace(cfg, num_workers=2), ViewConfig(size=16), None, seed=0) as ld:
        with pytest.raises(DataError, match=r"data.max_errors=1"):
            _take(ld, 2 * ld.batches_per_epoch)


def _record_in_child(policy: ErrorPolicy, j: int) -> None:
    try:
        policy.read(_Broken(), j)
    except DataError:
        pass


class _Broken:
    """A source whose every image is unreadable."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        raise UnreadableImageError(f"cannot read image broken{i}.jpg", f"broken{i}.jpg")


def test_error_count_shared_across_processes() -> None:
    policy = ErrorPolicy("skip", 3, 10)
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_record_in_child, args=(policy, 0))  # child records 0..3, fails at the 4th
    p.start()
    p.join(30)
    assert policy.skipped == 4 and list(policy._bad[:5]) == [1, 1, 1, 1, 0]
    with pytest.raises(DataError, match=r"data.max_errors=3 .*\(5\).*broken4.jpg"):
        policy.read(_Broken(), 4)  # the parent continues the shared count


def test_corrupt_raise(tree) -> None:
    src, cfg = _bad_tree(tree, on_error="raise")
    with build_pretrain_loader(src, cfg, ViewConfig(size=16), None, seed=0) as ld:
        with pytest.raises(DataError, match=r"cannot read image .*(garbage|truncated)\.jpg"):
            _take(ld, ld.batches_per_epoch)


# ----------------------------------------------------------------------------------------- upscale
def test_upscale_policy(tree, caplog: pytest.LogCaptureFixture) -> None:
    root = tree({"a": 4, "b": 4}, size=(20, 20))
    cfg = DataConfig(name="image_folder", path=str(root), batch_size=4, num_workers=0, allow_upscale=False)
    src = build_source(cfg)
    with pytest.raises(DataError, match=r"allow_upscale=true.*method.view.size to at most 20"):
        build_pretrain_loader(src, cfg, ViewConfig(size=32), seed=0)
    build_pretrain_loader(src, cfg, ViewConfig(size=20), seed=0).close()  # big enough: fine
    with caplog.at_level(logging.WARNING, logger="sslkit.data"):
        with build_pretrain_loader(src, replace(cfg, allow_upscale=True), ViewConfig(size=32), seed=0) as ld:
            b = _take(ld, 2)
    assert b[0]["images"].shape == (4, 3, 32, 32)
    assert len([r for r in caplog.records if "upsample" in r.getMessage()]) == 1


# ----------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader(num_workers: int) -> None:
    src, cfg = _synthetic(n=10, batch_size=4)
    batches = list(build_eval_loader(src, cfg, 24, num_workers=num_workers))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]  # in order, no drop_last
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    assert torch.cat([b["labels"] for b in batches]).tolist() == src.labels().tolist()
    assert batches[0]["images"].shape == (4, 3, 24, 24) and batches[0]["images"].dtype == torch.float32
    again = list(build_eval_loader(src, cfg, 24, batch_size=5, num_workers=0))
    assert torch.equal(torch.cat([b["images"] for b in batches]), torch.cat([b["images"] for b in again]))


def test_mae_view_crops_first_with_torchvision_pixels_and_draws() -> None:
    """The MAE view crops a PIL image before it becomes a tensor: the same pixels and random draws as
    torchvision's ToImage -> RandomResizedCrop -> flip -> ToDtype -> Normalize, for PIL and tensor inputs."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2

    from sslkit.data.views import build_mae_view, interpolation

    vc = ViewConfig(size=32, scale=(0.2, 1.0), interpolation="bicubic")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = build_mae_view(vc, mean, std)
    ref = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(32, scale=(0.2, 1.0), ratio=tuple(vc.ratio),
                                                         interpolation=interpolation("bicubic"), antialias=True),
                      v2.RandomHorizontalFlip(vc.hflip), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    rng = np.random.default_rng(0)
    for k in range(20):
        h, w = (int(v) for v in rng.integers(12, 90, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for img in (Image.fromarray(arr), Image.fromarray(arr).convert("P"), torch.from_numpy(arr).permute(2, 0, 1)):
            torch.manual_seed(k)
            a, after_a = ours(img), torch.rand(1)
            torch.manual_seed(k)
            b, after_b = ref(img.convert("RGB") if isinstance(img, Image.Image) else img), torch.rand(1)
            assert type(a) is torch.Tensor and a.shape == (3, 32, 32)
            assert torch.equal(a, b.as_subclass(torch.Tensor)) and torch.equal(after_a, after_b), (k, h, w)
