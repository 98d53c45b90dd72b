"""The one interface between the engine and its data: a backend.

A backend serves this process's share of each epoch's training batches (views [K, B, C, H, W] and
labels [B], on the device, normalised), the unsharded endless stream that initialises teachers,
and this process's share of the evaluation set (exact: every test image once over all processes,
none padded); and it says what the data is (classes, normalisation, input size, fingerprint).
`resident` keeps the decoded dataset on the device (fastest, for data that fits); `stream` reads
and augments images in DataLoader workers as training goes (memory independent of the dataset's
size).  The engine uses only this interface; methods never see it."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from . import ImageData, Source, open_source, resident_data, resolve_recipe
from .loader import ResizedCropLoader, ViewLoader, batches_per_epoch, eval_batches
from .recipes import Recipe

log = logging.getLogger("dkel")
Batches = Iterator[tuple[Tensor, Tensor]]


class DataBackend:
    """What the engine asks of its data (see the module docstring)."""

    kind: str

    def __init__(self, *, name: str, classes: list[str], mean, std, in_channels: int, image_size: int,
                 fingerprint: str, train_size: int, test_size: int, recipe: Recipe,
                 paper_epochs: Optional[int], batch_size: int,
                 views: int, seed: int, rank: int, world: int, channels_last: bool, device: torch.device):
        self.name, self.classes = name, list(classes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_channels, self.image_size = in_channels, image_size
        self.fingerprint = fingerprint
        self.train_size, self.test_size = train_size, test_size
        self.recipe = recipe
        self.paper_epochs = paper_epochs  # the paper's length in epochs, time_scale=auto's reference
        self.batch_size, self.views, self.seed = batch_size, views, seed
        self.rank, self.world = rank, world
        self.channels_last, self.device = channels_last, device
        self.skipped: list[str] = []  # unreadable images skipped so far (on_bad_image=skip)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def steps(self, world: Optional[int] = None) -> int:
        """Batches per epoch for one process when `world` processes share it (default: this run's)."""
        return batches_per_epoch(self.train_size, self.batch_size, world or self.world)

    def train_batches(self, epoch: int) -> Batches:
        """This process's share of every global batch of `epoch`."""
        raise NotImplementedError

    def prepare_batches(self) -> Batches:
        """Whole global batches without end, from draws that training never uses (teacher initialisation)."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> Batches:
        """This process's share of the test split: samples rank, rank + world, ... (never padded)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes, if any."""


class ResidentBackend(DataBackend):
    kind = "resident"

    def __init__(self, data: ImageData, **kw):
        super().__init__(name=data.name, classes=data.classes, mean=data.mean, std=data.std,
                         in_channels=data.in_channels, image_size=data.image_size, fingerprint=data.fingerprint,
                         train_size=len(data.train_labels), test_size=len(data.test_labels), recipe=data.recipe,
                         paper_epochs=data.spec.paper_epochs, **kw)
        self.skipped = list(data.skipped)
        self.data = data.to(self.device)
        args = dict(batch_size=self.batch_size, views=self.views, mean=self.mean, std=self.std, seed=self.seed,
                    rank=self.rank, world=self.world, channels_last=self.channels_last)
        if self.recipe.name == "imagenet":
            self.loader = ResizedCropLoader(data.train_images, data.train_labels, recipe=self.recipe, **args)
        else:
            self.loader = ViewLoader(data.train_images, data.train_labels, pad=data.pad, flip=data.flip, **args)

    def train_batches(self, epoch: int) -> Batches:
        return self.loader.batches(epoch)

    def prepare_batches(self) -> Batches:
        return self.loader.unsharded().stream(-1)

    def eval_batches(self, batch_size: int) -> Batches:
        return eval_batches(self.data.test_images, self.data.test_labels, batch_size=batch_size, mean=self.mean,
                            std=self.std, rank=self.rank, world=self.world, channels_last=self.channels_last,
                            crop=self.recipe.centre)


# ----------------------------------------------------------------------------- choosing
def resident_bytes(source: Source, recipe: Recipe) -> int:
    """The decoded dataset's size at the recipe's stored size (an estimate for unsized image files)."""
    from . import native_side

    n = len(source.train) + len(source.test)
    if source.splits is not None:
        per = source.splits.train_images[0].numel()
        return n * (per if recipe.size is None else source.splits.train_images.shape[1] * recipe.stored_size ** 2)
    side = recipe.stored_size or native_side(source)
    return n * 3 * side * side


def memory_available() -> int:
    """Bytes the host can still give (MemAvailable), or its physical memory where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_budget(device: torch.device) -> tuple[int, str]:
    """(bytes, explanation) that a resident dataset may take: a quarter of the device's memory (the
    rest is for training) and half of the host's available memory (the cache is mapped once per machine)."""
    host = memory_available() // 2
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory // 4
        if total < host:
            return total, f"a quarter of {device}'s {total * 4 / 1e9:.1f} GB"
    return host, f"half of the host's {host * 2 / 1e9:.1f} GB available"


def choose_backend(source: Source, recipe: Recipe, device: torch.device) -> str:
    need = resident_bytes(source, recipe)
    budget, why = resident_budget(device)
    kind = "resident" if need <= budget else "stream"
    log.info("data_backend=auto: the decoded dataset is about %.2f GB (%d images), the budget %.2f GB (%s) -> %s",
             need / 1e9, len(source.train) + len(source.test), budget / 1e9, why, kind)
    return kind


def default_workers() -> int:
    """Loader processes per training process: the CPUs of this machine shared by its processes, one
    left for the training process itself, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cpus // local - 1))


def open_backend(cfg: Any, *, views: int, device: torch.device, rank: int = 0, world: int = 1,
                 channels_last: bool = False, download: bool = False) -> DataBackend:
    """The backend `cfg.data_backend` names (auto: resident if the decoded data fits comfortably),
    over the dataset `cfg.dataset`."""
    spec, root, source = open_source(cfg.dataset, cfg.data_dir, download=download)
    recipe = resolve_recipe(spec, source, cfg.recipe, cfg.image_size)
    kind = choose_backend(source, recipe, device) if cfg.data_backend == "auto" else cfg.data_backend
    common = dict(batch_size=cfg.batch_size, views=views, seed=cfg.seed, rank=rank, world=world,
                  channels_last=channels_last, device=device)
    if kind == "resident":
        data = resident_data(cfg.dataset, spec, root, source, recipe, cache_dir=cfg.cache_dir,
                             train_subset=cfg.train_subset, on_bad_image=cfg.on_bad_image)
        return ResidentBackend(data, **common)
    from .stream import StreamBackend

    return StreamBackend(cfg.dataset, spec, source, recipe, train_subset=cfg.train_subset,
                         num_workers=cfg.num_workers if cfg.num_workers is not None else default_workers(),
                         on_bad_image=cfg.on_bad_image, **common)


__all__ = ["DataBackend", "ResidentBackend", "choose_backend", "open_backend"]
