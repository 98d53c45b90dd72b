"""Datasets: the registry of readers and recipe facts, the resident (decoded, device-resident)
representation, and the way from a dataset's name to the samples either data backend reads."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .. import files
from ..errors import DataError, StorageError
from ..registry import Registry
from . import sources
from .cache import Skipped, in_memory, read_cache, write_cache, write_rows
from .loader import ViewLoader, crop_flip, eval_batches
from .recipes import RECIPES, Recipe
from .samples import DatasetSamples, FileSamples, TarSamples, TensorSamples, find_shards, tar_classes
from .sources import Listing, Splits

log = logging.getLogger("dkel")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Source:
    """A dataset ready for either backend: class names, both splits as samples, its fingerprint."""

    classes: list[str]
    train: Any  # samples (see samples.py)
    test: Any
    fingerprint: str
    splits: Optional[Splits] = None  # the decoded arrays, for datasets that come that way

    @classmethod
    def of(cls, read: Union[Splits, Listing, "Source"]) -> "Source":
        if isinstance(read, Splits):
            return cls(read.classes, TensorSamples(read.train_images, read.train_labels, "train"),
                       TensorSamples(read.test_images, read.test_labels, "test"), read.fingerprint(), read)
        if isinstance(read, Listing):
            return cls(read.classes, FileSamples(read.train), FileSamples(read.test), read.fingerprint())
        return read


@dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset and the recipe facts that belong to it."""

    read: Callable[[Path], Union[Splits, Listing, Source]]  # root -> arrays, image files or samples
    mean: Optional[tuple[float, ...]]  # None: measured on the train split
    std: Optional[tuple[float, ...]]
    pad: int  # zero padding of the cifar recipe's random crop, pixels (-1: an eighth of the size)
    flip: bool
    download: Optional[Callable[[Path], None]] = None
    needs_dir: bool = True
    # the paper's schedule length for this dataset, the reference for time_scale=auto
    # (None: no recipe, the time constants stay the paper's unless the run sets paper_epochs)
    paper_epochs: Optional[int] = None
    recipe: str = "cifar"  # the augmentation recipe unless recipe= overrides it
    image_size: Optional[int] = None  # default input size (None: the images' own)


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
    recipe: Optional[Recipe] = None
    fingerprint: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        """The side of the images the network sees."""
        return self.recipe.size if self.recipe and self.recipe.size else self.train_images.shape[-1]

    def to(self, device) -> "ImageData":
        for split in ("train", "test"):
            for kind in ("images", "labels"):
                attr = f"{split}_{kind}"
                setattr(self, attr, getattr(self, attr).to(device))
        return self


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _cifar(classes: int):
    def read(root: Path) -> Union[Splits, Listing]:
        folder = sources.find_cifar_pickles(root, classes)
        if folder is not None:
            return sources.load_cifar_pickles(folder, classes)
        if (root / "train").is_dir() and (root / "test").is_dir():
            listing = sources.list_image_folder(root)
            if len(listing.classes) != classes:
                raise DataError(f"{root}: found {len(listing.classes)} class folders, CIFAR-{classes} has {classes}")
            return listing
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


def read_shards(root: Path) -> Source:
    """Tar shards in WebDataset layout: train/*.tar and val/ (or test/) *.tar, or *train*.tar and
    *val*.tar (or *test*.tar) in the root; classes.txt (optional) names the labels."""
    found = [find_shards(root, ("train",)), find_shards(root, ("val", "test"))]
    if found[0] is None or found[1] is None:
        raise DataError(f"{root} needs tar shards for train (train/*.tar or *train*.tar) and for val "
                        "(val/*.tar, test/*.tar, *val*.tar or *test*.tar)")
    train, test = TarSamples(found[0], "train"), TarSamples(found[1], "val")
    classes = tar_classes(root, train, test)
    h = hashlib.sha256("\0".join(classes).encode() + train.digest() + test.digest())
    return Source(classes, train, test, h.hexdigest())


