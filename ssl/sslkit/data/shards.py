"""WebDataset tar shards: the ``webdataset`` source (random access) and the shard writer.

A shard is an uncompressed tar in the WebDataset layout: the files of one sample are consecutive members
sharing a key (``<key>.jpg``, ``<key>.cls``, ``<key>.json``; the key is the member path up to the first
dot of its base name). ``WebDatasetSource`` indexes the members of every shard once (one header walk per
shard, the same indexer as the image-folder tar), then reads any sample by offset (``os.pread``). So the
shards are a storage format only: the sampler, ``data.split``, the views and exact resume are the same
as for an image folder, for any number of shards, ranks and workers.

Why not stream them through ``webdataset.WebDataset``: a stream is split by *shards* over ranks x workers,
so an epoch's order, its split of samples over ranks and any resume point depend on the world size, and
uneven shard counts give ranks unequal epochs. Random access keeps the one global order of the other
sources. Local (POSIX / Lustre / GPFS) paths only; ``pipe:`` / URLs need streaming and are refused.

``write_shards`` writes any source's samples (original encoded bytes where the source has them, else
lossless PNG) with ``webdataset.ShardWriter``, plus an index ``<prefix>-index.json`` (shard list with
sample counts and byte sizes, the class names) that ``data.path`` can point to, and the member table
``<prefix>-members.npz`` the reader then loads instead of walking the shards' headers.
"""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from sslkit.data.sources import (
    IMG_EXTENSIONS,
    _EncodedSource,
    _index_tar,
    _unreadable_msg,
    UnreadableImageError,
)
from sslkit.errors import ConfigError, DataError

INDEX_KIND = "wids-shard-index-v1"  # the shard-list format of webdataset's wids (+ "classes")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)


def _split_key(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): WebDataset's key / extension rule."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower()


