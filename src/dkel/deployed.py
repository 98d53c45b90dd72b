"""What a deployed network needs around it: the preprocessing of its inputs and its class names.

Every exported network expects images normalised as in training.  The sidecar JSON written next
to an export (`deploy.onnx.json`, ...) records mean, std, input size and classes; `Preprocessing`
turns raw images into the network's input from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import files
from .data.items import to_uint8_chw
from .errors import DkelError


@dataclass(frozen=True)
class Preprocessing:
    """Raw images -> the normalised float batch a deployed network takes.

    Accepts a PIL image, a uint8 or [0, 1] float tensor ([C, H, W] or [B, C, H, W]), an HWC uint8
    array, or a list of those; resizes to the training size (as dkel resizes image files) and
    normalises with the training mean and std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int
    classes: tuple[str, ...] = ()

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "Preprocessing":
        try:
            return cls(tuple(info["mean"]), tuple(info["std"]), int(info["image_size"]), int(info["in_channels"]),
                       tuple(info.get("classes") or ()))
        except (KeyError, TypeError, ValueError) as e:
            raise DkelError(f"the preprocessing record lacks {e}") from None

    @classmethod
    def from_sidecar(cls, path: str | Path) -> "Preprocessing":
        """From an export's sidecar JSON, or from the exported file itself (its `.json` beside it)."""
        path = Path(path)
        sidecar = path if path.suffix == ".json" else path.with_name(path.name + ".json")
        with files.guarded(sidecar, "read"):
            text = sidecar.read_text()
        try:
            return cls.from_info(json.loads(text))
        except json.JSONDecodeError as e:
            raise DkelError(f"{sidecar} is not valid JSON ({e})") from None

    def __call__(self, images: Any) -> Tensor:
        if isinstance(images, (list, tuple)):
            batch = torch.stack([self._one(x) for x in images])
        elif isinstance(images, Tensor) and images.dim() == 4:
            batch = torch.stack([self._one(x) for x in images])
        else:
            batch = self._one(images)[None]
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def _one(self, image: Any) -> Tensor:
        x = to_uint8_chw(image, "image")
        if x.shape[0] != self.in_channels:
            if self.in_channels == 1:
                x = x.float().mean(0, keepdim=True).round().to(torch.uint8)
            elif x.shape[0] == 1:
                x = x.expand(self.in_channels, -1, -1)
        if x.shape[1:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None].float(), size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        return x

    def labels(self, logits: Tensor) -> Sequence[str]:
        """Class names of the arg-max of each row of `logits`."""
        if not self.classes:
            raise DkelError("no class names were recorded for this network")
        return [self.classes[i] for i in logits.argmax(-1).tolist()]
