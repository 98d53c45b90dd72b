"""Readers of each dataset's files: array formats straight into uint8 tensors ([N, C, H, W]) and labels,
image files into a `Listing` (paths and labels) that either data backend decodes."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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

    def fingerprint(self) -> str:
        """Identity of the data: class names and every array's bytes."""
        h = hashlib.sha256("\0".join(self.classes).encode())
        for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


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
class BadImage(Exception):
    """An image that cannot be read or decoded: `name` says which, the message also why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name


class PathList:
    """Many relative paths in two numpy arrays instead of a list of str objects: no per-item Python
    objects, so forked loader workers do not copy its pages by touching reference counts."""

    def __init__(self, paths: list[str]):
        encoded = [p.encode() for p in paths]
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = self.ends[i - 1] if i else 0
        return self.blob[start:self.ends[i]].tobytes().decode()

    def digest(self) -> bytes:
        return hashlib.sha1(self.ends.tobytes() + self.blob.tobytes()).digest()


@dataclass
class FileList:
    """Image files of one split: paths relative to `root`, and their labels."""

    root: Path
    paths: PathList
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def subset(self, index: np.ndarray) -> "FileList":
        return FileList(self.root, PathList([self.paths[int(i)] for i in index]), self.labels[index])


@dataclass
class Listing:
    """An image-file dataset before decoding: what both data backends read."""

    classes: list[str]
    train: FileList
    test: FileList

    def fingerprint(self) -> str:
        """Identity of the data: class names, and every split's relative paths and labels (not the
        file times, so a copy of the dataset on another machine has the same fingerprint)."""
        h = hashlib.sha256("\0".join(self.classes).encode())
        for split in (self.train, self.test):
            h.update(split.paths.digest())
            h.update(split.labels.astype(np.int64).tobytes())
        return h.hexdigest()


try:  # deprecated in torchvision 0.29 in favour of TorchCodec, but still 1.2x faster than PIL here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                            DeprecationWarning)
except ImportError:  # a torchvision without its image decoders: PIL decodes everything
    decode_image = None


def decode_image_bytes(data: bytes | Tensor, name: str) -> Tensor:
    """uint8 [3, H, W] from the bytes of an image file: torchvision's decoder (faster than PIL, the same
    pixels for JPEG), PIL for formats it does not read."""
    raw = data if isinstance(data, Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if decode_image is not None:
        try:
            return decode_image(raw, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw.numpy().tobytes())) as img:
            array = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise BadImage(name, "not an image in a format PIL or torchvision can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(name, str(e)) from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def decode_file(path: Path) -> Tensor:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise BadImage(str(path), e.strerror or str(e)) from None
    if raw.size == 0:
        raise BadImage(str(path), "empty file")
    return decode_image_bytes(torch.from_numpy(raw), str(path))


def _walk(folder: Path) -> list[str]:
    """Image files below `folder`, relative to it, in the order of their path components."""
    found = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(folder / rel if rel else folder) as it:
            for entry in it:
                sub = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    stack.append(sub)
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(sub)
    return sorted(found, key=lambda p: p.split("/"))


def class_folders(split_dir: Path) -> dict[str, list[str]]:
    """{class: image paths relative to split_dir} for an ImageFolder split (`<split>/<class>/**/<image>`);
    a class folder without images is left out, with a warning naming it."""
    out = {}
    for d in sorted(p.name for p in split_dir.iterdir() if p.is_dir()):
        images = _walk(split_dir / d)
        if images:
            out[d] = [f"{d}/{p}" for p in images]
        else:
            log.warning("class folder %s holds no images; class %r is left out", split_dir / d, d)
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


def labelled_split(root: Path, by_class: dict[str, list[str]], classes: list[str]) -> FileList:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c, files in by_class.items():
        paths += files
        labels += [index[c]] * len(files)
    return FileList(root, PathList(paths), np.asarray(labels, dtype=np.int64))


def list_image_folder(root: Path, test_names=("val", "test")) -> Listing:
    train_dir = root / "train"
    test_dir = next((root / n for n in test_names if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root} needs a train/ folder and a {' or '.join(t + '/' for t in test_names)} "
                        "folder, each holding one subfolder of images per class")
    train = class_folders(train_dir)
    classes = list(train)
    test = class_folders(test_dir)
    check_classes(classes, test, f"{test_dir.name}/")
    return Listing(classes, labelled_split(train_dir, train, classes), labelled_split(test_dir, test, classes))


def flat_split(folder: Path, names: list[str], wnids: list[str], classes: list[str], source: str) -> FileList:
    """A flat folder of images labelled by class name, from an annotation file."""
    check_classes(classes, wnids, source)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{source} names {len(missing)} images that are not in {folder} (first: {missing[0]})")
    index = {c: i for i, c in enumerate(classes)}
    order = sorted(range(len(names)), key=lambda i: names[i])
    return FileList(folder, PathList([names[i] for i in order]),
                    np.asarray([index[wnids[i]] for i in order], dtype=np.int64))


# ----------------------------------------------------------------------------- Tiny ImageNet
def list_tinyimagenet(root: Path) -> Listing:
    """The raw release (train/<wnid>/images/, val/images/ + val/val_annotations.txt) or an
    already sorted layout (train/<wnid>/, val/<wnid>/).  Classes in sorted wnid order."""
    if not (root / "val" / "images").is_dir():
        return list_image_folder(root, test_names=("val",))
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"{root / 'val'} has an images/ folder but no val_annotations.txt to label it")
    train = class_folders(root / "train")
    classes = list(train)
    names, wnids = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations}:{n}: expected '<file>\\t<wnid>...', got {line!r}")
        names.append(fields[0])
        wnids.append(fields[1])
    if not names:
        raise DataError(f"{annotations} lists no images")
    check_classes(classes, wnids, "val/val_annotations.txt")
    test = FileList(root / "val" / "images", PathList(names),
                    np.asarray([classes.index(w) for w in wnids], dtype=np.int64))
    missing = [n for n in names if not (root / "val" / "images" / n).is_file()]
    if missing:
        raise DataError(f"{annotations}: image {root / 'val' / 'images' / missing[0]} does not exist")
    return Listing(classes, labelled_split(root / "train", train, classes), test)


# ----------------------------------------------------------------------------- ImageNet
def _imagenet_dirs(root: Path) -> tuple[Path, Path]:
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):  # the second: Kaggle's layout
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base / "train", base / "val"
    raise DataError(f"{root} has no train/ and val/ folders (nor ILSVRC/Data/CLS-LOC/train and val)")


def _find(root: Path, names: list[str]) -> Optional[Path]:
    for name in names:
        for base in (root, root.parent):
            if (base / name).is_file():
                return base / name
    return None


def _devkit_files(root: Path) -> Optional[tuple[bytes, bytes]]:
    """(meta.mat, validation ground truth) of the ILSVRC2012 devkit, extracted or as its .tar.gz."""
    folder = root / "ILSVRC2012_devkit_t12" / "data"
    if (folder / "meta.mat").is_file() and (folder / "ILSVRC2012_validation_ground_truth.txt").is_file():
        return (folder / "meta.mat").read_bytes(), (folder / "ILSVRC2012_validation_ground_truth.txt").read_bytes()
    archive = root / "ILSVRC2012_devkit_t12.tar.gz"
    if archive.is_file():
        import tarfile

        try:
            with tarfile.open(archive) as tar:
                return tuple(tar.extractfile(f"ILSVRC2012_devkit_t12/data/{n}").read()  # type: ignore
                             for n in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt"))
        except (tarfile.TarError, KeyError, OSError) as e:
            raise DataError(f"cannot read {archive}: {e}") from None
    return None


def devkit_wnids(meta_mat: bytes, source: str) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} of the 1000 leaf synsets in the devkit's meta.mat."""
    import io

    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise DataError(f"{source}: not the devkit's meta.mat ({e})") from None


