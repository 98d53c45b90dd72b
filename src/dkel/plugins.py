"""A user's own models, datasets and methods, visible to every command.

Three ways in, all landing in the one set of registries (`registry.py`'s tables):
- decorators `dkel.register_model`, `dkel.register_dataset`, `dkel.register_method` in a module or
  file that `--import MODULE_OR_FILE` (any subcommand) or the `imports:` config key names;
- installed packages that declare an entry point in the group `dkel.plugins` (loaded by every
  command, never by `import dkel`);
- objects passed to `dkel.fit` from Python (registered for that process only).

A run records what it imported in its config.yaml (files as absolute paths), so `dkel eval`,
`dkel export` and the worker processes of `dkel compare` import it again without being told."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .errors import ConfigError

log = logging.getLogger("dkel")
ENTRY_POINT_GROUP = "dkel.plugins"
_imported: dict[str, Any] = {}
_entry_points_loaded = False


def normalise(spec: str) -> str:
    """A module name stays as it is; a file path becomes absolute (so a run folder can re-import it)."""
    spec = str(spec).strip()
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return str(Path(spec).expanduser().resolve())
    return spec


def import_one(spec: str) -> Any:
    """Import a module by name or a Python file by path (each once per process)."""
    spec = normalise(spec)
    if spec in _imported:
        return _imported[spec]
    try:
        if spec.endswith(".py") or Path(spec).is_absolute():
            path = Path(spec)
            if not path.is_file():
                raise ConfigError(f"--import {spec}: no such file")
            name = f"dkel_plugin_{path.stem}_{abs(hash(spec)) % 10**8}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(spec)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name and spec.split(".")[0] == e.name.split(".")[0]:
            raise ConfigError(f"--import {spec}: no module named {e.name!r} (give an importable module or a .py "
                              "file)") from None
        raise ConfigError(f"--import {spec} failed: {type(e).__name__}: {e}") from None
    except Exception as e:
        where = _innermost_frame(e, spec)
        raise ConfigError(f"--import {spec} failed{where}: {type(e).__name__}: {e}") from None
    _imported[spec] = module
    return module


def _innermost_frame(error: BaseException, spec: str) -> str:
    """' at FILE:LINE' of the deepest frame of the plugin itself, so the one line points at the fault."""
    tb, found = error.__traceback__, ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename == spec or Path(filename).stem == spec.rsplit(".", 1)[-1]:
            found = f" at {filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def load_entry_points() -> None:
    """Import every installed `dkel.plugins` entry point, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise ConfigError(f"plugin {ep.name} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) failed to "
                              f"load: {type(e).__name__}: {e}") from None


def activate(imports: Iterable[str] = ()) -> list[str]:
    """Load the installed plugins and import `imports`; returns them normalised (as a run records them)."""
    load_entry_points()
    done = []
    for spec in imports or ():
        import_one(spec)
        done.append(normalise(spec))
    return list(dict.fromkeys(done))


def imports_in(layers: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """The `imports` of every config layer, in order."""
    out: list[str] = []
    for source, values in layers:
        value = values.get("imports") or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key 'imports' in {source} must be a list of modules or files")
        out += list(value)
    return out


# ----------------------------------------------------------------------------- decorators
def register_method(name: Optional[str] = None, summary: Optional[str] = None) -> Callable[[type], type]:
    """Class decorator: a `dkel.methods.Method` subclass becomes method `name` (default: its `name`)."""
    from .methods import METHODS, Method

    def add(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"register_method: {cls!r} is not a subclass of dkel.methods.Method")
        key = name or getattr(cls, "name", None)
        if not key:
            raise ConfigError(f"register_method: {cls.__name__} has no name")
        cls.name = key
        for attr, default in (("summary", summary or cls.__doc__ or key), ("paper", "user method")):
            if not isinstance(getattr(cls, attr, None), str):
                setattr(cls, attr, (default or "").strip().splitlines()[0] if isinstance(default, str) else default)
        METHODS.register(key, summary or cls.summary)(cls)
        return cls

    return add


def register_model(name: str, description: str = "", input_size: int = 32, split: Optional[str] = None):
    """Decorator: `fn(num_classes) -> nn.Module` (or `fn(num_classes, in_channels)`) becomes model `name`,
    split into trunk and tail automatically, or at module `split` (see `dkel.models.adapters`)."""
    from .models import register_callable

    def add(fn: Callable) -> Callable:
        register_callable(name, fn, description or (fn.__doc__ or "user model").strip().splitlines()[0],
                          input_size, split)
        return fn

    return add


def register_dataset(name: str, description: str = "", *, mean: Optional[tuple[float, ...]] = None,
                     std: Optional[tuple[float, ...]] = None, pad: int = -1, flip: bool = True,
                     needs_dir: bool = False, classes: Optional[list[str]] = None):
    """Decorator: `fn(data_dir) -> (train, test)` torch Datasets of (image, label) becomes dataset `name`.

    Images may be PIL images, CHW tensors (uint8 or float in [0, 1]) or HWC uint8 arrays; mean/std
    default to the training split's, `pad` (crop padding, default 1/8 of the size) and `flip` set the
    augmentation."""
    from .data import register_user_dataset

    def add(fn: Callable) -> Callable:
        register_user_dataset(name, fn, description or (fn.__doc__ or "user dataset").strip().splitlines()[0],
                              mean=mean, std=std, pad=pad, flip=flip, needs_dir=needs_dir, classes=classes)
        return fn

    return add
