"""data=hf: a local Hugging Face dataset (save_to_disk dir, DatasetDict split, parquet files) equals the same
images as an image folder (pixels, labels, classes, split), fails with the fix for a wrong column / split /
path, and pretrains with an exact resume (stopped after 2 steps + resumed == 4 uninterrupted)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.config import DataConfig, compose
from sslkit.data import build_pretrain_loader, build_source
from sslkit.errors import DataError

from .conftest import assert_pretrain_resumes_exactly

datasets = pytest.importorskip("datasets", reason="the hf extra (in .[dev])")

CLASSES = {"cat": 5, "dog": 4, "emu": 6}


def _hf_from_folder(folder_src, with_label_names: bool = True):
    """The image folder's files, in its order, as a datasets.Dataset (encoded bytes, as the Hub stores them)."""
    rows = {"image": [], "label": []}
    for i in range(len(folder_src)):
        rows["image"].append({"bytes": folder_src._read(i), "path": None})
        rows["label"].append(int(folder_src.labels()[i]))
    label = datasets.ClassLabel(names=folder_src.classes) if with_label_names else datasets.Value("int64")
    return datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "label": label}))


@pytest.fixture
def folder(tree):
    root = tree(CLASSES)
    return root, build_source(DataConfig(name="image_folder", path=str(root)))


def _same(a, b) -> None:
    assert len(a) == len(b) and a.classes == b.classes
    assert a.labels().tolist() == b.labels().tolist()
    for i in range(len(a)):
        assert torch.equal(torch.from_numpy(np.array(a[i][0])), torch.from_numpy(np.array(b[i][0])))
        assert a[i][1] == b[i][1] and a.native_size(i) == b.native_size(i)


def test_save_to_disk_dir_equals_the_image_folder(folder, tmp_path: Path) -> None:
    root, src = folder
    _hf_from_folder(src).save_to_disk(str(tmp_path / "ds"))
    hf = build_source(DataConfig(name="hf", path=str(tmp_path / "ds")))
    _same(hf, src)
    assert "ds[row 3]" in hf.describe(3)
    _same(pickle.loads(pickle.dumps(hf)), src)  # to loader workers
    for split in ("train", "val"):  # the one split rule: per class, the last val_fraction in source order
        a = build_source(DataConfig(name="hf", path=str(tmp_path / "ds"), split=split, val_fraction=0.4))
        b = build_source(DataConfig(name="image_folder", path=str(root), split=split, val_fraction=0.4))
        _same(a, b)


def test_parquet_files_and_dataset_dict(folder, tmp_path: Path) -> None:
    _, src = folder
    ds = _hf_from_folder(src, with_label_names=False)  # plain int labels: classes are their values
    (tmp_path / "pq").mkdir()
    ds.select(range(8)).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    ds.select(range(8, len(ds))).to_parquet(str(tmp_path / "pq" / "train-00001.parquet"))
    for path in (tmp_path / "pq", f"{tmp_path}/pq/train-*.parquet"):
        hf = build_source(DataConfig(name="hf", path=str(path)))
        assert hf.classes == ["0", "1", "2"] and hf.labels().tolist() == src.labels().tolist()
        assert torch.equal(torch.from_numpy(np.array(hf[9][0])), torch.from_numpy(np.array(src[9][0])))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert len(build_source(DataConfig(name="hf", path=str(tmp_path / "dd"), hf_split="validation"))) == 3
    with pytest.raises(DataError, match=r"data.hf_split=<name>"):
        build_source(DataConfig(name="hf", path=str(tmp_path / "dd")))
    with pytest.raises(DataError, match=r"data.hf_split='validation': .* is one split"):  # not silently ignored
        build_source(DataConfig(name="hf", path=str(tmp_path / "pq"), hf_split="validation"))
    unlabelled = build_source(DataConfig(name="hf", path=str(tmp_path / "pq"), label_column=None))
    assert unlabelled.classes == [] and set(unlabelled.labels().tolist()) == {-1}


def test_wrong_column_or_path_says_the_fix(folder, tmp_path: Path) -> None:
    _, src = folder
    _hf_from_folder(src).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"data.image_column='img' is not a column .* \(columns: \['image', 'label'\]\)"):
        build_source(DataConfig(name="hf", path=str(tmp_path / "ds"), image_column="img"))
    with pytest.raises(DataError, match="not an Image feature"):
        build_source(DataConfig(name="hf", path=str(tmp_path / "ds"), image_column="label", label_column=None))
    with pytest.raises(DataError, match="no Hugging Face dataset there"):
        build_source(DataConfig(name="hf", path=str(tmp_path)))
    with pytest.raises(DataError, match="not in the local cache"):
        build_source(DataConfig(name="hf", path="sslkit-test/not-cached-anywhere"))


def test_corrupt_row_is_an_unreadable_image(folder, tmp_path: Path) -> None:
    _, src = folder
    ds = _hf_from_folder(src)
    rows = ds.to_dict()
    rows["image"][2] = {"bytes": b"\xff\xd8 not a jpeg", "path": None}
    datasets.Dataset.from_dict(rows, features=ds.features).save_to_disk(str(tmp_path / "bad"))
    hf = build_source(DataConfig(name="hf", path=str(tmp_path / "bad")))
    with pytest.raises(DataError, match=r"bad\[row 2\]"):
        hf[2]
    loader = build_pretrain_loader(hf, DataConfig(name="hf", path=str(tmp_path / "bad"), batch_size=4, num_workers=0),
                                   compose(["method=simmim"]).method.view, None, seed=0)
    assert next(iter(loader))["images"].shape[0] == 4  # on_error=skip: a batch all the same


def test_pretrain_on_hf_resumes_exactly(folder, tmp_path: Path) -> None:
    _, src = folder
    _hf_from_folder(src).save_to_disk(str(tmp_path / "ds"))
    assert_pretrain_resumes_exactly(["data=hf", f"data.path={tmp_path / 'ds'}"], tmp_path)
