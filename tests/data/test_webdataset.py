"""data=webdataset and the shard writer: a tiny CIFAR-like tar written to shards with `sslkit-data shard` holds
exactly the train split (the val split in its own shards), reads back byte for byte under every way of naming
the shards, labels from `cls` / a json field / none, fails with the fix, and pretrains with an exact resume
(stopped after 2 steps + resumed == 4 uninterrupted)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.cli import data_main
from sslkit.config import DataConfig, compose
from sslkit.data import build_pretrain_loader, build_source
from sslkit.data.shards import WebDatasetSource, write_shards
from sslkit.errors import ConfigError, DataError

from .conftest import assert_pretrain_resumes_exactly, make_tar, make_tree

pytest.importorskip("webdataset", reason="the webdataset extra (in .[dev])")

CLASSES = {"airplane": 7, "bird": 5, "cat": 6}


@pytest.fixture
def cifar_tar(tmp_path: Path) -> Path:
    """A tiny CIFAR-10-like tar: cifar10/train/<class>/<NNNN>.{jpg,png}, 32x32."""
    tree = make_tree(tmp_path / "tree", CLASSES, size=(32, 32), prefix="cifar10/train")
    return make_tar(tree, tmp_path / "cifar10-train.tar")


@pytest.fixture
def shards(cifar_tar: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    data_main(["shard", f"data.path={cifar_tar}", f"out={out}", "shard_size=5",  # no data=: an image folder / tar
               "data.val_fraction=0.2", "progress=false"])
    return out


def _key(src: WebDatasetSource, i: int) -> int:
    return int(src.describe(i).rsplit("::", 1)[1].split(".")[0])


def test_writer_keeps_the_val_split_out_and_reads_back_byte_for_byte(cifar_tar: Path, shards: Path) -> None:
    index = json.loads((shards / "train-index.json").read_text())
    assert index["classes"] == sorted(CLASSES)
    assert [s["nsamples"] for s in index["shardlist"]] == [5, 5, 5]  # 18 images, 1 + 1 + 1 of them val
    for split in ("train", "val"):
        ref = build_source(DataConfig(name="image_folder", path=str(cifar_tar), split=split, val_fraction=0.2))
        ws = build_source(DataConfig(name="webdataset", path=str(shards / f"{split}-index.json")))
        assert len(ws) == len(ref) and ws.classes == ref.classes
        keys = sorted(_key(ws, i) for i in range(len(ws)))
        assert keys == list(range(len(ref)))  # every sample of the split exactly once
        for i in range(len(ws)):
            j = _key(ws, i)
            assert ws._read(i) == ref.base._read(int(ref.indices[j]))  # the file's own bytes, not re-encoded
            assert ws[i][1] == ref[j][1] and ws.native_size(i) == ref.native_size(j)
    order = [_key(build_source(DataConfig(name="webdataset", path=str(shards / "train-index.json"))), i) for i in range(3)]
    assert order != [0, 1, 2]  # written in a seeded random order


def test_every_way_of_naming_the_shards(shards: Path) -> None:
    ref = WebDatasetSource(str(shards / "train-index.json"))
    names = [
        str(shards / "train-{000000..000002}.tar"),
        str(shards / "train-*.tar"),
        f"{shards / 'train-000000.tar'}::{shards / 'train-00000{1,2}.tar'}",
    ]
    for path in names:
        src = build_source(DataConfig(name="webdataset", path=path))
        assert [src.describe(i) for i in range(len(src))] == [ref.describe(i) for i in range(len(ref))]
        assert src.labels().tolist() == ref.labels().tolist()
        assert src.classes == ["0", "1", "2"]  # no index: the integer labels' names
    with pytest.raises(DataError, match=r"2 shard indexes .*Fix: choose one"):
        WebDatasetSource(str(shards))  # train-index.json and val-index.json
    with pytest.raises(DataError, match=r"1 of 4 shards do not exist, the first is .*train-000003.tar"):
        WebDatasetSource(str(shards / "train-{000000..000003}.tar"))
    with pytest.raises(ConfigError, match=r"local shard files"):
        WebDatasetSource("https://example.com/train-{000000..000002}.tar")
    clone = pickle.loads(pickle.dumps(ref))  # to loader workers: descriptors are per process
    assert clone._read(3) == ref._read(3)
    ref._max_open = 1  # an LRU smaller than the shard count still reads everything
    assert [len(ref._read(i)) for i in range(len(ref))] == [int(s) for s in ref._sizes] and len(ref._fds) == 1


def test_the_writers_member_table_replaces_the_header_walk(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sslkit.data.shards as sh

    walked = WebDatasetSource(str(shards / "train-{000000..000002}.tar"))  # a pattern: every shard's headers
    real, calls = sh._index_tar, []
    monkeypatch.setattr(sh, "_index_tar", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    fast = WebDatasetSource(str(shards / "train-index.json"))  # the index: train-members.npz, no walk
    assert calls == [] and fast.classes == sorted(CLASSES) and walked.classes == ["0", "1", "2"]
    assert [fast.describe(i) for i in range(len(fast))] == [walked.describe(i) for i in range(len(walked))]
    assert fast.labels().tolist() == walked.labels().tolist() and fast._read(4) == walked._read(4)
    with open(shards / "train-000002.tar", "ab") as f:  # a shard changed since it was written: walk again
        f.write(bytes(1024))
    again = WebDatasetSource(str(shards / "train-index.json"))
    assert len(calls) == 3 and again.labels().tolist() == walked.labels().tolist()


def _shard_with(tmp_path: Path, samples: list[dict[str, bytes]]) -> Path:
    path = tmp_path / "custom-000000.tar"
    with tarfile.open(path, "w") as tf:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_labels_from_a_json_field_or_none(tmp_path: Path, shards: Path) -> None:
    img = WebDatasetSource(str(shards / "train-index.json"))._read(0)
    path = _shard_with(tmp_path, [
        {"a/x1.jpg": img, "a/x1.json": json.dumps({"meta": {"kind": "dog"}}).encode()},
        {"a/x2.seg.jpg": img, "a/x2.json": json.dumps({"meta": {"kind": "cat"}}).encode()},
        {"a/x3.txt": b"no image: left out"},
        {"a/x4.jpg": img, "a/x4.json": json.dumps({"meta": {"kind": "dog"}}).encode()},
    ])
    src = WebDatasetSource(str(path), label_key="json:meta.kind")
    assert src.classes == ["cat", "dog"] and src.labels().tolist() == [1, 0, 1] and src.skipped_no_image == 1
    assert src.describe(1).endswith("::a/x2.seg.jpg")
    unlabelled = build_source(DataConfig(name="webdataset", path=str(path), label_key=None))
    assert unlabelled.classes == [] and unlabelled.labels().tolist() == [-1, -1, -1]
    with pytest.raises(DataError, match=r"no .cls member .*data.label_key"):
        WebDatasetSource(str(path))
    with pytest.raises(DataError, match=r"field meta.nope"):
        WebDatasetSource(str(path), label_key="json:meta.nope")


def test_a_corrupt_member_is_an_unreadable_image(tmp_path: Path, shards: Path) -> None:
    good = WebDatasetSource(str(shards / "train-index.json"))._read(0)
    path = _shard_with(tmp_path, [{f"k{i}.jpg": good if i != 2 else b"\xff\xd8 not a jpeg", f"k{i}.cls": b"0"}
                                  for i in range(6)])
    cfg = DataConfig(name="webdataset", path=str(path), batch_size=4, num_workers=0)
    src = build_source(cfg)
    with pytest.raises(DataError, match=r"custom-000000.tar::k2.jpg"):
        src[2]
    loader = build_pretrain_loader(src, cfg, compose(["method=simmim"]).method.view, None, seed=0)
    assert next(iter(loader))["images"].shape[0] == 4  # on_error=skip


def test_writer_from_a_pixel_source_is_lossless(tmp_path: Path) -> None:
    src = build_source(DataConfig(name="synthetic", num_samples=12, num_classes=3, image_size=16))
    write_shards(src, tmp_path / "syn", shard_size=100, shuffle=False, progress=False)
    ws = WebDatasetSource(str(tmp_path / "syn"))
    assert ws.classes == src.classes and ws.labels().tolist() == src.labels().tolist()
    for i in range(len(src)):
        a = torch.from_numpy(np.array(ws[i][0])).permute(2, 0, 1)
        b = src[i][0]
        b = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.array(b)).permute(2, 0, 1)
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"already holds train-\*.tar"):
        write_shards(src, tmp_path / "syn", progress=False)


def test_pretrain_on_shards_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    assert_pretrain_resumes_exactly(["data=webdataset", f"data.path={shards / 'train-index.json'}"], tmp_path)
