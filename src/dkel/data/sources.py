"""Readers that turn each dataset's files into uint8 tensors ([N, C, H, W]) and labels."""
from __future__ import annotations

import gzip
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

log = logging.getLogger("dkel")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Splits:
    train_images: Tensor  # uint8 [N, C, H, W]
    train_labels: Tensor  # int64 [N]
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]

    def check(self, source: str) -> "Splits":
        """Structural sanity of decoded data (also used to reject a damaged cache)."""
        if len(self.classes) < 2:
            raise DataError(f"{source}: found {len(self.classes)} class ({', '.join(self.classes)}); a classifier "
                            "needs at least two")
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if len(images) == 0:
                raise DataError(f"{source}: the {split} split has no images")
            if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
                raise DataError(f"{source}: malformed {split} split")
            if labels.min() < 0 or labels.max() >= len(self.classes):
                raise DataError(f"{source}: {split} labels outside 0..{len(self.classes) - 1}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(f"{source}: train images are {tuple(self.train_images.shape[1:])} but "
                            f"test images are {tuple(self.test_images.shape[1:])}")
        return self


def hwc_to_tensor(array: np.ndarray) -> Tensor:
    """[N, H, W, C] or [N, H, W] uint8 -> [N, C, H, W]."""
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def labels_tensor(labels) -> Tensor:
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


# ----------------------------------------------------------------------------- digits
def load_digits() -> Splits:
    """scikit-learn's 8x8 handwritten digits; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(images, d.target, test_size=0.2, stratify=d.target,
                                              random_state=0)
    return Splits(hwc_to_tensor(x_tr), labels_tensor(y_tr), hwc_to_tensor(x_te), labels_tensor(y_te),
                  [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read CIFAR file {path}: {e}") from None


def _cifar_rows(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    d = _unpickle(path)
    try:
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, list(d[label_key])
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} is not in the CIFAR pickle layout ({e})") from None


def find_cifar_pickles(root: Path, classes: int) -> Path | None:
    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    marker = "data_batch_1" if classes == 10 else "train"
    for candidate in (root / folder, root):
        if (candidate / marker).is_file():
            return candidate
    return None


def load_cifar_pickles(folder: Path, classes: int) -> Splits:
    if classes == 10:
        parts = [_cifar_rows(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
        test = _cifar_rows(folder / "test_batch", "labels")
        names = _unpickle(folder / "batches.meta")["label_names"]
    else:
        parts = [_cifar_rows(folder / "train", "fine_labels")]
        test = _cifar_rows(folder / "test", "fine_labels")
        names = _unpickle(folder / "meta")["fine_label_names"]
    if len(names) != classes:
        raise DataError(f"{folder}: expected {classes} class names, found {len(names)}")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = sum((p[1] for p in parts), [])
    return Splits(torch.from_numpy(train_x), labels_tensor(train_y), torch.from_numpy(test[0]),
                  labels_tensor(test[1]), list(names))


# ----------------------------------------------------------------------------- Fashion-MNIST
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}")
    return data.reshape(shape).copy()  # frombuffer is read-only


def find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root / "FashionMNIST" / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion(root: Path) -> Splits:
    files = {}
    for key in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"):
        path = find_idx(root, key)
        if path is None:
            raise DataError(f"Fashion-MNIST file {key}[.gz] not found under {root} "
                            "(looked in FashionMNIST/raw/, raw/ and the folder itself)")
        files[key] = read_idx(path)
    return Splits(hwc_to_tensor(files["train-images-idx3-ubyte"]),
                  labels_tensor(files["train-labels-idx1-ubyte"]),
                  hwc_to_tensor(files["t10k-images-idx3-ubyte"]),
                  labels_tensor(files["t10k-labels-idx1-ubyte"]), list(FASHION_CLASSES))


# ----------------------------------------------------------------------------- image files
def decode_images(paths: list[Path], size: int | None, channels: int = 3) -> Tensor:
    """Decode image files into one uint8 [N, C, S, S] tensor (resized to `size` if given)."""
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                return np.asarray(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(decode, paths, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}); "
                        "set image_size=N to resize them all")
    return hwc_to_tensor(np.stack(arrays))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """{class: image paths} for an ImageFolder-style split (`<split>/<class>/**/<image>`); a class
    folder without images is left out, with a warning naming it."""
    out = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        images = list_images(d)
        if images:
            out[d.name] = images
        else:
            log.warning("class folder %s holds no images; class %r is left out", d, d.name)
    if not out:
        raise DataError(f"{split_dir} has no class folders with images")
    return out


def check_classes(classes: list[str], found, split: str) -> None:
    missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    if missing or extra:
        detail = "; ".join(f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for what, names in (("missing", missing), ("not in train/", extra)) if names)
        raise DataError(f"class mismatch between splits: train/ has {len(classes)} classes, "
                        f"{split} has {len(set(found))} ({detail})")


def labelled_split(by_class: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c, files in by_class.items():
        paths += files
        labels += [index[c]] * len(files)
    return paths, labels


def load_image_folder(root: Path, size: int | None, test_names=("val", "test")) -> Splits:
    train_dir = root / "train"
    test_dir = next((root / n for n in test_names if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root} needs a train/ folder and a {' or '.join(t + '/' for t in test_names)} "
                        "folder, each holding one subfolder of images per class")
    train = class_folders(train_dir)
    classes = list(train)
    test = class_folders(test_dir)
    check_classes(classes, test, f"{test_dir.name}/")
    train_paths, train_labels = labelled_split(train, classes)
    test_paths, test_labels = labelled_split(test, classes)
    return Splits(decode_images(train_paths, size), labels_tensor(train_labels),
                  decode_images(test_paths, size), labels_tensor(test_labels), classes)


# ----------------------------------------------------------------------------- Tiny ImageNet
def load_tinyimagenet(root: Path, size: int = 64) -> Splits:
    """The raw release (train/<wnid>/images/, val/images/ + val/val_annotations.txt) or an
    already sorted layout (train/<wnid>/, val/<wnid>/).  Classes in sorted wnid order."""
    if not (root / "val" / "images").is_dir():
        return load_image_folder(root, size, test_names=("val",))
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"{root / 'val'} has an images/ folder but no val_annotations.txt to label it")
    train = class_folders(root / "train")
    classes = list(train)
    index = {c: i for i, c in enumerate(classes)}
    train_paths, train_labels = labelled_split(train, classes)
    test_paths, wnids = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations}:{n}: expected '<file>\\t<wnid>...', got {line!r}")
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise DataError(f"{annotations}:{n}: image {path} does not exist")
        test_paths.append(path)
        wnids.append(fields[1])
    if not test_paths:
        raise DataError(f"{annotations} lists no images")
    check_classes(classes, wnids, "val/val_annotations.txt")
    test_labels = [index[w] for w in wnids]
    return Splits(decode_images(train_paths, size), labels_tensor(train_labels),
                  decode_images(test_paths, size), labels_tensor(test_labels), classes)
