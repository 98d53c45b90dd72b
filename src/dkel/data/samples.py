"""One image at a time, from wherever a split lives: image files, tar shards, arrays, a user's Dataset.

Every kind answers `len`, `load(i) -> (uint8 [C, H, W], label)` and `name(i)` (for messages), and
raises `BadImage` for an image it cannot read.  The stream backend's workers call `load`; the
resident cache is written through the same calls, so both backends read the same pixels."""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor

from ..errors import DataError, DkelError
from .items import split_item, to_uint8_chw
from .sources import IMAGE_EXTENSIONS, BadImage, FileList, PathList, decode_file, decode_image_bytes


class FileSamples:
    def __init__(self, files: FileList):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[Tensor, int]:
        return decode_file(self.files.path(i)), int(self.files.labels[i])

    def name(self, i: int) -> str:
        return str(self.files.path(i))

    def labels(self) -> np.ndarray:
        return self.files.labels


class TensorSamples:
    """Images already decoded into one uint8 [N, C, H, W] tensor (array formats: pickles, IDX)."""

    def __init__(self, images: Tensor, labels: Tensor, split: str):
        self.images, self.label_tensor, self.split = images, labels, split

    def __len__(self) -> int:
        return len(self.label_tensor)

    def load(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.label_tensor[i])

    def name(self, i: int) -> str:
        return f"{self.split} image {i}"

    def labels(self) -> np.ndarray:
        return self.label_tensor.numpy()


class DatasetSamples:
    """A user's map-style Dataset yielding (image, label): a PIL image, a CHW tensor (uint8 or float
    in [0, 1]) or an HWC uint8 array.  A wrong item type is the user's bug, not a bad image: it
    raises DataError whatever on_bad_image says."""

    def __init__(self, dataset: Any, split: str):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise DataError(f"the {split} dataset must be a map-style Dataset (with __getitem__ and "
                            f"__len__), got {type(dataset).__name__}")
        self.dataset, self.split = dataset, split

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> tuple[Tensor, int]:
        where = self.name(i)
        try:
            item = self.dataset[i]
        except DkelError:
            raise
        except Exception as e:  # the user's own loading code failed on this item
            raise BadImage(where, f"{type(e).__name__}: {e}") from None
        image, label = split_item(item, where)
        return to_uint8_chw(image, where), label

    def name(self, i: int) -> str:
        return f"{self.split} item {i}"

    def labels(self) -> np.ndarray:
        targets = getattr(self.dataset, "targets", None)
        if targets is not None and len(targets) == len(self):
            return np.asarray(targets, dtype=np.int64)
        return np.asarray([split_item(self.dataset[i], self.name(i))[1] for i in range(len(self))], dtype=np.int64)


# ----------------------------------------------------------------------------- WebDataset tar shards
LABEL_EXTENSIONS = ("cls", "label")


class TarSamples:
    """Samples of tar shards in WebDataset layout (`<key>.jpg` + `<key>.cls` with the class index),
    read by offset: each shard is indexed once (headers and labels only), then any sample is one
    seek and one read, so order, workers and processes need no shard-level shuffling and a run is
    as deterministic as with image files.  Shards must be seekable files (a local or mounted
    network file system), not URLs."""

    def __init__(self, shards: list[Path], split: str):
        self.shards = [str(s) for s in shards]
        self.split = split
        shard_ids, offsets, sizes, labels, keys = [], [], [], [], []
        for sid, shard in enumerate(shards):
            for key, (offset, size), label in self._index(shard):
                shard_ids.append(sid)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
                keys.append(key)
        if not labels:
            raise DataError(f"the {split} shards ({shards[0].parent}) hold no image with a .cls label")
        self.shard_id = np.asarray(shard_ids, dtype=np.int32)
        self.offset = np.asarray(offsets, dtype=np.int64)
        self.size = np.asarray(sizes, dtype=np.int64)
        self.label_array = np.asarray(labels, dtype=np.int64)
        self.keys = PathList(keys)
        self._open: dict[int, Any] = {}

    @staticmethod
    def _index(shard: Path):
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    if "." not in base:
                        continue
                    key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                    ext = base.split(".", 1)[1].lower()
                    if "." + ext in IMAGE_EXTENSIONS:
                        images[key] = (member.offset_data, member.size)
                    elif ext in LABEL_EXTENSIONS:
                        text = tar.extractfile(member).read().decode().strip()  # type: ignore[union-attr]
                        try:
                            labels[key] = int(text)
                        except ValueError:
                            raise DataError(f"{shard}: {member.name} holds {text!r}, not a class index") from None
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read tar shard {shard}: {e}") from None
        for key in sorted(images):
            if key in labels:
                yield key, images[key], labels[key]

    def __len__(self) -> int:
        return len(self.label_array)

    def __getstate__(self):  # open file descriptors stay with the process that opened them
        return {**self.__dict__, "_open": {}}

    def load(self, i: int) -> tuple[Tensor, int]:
        sid = int(self.shard_id[i])
        try:
            fd = self._open.get(sid)
            if fd is None:
                fd = self._open[sid] = os.open(self.shards[sid], os.O_RDONLY)
            data = os.pread(fd, int(self.size[i]), int(self.offset[i]))  # no shared file position: thread-safe
        except OSError as e:
            raise BadImage(self.name(i), e.strerror or str(e)) from None
        return decode_image_bytes(data, self.name(i)), int(self.label_array[i])

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.shard_id[i])]}:{self.keys[i]}"

    def labels(self) -> np.ndarray:
        return self.label_array

    def digest(self) -> bytes:
        return hashlib.sha1(self.keys.digest() + self.label_array.tobytes()).digest()


def find_shards(root: Path, split_names: tuple[str, ...]) -> Optional[list[Path]]:
    """The .tar shards of a split: <root>/<split>/*.tar, or <root>/*<split>*.tar."""
    for name in split_names:
        folder = root / name
        if folder.is_dir():
            shards = sorted(folder.glob("*.tar"))
            if shards:
                return shards
        shards = sorted(p for p in root.glob(f"*{name}*.tar") if p.is_file())
        if shards:
            return shards
    return None


def tar_classes(root: Path, *splits: TarSamples) -> list[str]:
    """classes.txt (one name per line, in label order) if the root has one, else "0", "1", ..."""
    largest = max(int(s.label_array.max()) for s in splits)
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) <= largest:
            raise DataError(f"{names_file} names {len(names)} classes but a shard uses label {largest}")
        return names
    return [str(i) for i in range(largest + 1)]

