"""The stream backend: images read, decoded and augmented by DataLoader workers as training goes.

Nothing of the dataset is held beyond its index (paths or offsets, labels), so memory does not grow
with the dataset.  Every item a worker gets names its split, position, sample and epoch; its views
come from the recipe's pure function of (seed, epoch, position, view), so batches are the same for
any number of workers, in any process, and after a resume.  Batches arrive in order as uint8
(a quarter of the bytes of floats), pinned on CUDA, and are copied to the device one batch ahead
and normalised there.  Unreadable images stop the run with the file's name, or with
on_bad_image=skip are left out of their batch, logged once and listed in `skipped`."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..errors import DataError, DkelError
from . import DatasetSpec, Source, balanced_subset, sized
from .backend import Batches, DataBackend
from .loader import Normalize, batches_per_epoch, epoch_permutation, shard
from .recipes import Recipe
from .sources import BadImage

log = logging.getLogger("dkel")
TRAIN, TEST, TRAIN_PLAIN = 0, 1, 2  # TRAIN_PLAIN: a training image as evaluation sees it (statistics)
STATS_IMAGES = 1024  # images that measure mean/std when the dataset does not state them


class ViewItems:
    """What a worker computes for one item (split, position, sample index, epoch)."""

    def __init__(self, train: Any, test: Any, recipe: Recipe, seed: int, views: int, channels: int,
                 shape: Optional[tuple[int, int]]):
        self.train, self.test, self.recipe = train, test, recipe
        self.seed, self.views, self.channels = seed, views, channels
        self.shape = shape  # every image's (H, W) when the recipe keeps the images' own size

    def __getitem__(self, item: tuple[int, int, int, int]):
        split, position, index, epoch = item
        samples = self.test if split == TEST else self.train
        try:
            image, label = samples.load(index)
        except BadImage as e:
            return None, -1, (e.name, str(e)), None
        except DkelError as e:  # a user's Dataset yields something no recipe can use
            return None, -1, None, str(e)
        if image.shape[0] != self.channels:
            if image.shape[0] == 1 and self.channels == 3:
                image = image.expand(3, -1, -1)
            else:
                return None, -1, None, f"{samples.name(index)} has {image.shape[0]} channels, earlier ones {self.channels}"
        if self.shape is not None and tuple(image.shape[-2:]) != self.shape:
            return None, -1, None, (f"images have different sizes ({samples.name(index)} is {tuple(image.shape[-2:])}, "
                                    f"the first {self.shape}); set image_size=N to resize them all")
        if split == TRAIN:
            out = self.recipe.train_views(image, self.recipe.params(self.seed, epoch, position, self.views))
        else:
            out = self.recipe.eval_view(image)[None]
        return out, label, None, None


class Collate:
    """Items -> (uint8 views [K, b, C, H, W], labels [b], unreadable (name, message), fatal messages)."""

    def __init__(self, channels_last: bool):
        self.channels_last = channels_last

    def __call__(self, items):
        good = [x for x in items if x[0] is not None]
        views = torch.stack([x[0] for x in good], 1) if good else torch.zeros(0, dtype=torch.uint8)
        if good and self.channels_last:  # per image channels-last, as the resident loader makes it
            views = views.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        labels = torch.tensor([x[1] for x in good], dtype=torch.int64)
        return views, labels, [x[2] for x in items if x[2]], [x[3] for x in items if x[3]]


class Plan:
    """The loader's batch sampler: yields the item lists of whichever pass was asked for last."""

    def __init__(self):
        self.make: Callable[[], Iterator[list]] = lambda: iter(())

    def __iter__(self):
        return self.make()