def expand_shards(path: Union[str, Sequence[str]], what: str = "data.path") -> tuple[list[str], Optional[dict]]:
    """Shard files of ``path`` (a brace pattern ``train-{000000..000099}.tar``, a glob, a directory of
    ``.tar``, an index ``.json`` written by ``write_shards`` / wids, or a list of any of these) and the index
    when one was given. Missing files fail with the first missing name."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    shards: list[str] = []
    index: Optional[dict] = None
    for item in items:
        item = os.path.expanduser(str(item))
        if "://" in item or item.startswith("pipe:"):
            raise ConfigError(f"{what}={item}: data=webdataset reads local shard files (a cluster file system path); "
                              f"URLs and pipe: need streaming, which sslkit does not do. Fix: copy or mount the shards")
        if os.path.isdir(item):
            indexes = sorted(glob.glob(os.path.join(item, "*-index.json")))
            if len(indexes) > 1:
                raise DataError(f"{what}={item} holds {len(indexes)} shard indexes ({', '.join(map(os.path.basename, indexes))}). "
                                f"Fix: choose one, e.g. {what}={indexes[0]}")
            if not indexes:
                found = sorted(glob.glob(os.path.join(item, "*.tar")))
                if not found:
                    raise DataError(f"{what}={item} is a directory without .tar shards. Fix: write shards with "
                                    f"`sslkit-data shard ... out={item}` or point {what} to them")
                shards += found
                continue
            item = indexes[0]
        if item.endswith(".json") and os.path.isfile(item):
            index = json.loads(Path(item).read_text())
            if index.get("__kind__") != INDEX_KIND or "shardlist" not in index:
                raise DataError(f"{what}={item} is not a shard index (written by sslkit-data shard or wids). "
                                f"Fix: point {what} to the shards (a brace pattern, a glob or a directory)")
            base = os.path.dirname(item)
            index["__dir__"] = base
            shards += [os.path.join(base, s["url"]) for s in index["shardlist"]]
            continue
        for one in _braceexpand(item, what):
            if any(c in one for c in "*?["):
                found = sorted(glob.glob(one))
                if not found:
                    raise DataError(f"{what}: no file matches {one}. Fix: check the pattern")
                shards += found
            else:
                shards.append(one)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"{what}: {len(missing)} of {len(shards)} shards do not exist, the first is {missing[0]}. "
                        f"Fix: check the brace pattern's range (e.g. train-{{000000..000099}}.tar) and the directory")
    if not shards:
        raise DataError(f"{what}={path}: no shards. Fix: a brace pattern, a glob, a directory or an index .json")
    return shards, index


def _braceexpand(pattern: str, what: str) -> list[str]:
    if "{" not in pattern:
        return [pattern]
    try:
        import braceexpand
    except ImportError as e:
        raise ConfigError(f'{what}: brace patterns need braceexpand: pip install "sslkit[webdataset]"') from e
    return list(braceexpand.braceexpand(pattern))


def _label_reader(label_key: str) -> tuple[str, Optional[list[str]]]:
    """``cls`` -> (``cls``, None); ``json:a.b`` -> (``json``, [a, b])."""
    if label_key.startswith("json:"):
        field = label_key[len("json:"):]
        if not field:
            raise ConfigError("data.label_key=json:<field> needs a field name, e.g. json:label")
        return "json", field.split(".")
    return label_key.lower().lstrip("."), None


class WebDatasetSource(_EncodedSource):
    """WebDataset tar shards read by random access (see the module doc).

    ``label_key``: the member holding the label, an integer as text (``cls``, the default, or any extension),
    ``json:<field>`` (a dotted field of the ``.json`` member: an integer or a class name), or None
    (unlabelled, -1). Integer labels are kept as they are; the class names come from the index's
    ``classes`` when ``data.path`` names an index or a directory with one, else ``"0".."K-1"``. Name labels
    are numbered in sorted order. Samples in shard order, then tar order; samples without an image member
    are left out (counted in ``skipped_no_image``).
    """

    def __init__(self, path: Union[str, Sequence[str]], label_key: Optional[str] = "cls",
                 what: str = "data.path") -> None:
        self.shards, index = expand_shards(path, what)
        kind, field = _label_reader(label_key) if label_key else (None, None)
        self._kind = kind
        self._fds: "OrderedDict[int, int]" = OrderedDict()
        self._fd_pid: Optional[int] = None
        self._max_open = _fd_budget(len(self.shards))
        if kind in ("cls", None) and self._load_members(index):
            return
        shard_of, offsets, sizes, keys, raw_labels = [], [], [], [], []
        self.skipped_no_image = 0
        for s, shard in enumerate(self.shards):
            names, offs, szs = _index_tar(Path(shard), f"{what} shard {shard}", keep=lambda n: True)
            with open(shard, "rb") as f:
                groups = _group_members(names, offs, szs)
                for key, members in groups:
                    image = next(((o, n) for e, o, n in members if e.rsplit(".", 1)[-1] in _IMAGE_EXTS), None)
                    if image is None:
                        self.skipped_no_image += 1
                        continue
                    label: Any = None
                    if kind is not None:
                        member = next(((o, n) for e, o, n in members if e == kind), None)
                        if member is None:
                            raise DataError(f"sample {key} of {shard} has no .{kind} member (members: "
                                            f"{', '.join(e for e, _, _ in members)}). Fix: set data.label_key to the "
                                            f"member holding the label, or data.label_key=null for unlabelled data")
                        f.seek(member[0])
                        label = _parse_label(f.read(member[1]), kind, field, f"{shard}::{key}.{kind}")
                    shard_of.append(s)
                    offsets.append(image[0])
                    sizes.append(image[1])
                    keys.append(f"{key}.{next(e for e, o, n in members if o == image[0])}")
                    raw_labels.append(label)
        if not keys:
            raise DataError(f"{what}: the {len(self.shards)} shards hold no samples with an image member "
                            f"({', '.join(_IMAGE_EXTS)}). Fix: check the shards (tar tf <shard>)")
        self._shard = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._names = np.array([k.encode("utf-8", "surrogateescape") for k in keys])
        self._labels, self.classes = _number_labels(raw_labels, kind, (index or {}).get("classes"))

    def _load_members(self, index: Optional[dict]) -> bool:
        """Take the member table the writer saved next to its index (``<prefix>-members.npz``: each sample's
        shard, offset, size, name and ``cls`` label) instead of walking every shard's headers, when ``data.path``
        is that index and no shard changed size since. A walk reads a page per member, on a cold cluster file
        system most of the data; the table is ~40 bytes per sample."""
        if not index or not index.get("members") or any("bytes" not in e for e in index["shardlist"]):
            return False
        table = Path(index["__dir__"]) / index["members"]
        if not table.is_file() or [os.path.getsize(s) for s in self.shards] != [e["bytes"] for e in index["shardlist"]]:
            return False
        with np.load(table) as t:
            self._shard, self._offsets, self._sizes = t["shard"], t["offsets"], t["sizes"]
            self._names, labels = t["names"], t["labels"]
            self.skipped_no_image = int(t["skipped_no_image"])
        if self._kind is None:
            self._labels, self.classes = np.full(len(labels), -1, dtype=np.int64), []
        else:  # the source's labels as written (-1: unlabelled, no .cls member)
            k = int(labels.max()) + 1 if len(labels) else 0
            names = index.get("classes") or []
            self._labels, self.classes = labels.astype(np.int64), list(names) if len(names) >= k else [str(c) for c in range(k)]
        return True

    def __len__(self) -> int:
        return len(self._names)

    def _fd(self, s: int) -> int:
        if self._fd_pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._fd_pid = OrderedDict(), os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            if len(self._fds) >= self._max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        else:
            self._fds.move_to_end(s)
        return fd

    def _read(self, i: int) -> bytes:
        try:
            size = int(self._sizes[i])
            data = os.pread(self._fd(int(self._shard[i])), size, int(self._offsets[i]))
            if len(data) != size:
                raise OSError(f"short read: {len(data)} of {size} bytes (shard truncated?)")
            return data
        except OSError as e:
            raise UnreadableImageError(_unreadable_msg(self.describe(i), e), self.describe(i)) from e

    def describe(self, i: int) -> str:
        i = int(i)
        return f"{self.shards[int(self._shard[i])]}::{self._names[i].decode('utf-8', 'surrogateescape')}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"], state["_fd_pid"] = OrderedDict(), None  # each process opens its own descriptors
        return state

    def __del__(self) -> None:
        try:
            if getattr(self, "_fd_pid", None) == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
        except Exception:  # interpreter shutdown
            pass


def _group_members(names: list[str], offsets: list[int], sizes: list[int]) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Consecutive members with the same key -> [(key, [(ext, offset, size), ...])] (hidden names skipped)."""
    out: list[tuple[str, list[tuple[str, int, int]]]] = []
    for name, off, size in zip(names, offsets, sizes):
        if posixpath.basename(name).startswith(".") or "__MACOSX" in name:
            continue
        key, ext = _split_key(name)
        if out and out[-1][0] == key:
            out[-1][1].append((ext, off, size))
        else:
            out.append((key, [(ext, off, size)]))
    return out


def _parse_label(raw: bytes, kind: str, field: Optional[list[str]], where: str) -> Any:
    try:
        if field is None:
            return int(raw.decode("utf-8").strip())
        value: Any = json.loads(raw)
        for part in field:
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is neither an integer nor a class name")
        return value
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        what = f"field {'.'.join(field)}" if field else "an integer"
        raise DataError(f"{where}: cannot read the label as {what} ({type(e).__name__}: {e}). Fix: set "
                        f"data.label_key to the member / json field with the label, or null") from e


def _number_labels(raw: list[Any], kind: Optional[str], index_classes: Optional[list[str]]) -> tuple[np.ndarray, list[str]]:
    if kind is None:
        return np.full(len(raw), -1, dtype=np.int64), []
    if all(isinstance(v, int) for v in raw):
        labels = np.asarray(raw, dtype=np.int64)
        k = int(labels.max()) + 1
        if labels.min() < 0:
            raise DataError(f"negative label {int(labels.min())} in the shards: labels must be 0..K-1")
        classes = list(index_classes) if index_classes and len(index_classes) >= k else [str(c) for c in range(k)]
        return labels, classes
    names = sorted({str(v) for v in raw})
    number = {c: k for k, c in enumerate(names)}
    return np.asarray([number[str(v)] for v in raw], dtype=np.int64), names


