"""Every file dkel writes goes through here.

A write is atomic (a temporary file in the same folder, flushed, then renamed over the target),
so a crash, a full disk or a read-only filesystem leaves the previous good file in place; and an
`OSError` becomes one `StorageError` line naming the path and the cause instead of a traceback."""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from .errors import StorageError

CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "a file of that name exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
}


def cause(error: OSError) -> str:
    return CAUSES.get(error.errno, error.strerror or str(error))


def storage_error(path: Path | str, error: OSError, what: str = "write") -> StorageError:
    return StorageError(f"cannot {what} {path}: {cause(error)}")


@contextlib.contextmanager
def guarded(path: Path | str, what: str = "write") -> Iterator[None]:
    """Turn an OSError inside the block into a one-line StorageError about `path`."""
    try:
        yield
    except OSError as e:
        raise storage_error(path, e, what) from None
    except Exception as e:  # a writer that wraps the OSError (torch.save raises RuntimeError on a full disk)
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise storage_error(path, cause, what) from None


def os_error_behind(error: BaseException) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def make_dir(path: Path) -> Path:
    with guarded(path, "create the folder"):
        if path.exists() and not path.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`, renamed over `path` when the block succeeds and removed
    when it fails, so `path` only ever holds a complete file (the previous one until then)."""
    path = Path(path)
    if path.is_dir():
        raise storage_error(path, OSError(errno.EISDIR, "is a directory"))
    make_dir(path.parent)
    tmp = None
    try:
        with guarded(path):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            yield Path(tmp)
            commit(Path(tmp), path)
            tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def commit(tmp: Path, path: Path) -> None:
    """Make the finished temporary file durable, then put it in place in one rename."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it over `path`."""
    with signals_held(), replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them: an interrupt inside
    torch.save leaves its zip writer broken (a RuntimeError, not the interrupt), and a file is
    better finished than abandoned half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    swapped = [s for s, h in previous.items() if callable(h) or h == signal.SIG_DFL]
    for s in swapped:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s in swapped:
            signal.signal(s, previous[s])
        for s in held:
            signal.raise_signal(s)


def write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_csv(path: Path, rows: Iterable[Iterable[Any]]) -> None:
    """Rows (the first one the header) as a CSV file."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    write_text(path, text.getvalue())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj: Any, path: Path) -> None:
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def save_figure(fig, path: Path, **kwargs) -> None:
    """A matplotlib figure as PNG (closing the figure either way)."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", **kwargs))
    finally:
        plt.close(fig)


def append_line(path: Path, line: str) -> None:
    """Append one line (logs that grow: a rewrite would be wasteful, a torn last line is harmless)."""
    with guarded(path):
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()


class LogFile(logging.FileHandler):
    """A log file whose write errors stop the program with one line (logging would otherwise
    print a traceback and carry on, losing the log silently)."""

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise storage_error(self.baseFilename, error) from None
        super().handleError(record)


def open_log(path: Path) -> LogFile:
    with guarded(path):
        handler = LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler
