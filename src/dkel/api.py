"""The Python face of dkel, beside the command line: `fit`, `load`, `evaluate`.

`fit` resolves the same configuration `dkel train` would (its keyword arguments are the keys of
`key=value`) and trains it through the same engine, into the same run folder.  Objects passed from
Python (a model callable, a pair of Datasets) are registered for this process; the run records how
to rebuild them where that is possible (an importable callable as `module:attribute`), and says so
in one line where it is not."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConfigError, DkelError

ModelSpec = Union[str, Callable[[int], nn.Module], Sequence[Union[str, Callable[[int], nn.Module]]]]


@dataclass
class Run:
    """A finished (or resumed) run: its folder, its results.json and its deployed network."""

    dir: Path
    results: dict[str, Any] = field(repr=False)
    deployed: nn.Module = field(repr=False)

    @property
    def deploy_acc(self) -> float:
        return self.results["deploy_acc"]


def fit(method: str = "dkel", *, model: ModelSpec, data: Union[str, tuple[Any, Any]], out: Optional[str] = None,
        classes: Optional[Sequence[str]] = None, resume: bool = False, overwrite: bool = False,
        imports: Sequence[str] = (), **overrides: Any) -> Run:
    """Train `method` on `model` and `data` through dkel's engine; returns the finished `Run`.

    model: a zoo name ("resnet32"), "torchvision:NAME", "timm:NAME", "module:attribute", a callable
        num_classes -> nn.Module, or (independent, dml, kdcl) a list of those, one per peer.
    data: a dataset name ("cifar10", with data_dir=... / download=True as for `dkel train`) or a pair
        (train, test) of torch Datasets yielding (image, label), the image a PIL image, a CHW tensor
        (uint8, or float in [0, 1]) or an HWC uint8 array.  Class names: `classes`, else the train
        set's `classes` attribute, else "0".."C-1" with C from the labels.
    out: the run folder (default: runs/<dataset>/<method>-<model>/<name>-seed<k>).
    resume: continue the run in `out` (as `dkel train --resume`); overwrite: replace it.
    overrides: any config key, e.g. epochs=10, lr=0.05, peers=4, beta=0.1, progress="none"."""
    from . import engine, plugins
    from .run import resolve_run

    plugins.activate(imports)
    values: dict[str, Any] = {"method": method, "model": model_key(model), "dataset": data_key(data, classes),
                              **overrides}
    if out is not None:
        values["out"] = str(out)
    layers: list[tuple[str, dict[str, Any]]] = []
    if resume:
        if out is None:
            raise ConfigError("resume=True needs out=RUN_DIR, the run to continue")
        from .run_folder import RunFolder

        layers.append((f"{out}/config.yaml", RunFolder(Path(out)).require_run().effective_config()))
    layers.append(("dkel.fit arguments", values))
    cfg = resolve_run(layers, imports)
    from .run_folder import RunFolder

    folder = Path(out) if out is not None else RunFolder.for_config(cfg).root
    with warnings_on_stderr():
        results = engine.train(cfg, resume=folder if resume else None, overwrite=overwrite)
    return Run(folder, results, load(folder))


@contextmanager
def warnings_on_stderr():
    """Where the caller has not configured logging, dkel's warnings (a teacher that copies its
    student, a run that ended at chance, skipped images) would reach train.log only: print them on
    stderr too, as the command line does, for the length of the call."""
    from .cli import StderrHandler

    log = logging.getLogger("dkel")
    configured = any(not isinstance(h, logging.FileHandler) for h in log.handlers) or (
        log.propagate and logging.getLogger().handlers)
    if configured:
        yield
        return
    handler = StderrHandler()
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def model_key(model: ModelSpec) -> Any:
    """What the config records for `model`: strings as they are; a callable as `module:attribute`
    when it can be imported again, else a name registered for this process only."""
    if isinstance(model, (list, tuple)):
        return [model_key(m) for m in model]
    if isinstance(model, str):
        return model
    if not callable(model):
        raise ConfigError(f"model must be a name or a callable num_classes -> nn.Module, got {type(model).__name__}")
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        return f"{module}:{qualname}"
    from .models import PYTHON_PREFIX, register_callable

    name = f"{PYTHON_PREFIX}{qualname or type(model).__name__}"
    register_callable(name, model, "given to dkel.fit", replace=True)
    return name


def data_key(data: Any, classes: Optional[Sequence[str]]) -> str:
    """The dataset name the config records: a name as it is; a (train, test) pair is registered for
    this process as `python:<train class name>`."""
    if isinstance(data, str):
        if classes is not None:
            raise ConfigError("classes= applies to data given as (train, test) Datasets")
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ConfigError(f"data must be a dataset name or a (train, test) pair of Datasets, got {type(data).__name__}")
    from .data import PYTHON_PREFIX, register_user_dataset

    name = f"{PYTHON_PREFIX}{type(data[0]).__name__}"
    pair = tuple(data)
    register_user_dataset(name, lambda root: pair, "given to dkel.fit", classes=classes, replace=True)
    return name


def load(path: Union[str, Path], checkpoint: str = "last") -> nn.Module:
    """The deployed network of a run folder, or of an exported file (.safetensors, .pt, .onnx), in eval
    mode on the CPU, with its input preprocessing as `.preprocessing` (a `dkel.deployed.Preprocessing`:
    `net(net.preprocessing(images))` classifies raw images)."""
    from .deployed import Preprocessing

    path = Path(path)
    if path.is_dir():
        from .engine import restore

        _, method, ckpt, _ = restore(path, checkpoint, "cpu")
        net = method.deploy().float().eval().to(memory_format=torch.contiguous_format)
        info = ckpt["data"]
    elif path.is_file():
        net, info = _load_exported(path)
    else:
        raise DkelError(f"{path} is neither a run folder nor an exported network")
    net.preprocessing = Preprocessing.from_info(info)
    return net


def _load_exported(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from . import files, models

    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        raise DkelError(f"{path} has no sidecar {sidecar.name} (dkel export writes one beside the network)")
    with files.guarded(sidecar, "read"):
        meta = json.loads(sidecar.read_text())
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        net = models.create(meta["model"], meta["num_classes"], meta["in_channels"],
                            image_size=meta.get("image_size"))
        with files.guarded(path, "read"):
            net.load_state_dict(load_file(str(path)))
        return net.eval(), meta
    if path.suffix == ".pt":
        with files.guarded(path, "read"):
            return torch.jit.load(str(path), map_location="cpu").eval(), meta
    if path.suffix == ".onnx":
        return OnnxNetwork(path).eval(), meta
    raise DkelError(f"{path}: unknown export format (expected .safetensors, .pt or .onnx)")


class OnnxNetwork(nn.Module):
    """An exported ONNX network run by onnxruntime, called like the PyTorch one."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise DkelError("loading ONNX needs onnxruntime: pip install 'dkel[onnx]'") from None
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.session.get_inputs()[0].name: x})[0])


def evaluate(run: Union[str, Path, Run], data: Optional[tuple[Any, Any]] = None,
             checkpoint: str = "last") -> dict[str, float]:
    """Test accuracy (top-1 and `_top5`) of every output of a run; `data` gives the (train, test)
    Datasets again for a run that was trained on Python objects in another process."""
    from .engine import evaluate_run
    from .run_folder import RunFolder

    folder = run.dir if isinstance(run, Run) else Path(run)
    if data is not None:
        from .data import register_user_dataset
        from .engine import load_checkpoint

        recorded = RunFolder(folder).require_run()
        name = recorded.effective_config()["dataset"]
        classes = load_checkpoint(recorded.best if checkpoint == "best" else recorded.last)["data"]["classes"]
        pair = tuple(data)
        register_user_dataset(name, lambda root: pair, "given to dkel.evaluate", classes=classes, replace=True)
    return evaluate_run(folder, checkpoint, "cpu")[0]
