"""Tensor-resident batches of K augmented views (the resident backend's loader).

The whole uint8 image set lives on the training device.  Each epoch's permutation comes from a
generator seeded by (seed, epoch), and so, for the cifar recipe, do its crop offsets and flips,
drawn up front; the imagenet recipe's crops come from the recipe's per-sample function.  An epoch
is therefore reproducible on its own (exact resume) and independent of how many processes share
it; each batch is then one gather (cifar) or one roi_align (imagenet) on the device."""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """The order of an epoch, the same for every backend and recipe."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Global batches of an epoch; a final one too small for BatchNorm (< 2 per process) is dropped."""
    full = math.ceil(n / batch_size)
    last = n - (full - 1) * batch_size
    return full - (1 if last // world < 2 else 0)


def shard(batch: int, batch_size: int, n: int, rank: int, world: int) -> range:
    """Positions in the epoch's order that process `rank` takes of global batch `batch`."""
    return range(batch * batch_size + rank, min((batch + 1) * batch_size, n), world)


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, pad: int,
              channels_last: bool) -> Tensor:
    """Random crops with zero padding and horizontal flips, all samples and views at once.

    images: [B, C, H, W] uint8; top/left/flip: [K, B] with offsets in [0, 2*pad].
    Returns [K, B, C, H, W] uint8, laid out channels-last per image if asked.  Every
    output pixel is one row of a [pixels, C] table, so the whole batch is one gather."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    table = padded.permute(0, 2, 3, 1).reshape(-1, c)  # [B * Hp * Wp, C]
    hp, wp = h + 2 * pad, w + 2 * pad
    k = top.shape[0]
    dev = images.device
    rows = top[..., None] + torch.arange(h, device=dev)  # [K, B, H]
    ar = torch.arange(w, device=dev)
    cols = left[..., None] + torch.where(flip[..., None].bool(), w - 1 - ar, ar)  # [K, B, W]
    index = (torch.arange(b, device=dev)[None, :, None, None] * hp + rows[..., None]) * wp + cols[:, :, None, :]
    out = table.index_select(0, index.flatten()).view(k, b, h, w, c).permute(0, 1, 4, 2, 3)
    return out if channels_last else out.contiguous()


class Normalize:
    """uint8 -> float, (x/255 - mean)/std folded into one multiply-add."""

    def __init__(self, mean, std, device):
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        self.scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device) / std_t).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


class ViewLoader:
    """Training batches: (views [K, B, C, H, W] float, labels [B]).

    `batch_size` is the global batch; with `world` processes each takes every
    `world`-th sample of it.  A final batch too small for BatchNorm (< 2 samples per
    process) is dropped."""

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, views: int, pad: int,
                 flip: bool, mean, std, seed: int, rank: int = 0, world: int = 1,
                 channels_last: bool = False):
        self.images, self.labels = images, labels
        self.batch_size, self.views, self.pad, self.flip = batch_size, views, pad, flip
        self.seed, self.rank, self.world = seed, rank, world
        self.channels_last = channels_last
        self.normalize = Normalize(mean, std, images.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def unsharded(self) -> "ViewLoader":
        """The same batches, whole, as a single process would see them."""
        clone = copy.copy(self)
        clone.rank, clone.world = 0, 1
        return clone

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.set_epoch(epoch)
        return iter(self)

    def stream(self, first_epoch: int = -1) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches without end, from epochs first_epoch, first_epoch - 1, ... (negative epochs
        are draws that training itself never uses)."""
        epoch = first_epoch
        while True:
            yield from self.batches(epoch)
            epoch -= 1

    @property
    def num_batches(self) -> int:
        return batches_per_epoch(len(self.labels), self.batch_size, self.world)

    def __len__(self) -> int:
        return self.num_batches

    def draw(self, epoch: int) -> tuple[Tensor, ...]:
        """The epoch's permutation, crop offsets [N, K] x2 and flips [N, K]."""
        g = epoch_generator(self.seed, epoch)
        n, k = len(self.labels), self.views
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n, k), generator=g, dtype=torch.int64)
        flips = torch.randint(0, 2 if self.flip else 1, (n, k), generator=g, dtype=torch.int64)
        dev = self.images.device
        return perm.to(dev), offsets[0].to(dev), offsets[1].to(dev), flips.to(dev)

    def augment(self, epoch: int, pos: Tensor, idx: Tensor, drawn: tuple[Tensor, ...]) -> Tensor:
        """Views [K, B, C, H, W] of images `idx`, at positions `pos` of the epoch's order."""
        _, top, left, flips = drawn
        return crop_flip(self.images[idx], top[pos].T, left[pos].T, flips[pos].T, self.pad, self.channels_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        drawn = self.draw(epoch)
        perm = drawn[0]
        for i in range(self.num_batches):
            pos = torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(perm)),
                               device=perm.device)[self.rank::self.world]
            idx = perm[pos]
            yield self.normalize(self.augment(epoch, pos, idx, drawn)), self.labels[idx]


class ResizedCropLoader(ViewLoader):
    """The imagenet recipe on stored square images: each view's RandomResizedCrop and flip come from
    the recipe's pure function of (seed, epoch, index, view), as in the stream backend."""

    def __init__(self, images: Tensor, labels: Tensor, *, recipe, **kw):
        super().__init__(images, labels, pad=0, flip=recipe.flip, **kw)
        self.recipe = recipe

    def draw(self, epoch: int) -> tuple[Tensor, ...]:
        perm = epoch_permutation(self.seed, epoch, len(self.labels))
        return perm.to(self.images.device), perm

    def augment(self, epoch: int, pos: Tensor, idx: Tensor, drawn: tuple[Tensor, ...]) -> Tensor:
        index = drawn[1][pos.cpu()].numpy()
        u = self.recipe.params(self.seed, epoch, index, self.views)  # [B, K, slots]
        return self.recipe.resized_crops(self.images[idx], u, self.channels_last)


def eval_batches(images: Tensor, labels: Tensor, *, batch_size: int, mean, std, rank: int = 0,
                 world: int = 1, channels_last: bool = False,
                 crop: Callable[[Tensor], Tensor] = lambda x: x) -> Iterator[tuple[Tensor, Tensor]]:
    """Un-augmented test batches (`crop`: the recipe's evaluation crop of stored images); process r
    takes samples r, r+world, ... (no padding)."""
    normalize = Normalize(mean, std, images.device)
    idx_all = torch.arange(rank, len(labels), world, device=images.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for chunk in idx_all.split(batch_size):
        yield normalize(crop(images[chunk])).contiguous(memory_format=fmt), labels[chunk]