def _fd_budget(n_shards: int) -> int:
    """How many shard descriptors a process keeps open: all of them when the open-file limit allows
    (raising the soft limit toward the hard one), else an LRU of the limit minus a reserve."""
    reserve = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n_shards + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return max(16, n_shards if soft == resource.RLIM_INFINITY else min(n_shards, soft - reserve))


# ----------------------------------------------------------------------------------------- writer
def _encoded(source: Any, i: int) -> tuple[bytes, str]:
    """Sample ``i`` of ``source`` as (encoded bytes, extension): the file's own bytes for encoded-file
    sources, else lossless PNG of the pixels."""
    base, j = source, int(i)
    while hasattr(base, "indices") and hasattr(base, "base"):  # SubsetSource chains
        base, j = base.base, int(base.indices[j])
    if isinstance(base, _EncodedSource):
        data, name = base._read(j), base.describe(j).rsplit("/", 1)[-1]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext not in _IMAGE_EXTS:  # e.g. a Hugging Face row: the format from the bytes
            with Image.open(io.BytesIO(data)) as im:
                ext = (im.format or "png").lower().replace("jpeg", "jpg")
        return data, ext
    image, _ = base[j]
    if isinstance(image, torch.Tensor):  # (3, H, W) uint8
        image = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def write_shards(source: Any, out: Union[str, Path], shard_size: int = 10000, prefix: str = "train",
                 shuffle: bool = True, seed: int = 0, max_shard_bytes: float = 3e9,
                 progress: bool = True) -> dict[str, Any]:
    """Write ``source`` as WebDataset shards ``<out>/<prefix>-000000.tar ...`` (at most ``shard_size``
    samples / ``max_shard_bytes`` bytes each; in a seeded random order with ``shuffle``, so streaming readers
    get mixed classes too) and the index ``<out>/<prefix>-index.json``. Each sample: ``<key>.<ext>`` (the
    image), ``<key>.cls`` (its label; none for unlabelled samples) and ``<key>.json`` (label, class name,
    where it came from). The key is the sample's position in ``source``. Returns the index."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")):
        raise ConfigError(f"{out} already holds {prefix}-*.tar shards. Fix: choose another out= or prefix=, or "
                          f"delete them")
    n = len(source)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    labels = source.labels()
    width = max(8, len(str(n - 1)))
    from tqdm import tqdm

    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=int(shard_size), maxsize=float(max_shard_bytes), verbose=0) as sink:
        for i in tqdm(order, desc=f"[sslkit] shards -> {out}", disable=not progress, unit="img"):
            data, ext = _encoded(source, int(i))
            label = int(labels[i])
            sample: dict[str, Any] = {"__key__": f"{int(i):0{width}d}", ext: data,
                                      "json": json.dumps({"label": label, "class": source.classes[label] if label >= 0 else None,
                                                          "source": source.describe(int(i))}).encode()}
            if label >= 0:
                sample["cls"] = str(label).encode()
            sink.write(sample)
    files = sorted(out.glob(f"{prefix}-*.tar"))
    table = WebDatasetSource([str(f) for f in files], label_key=None)  # header walks; samples in written order
    assert len(table) == n, f"wrote {n} samples, found {len(table)}"
    counts = np.bincount(table._shard, minlength=len(files)).tolist()
    np.savez(out / f"{prefix}-members.npz", shard=table._shard, offsets=table._offsets, sizes=table._sizes,
             names=table._names, labels=np.asarray(labels)[order].astype(np.int64), skipped_no_image=0)
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": prefix,
             "shardlist": [{"url": f.name, "nsamples": c, "bytes": f.stat().st_size} for f, c in zip(files, counts)],
             "classes": list(source.classes), "members": f"{prefix}-members.npz"}
    (out / f"{prefix}-index.json").write_text(json.dumps(index, indent=1))
    return index
