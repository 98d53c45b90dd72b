"""Export the deployed single network and prove the file computes what the run trained.

Next to the file goes a sidecar JSON (`<file>.json`) with the model, the classes and the
preprocessing the network expects (`dkel.deployed.Preprocessing.from_sidecar` reads it)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import files, models
from .engine import restore
from .errors import DkelError

EXTENSIONS = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}


def export_path(run_dir: Path, fmt: str, out: Optional[Path], overwrite: bool) -> Path:
    """Where the export goes: RUN/export/deploy.<ext> by default, into `out` if it is a folder
    (or ends with a separator), else `out` itself, which is never replaced unless `overwrite`."""
    name = f"deploy{EXTENSIONS[fmt]}"
    if out is None:
        return Path(run_dir) / "export" / name
    path = Path(out) / name if Path(out).is_dir() or str(out).endswith(os.sep) else Path(out)
    for target in (path, path.with_name(path.name + ".json")):
        if target.exists() and not overwrite:
            raise DkelError(f"{target} already exists; add --overwrite to replace it")
    return path


def export_run(run_dir: Path, fmt: str, which: str = "last", out: Optional[Path] = None,
               overwrite: bool = False) -> tuple[Path, float]:
    """Write the deployed network as `fmt`; returns the path and the largest output difference
    between the exported file (loaded back) and the in-memory network on a sample batch."""
    cfg, method, ckpt, _ = restore(run_dir, which, "cpu")
    path = export_path(run_dir, fmt, out, overwrite)
    net = method.deploy().float().eval().to(memory_format=torch.contiguous_format)
    info = ckpt["data"]
    example = torch.randn(8, info["in_channels"], info["image_size"], info["image_size"],
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(example)
    # the deployed peer's own specification (a mixed cohort lists several)
    model = getattr(net, "dkel_model", cfg.model)
    meta = {"model": model, "method": cfg.method, "num_classes": len(info["classes"]),
            "input": "float [B, C, H, W]: RGB (or gray) in [0, 1], minus mean, divided by std", **info}
    got = {"torchscript": _torchscript, "onnx": _onnx, "safetensors": _safetensors}[fmt](net, example, path, meta)
    diff = (got - expected).abs().max().item()
    if diff > 1e-3 * max(1.0, expected.abs().max().item()):
        raise DkelError(f"exported {fmt} network differs from the trained one by {diff:.3g}")
    files.write_json(path.with_name(path.name + ".json"), meta)
    return path, diff


def _torchscript(net, example, path, meta):
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what many deployments load
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example)
        files.write_atomic(path, lambda f: torch.jit.save(traced, f))
        with torch.no_grad(), files.guarded(path, "read"):
            return torch.jit.load(str(path))(example)


def _onnx(net, example, path, meta):
    try:
        import onnxruntime
    except ImportError:
        raise DkelError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dkel[onnx]'") from None
    with files.replacing(path) as tmp, contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates
        torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": example.numpy()})[0])


def _safetensors(net, example, path, meta):
    from safetensors.torch import load, save

    files.write_bytes(path, save({k: v.contiguous() for k, v in net.state_dict().items()},
                                 metadata={k: json.dumps(v) for k, v in meta.items()}))
    fresh = models.create(meta["model"], meta["num_classes"], meta["in_channels"],
                          image_size=meta["image_size"]).eval()
    with files.guarded(path, "read"):
        fresh.load_state_dict(load(path.read_bytes()))
    with torch.no_grad():
        return fresh(example)
