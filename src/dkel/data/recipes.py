"""Augmentation recipes: how one image becomes K training views or one evaluation view.

`cifar`: the image at the input size (shorter side resized and centre-cropped if it is not
already square at that size), zero-padded random crop and horizontal flip.  `imagenet`:
RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and flip for training; shorter side resized to
size*256/224 and a centre crop of `size` for evaluation.  Neither squashes a non-square image.

The random parameters of a view are one pure function, `uniforms`, of (seed, epoch, sample
index, view): a counter-based hash, so a view is the same whichever process or worker makes it
and whatever was drawn before it.  The stream backend calls it per sample in its workers; the
resident backend calls it for a whole batch on the host and applies the crops on the device.
(The resident `cifar` path keeps its own per-epoch draw, so its results stay what they were.)"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

RECIPES = ("cifar", "imagenet")


def _functional():
    """torchvision's v2 functional transforms, imported when first used (importing them loads
    torchvision.models, about 1.5 s, which training on the cifar recipe never needs)."""
    import torchvision.transforms.v2.functional as functional

    return functional
ATTEMPTS = 10  # RandomResizedCrop's tries before it falls back to a centre crop


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (arithmetic wraps modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _u64(value) -> np.ndarray:
    """Any integers (negative epochs too) as uint64, two's complement."""
    return np.asarray(value, dtype=np.int64).astype(np.uint64)


