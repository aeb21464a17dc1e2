"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never half."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_text"]


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


class _Recorder:
    """The file, with the first OSError of a ``write`` kept: writers such as torch.save replace it by a message
    of their own ("unexpected pos ..."); the real cause (no space left, file too large) is what the user needs."""

    def __init__(self, f: IO[Any]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> Any:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else _MODE)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            rec = _Recorder(f)
            try:
                write(rec)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            except Exception as exc:
                cause = rec.error or (exc if isinstance(exc, OSError) else None)
                if cause is None:
                    raise
                raise OSError(cause.errno, f"could not write {path} ({cause.strerror or cause}); "
                              "nothing was replaced") from exc
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))
