"""The resident backend's decoded images: written row by row, kept on disk, memory-mapped.

A cache is a folder (meta.json and one raw uint8/int64 file per array) keyed by dataset, source
folder and stored image size, and stamped with the source's file times so it is rebuilt when they
change.  Images are decoded by a thread pool straight into a memory-mapped file (never a
whole-dataset np.stack), in a temporary folder renamed into place when complete.  Readers map the
files copy-on-write, so the processes of one machine share one copy of the pages."""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .. import files
from ..errors import DataError
from .sources import BadImage, Splits

log = logging.getLogger("dkel")
CACHE_FORMAT = 2
CHUNK = 256  # images decoded per round: bounds the memory in flight


class Skipped(list):
    """Names (with the reason) of images skipped by on_bad_image=skip."""


def write_rows(samples: Any, fit: Callable[[Tensor], Tensor], allocate: Callable[[tuple], np.ndarray],
               on_bad: str, skipped: Skipped, fixed_size: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode every sample through `fit` into `allocate([N, C, S, S])`; returns (images, labels) of the
    rows kept.  Without a fixed size every image must come out at the first one's size."""
    n = len(samples)

    def load(i: int):
        try:
            image, label = samples.load(i)
            return fit(image), label, None
        except BadImage as e:
            if on_bad == "error":
                raise DataError(f"cannot read image {e} (on_bad_image=skip skips such files)") from None
            return None, None, str(e)

    out: Optional[np.ndarray] = None
    labels = np.empty(n, dtype=np.int64)
    kept = 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, n, CHUNK):
            for i, (image, label, bad) in enumerate(pool.map(load, range(start, min(n, start + CHUNK))), start):
                if bad is not None:
                    skipped.append(bad)
                    log.warning("skipping unreadable image %s", bad)
                    continue
                if out is None:
                    out = allocate((n, *image.shape))
                elif tuple(image.shape) != out.shape[1:]:
                    hint = "" if fixed_size else "; set image_size=N to resize them all"
                    raise DataError(f"images have different sizes ({samples.name(i)} is "
                                    f"{tuple(image.shape)}, earlier ones {tuple(out.shape[1:])}){hint}")
                out[kept] = image.numpy()
                labels[kept] = label
                kept += 1
    if out is None:
        raise DataError(f"no readable image in {samples.name(0) if n else 'an empty split'}")
    return out[:kept], labels[:kept]


def in_memory(shape: tuple) -> np.ndarray:
    return torch.empty(shape, dtype=torch.uint8).numpy()


def _map(path: Path, dtype, shape) -> Tensor:
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", shape=tuple(shape)))


def read_cache(path: Path, stamp: str) -> Optional[tuple[Splits, dict]]:
    """The cached splits, memory-mapped, if the cache is complete and matches `stamp`."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("stamp") != stamp:
            log.info("dataset cache %s is stale; rebuilding", path)
            return None
        arrays = {}
        for split in ("train", "test"):
            shape = meta["shapes"][split]
            arrays[f"{split}_images"] = _map(path / f"{split}_images.u8", np.uint8, shape)
            arrays[f"{split}_labels"] = _map(path / f"{split}_labels.i64", np.int64, shape[:1])
        splits = Splits(**arrays, classes=meta["classes"]).check(f"cache {path}")
        return splits, meta
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        log.warning("dataset cache %s is unreadable (%s); rebuilding", path, e)
        return None


def write_cache(path: Path, stamp: str, classes: list[str], fingerprint: str,
                fill: Callable[[str, Callable[[tuple], np.ndarray]], tuple[np.ndarray, np.ndarray]],
                skipped: Skipped) -> None:
    """Build the cache in a temporary folder next to `path`, then move it into place.

    fill(split, allocate) writes a split's images into allocate(shape) and returns (images, labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shapes = {}
        for split in ("train", "test"):
            target = tmp / f"{split}_images.u8"
            maps: list[np.memmap] = []

            def allocate(shape: tuple) -> np.ndarray:
                maps.append(np.memmap(target, dtype=np.uint8, mode="w+", shape=shape))
                return maps[-1]

            images, labels = fill(split, allocate)
            shapes[split] = list(images.shape)
            for m in maps:
                m.flush()
            del images, maps
            with open(target, "r+b") as f:  # rows of skipped images were never written
                f.truncate(int(np.prod(shapes[split])))
            labels.tofile(tmp / f"{split}_labels.i64")
        meta = {"format": CACHE_FORMAT, "stamp": stamp, "fingerprint": fingerprint, "classes": classes,
                "shapes": shapes, "skipped": list(skipped)}
        (tmp / "meta.json.tmp").write_text(json.dumps(meta))
        files.commit(tmp / "meta.json.tmp", tmp / "meta.json")
        if path.exists():  # only a stale or damaged cache of ours sits at this path
            old = path.parent / f".{path.name}.{os.getpid()}.old"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
