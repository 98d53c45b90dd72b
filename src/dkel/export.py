"""Export the deployed single network and prove the file computes what the run trained."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import models
from .engine import restore
from .errors import DkelError

EXTENSIONS = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}


def export_run(run_dir: Path, fmt: str, which: str = "last", out: Optional[Path] = None) -> tuple[Path, float]:
    """Write the deployed network as `fmt`; returns the path and the largest output difference
    between the exported file (loaded back) and the in-memory network on a sample batch."""
    cfg, method, ckpt, _ = restore(run_dir, which, "cpu")
    net = method.deploy().float().eval().to(memory_format=torch.contiguous_format)
    info = ckpt["data"]
    path = Path(out) if out else Path(run_dir) / "export" / f"deploy{EXTENSIONS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(8, info["in_channels"], info["image_size"], info["image_size"],
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(example)
    # the deployed peer's own specification (a mixed cohort lists several)
    model = getattr(net, "dkel_model", cfg.model)
    meta = {"model": model, "method": cfg.method, "num_classes": len(info["classes"]), **info}
    got = {"torchscript": _torchscript, "onnx": _onnx, "safetensors": _safetensors}[fmt](net, example, path, meta)
    diff = (got - expected).abs().max().item()
    if diff > 1e-3 * max(1.0, expected.abs().max().item()):
        raise DkelError(f"exported {fmt} network differs from the trained one by {diff:.3g}")
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2))
    return path, diff


def _torchscript(net, example, path, meta):
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what many deployments load
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example)
        traced.save(str(path))
        with torch.no_grad():
            return torch.jit.load(str(path))(example)


def _onnx(net, example, path, meta):
    try:
        import onnxruntime
    except ImportError:
        raise DkelError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dkel[onnx]'") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every pass
        torch.onnx.export(net, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": example.numpy()})[0])


def _safetensors(net, example, path, meta):
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    fresh = models.create(meta["model"], meta["num_classes"], meta["in_channels"],
                          image_size=meta["image_size"]).eval()
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return fresh(example)