class StreamBackend(DataBackend):
    kind = "stream"

    def __init__(self, name: str, spec: DatasetSpec, source: Source, recipe: Recipe, *,
                 train_subset: Optional[int], num_workers: int, on_bad_image: str, **kw):
        self.source, self.on_bad = source, on_bad_image
        self.subset: Optional[np.ndarray] = None
        train_size = len(source.train)
        if train_subset is not None:
            labels = torch.from_numpy(np.asarray(source.train.labels(), dtype=np.int64))
            self.subset = balanced_subset(labels, train_subset, len(source.classes)).numpy()
            train_size = len(self.subset)
        first = self._first_image(source)
        recipe = sized(recipe, first.shape[-1])
        shape = None if recipe.size is not None else tuple(first.shape[-2:])
        channels = first.shape[0]
        image_size = recipe.size or first.shape[-1]
        super().__init__(name=name, classes=source.classes, mean=(0.0,) * channels, std=(1.0,) * channels,
                         in_channels=channels, image_size=image_size, fingerprint=source.fingerprint,
                         train_size=train_size, test_size=len(source.test), recipe=recipe,
                         paper_epochs=spec.paper_epochs, **kw)
        self.items = ViewItems(source.train, source.test, recipe, self.seed, self.views, channels, shape)
        self.plan = Plan()
        self.num_workers = num_workers
        self.loader = DataLoader(self.items, batch_sampler=self.plan, num_workers=num_workers,
                                 collate_fn=Collate(self.channels_last), pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                                 generator=torch.Generator())  # never touches the global RNG
        self.generation = 0
        self._skipped: dict[str, None] = {}
        if spec.mean is not None:
            self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        else:
            self.mean, self.std = self._measure_stats()
        self.normalize = Normalize(self.mean, self.std, self.device)

    @staticmethod
    def _first_image(source: Source) -> Tensor:
        for i in range(min(len(source.train), 16)):
            try:
                return source.train.load(i)[0]
            except BadImage:
                continue
        raise DataError(f"none of the first training images can be read (e.g. {source.train.name(0)})")

    def _index(self, position: int) -> int:
        return int(self.subset[position]) if self.subset is not None else position

    # ------------------------------------------------------------------------- passes
    def _train_plan(self, epoch: int, rank: int, world: int) -> Callable[[], Iterator[list]]:
        n, b = self.train_size, self.batch_size

        def make():
            order = epoch_permutation(self.seed, epoch, n).numpy()
            for i in range(batches_per_epoch(n, b, world)):
                yield [(TRAIN, int(j), self._index(int(j)), epoch) for j in order[shard(i, b, n, rank, world)]]
        return make

    def _note(self, bad: list[str], fatal: list[str]) -> None:
        if fatal:
            raise DataError(fatal[0])
        for name, message in bad:
            if self.on_bad == "error":
                raise DataError(f"cannot read image {message} (on_bad_image=skip skips such files)")
            if name not in self._skipped:
                self._skipped[name] = None
                self.skipped.append(message)
                log.warning("skipping unreadable image %s (%d skipped so far)", message, len(self.skipped))

    def _pass(self, make: Callable[[], Iterator[list]], normalize: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of one pass through the loader, copied to the device one batch ahead."""
        self.generation += 1
        generation = self.generation
        self.plan.make = make
        ahead = None
        for views, labels, bad, fatal in self.loader:
            if generation != self.generation:
                raise RuntimeError("a pass of the stream backend was taken up again after a newer one started")
            self._note(bad, fatal)
            if len(labels) == 0:
                raise DataError("every image of a batch was unreadable; see the skipped images in the log")
            moved = (views.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            if ahead is not None:
                yield ahead
            ahead = (self.normalize(moved[0]), moved[1]) if normalize else moved
        if ahead is not None:
            yield ahead

    def train_batches(self, epoch: int) -> Batches:
        return self._pass(self._train_plan(epoch, self.rank, self.world))

    def prepare_batches(self) -> Batches:
        epoch = -1
        while True:
            yield from self._pass(self._train_plan(epoch, 0, 1))
            epoch -= 1

    def eval_batches(self, batch_size: int) -> Batches:
        positions = np.arange(self.rank, self.test_size, self.world)

        def make():
            for start in range(0, len(positions), batch_size):
                yield [(TEST, int(i), int(i), 0) for i in positions[start:start + batch_size]]

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for views, labels in self._pass(make):
            yield views[0].contiguous(memory_format=fmt), labels

    def _measure_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the evaluation views of a fixed sample of training images."""
        n = self.train_size
        chosen = np.sort(epoch_permutation(0, 0, n).numpy()[:STATS_IMAGES])

        def make():
            for start in range(0, len(chosen), 64):
                yield [(TRAIN_PLAIN, int(j), self._index(int(j)), 0) for j in chosen[start:start + 64]]

        c = self.in_channels
        total, sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
        for views, _ in self._pass(make, normalize=False):
            x = views.cpu().to(torch.float64).transpose(0, 2).reshape(c, -1) / 255.0
            total += x.sum(1)
            sq += (x * x).sum(1)
            count += x.shape[1]
        mean = total / count
        std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
        log.info("mean/std measured on %d training images: %s / %s", len(chosen), mean.tolist(), std.tolist())
        return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
