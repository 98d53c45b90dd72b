"""Datasets as device-resident uint8 tensors, and the multi-view loader that augments them."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import files
from ..errors import DataError, StorageError
from ..registry import Registry
from . import sources
from .loader import ViewLoader, crop_flip, eval_batches
from .sources import Splits

log = logging.getLogger("dkel")
CACHE_FORMAT = 2  # 2: the content fingerprint is stored beside the splits


@dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset and the recipe facts that belong to it."""

    read: Callable[[Path, Optional[int]], Splits]  # (root, image_size) -> splits
    mean: Optional[tuple[float, ...]]  # None: measured on the train split
    std: Optional[tuple[float, ...]]
    pad: int  # zero padding of the random crop, pixels
    flip: bool
    download: Optional[Callable[[Path], None]] = None
    needs_dir: bool = True
    # the paper's schedule length for this dataset, the reference for time_scale=auto
    # (None: no recipe, the time constants stay the paper's unless the run sets paper_epochs)
    paper_epochs: Optional[int] = None


@dataclass
class ImageData:
    name: str
    classes: list[str]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool
    spec: DatasetSpec
    fingerprint: str  # of the full decoded splits and class names (recorded by every run)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    def to(self, device) -> "ImageData":
        for split in ("train", "test"):
            for kind in ("images", "labels"):
                attr = f"{split}_{kind}"
                setattr(self, attr, getattr(self, attr).to(device))
        return self


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _cifar(classes: int):
    def read(root: Path, size: Optional[int]) -> Splits:
        folder = sources.find_cifar_pickles(root, classes)
        if folder is not None:
            return sources.load_cifar_pickles(folder, classes)
        if (root / "train").is_dir() and (root / "test").is_dir():
            splits = sources.load_image_folder(root, size)
            if len(splits.classes) != classes:
                raise DataError(f"{root}: found {len(splits.classes)} class folders, CIFAR-{classes} has {classes}")
            return splits
        official = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
        raise DataError(f"no CIFAR-{classes} data in {root}: expected {official}/ (add --download to fetch it) "
                        "or train/ and test/ folders of class subfolders")

    def download(root: Path) -> None:
        from torchvision import datasets as tvd

        cls = tvd.CIFAR10 if classes == 10 else tvd.CIFAR100
        for train in (True, False):
            cls(str(root), train=train, download=True)

    return read, download


def _download_fashion(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)


_read_c10, _dl_c10 = _cifar(10)
_read_c100, _dl_c100 = _cifar(100)
# digits has no paper; its demo runs take CIFAR's 300 epochs as the length of the paper's time
# constants, so that the 30-epoch default run stretches them (printed at the start of every run)
DATASETS.register("digits", "scikit-learn 8x8 handwritten digits, 10 classes, embedded (no download); no paper "
                            "recipe: time_scale=auto takes CIFAR's 300 epochs")(
    DatasetSpec(lambda root, size: sources.load_digits(), None, None, pad=1, flip=False, needs_dir=False,
                paper_epochs=300))
DATASETS.register("cifar10", "CIFAR-10 (official pickles via --download, or train/ + test/ image folders)")(
    DatasetSpec(_read_c10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, _dl_c10, paper_epochs=300))
DATASETS.register("cifar100", "CIFAR-100 (official pickles via --download, or train/ + test/ image folders)")(
    DatasetSpec(_read_c100, (0.5071, 0.4866, 0.4409), (0.2675, 0.2565, 0.2761), 4, True, _dl_c100,
                paper_epochs=300))
DATASETS.register("fashion-mnist", "Fashion-MNIST 28x28 (IDX files, .gz or raw; --download)")(
    DatasetSpec(lambda root, size: sources.load_fashion(root), (0.2860,), (0.3530,), 2, True, _download_fashion))
DATASETS.register("tinyimagenet", "Tiny ImageNet-200, 64x64 (raw release layout or sorted val/)")(
    DatasetSpec(lambda root, size: sources.load_tinyimagenet(root, size or 64), (0.4802, 0.4481, 0.3975),
                (0.2302, 0.2265, 0.2262), 4, True, paper_epochs=100))
DATASETS.register("imagefolder", "any train/ + val/ (or test/) folders of class subfolders")(
    DatasetSpec(lambda root, size: sources.load_image_folder(root, size), None, None, pad=-1, flip=True))


