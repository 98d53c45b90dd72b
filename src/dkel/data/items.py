"""One image from a user's `Dataset` item, as the uint8 CHW tensor every data path works on.

A user's dataset may yield a PIL image, a CHW tensor (uint8, or float in [0, 1]) or an HWC uint8
array; the resident cache and the streaming backend both read items through this one function, so
they accept exactly the same datasets."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError


def to_uint8_chw(image: Any, where: str = "item") -> Tensor:
    """uint8 [C, H, W] from a PIL image, a CHW tensor (uint8 or float in [0, 1]) or an HWC uint8 array."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        array = np.array(image)  # a copy: PIL's buffer is read-only
        return torch.from_numpy(np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1)))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise DataError(f"{where}: a numpy image must be uint8 HWC or HW, got {image.dtype} "
                            f"with shape {image.shape}")
        array = image[..., None] if image.ndim == 2 else image
        if array.shape[-1] not in (1, 3):
            raise DataError(f"{where}: a numpy image must be HWC with 1 or 3 channels, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if isinstance(image, Tensor):
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise DataError(f"{where}: a tensor image must be CHW with 1 or 3 channels, got shape "
                            f"{tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.contiguous()
        if image.is_floating_point():
            lo, hi = image.min().item(), image.max().item()
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise DataError(f"{where}: a float tensor image must hold values in [0, 1], got "
                                f"[{lo:.3g}, {hi:.3g}] (pass it before normalisation)")
            return (image * 255).round_().clamp_(0, 255).to(torch.uint8).contiguous()
        raise DataError(f"{where}: a tensor image must be uint8 or float, got {image.dtype}")
    raise DataError(f"{where}: the image must be a PIL image, a CHW tensor or an HWC uint8 array, "
                    f"got {type(image).__name__}")


def split_item(item: Any, where: str = "item") -> tuple[Any, int]:
    """(image, label) of one dataset item, with the label as a Python int."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{where}: a dataset must yield (image, label) pairs, got {type(item).__name__}"
                        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
    image, label = item[0], item[1]
    if isinstance(label, Tensor):
        if label.numel() != 1:
            raise DataError(f"{where}: the label must be one integer class index, got a tensor of shape "
                            f"{tuple(label.shape)}")
        label = label.item()
    if isinstance(label, (np.integer,)):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: the label must be an integer class index, got {label!r}")
    if label < 0:
        raise DataError(f"{where}: the label must be >= 0, got {label}")
    return image, label