def list_imagenet(root: Path) -> Listing:
    """ILSVRC2012: train/<wnid>/*.JPEG, and val/ either as class folders, or flat, labelled by
    LOC_val_solution.csv (Kaggle) or by the devkit (ILSVRC2012_devkit_t12[.tar.gz] in the root)."""
    train_dir, val_dir = _imagenet_dirs(root)
    train = class_folders(train_dir)
    classes = list(train)
    train_list = labelled_split(train_dir, train, classes)
    if any(p.is_dir() for p in val_dir.iterdir()):
        val = class_folders(val_dir)
        check_classes(classes, val, "val/")
        return Listing(classes, train_list, labelled_split(val_dir, val, classes))
    solution = _find(root, ["LOC_val_solution.csv"])
    if solution is not None:
        names, wnids = [], []
        rows = solution.read_text().splitlines()
        for n, line in enumerate(rows[1:], 2):
            if not line.strip():
                continue
            image_id, _, prediction = line.partition(",")
            if not prediction.strip():
                raise DataError(f"{solution}:{n}: expected 'ImageId,PredictionString', got {line!r}")
            names.append(image_id.strip() + ".JPEG")
            wnids.append(prediction.split()[0])
        return Listing(classes, train_list, flat_split(val_dir, names, wnids, classes, solution.name))
    devkit = _devkit_files(root)
    if devkit is not None:
        by_id = devkit_wnids(devkit[0], "ILSVRC2012_devkit_t12/data/meta.mat")
        try:
            ids = [int(v) for v in devkit[1].decode().split()]
        except ValueError:
            raise DataError("ILSVRC2012_validation_ground_truth.txt must hold one class id per line") from None
        unknown = sorted(set(ids) - set(by_id))
        if unknown:
            raise DataError(f"ILSVRC2012_validation_ground_truth.txt uses class id {unknown[0]}, not in meta.mat")
        names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(ids) + 1)]
        return Listing(classes, train_list, flat_split(val_dir, names, [by_id[i] for i in ids], classes,
                                                       "the devkit's validation ground truth"))
    raise DataError(f"{val_dir} holds images but no class folders, and no LOC_val_solution.csv or "
                    "ILSVRC2012_devkit_t12 (folder or .tar.gz) was found in "
                    f"{root} to label them")