_read_c10, _dl_c10 = _cifar(10)
_read_c100, _dl_c100 = _cifar(100)
# digits has no paper; its demo runs take CIFAR's 300 epochs as the length of the paper's time
# constants, so that the 30-epoch default run stretches them (printed at the start of every run)
DATASETS.register("digits", "scikit-learn 8x8 handwritten digits, 10 classes, embedded (no download); no paper "
                            "recipe: time_scale=auto takes CIFAR's 300 epochs")(
    DatasetSpec(lambda root: sources.load_digits(), None, None, pad=1, flip=False, needs_dir=False,
                paper_epochs=300))
DATASETS.register("cifar10", "CIFAR-10 (official pickles via --download, or train/ + test/ image folders)")(
    DatasetSpec(_read_c10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, _dl_c10, paper_epochs=300))
DATASETS.register("cifar100", "CIFAR-100 (official pickles via --download, or train/ + test/ image folders)")(
    DatasetSpec(_read_c100, (0.5071, 0.4866, 0.4409), (0.2675, 0.2565, 0.2761), 4, True, _dl_c100,
                paper_epochs=300))
DATASETS.register("fashion-mnist", "Fashion-MNIST 28x28 (IDX files, .gz or raw; --download)")(
    DatasetSpec(sources.load_fashion, (0.2860,), (0.3530,), 2, True, _download_fashion))
DATASETS.register("tinyimagenet", "Tiny ImageNet-200, 64x64 (raw release layout or sorted val/)")(
    DatasetSpec(sources.list_tinyimagenet, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), 4, True,
                paper_epochs=100, image_size=64))
DATASETS.register("imagefolder", "any train/ + val/ (or test/) folders of class subfolders")(
    DatasetSpec(sources.list_image_folder, None, None, pad=-1, flip=True))
DATASETS.register("imagenet", "ILSVRC2012 (train/ class folders; val/ as class folders, or flat with "
                  "LOC_val_solution.csv or the devkit), imagenet recipe at 224")(
    DatasetSpec(sources.list_imagenet, IMAGENET_MEAN, IMAGENET_STD, 0, True, paper_epochs=90,
                recipe="imagenet", image_size=224))
DATASETS.register("webdataset", "tar shards in WebDataset layout (<key>.jpg + <key>.cls), train and val")(
    DatasetSpec(read_shards, None, None, pad=-1, flip=True))


PYTHON_PREFIX = "python:"  # datasets handed to dkel.fit as objects: they live only in that process


def register_user_dataset(name: str, make: Callable[[Optional[Path]], tuple], description: str, *,
                          mean=None, std=None, pad: int = -1, flip: bool = True, needs_dir: bool = False,
                          classes=None, replace: bool = False) -> DatasetSpec:
    """Dataset `name` from `make(data_dir) -> (train, test)` torch Datasets (read by either backend)."""
    def read(root: Path) -> Source:
        pair = make(root if needs_dir else None)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"dataset {name!r} must give a (train, test) pair of Datasets, got {type(pair).__name__}")
        return user_source(*pair, classes=classes)

    spec = DatasetSpec(read, None if mean is None else tuple(mean), None if std is None else tuple(std), pad, flip,
                       needs_dir=needs_dir)
    if replace:
        DATASETS.unregister(name)
    DATASETS.register(name, description)(spec)
    return spec


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


def cache_folder(name: str, root: Path, size: Optional[int], cache_dir: Optional[str]) -> Path:
    key = hashlib.sha1(f"{name}|{root.resolve()}|{size}".encode()).hexdigest()[:16]
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{name}-{key}"


def fill_from(source: Source, fit: Optional[Callable[[Tensor], Tensor]], on_bad: str, skipped: Skipped):
    """The cache writer's fill(split, allocate): decoded arrays are copied (resized if `fit`), image
    samples decoded row by row."""
    def fill(split: str, allocate):
        if source.splits is not None:
            images = getattr(source.splits, f"{split}_images")
            labels = getattr(source.splits, f"{split}_labels")
            first = fit(images[:1]) if fit else images[:1]
            out = allocate((len(images), *first.shape[1:]))
            for start in range(0, len(images), 4096):
                chunk = images[start:start + 4096]
                out[start:start + len(chunk)] = (fit(chunk) if fit else chunk).numpy()
            return out, labels.numpy()
        return write_rows(getattr(source, split), fit or (lambda x: x), allocate, on_bad, skipped, fit is not None)
    return fill


