"""Data sources: indexable collections of labelled RGB images, built from a ``DataConfig``.

A source has ``__len__``, ``__getitem__(i) -> (image, label)`` where the image is a PIL RGB image or a
(3, H, W) uint8 tensor, ``classes``, ``labels()`` ((N,) int64, -1 = unlabelled), ``describe(i)`` (a
file / member name for messages) and ``native_size(i) -> (H, W)``. Sources are picklable and safe to
use from DataLoader worker processes (file handles are opened lazily, per process).

Unreadable images raise ``UnreadableImageError`` (a ``DataError``) naming the file; the loaders decide
whether to skip or fail (``data.on_error``).

``data.split`` is one rule for every source: per class, in source order (sorted file names), the last
``round(val_fraction * n_class)`` samples are ``val``, the rest ``train``; ``all`` is everything
(including unlabelled samples, which belong to neither train nor val).
"""

from __future__ import annotations

import io
import mmap
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image

from sslkit.errors import ConfigError, DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
SOURCE_NAMES = ("synthetic", "image_folder", "cifar10", "cifar100", "stl10", "imagenet", "hf", "webdataset")
SPLITS = ("all", "train", "val")

ImageLike = Union[Image.Image, torch.Tensor]


class UnreadableImageError(DataError):
    """One image could not be read or decoded (corrupt, truncated, not an image, I/O error).

    ``file`` names it; ``__cause__`` is the underlying error.
    """

    def __init__(self, message: str, file: Optional[str] = None) -> None:
        super().__init__(message)
        self.file = file


@runtime_checkable
class Source(Protocol):
    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[ImageLike, int]: ...

    def labels(self) -> np.ndarray: ...

    def describe(self, i: int) -> str: ...

    def native_size(self, i: int) -> tuple[int, int]: ...


def _decode(data: bytes, name: str) -> Image.Image:
    """Encoded bytes -> fully loaded RGB PIL image, or ``UnreadableImageError`` naming ``name``."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # the full decode: a truncated file fails here
        return im if im.mode == "RGB" else im.convert("RGB")  # (RGB: no copy, 0.07 ms per 500x375 image)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImageError(_unreadable_msg(name, e), name) from e


def _header_size(data: bytes, name: str) -> tuple[int, int]:
    """(H, W) from the image header only."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return h, w
    except Exception as e:
        raise UnreadableImageError(_unreadable_msg(name, e), name) from e


def _unreadable_msg(name: str, e: BaseException) -> str:
    return (
        f"cannot read image {name} ({type(e).__name__}: {e}). Fix: replace or delete the file, or set "
        f"data.on_error=skip to substitute it (at most data.max_errors files are skipped)"
    )


def _is_image(name: str) -> bool:
    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):  # hidden files, AppleDouble '._x.jpg'
        return False
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_names(dirs: list[str], root_name: str) -> dict[str, str]:
    """Directories (posix, relative) that directly contain images -> class name.

    The class name is the directory's path relative to the deepest common parent of all class
    directories, so any wrapper prefix (``cifar10/train/<class>/``) is dropped.
    """
    parents = [posixpath.dirname(d) for d in dirs]
    base = posixpath.commonpath(parents) if all(parents) else ""
    out = {}
    for d in dirs:
        if d == "":
            out[d] = root_name
        else:
            out[d] = d[len(base) + 1 :] if base else d
    return out


class _EncodedSource:
    """A source of encoded image files: subclasses give ``_read(i) -> bytes``, ``describe(i)`` and ``_labels``;
    decoding, labels and the header size are shared."""

    _labels: np.ndarray

    def _read(self, i: int) -> bytes:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = int(i)
        return _decode(self._read(i), self.describe(i)), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def native_size(self, i: int) -> tuple[int, int]:
        i = int(i)
        return _header_size(self._read(i), self.describe(i))


