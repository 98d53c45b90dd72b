"""Run folders: their layout, who may use them, and what may be deleted.

A folder dkel creates for a run gets a marker file; `--overwrite` deletes only such a folder, only
the entries dkel writes there, and never the current directory, one of its parents, the home
directory or a filesystem root.  One process at a time uses a run folder (an advisory lock held for
the life of the process).  `sessions.jsonl` records every start and resume with what changed, so
`config.yaml` always stays the configuration the run started with."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from . import files
from .config import model_slug
from .errors import RunFolderError

MARKER = ".dkel-run"
LOCK = ".lock"
# everything dkel itself writes into a run folder; anything else belongs to someone else
OWN_ENTRIES = {MARKER, LOCK, "config.yaml", "env.json", "sessions.jsonl", "train.log", "metrics.csv",
               "results.json", "curves.png", "checkpoints", "tensorboard", "export"}


def shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class RunFolder:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    env = property(lambda self: self.root / "env.json")
    sessions = property(lambda self: self.root / "sessions.jsonl")
    metrics = property(lambda self: self.root / "metrics.csv")
    log = property(lambda self: self.root / "train.log")
    results = property(lambda self: self.root / "results.json")
    curves = property(lambda self: self.root / "curves.png")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last = property(lambda self: self.root / "checkpoints" / "last.pt")
    best = property(lambda self: self.root / "checkpoints" / "best.pt")
    marker = property(lambda self: self.root / MARKER)

    @classmethod
    def for_config(cls, cfg: Any) -> "RunFolder":
        """`out`, else runs_dir/<dataset>/<method>-<model>/<name>-seed<k>, the name defaulting to the
        DKEL mode or "default"."""
        if cfg.out:
            return cls(Path(cfg.out))
        name = cfg.name or getattr(cfg, "mode", None) or "default"
        return cls(Path(cfg.runs_dir) / model_slug(cfg.dataset) / f"{cfg.method}-{model_slug(cfg.model)}"
                   / f"{name}-seed{cfg.seed}")

    def is_run(self) -> bool:
        return self.config.is_file()

    def require_run(self) -> "RunFolder":
        if not self.root.is_dir():
            raise RunFolderError(f"{self.root} does not exist")
        if not self.is_run():
            raise RunFolderError(f"{self.root} is not a run folder (no config.yaml)")
        return self

    # -- what is in it -----------------------------------------------------------------------
    def entries(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise files.storage_error(self.root, e, "read") from None

    def foreign_entries(self) -> list[str]:
        """Entries dkel did not write (its own temporary files, `.<name>.<random>.tmp`, count as its own)."""
        return [n for n in self.entries()
                if n not in OWN_ENTRIES and not (n.startswith(".") and n.endswith(".tmp"))]

    def is_empty(self) -> bool:
        return not [n for n in self.entries() if n != LOCK]

    # -- fresh starts ------------------------------------------------------------------------
    def check_fresh(self, overwrite: bool) -> None:
        """Raise unless a new run may start here (after deleting the old one if `overwrite`)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise RunFolderError(f"--out {root} is a file, not a folder")
        if not root.exists() or self.is_empty():
            return
        foreign = self.foreign_entries()
        if foreign:
            raise RunFolderError(f"{root} is not empty and holds files dkel did not write ({shown(foreign)}); "
                                 "choose another --out (dkel never deletes what it did not create)")
        if not overwrite:
            raise RunFolderError(f"run folder {root} already exists; continue it with --resume {root} "
                                 "or replace it with --overwrite")
        refuse_protected(root)
        if not self.marker.is_file():
            raise RunFolderError(f"{root} was not created by this version of dkel (no {MARKER} marker), so "
                                 "--overwrite will not delete it; remove it yourself or choose another --out")

    def clear(self) -> None:
        """Delete what an earlier run wrote here (only dkel's own entries; the marker and lock stay)."""
        for name in self.entries():
            if name in (MARKER, LOCK) or name not in OWN_ENTRIES and not name.endswith(".tmp"):
                continue
            path = self.root / name
            with files.guarded(path, "delete"):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def create(self) -> None:
        files.make_dir(self.root)
        if not self.marker.is_file():
            files.write_json(self.marker, {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "by": "dkel"})
        files.make_dir(self.checkpoints)

    # -- locking -----------------------------------------------------------------------------
    def lock(self) -> "FolderLock":
        return FolderLock(self.root / LOCK)

    # -- history of starts and resumes -------------------------------------------------------
    def effective_config(self) -> dict[str, Any]:
        """config.yaml with the changes every later resume recorded in sessions.jsonl."""
        with files.guarded(self.config, "read"):
            base = yaml.safe_load(self.config.read_text()) or {}
        for session in self.read_sessions():
            for key, (_, new) in session.get("changed", {}).items():
                base[key] = new
        return base

    def read_sessions(self) -> list[dict[str, Any]]:
        if not self.sessions.is_file():
            return []
        out = []
        with files.guarded(self.sessions, "read"):
            lines = self.sessions.read_text().splitlines()
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash while appending
                continue
        return out

    def record_session(self, kind: str, **info: Any) -> None:
        entry = {"event": kind, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
                 "host": socket.gethostname(), "argv": sys.argv, **info}
        files.append_line(self.sessions, json.dumps(entry))


def refuse_protected(path: Path) -> None:
    """--overwrite never deletes the current directory, its parents, the home directory or a root."""
    target = path.resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if target == target.parent:
        raise RunFolderError(f"refusing to overwrite {path}: it is a filesystem root")
    if cwd == target or target in cwd.parents:
        raise RunFolderError(f"refusing to overwrite {path}: it is the current directory or one of its parents")
    if home == target or target in home.parents:
        raise RunFolderError(f"refusing to overwrite {path}: it is the home directory or one of its parents")


class FolderLock:
    """An exclusive advisory lock (flock) on `path`, held until `release()` or process exit.

    The kernel drops it when the process dies, however it dies, so a crashed run never leaves its
    folder locked."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no locking, as before
            return
        with files.guarded(path, "lock"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"run folder {path.parent} is in use by {holder}; wait for it to finish or "
                                 "stop it first") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise files.storage_error(path, e) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None



