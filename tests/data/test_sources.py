"""image_folder (directory and tar), split rule, torchvision/STL sources and build-time errors."""

from __future__ import annotations

import gzip
import pickle
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.config import DataConfig
from sslkit.data import build_eval_loader, build_source, split_indices
from sslkit.data.sources import _index_tar_fast, _index_tar_tarfile
from sslkit.errors import ConfigError, DataError

from tests.data.conftest import make_tar

CLASSES = {"cat": 5, "dog": 4, "emu": 6}


def _pixels(src, i: int) -> torch.Tensor:
    img, _ = src[i]
    return torch.from_numpy(np.array(img))


def test_dir_tree_with_wrapper_prefix(tree) -> None:
    root = tree(CLASSES, prefix="wrap/train")
    src = build_source(DataConfig(name="image_folder", path=str(root)))
    assert src.classes == ["cat", "dog", "emu"]  # wrapper prefix dropped
    assert len(src) == 15  # README, hidden '._*' files ignored
    assert src.labels().tolist() == [0] * 5 + [1] * 4 + [2] * 6
    assert src.describe(5).endswith("wrap/train/dog/0000.jpg")
    img, label = src[6]
    assert img.mode == "RGB" and img.size == (20, 24) and label == 1
    assert src.native_size(6) == (24, 20)


@pytest.mark.parametrize("dot_prefix", [False, True])
def test_tar_equals_dir(tree, tmp_path: Path, dot_prefix: bool) -> None:
    root = tree(CLASSES, prefix="cifar/train")
    tar = make_tar(root, tmp_path / "data.tar", dot_prefix=dot_prefix)
    d = build_source(DataConfig(name="image_folder", path=str(root)))
    t = build_source(DataConfig(name="image_folder", path=str(tar)))
    assert t.classes == d.classes and len(t) == len(d)
    assert t.labels().tolist() == d.labels().tolist()
    for i in range(len(d)):
        assert torch.equal(_pixels(t, i), _pixels(d, i))
        assert t.native_size(i) == d.native_size(i)
    assert "::cifar/train/cat/0000.jpg" in t.describe(0)
    # picklable with a lazily opened descriptor (used before pickling, as at build time)
    t2 = pickle.loads(pickle.dumps(t))
    assert torch.equal(_pixels(t2, 3), _pixels(d, 3))


def test_tar_read_from_workers(tree, tmp_path: Path) -> None:
    """The tar source works in forked DataLoader workers (own descriptor per process)."""
    tar = make_tar(tree(CLASSES), tmp_path / "d.tar")
    cfg = DataConfig(name="image_folder", path=str(tar), batch_size=4)
    src = build_source(cfg)
    src[0]  # descriptor opened in the parent before the fork
    a = list(build_eval_loader(src, cfg, 16, num_workers=0))
    b = list(build_eval_loader(src, cfg, 16, num_workers=2))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in ("images", "labels", "index"))


def test_split_train_val_disjoint_complete(tree) -> None:
    root = tree({"a": 10, "b": 20, "c": 5})
    base = DataConfig(name="image_folder", path=str(root), val_fraction=0.1)
    tr = build_source(replace(base, split="train"))
    va = build_source(replace(base, split="val"))
    al = build_source(base)
    names = lambda s: [s.describe(i) for i in range(len(s))]  # noqa: E731
    assert set(names(tr)).isdisjoint(names(va))
    assert sorted(names(tr) + names(va)) == sorted(names(al))
    # per class the last round(0.1 * n) sorted files are val: a: 1, b: 2, c: round(0.5) = 1 (half up)
    assert [Path(n).parent.name + "/" + Path(n).name for n in names(va)] == [
        "a/0009.png", "b/0018.jpg", "b/0019.png", "c/0004.jpg"]
    assert va.labels().tolist() == [0, 1, 1, 2]


def test_split_rule_cifar_convention() -> None:
    labels = np.repeat(np.arange(10), 5000)
    va = split_indices(labels, "val", 0.1)
    tr = split_indices(labels, "train", 0.1)
    assert len(va) == 5000 and len(tr) == 45000
    assert (va % 5000 >= 4500).all() and (tr % 5000 < 4500).all()
    # unlabelled samples (-1) belong to 'all' only
    lab = np.array([-1, 0, 0, -1, 1, 1])
    assert split_indices(lab, "all", 0.5).tolist() == [0, 1, 2, 3, 4, 5]
    assert split_indices(lab, "train", 0.5).tolist() == [1, 4]
    assert split_indices(lab, "val", 0.5).tolist() == [2, 5]
    with pytest.raises(ConfigError, match="data.split"):
        split_indices(lab, "test", 0.1)


def test_missing_and_empty_errors(tree, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs data.path"):
        build_source(DataConfig(name="image_folder", path=None))
    with pytest.raises(DataError, match="does not exist"):
        build_source(DataConfig(name="image_folder", path=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        build_source(DataConfig(name="image_folder", path=str(empty)))
    with pytest.raises(DataError, match="no images"):
        build_source(DataConfig(name="image_folder", path=str(make_tar(empty, tmp_path / "e.tar"))))
    root = tree({"a": 3})
    with pytest.raises(DataError, match="is empty"):
        build_source(DataConfig(name="image_folder", path=str(root), split="val", val_fraction=0.0))
    with pytest.raises(ConfigError, match="data.name"):
        build_source(DataConfig(name="mnist", path=str(root)))


def test_compressed_tar_error(tree, tmp_path: Path) -> None:
    tar = make_tar(tree({"a": 2}), tmp_path / "x.tar")
    gz = tmp_path / "x.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    with pytest.raises(DataError, match="gunzip"):
        build_source(DataConfig(name="image_folder", path=str(gz)))


@pytest.mark.parametrize(
    "name,expect",
    [("cifar10", r"cifar-10-batches-py.*data_batch_1"), ("cifar100", r"cifar-100-python"),
     ("stl10", r"stl10_binary.*unlabeled_X\.bin"), ("imagenet", r"train/<wnid>")],
)
def test_torchvision_missing_files_say_where(tmp_path: Path, name: str, expect: str) -> None:
    with pytest.raises(DataError, match=expect) as e:
        build_source(DataConfig(name=name, path=str(tmp_path)))
    assert "offline" in str(e.value)


def test_cifar_corrupt_files(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch", "batches.meta"]:
        (d / f).write_bytes(b"junk")
    with pytest.raises(DataError, match="corrupted or incomplete.*cifar-10-python.tar.gz"):
        build_source(DataConfig(name="cifar10", path=str(d)))  # the extracted folder itself is accepted


def test_stl10_memmap_reader(tmp_path: Path) -> None:
    """A fake stl10_binary: pixel layout (column-major per channel), labels, unlabelled = -1."""
    d = tmp_path / "stl10_binary"
    d.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (4, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
    unl = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    train.transpose(0, 1, 3, 2).tofile(d / "train_X.bin")  # stored as (N, C, W, H)
    unl.transpose(0, 1, 3, 2).tofile(d / "unlabeled_X.bin")
    np.array([1, 2, 10, 1], dtype=np.uint8).tofile(d / "train_y.bin")
    (d / "class_names.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n")
    src = build_source(DataConfig(name="stl10", path=str(tmp_path)))
    assert len(src) == 7 and len(src.classes) == 10
    assert src.labels().tolist() == [0, 1, 9, 0, -1, -1, -1]
    assert torch.equal(src[2][0], torch.from_numpy(train[2]))
    assert torch.equal(src[5][0], torch.from_numpy(unl[1]))
    assert src[5][1] == -1
    assert torch.equal(pickle.loads(pickle.dumps(src))[1][0], torch.from_numpy(train[1]))
    tr = build_source(DataConfig(name="stl10", path=str(tmp_path), split="train", val_fraction=0.4))
    assert tr.indices.tolist() == [0, 1, 2]  # class 0: [0, 3] -> val 3; classes 1, 9: round(0.4) = 0 val


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_tar_index_matches_tarfile(tree, tmp_path: Path, fmt: int) -> None:
    """Long (prefix-split / GNU 'L' / pax) and non-ASCII member names index like ``tarfile`` does."""
    long_dir = "w/" + "x" * 60 + "/" + "y" * 60  # > 100 chars: ustar prefix field, 'L' or pax path
    root = tree({"cls": 2, "klasse_ü" if fmt != tarfile.USTAR_FORMAT else "k2": 2}, prefix=long_dir)
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w", format=fmt) as tf:
        for p in sorted(root.rglob("*")):
            tf.add(p, arcname=p.relative_to(root).as_posix(), recursive=False)
    fast = _index_tar_fast(tar)
    assert fast is not None and fast == _index_tar_tarfile(tar)
    assert len(fast[0]) == 4
    src = build_source(DataConfig(name="image_folder", path=str(tar)))
    assert len(src.classes) == 2 and src[3][0].size == (20, 24)