def decoded(name: str, spec: DatasetSpec, source: Source, root: Optional[Path], recipe: Recipe,
            cache_dir: Optional[str], on_bad: str) -> tuple[Splits, str, list[str]]:
    """(uint8 splits at the recipe's stored size, fingerprint, skipped images), through the on-disk
    cache when the dataset has a folder (rebuilt whenever its files change)."""
    fit = recipe.fit if recipe.size is not None else None
    if source.splits is not None and (fit is None or source.splits.train_images.shape[-2:] == (recipe.stored_size,) * 2):
        return source.splits, content_fingerprint(source.splits), []
    skipped = Skipped()
    if root is None:  # a user's Dataset: decoded into memory, nothing to key a cache by
        arrays = {}
        for split in ("train", "test"):
            images, labels = fill_from(source, fit, on_bad, skipped)(split, in_memory)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = torch.from_numpy(images), torch.from_numpy(labels)
        splits = Splits(**arrays, classes=source.classes).check(name)
        return splits, content_fingerprint(splits), list(skipped)
    path = cache_folder(name, root, recipe.stored_size if fit else None, cache_dir)
    stamp = tree_fingerprint(root)
    cached = read_cache(path, stamp)
    if cached is None:
        log.info("decoding %s from %s (once; cached in %s)", name, root, path)
        try:
            write_cache(path, stamp, source.classes, "", fill_from(source, fit, on_bad, skipped), skipped)
            cached = read_cache(path, stamp)
        except OSError as e:
            log.warning("%s; continuing without a dataset cache", files.storage_error(path, e))
        if cached is None:
            skipped.clear()
            return decoded(name, spec, source, None, recipe, cache_dir, on_bad)
    splits, meta = cached
    if meta["skipped"] and on_bad == "error":
        raise DataError(f"cannot read image {meta['skipped'][0]} (on_bad_image=skip skips such files; "
                        f"{len(meta['skipped'])} were skipped when the cache was built)")
    return splits, content_fingerprint(splits), meta["skipped"]


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


def locate(name: str, data_dir: Optional[str], download: bool = False) -> tuple[DatasetSpec, Optional[Path]]:
    """The dataset's spec and folder (None for embedded data), checked to exist."""
    if name.startswith(PYTHON_PREFIX) and name not in DATASETS:
        raise DataError(f"dataset {name!r} was given to dkel.fit as Python objects, which only that process "
                        "holds; pass them again from Python (dkel.evaluate(run, data=(train, test)))")
    spec = DATASETS.get(name)
    if not spec.needs_dir:
        return spec, None
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
    return spec, root


def open_source(name: str, data_dir: Optional[str] = None, *,
                download: bool = False) -> tuple[DatasetSpec, Optional[Path], Source]:
    """A dataset as samples, from the registry by name (a user's Datasets are registered there too)."""
    spec, root = locate(name, data_dir, download)
    source = Source.of(spec.read(root if root is not None else Path(".")))
    if len(source.classes) < 2:
        raise DataError(f"{root or name}: found {len(source.classes)} class ({', '.join(source.classes)}); "
                        "a classifier needs at least two")
    return spec, root, source