class ImageFolderSource(_EncodedSource):
    """A class-per-folder tree of images, on disk or inside an uncompressed ``.tar`` (read in place).

    Class folders are the directories that directly contain images (any wrapper prefix is allowed);
    classes are sorted by name, files sorted by path within each class. For a tar, the member headers
    are indexed once at build time; each member is then read by offset with ``os.pread`` on a file
    descriptor opened lazily per process (nothing open is pickled or shared across a fork).
    """

    def __init__(self, path: Union[str, os.PathLike], *, what: str = "data.path") -> None:
        self.path = str(path)
        p = Path(self.path)
        if not p.exists():
            raise DataError(
                f"{what}={self.path} does not exist. Fix: point {what} to a class-per-folder image "
                f"directory (<path>/<class>/<image>.jpg) or an uncompressed .tar of one"
            )
        self.is_tar = p.is_file()
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None
        if self.is_tar:
            names, offsets, sizes = _index_tar(p, what)
        else:
            names = _scan_dir(p)
            offsets = sizes = None
        if not names:
            raise DataError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) found in {what}={self.path}. Fix: use a "
                f"class-per-folder layout, <path>/<class>/<image>.jpg (a wrapper prefix is fine)"
            )
        root_name = p.name.split(".")[0] if self.is_tar else p.name
        dirs = sorted({posixpath.dirname(n) for n in names})
        cls_of_dir = _class_names(dirs, root_name)
        self.classes = sorted(set(cls_of_dir.values()))
        label_of = {c: k for k, c in enumerate(self.classes)}
        keys = [(label_of[cls_of_dir[posixpath.dirname(n)]], n) for n in names]
        order = sorted(range(len(names)), key=keys.__getitem__)  # by (class, path)
        # posix paths relative to the root / tar member names, as one fixed-width bytes array: no
        # per-item Python objects, so forked workers don't copy it page by page through refcounts
        self._names = np.array([names[j].encode("utf-8", "surrogateescape") for j in order])
        self._labels = np.array([keys[j][0] for j in order], dtype=np.int64)
        if self.is_tar:
            assert offsets is not None and sizes is not None
            self._offsets = np.asarray(offsets, dtype=np.int64)[order]
            self._sizes = np.asarray(sizes, dtype=np.int64)[order]

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        """Relative path (or tar member name) of sample ``i``."""
        return self._names[int(i)].decode("utf-8", "surrogateescape")

    def _read(self, i: int) -> bytes:
        name = self.describe(i)
        try:
            if not self.is_tar:
                with open(os.path.join(self.path, self.name(i)), "rb") as f:
                    return f.read()
            if self._fd is None or self._fd_pid != os.getpid():
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                self._fd_pid = os.getpid()
            off, size = int(self._offsets[i]), int(self._sizes[i])
            data = os.pread(self._fd, size, off)
            if len(data) != size:
                raise OSError(f"short read: {len(data)} of {size} bytes (tar truncated?)")
            return data
        except OSError as e:
            raise UnreadableImageError(_unreadable_msg(name, e), name) from e

    def describe(self, i: int) -> str:
        sep = "::" if self.is_tar else "/"
        return f"{self.path}{sep}{self.name(i)}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = state["_fd_pid"] = None  # each process opens its own descriptor
        return state

    def __del__(self) -> None:
        try:
            if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
        except Exception:  # interpreter shutdown, already closed
            pass


def _scan_dir(root: Path) -> list[str]:
    """Image files under ``root`` as posix paths relative to it (symlinks followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        for f in filenames:
            name = posixpath.join(rel, f) if rel else f
            if _is_image(name):
                out.append(name)
    return out


# magic bytes -> (compression, decompress command)
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": ("gzip", "gunzip"),
    b"BZh": ("bzip2", "bunzip2"),
    b"\xfd7zXZ": ("xz", "unxz"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
}


TarIndex = tuple[list[str], list[int], list[int]]  # image member names, data offsets, sizes


def _index_tar(path: Path, what: str, keep: Callable[[str], bool] = _is_image) -> TarIndex:
    """One pass over the tar headers -> (names, data offsets, sizes) of the regular-file members whose
    name passes ``keep`` (default: images), in archive order."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, (kind, cmd) in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise DataError(
                f"{what}={path} is a {kind}-compressed tar, which cannot be read in place. Fix: "
                f"decompress it once (`{cmd} {path.name}`) and point {what} to the plain .tar, or "
                f"extract it to a folder"
            )
    try:
        fast = _index_tar_fast(path, keep)
        return fast if fast is not None else _index_tar_tarfile(path, keep)
    except (tarfile.TarError, ValueError) as e:
        raise DataError(
            f"{what}={path} is not a readable tar ({e}). Fix: point {what} to a class-per-folder "
            f"directory or an uncompressed .tar of one"
        ) from e