def default_cache_dir() -> Path:
    env = os.environ.get("DKEL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dkel"


def tree_fingerprint(root: Path) -> str:
    """Changes whenever a file under `root` is added, removed, resized or touched."""
    h = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def content_fingerprint(splits: Splits) -> str:
    """Identifies the decoded data itself: every image, label and class name."""
    h = hashlib.sha1("\0".join(splits.classes).encode())
    for tensor in (splits.train_labels, splits.test_labels, splits.train_images, splits.test_images):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def cached_read(name: str, spec: DatasetSpec, root: Path, image_size: Optional[int],
                cache_dir: Optional[Path]) -> tuple[Splits, str]:
    """(splits, content fingerprint), decoded once into a uint8 cache keyed by the source files and
    rebuilt when they change; without a writable cache it runs uncached."""
    fingerprint = tree_fingerprint(root)
    key = hashlib.sha1(f"{name}|{root.resolve()}|{image_size}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    path = (cache_dir or default_cache_dir()) / f"{name}-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get("fingerprint") == fingerprint and blob.get("format") == CACHE_FORMAT:
                return Splits(**blob["splits"]).check(f"cache {path}"), blob["content"]
            log.info("dataset cache %s is stale; rebuilding", path)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("dataset cache %s is unreadable (%s); rebuilding", path, e)
    log.info("decoding %s from %s (once; cached in %s)", name, root, path)
    splits = spec.read(root, image_size).check(str(root))
    content = content_fingerprint(splits)
    try:
        files.save_torch({"format": CACHE_FORMAT, "fingerprint": fingerprint, "content": content,
                          "splits": vars(splits)}, path)
    except StorageError as e:
        log.warning("%s; continuing without a dataset cache", e)
    return splits, content


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1]."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).transpose(0, 1).reshape(c, -1) / 255.0
        total += x.sum(1)
        sq += (x * x).sum(1)
    n = images.numel() / c
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def balanced_subset(labels: Tensor, n: int, num_classes: int) -> Tensor:
    """Indices of a fixed class-balanced subset of size n (the same for every seed and method)."""
    if n < num_classes:
        raise DataError(f"train_subset={n} is smaller than the number of classes ({num_classes})")
    if n > len(labels):
        raise DataError(f"train_subset={n} exceeds the {len(labels)} training images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    per_class = [order[labels[order] == c] for c in range(num_classes)]
    quota = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    short = [c for c in range(num_classes) if len(per_class[c]) < quota[c]]
    if short:
        raise DataError(f"train_subset={n}: class {short[0]} has only {len(per_class[short[0]])} images")
    return torch.cat([idx[:q] for idx, q in zip(per_class, quota)]).sort().values


def load_dataset(name: str, data_dir: Optional[str] = None, *, download: bool = False,
                 image_size: Optional[int] = None, train_subset: Optional[int] = None,
                 cache_dir: Optional[str] = None) -> ImageData:
    spec = DATASETS.get(name)
    if not spec.needs_dir:
        splits = spec.read(Path("."), image_size).check(name)
        content = content_fingerprint(splits)
    else:
        root = Path(data_dir) if data_dir else Path("data") / name
        if download:
            if spec.download is None:
                raise DataError(f"dataset {name!r} cannot be downloaded by dkel; point --data-dir at a local copy")
            root.mkdir(parents=True, exist_ok=True)
            spec.download(root)
        hint = " (add --download to fetch it)" if spec.download else ""
        if not root.exists():
            raise DataError(f"data directory {root} does not exist{hint}")
        if not root.is_dir():
            raise DataError(f"data directory {root} is not a directory")
        if not any(root.iterdir()):
            raise DataError(f"data directory {root} is empty{hint}")
        splits, content = cached_read(name, spec, root, image_size, Path(cache_dir) if cache_dir else None)
    if spec.mean is not None and len(spec.mean) != splits.train_images.shape[1]:
        raise DataError(f"{name}: expected {len(spec.mean)}-channel images, got {splits.train_images.shape[1]}")
    mean, std = (spec.mean, spec.std) if spec.mean is not None else channel_stats(splits.train_images)
    train_x, train_y = splits.train_images, splits.train_labels
    if train_subset is not None:
        idx = balanced_subset(train_y, train_subset, len(splits.classes))
        train_x, train_y = train_x[idx], train_y[idx]
    pad = spec.pad if spec.pad >= 0 else max(1, splits.train_images.shape[-1] // 8)
    return ImageData(name, splits.classes, train_x, train_y, splits.test_images, splits.test_labels,
                     tuple(mean), tuple(std), pad, spec.flip, spec, content)


__all__ = ["DATASETS", "DatasetSpec", "ImageData", "Splits", "ViewLoader", "crop_flip", "eval_batches",
           "load_dataset"]