def user_source(train: Any, test: Any, classes: Optional[list[str]] = None) -> Source:
    """A user's (train, test) map-style Datasets as samples.  Classes: `classes`, else the train
    Dataset's `classes`, else "0", "1", ... up to the largest label."""
    samples = [DatasetSamples(d, split) for d, split in ((train, "train"), (test, "test"))]
    labels = [s.labels() for s in samples]
    if min(len(x) for x in labels) == 0:
        raise DataError("the train and test datasets must each hold at least one item")
    if classes is None:
        classes = getattr(train, "classes", None)
    largest = int(max(x.max() for x in labels))
    if classes is None:
        classes = [str(i) for i in range(largest + 1)]
    elif len(classes) <= largest:
        raise DataError(f"the dataset names {len(classes)} classes but uses label {largest}")
    h = hashlib.sha256("\0".join(map(str, classes)).encode())
    for x in labels:
        h.update(np.ascontiguousarray(x, dtype=np.int64).tobytes())
    return Source([str(c) for c in classes], *samples, h.hexdigest())


def resolve_recipe(spec: DatasetSpec, source: Source, recipe: str = "auto",
                   image_size: Optional[int] = None) -> Recipe:
    """The dataset's recipe (or `recipe`), at image_size, else the dataset's size, else 224 for the
    imagenet recipe, else the images' own size (None: all images must then have one size; a pad
    of -1, an eighth of it, is settled by `sized` once that size is known)."""
    name = spec.recipe if recipe == "auto" else recipe
    if name not in RECIPES:
        raise DataError(f"recipe must be one of auto, {', '.join(RECIPES)}, got {recipe!r}")
    size = image_size or spec.image_size or (224 if name == "imagenet" else None)
    pad = spec.pad if spec.pad >= 0 or size is None else max(1, size // 8)
    return Recipe(name, size, pad if name == "cifar" else 0, spec.flip)


def sized(recipe: Recipe, side: int) -> Recipe:
    """The recipe once the images' own side is known (settles a pad of an eighth of it)."""
    return dataclasses.replace(recipe, pad=max(1, side // 8)) if recipe.pad < 0 else recipe


def native_side(source: Source) -> int:
    if source.splits is not None:
        return source.splits.train_images.shape[-1]
    for i in range(min(len(source.train), 16)):  # the first readable image
        try:
            return source.train.load(i)[0].shape[-1]
        except sources.BadImage:
            continue
    raise DataError(f"none of the first training images can be read (e.g. {source.train.name(0)})")


def load_dataset(name: str, data_dir: Optional[str] = None, *, download: bool = False,
                 image_size: Optional[int] = None, train_subset: Optional[int] = None,
                 cache_dir: Optional[str] = None, recipe: str = "auto", on_bad_image: str = "error") -> ImageData:
    """The resident representation: every image decoded at the recipe's stored size."""
    spec, root, source = open_source(name, data_dir, download=download)
    rec = resolve_recipe(spec, source, recipe, image_size)
    return resident_data(name, spec, root, source, rec, cache_dir=cache_dir, train_subset=train_subset,
                         on_bad_image=on_bad_image)


def resident_data(name: str, spec: DatasetSpec, root: Optional[Path], source: Source, rec: Recipe, *,
                  cache_dir: Optional[str], train_subset: Optional[int], on_bad_image: str) -> ImageData:
    splits, fingerprint, skipped = decoded(name, spec, source, root, rec, cache_dir, on_bad_image)
    splits.check(name)
    rec = sized(rec, splits.train_images.shape[-1])
    if spec.mean is not None and len(spec.mean) != splits.train_images.shape[1]:
        raise DataError(f"{name}: expected {len(spec.mean)}-channel images, got {splits.train_images.shape[1]}")
    mean, std = (spec.mean, spec.std) if spec.mean is not None else channel_stats(rec.centre(splits.train_images))
    train_x, train_y = splits.train_images, splits.train_labels
    if train_subset is not None:
        idx = balanced_subset(train_y, train_subset, len(splits.classes))
        train_x, train_y = train_x[idx], train_y[idx]
    return ImageData(name, splits.classes, train_x, train_y, splits.test_images, splits.test_labels,
                     tuple(mean), tuple(std), rec.pad, spec.flip, spec, rec, fingerprint, skipped)


__all__ = ["DATASETS", "DatasetSpec", "ImageData", "Source", "Splits", "ViewLoader", "crop_flip",
           "eval_batches", "load_dataset", "open_source"]