def _index_tar_fast(path: Path, keep: Callable[[str], bool] = _is_image) -> Optional[TarIndex]:
    """Header walk over a memory map: ustar / pax / GNU long names, ~10x faster than ``tarfile``.

    Returns None for anything else (v7 tars, sparse files, base-256 sizes): use ``tarfile`` then.
    """
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    if path.stat().st_size < 1024:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        end = len(mm)
        off = 0
        pending: dict[bytes, bytes] = {}  # pax / GNU long-name overrides for the next member
        while off + 512 <= end:
            h = mm[off : off + 512]
            if h[0] == 0:  # end-of-archive block
                break
            if h[257:262] != b"ustar" or h[124] & 0x80:
                return None
            size = int(h[124:136].strip(b" \0") or b"0", 8)
            data = off + 512
            off = data + (size + 511) // 512 * 512
            kind = h[156:157]
            if kind == b"x":  # pax extended header for the next member
                pending.update(_pax_records(mm[data : data + size]))
                continue
            if kind == b"L":  # GNU long name for the next member
                pending[b"path"] = mm[data : data + size].split(b"\0", 1)[0]
                continue
            if kind in (b"g", b"K"):  # pax global header, GNU long link name: irrelevant here
                continue
            if kind not in (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"):
                return None  # sparse or unknown member types
            raw = pending.get(b"path")
            if raw is None:
                raw = h[0:100].split(b"\0", 1)[0]
                prefix = h[345:500].split(b"\0", 1)[0]
                if prefix:
                    raw = prefix + b"/" + raw
            if b"size" in pending:  # pax size overrides the header (files > 8 GiB)
                size = int(pending[b"size"])
                off = data + (size + 511) // 512 * 512
            pending = {}
            if kind in (b"0", b"\0", b"7"):
                name = raw.decode("utf-8", "surrogateescape").removeprefix("./")
                if keep(name):
                    names.append(name)
                    offsets.append(data)
                    sizes.append(size)
    return names, offsets, sizes


def _pax_records(buf: bytes) -> dict[bytes, bytes]:
    """Parse pax records ``b"<len> <key>=<value>\\n"``."""
    out = {}
    i = 0
    while i < len(buf) and buf[i] != 0:
        sp = buf.index(b" ", i)
        n = int(buf[i:sp])
        key, _, value = buf[sp + 1 : i + n - 1].partition(b"=")
        out[key] = value
        i += n
    return out


def _index_tar_tarfile(path: Path, keep: Callable[[str], bool] = _is_image) -> TarIndex:
    """The same index through ``tarfile`` (any format it reads)."""
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    with tarfile.open(path, mode="r:") as tf:
        while True:
            m = tf.next()
            if m is None:
                break
            tf.members = []  # don't keep every TarInfo (ImageNet has 1.28M members)
            name = m.name.removeprefix("./")
            if m.isfile() and not m.issparse() and keep(name):
                names.append(name)
                offsets.append(m.offset_data)
                sizes.append(m.size)
    return names, offsets, sizes


# ----------------------------------------------------------------------------------------- torchvision
_CIFAR_FILES = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"]),
    "cifar100": ("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", ["train", "test", "meta"]),
}