def uniforms(seed: int, epoch: int, index, view, count: int) -> np.ndarray:
    """Floats in [0, 1): shape broadcast(index, view) + (count,), a pure function of its arguments."""
    with np.errstate(over="ignore"):
        h = _mix(_mix(_mix(_u64(seed)) ^ _u64(epoch)) ^ _u64(index))
        h = _mix(h ^ _mix(_u64(view)))
        h = _mix(h[..., None] ^ np.arange(count, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _randint(u: np.ndarray, n) -> np.ndarray:
    """Integers uniform in [0, n) from floats in [0, 1)."""
    return np.minimum((u * n).astype(np.int64), np.asarray(n) - 1)


def resized_crop_boxes(u: np.ndarray, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's (top, left, h, w) from 4*ATTEMPTS uniforms per view (torchvision's algorithm).

    u: [..., >= 4*ATTEMPTS]; height, width broadcast against u[..., 0]."""
    height, width = np.asarray(height, dtype=np.int64), np.asarray(width, dtype=np.int64)
    area = (height * width)[..., None].astype(np.float64)
    a = ATTEMPTS
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0:a])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., a:2 * a])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width[..., None]) & (h <= height[..., None])
    first = ok.argmax(-1)[..., None]
    pick = lambda x: np.take_along_axis(x, first, -1)[..., 0]
    h_try, w_try = pick(h), pick(w)
    top_try = _randint(pick(u[..., 2 * a:3 * a]), height - h_try + 1)
    left_try = _randint(pick(u[..., 3 * a:4 * a]), width - w_try + 1)
    # the fallback: a centre crop at the nearest allowed aspect ratio
    in_ratio = width / height
    w_fb = np.where(in_ratio > ratio[1], np.round(height * ratio[1]).astype(np.int64), width)
    h_fb = np.where(in_ratio < ratio[0], np.round(width / ratio[0]).astype(np.int64), height)
    found = ok.any(-1)
    h_out, w_out = np.where(found, h_try, h_fb), np.where(found, w_try, w_fb)
    top = np.where(found, top_try, (height - h_fb) // 2)
    left = np.where(found, left_try, (width - w_fb) // 2)
    return top, left, h_out, w_out


@dataclass(frozen=True)
class Recipe:
    name: str  # cifar | imagenet
    size: Optional[int]  # the network's input side (cifar only may leave it None: the images' own)
    pad: int = 0  # cifar: zero padding of the random crop
    flip: bool = True

    @property
    def resize(self) -> Optional[int]:
        """imagenet: the shorter side before the evaluation centre crop (256 for 224)."""
        return int(round(self.size * 256 / 224)) if self.name == "imagenet" else self.size

    @property
    def stored_size(self) -> Optional[int]:
        """Side of an image as the resident backend keeps it."""
        return self.resize

    @property
    def slots(self) -> int:
        """Uniforms a view takes."""
        return 4 * ATTEMPTS + 1 if self.name == "imagenet" else 3

    def params(self, seed: int, epoch: int, index, views: int) -> np.ndarray:
        """[..., views, slots] uniforms for sample(s) `index`."""
        return uniforms(seed, epoch, np.asarray(index)[..., None], np.arange(views), self.slots)

    # ------------------------------------------------------------------------- one image
    def fit(self, image: Tensor, side: Optional[int] = None) -> Tensor:
        """Shorter side resized to `side` (default: stored size), then the central square; without a
        size, the image as it is."""
        side = side or self.stored_size
        if side is None or image.shape[-2:] == (side, side):
            return image
        if min(image.shape[-2:]) != side:
            image = _functional().resize(image, side, antialias=True)
        return _functional().center_crop(image, [side, side])

    def eval_view(self, image: Tensor) -> Tensor:
        """uint8 [C, size, size]: the image as evaluation sees it."""
        return self.centre(self.fit(image))

    def centre(self, images: Tensor) -> Tensor:
        """The evaluation crop of stored images ([..., C, stored, stored])."""
        return images if self.name == "cifar" else _functional().center_crop(images, [self.size, self.size])

    def train_views(self, image: Tensor, u: np.ndarray) -> Tensor:
        """uint8 [K, C, size, size] from one decoded image and its [K, slots] uniforms."""
        if self.name == "cifar":
            image = zero_pad(self.fit(image), self.pad)
            top, left = _randint(u[:, 0], 2 * self.pad + 1), _randint(u[:, 1], 2 * self.pad + 1)
            h, w = image.shape[-2] - 2 * self.pad, image.shape[-1] - 2 * self.pad
            views = [image[:, t:t + h, l:l + w] for t, l in zip(top.tolist(), left.tolist())]
        else:
            top, left, h, w = resized_crop_boxes(u, image.shape[-2], image.shape[-1])
            views = [_functional().resize(image[:, t:t + hh, l:l + ww], [self.size, self.size], antialias=True)
                     for t, l, hh, ww in zip(top.tolist(), left.tolist(), h.tolist(), w.tolist())]
        flips = (u[:, -1] < 0.5) & self.flip
        return torch.stack([v.flip(-1) if f else v for v, f in zip(views, flips.tolist())])

    # ------------------------------------------------------------------------- a batch on the device
    def resized_crops(self, images: Tensor, u: np.ndarray, channels_last: bool) -> Tensor:
        """imagenet training views of stored square images: [B, C, S, S] uint8 and [B, K, slots]
        uniforms -> [K, B, C, size, size] float (integer values, as the stream's uint8)."""
        from torchvision.ops import roi_align

        b, c, side, _ = images.shape
        k = u.shape[1]
        top, left, h, w = (torch.from_numpy(np.ascontiguousarray(a.T)).to(images.device, torch.float32)
                           for a in resized_crop_boxes(u, side, side))  # [K, B]
        batch = torch.arange(b, device=images.device, dtype=torch.float32).expand(k, b)
        boxes = torch.stack([batch, left, top, left + w, top + h], -1).reshape(-1, 5)
        out = roi_align(images.float(), boxes, self.size, 1.0, -1, aligned=True).round_()
        out = out.view(k, b, c, self.size, self.size)
        flips = torch.from_numpy(np.ascontiguousarray((u[..., -1] < 0.5).T & self.flip)).to(images.device)
        out = torch.where(flips[..., None, None, None], out.flip(-1), out)
        if channels_last:
            out = out.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return out


def zero_pad(image: Tensor, pad: int) -> Tensor:
    return torch.nn.functional.pad(image, (pad, pad, pad, pad)) if pad else image

