"""A user's own torch `Dataset`s as dkel splits.

Items are `(image, label)` with the image a PIL image, a CHW tensor (uint8 or float in [0, 1]) or an
HWC uint8 array (`items.py`).  The class count comes from the labels (or the dataset's `classes`
attribute, or what the user passes); every bad item is a one-line error naming its split and index."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from .items import split_item, to_uint8_chw
from .sources import Splits


def decode_split(dataset: Any, split: str, image_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """uint8 [N, C, H, W] images and int64 labels of every item of a map-style dataset."""
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"the {split} dataset must be a map-style Dataset (with len() and [i]), got "
                        f"{type(dataset).__name__}") from None
    if n == 0:
        raise DataError(f"the {split} dataset is empty")
    images, labels = [], []
    for i in range(n):
        where = f"{split} item {i}"
        try:
            item = dataset[i]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reading {where} failed: {type(e).__name__}: {e}") from None
        image, label = split_item(item, where)
        x = to_uint8_chw(image, where)
        if image_size is not None and x.shape[1:] != (image_size, image_size):
            x = F.interpolate(x[None].float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        if images and x.shape != images[0].shape:
            if x.shape[1:] != images[0].shape[1:]:
                raise DataError(f"{where} is {tuple(x.shape)} but {split} item 0 is {tuple(images[0].shape)}: "
                                "images must share one size (set image_size=N to resize them all)")
            x, images = _same_channels(x, images)
        images.append(x)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _same_channels(x: Tensor, images: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Gray and colour images mixed: make them all colour, as image files are read."""
    if x.shape[0] == 1:
        return x.expand(3, -1, -1).contiguous(), images
    return x, [im.expand(3, -1, -1).contiguous() if im.shape[0] == 1 else im for im in images]


def class_names(train: Any, labels: Tensor, classes: Optional[Sequence[str]]) -> list[str]:
    count = int(labels.max()) + 1
    if classes is None:
        found = getattr(train, "classes", None)
        if isinstance(found, (list, tuple)) and all(isinstance(c, str) for c in found) and len(found) >= count:
            classes = found
    if classes is None:
        return [str(i) for i in range(count)]
    classes = [str(c) for c in classes]
    if len(classes) < count:
        raise DataError(f"labels go up to {count - 1} but only {len(classes)} class names were given")
    return classes


def user_splits(train: Any, test: Any, classes: Optional[Sequence[str]] = None,
                image_size: Optional[int] = None) -> Splits:
    train_x, train_y = decode_split(train, "train", image_size)
    test_x, test_y = decode_split(test, "test", image_size)
    if train_x.shape[1] != test_x.shape[1]:
        train_x, test_x = (x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x for x in (train_x, test_x))
    names = class_names(train, torch.cat([train_y, test_y]), classes)
    return Splits(train_x, train_y, test_x, test_y, names)