class CIFARSource:
    """torchvision CIFAR-10 / CIFAR-100, the official *train* set (50,000 images; the official test
    set is not used: ``data.split`` carves train/val out of train like everywhere else). Offline only:
    the extracted python-pickle batches must already be under ``data.path``."""

    def __init__(self, name: str, root: str) -> None:
        from torchvision import datasets

        title, folder, archive, files = _CIFAR_FILES[name]
        rootp = Path(root)
        if rootp.name == folder:  # data.path pointing at the extracted folder itself
            rootp = rootp.parent
        missing = [f for f in files if not (rootp / folder / f).is_file()]
        fix = (
            f"Fix: download {archive} from https://www.cs.toronto.edu/~kriz/{archive} and extract it "
            f"into data.path (`tar xzf {archive} -C {rootp}`), giving {rootp / folder}/{{{','.join(files)}}} "
            f"(downloads are disabled: sslkit runs offline)"
        )
        if missing:
            raise DataError(f"{title} not found: missing {', '.join(missing)} in {rootp / folder}. {fix}")
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            ds = cls(root=str(rootp), train=True, download=False)
        except RuntimeError as e:  # torchvision's md5 check failed
            raise DataError(f"{title} files in {rootp / folder} are corrupted or incomplete ({e}). {fix}") from e
        self.title = title
        self.data = ds.data  # (N, 32, 32, 3) uint8
        self._labels = np.asarray(ds.targets, dtype=np.int64)
        self.classes = list(ds.classes)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        return torch.from_numpy(self.data[i]).permute(2, 0, 1).contiguous(), int(self._labels[i])  # (3, 32, 32)

    def labels(self) -> np.ndarray:
        return self._labels

    def describe(self, i: int) -> str:
        return f"{self.title} train image {int(i)}"

    def native_size(self, i: int) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])


class STL10Source:
    """STL-10 binaries, read by memory map (the 100k unlabelled images are 2.8 GB; torchvision's
    loader would hold them all in RAM in every worker).

    Samples: the 5,000 labelled ``train`` images (indices 0..4999, labels 0..9) followed by the
    100,000 ``unlabeled`` images (label -1). ``split=all`` (pretraining) uses both; ``train``/``val``
    apply the per-class rule to the labelled 5,000 (4,500 / 500 by default). The official test set
    is not used.
    """

    FILES = ["train_X.bin", "train_y.bin", "unlabeled_X.bin", "class_names.txt"]
    SIDE = 96

    def __init__(self, root: str) -> None:
        rootp = Path(root)
        if rootp.name == "stl10_binary":
            rootp = rootp.parent
        self.dir = rootp / "stl10_binary"
        missing = [f for f in self.FILES if not (self.dir / f).is_file()]
        if missing:
            raise DataError(
                f"STL-10 not found: missing {', '.join(missing)} in {self.dir}. Fix: download "
                f"stl10_binary.tar.gz from https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and "
                f"extract it into data.path (`tar xzf stl10_binary.tar.gz -C {rootp}`), giving "
                f"{self.dir}/{{{','.join(self.FILES)}}} (downloads are disabled: sslkit runs offline)"
            )
        px = 3 * self.SIDE * self.SIDE
        n_train = (self.dir / "train_X.bin").stat().st_size // px
        n_unl = (self.dir / "unlabeled_X.bin").stat().st_size // px
        y = np.fromfile(self.dir / "train_y.bin", dtype=np.uint8).astype(np.int64) - 1
        if len(y) != n_train:
            raise DataError(
                f"STL-10 in {self.dir}: train_y.bin has {len(y)} labels for {n_train} images. Fix: "
                f"re-extract stl10_binary.tar.gz"
            )
        self.n_train, self.n_unlabeled = int(n_train), int(n_unl)
        self._labels = np.concatenate([y, np.full(n_unl, -1, dtype=np.int64)])
        self.classes = [c for c in (self.dir / "class_names.txt").read_text().splitlines() if c.strip()]
        self._maps: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._maps_pid: Optional[int] = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None or self._maps_pid != os.getpid():
            s = self.SIDE
            self._maps = tuple(
                np.memmap(self.dir / f, dtype=np.uint8, mode="r", shape=(n, 3, s, s))
                for f, n in (("train_X.bin", self.n_train), ("unlabeled_X.bin", self.n_unlabeled))
            )  # type: ignore[assignment]
            self._maps_pid = os.getpid()
        assert self._maps is not None
        return self._maps

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        train, unl = self._arrays()
        arr = train[i] if i < self.n_train else unl[i - self.n_train]  # (3, W, H): stored column-major
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 2, 1))), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def describe(self, i: int) -> str:
        i = int(i)
        if i < self.n_train:
            return f"STL-10 train image {i} ({self.dir / 'train_X.bin'})"
        return f"STL-10 unlabeled image {i - self.n_train} ({self.dir / 'unlabeled_X.bin'})"

    def native_size(self, i: int) -> tuple[int, int]:
        return self.SIDE, self.SIDE

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = state["_maps_pid"] = None
        return state


class HFSource(_EncodedSource):
    """A local Hugging Face dataset: a ``save_to_disk`` directory (a ``Dataset``, or a ``DatasetDict`` with
    ``hf_split`` naming the part), parquet / arrow files (a file, a directory of them, or a glob), or a Hub
    id whose files are already in the local cache. Nothing is downloaded: the datasets library runs offline
    (``HF_DATASETS_OFFLINE=1`` is set for the load).

    ``image_column`` holds the images (an ``Image`` feature, read as encoded bytes and decoded here, so a
    corrupt image fails like any other source's); ``label_column`` the labels (a ``ClassLabel``: its names
    are the classes; other values: their sorted distinct values), or null for unlabelled data (-1).
    Rows stay in the dataset's order, so ``data.split`` takes the last ``val_fraction`` of each class.
    Random access by row (arrow memory-mapped, picklable to workers).
    """

    def __init__(self, path: str, image_column: str = "image", label_column: Optional[str] = "label",
                 hf_split: Optional[str] = None) -> None:
        try:
            import datasets
        except ImportError as e:
            raise ConfigError('data.name=hf needs the datasets library: pip install "sslkit[hf]"') from e
        self.path = str(path)
        ds = _load_hf(datasets, self.path, hf_split)
        for col, what in ((image_column, "data.image_column"), (label_column, "data.label_column")):
            if col is not None and col not in ds.column_names:
                raise DataError(f"{what}={col!r} is not a column of {self.path} (columns: {ds.column_names}). "
                                f"Fix: set {what} to one of them" + (" (or null: unlabelled)" if "label" in what else ""))
        feature = ds.features[image_column]
        if not isinstance(feature, datasets.Image):
            raise DataError(f"data.image_column={image_column!r} of {self.path} is {type(feature).__name__}, not an "
                            f"Image feature: cast it (ds.cast_column({image_column!r}, datasets.Image())) and save again")
        self.image_column = image_column
        self._ds = ds.cast_column(image_column, datasets.Image(decode=False)).select_columns([image_column])
        if label_column is None:
            self.classes: list[str] = []
            self._labels = np.full(len(ds), -1, dtype=np.int64)
        else:
            values = ds[label_column]
            lf = ds.features[label_column]
            if isinstance(lf, datasets.ClassLabel):
                self.classes = list(lf.names)
                self._labels = np.array([-1 if v is None else v for v in values], dtype=np.int64)
            else:
                distinct = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
                self.classes = [str(v) for v in distinct]
                index = {v: k for k, v in enumerate(distinct)}
                self._labels = np.array([-1 if v is None else index[v] for v in values], dtype=np.int64)
        if len(self._ds) == 0:
            raise DataError(f"{self.path} has no rows. Fix: check data.path / data.hf_split")

    def __len__(self) -> int:
        return len(self._ds)

    def _read(self, i: int) -> bytes:
        cell = self._ds[int(i)][self.image_column]  # {"bytes": ..., "path": ...}
        if cell.get("bytes") is not None:
            return cell["bytes"]
        try:
            with open(cell["path"], "rb") as f:
                return f.read()
        except (OSError, TypeError) as e:
            raise UnreadableImageError(_unreadable_msg(self.describe(i), e), self.describe(i)) from e

    def describe(self, i: int) -> str:
        return f"{self.path}[row {int(i)}]"


def _load_hf(datasets: Any, path: str, hf_split: Optional[str]) -> Any:
    """The ``Dataset`` at ``path`` (see ``HFSource``), offline."""
    import glob

    old = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        p = Path(os.path.expanduser(path))
        files = sorted(glob.glob(str(p))) if any(c in path for c in "*?[") else (
            sorted(str(f) for f in p.iterdir() if f.suffix in (".parquet", ".arrow")) if p.is_dir() else
            [str(p)] if p.is_file() else [])
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
        elif files:
            kind = "parquet" if files[0].endswith(".parquet") else "arrow"
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        elif not p.exists() and "/" in path and not path.startswith((".", "/", "~")):
            try:  # a Hub id, from the local cache only
                ds = datasets.load_dataset(path, split=hf_split or "train")
            except Exception as e:
                raise DataError(f"data.path={path}: not a local dataset, and the Hub id is not in the local cache "
                                f"({type(e).__name__}: {e}). Fix: download it on a machine with internet "
                                f"(datasets.load_dataset({path!r}).save_to_disk(dir)) and set data.path=dir") from e
            hf_split = None
        else:
            raise DataError(f"data.path={path}: no Hugging Face dataset there. Fix: a save_to_disk directory, "
                            f"parquet / arrow files (a file, a directory of them or a glob), or a cached Hub id")
    finally:
        if old is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = old
    if isinstance(ds, datasets.DatasetDict):
        if hf_split is None or hf_split not in ds:
            raise DataError(f"data.path={path} holds the splits {list(ds)}: choose one with data.hf_split=<name>")
        ds = ds[hf_split]
    elif hf_split is not None:
        raise DataError(f"data.hf_split={hf_split!r}: data.path={path} is one split (a single Dataset, or parquet / "
                        f"arrow files). Fix: set data.hf_split=null, or point data.path to the files of that split")
    return ds


def imagenet_source(root: str) -> ImageFolderSource:
    """ImageNet-1k training images in the standard folder layout ``<root>/train/<wnid>/*.JPEG``."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise DataError(
            f"ImageNet not found: {train} is not a directory. Fix: put the ILSVRC-2012 training images "
            f"in the standard layout {train}/<wnid>/<image>.JPEG (1000 class folders such as n01440764, "
            f"e.g. by extracting ILSVRC2012_img_train.tar and its per-class tars there), and set "
            f"data.path={root} (downloads are disabled: sslkit runs offline)"
        )
    return ImageFolderSource(train, what="data.path/train")


# ----------------------------------------------------------------------------------------- split
class SubsetSource:
    """The samples ``indices`` of ``base``, in that order."""

    def __init__(self, base: Any, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[ImageLike, int]:
        return self.base[int(self.indices[int(i)])]

    def labels(self) -> np.ndarray:
        return self.base.labels()[self.indices]

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.indices[int(i)]))

    def native_size(self, i: int) -> tuple[int, int]:
        return self.base.native_size(int(self.indices[int(i)]))


def split_indices(labels: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    """Indices of ``split``: per class in index order, the last ``round(val_fraction * n)`` are val.

    Rounding is half-up (``floor(x + 0.5)``). Unlabelled samples (label < 0) are only in ``all``.
    """
    if split not in SPLITS:
        raise ConfigError(f"data.split must be one of {SPLITS}, got {split!r}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if split == "all":
        return np.arange(n, dtype=np.int64)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    order = np.argsort(labels, kind="stable")  # grouped by class, index order within a class
    sl = labels[order]
    classes, starts, counts = np.unique(sl, return_index=True, return_counts=True)
    n_val = np.floor(counts * val_fraction + 0.5).astype(np.int64)
    k = np.searchsorted(classes, sl)  # class slot of each sorted sample
    rank = np.arange(n) - starts[k]  # position within its class
    is_val = rank >= counts[k] - n_val[k]
    keep = (sl >= 0) & (is_val if split == "val" else ~is_val)
    return np.sort(order[keep])


def apply_split(source: Any, split: str, val_fraction: float) -> Any:
    """``source`` restricted to ``split`` (the source itself for ``all``)."""
    if split == "all":
        return source
    return SubsetSource(source, split_indices(source.labels(), split, val_fraction))
