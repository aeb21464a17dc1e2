"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never half."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "json_text", "atomic_savefig", "deferred_signals"]


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


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block are held back and handled (by the handlers that were in place)
    when it ends: a write is never cut in the middle (torch.save turns a KeyboardInterrupt raised inside it into
    "enforce fail at inline_container.cc"). Only the main thread can set handlers; elsewhere nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in signums:
            if signal.getsignal(signum) is not None:  # None: a handler not set from Python, which cannot be restored
                previous[signum] = signal.signal(signum, lambda s, _frame: pending.append(s))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signum = pending[0]
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, None)  # e.g. default_int_handler: KeyboardInterrupt, now that the file is whole
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)  # what it would have done: the default action


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``.

    SIGINT/SIGTERM during the write are deferred until the rename is done (:func:`deferred_signals`): an
    interrupted run leaves the old file or the new one, and the interrupt is then handled as usual."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"fastsel: {path} is a folder; give a file name")
    with deferred_signals():
        _atomic_write(path, write, binary)


def _atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool) -> None:
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


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """``fig.savefig(path)`` written atomically; returns the file written. As matplotlib does, the suffix of
    ``path`` is the image format, and a name without one gets ``.png`` (``path.png``)."""
    text = os.fspath(path)
    suffix = os.path.splitext(os.path.basename(text))[1].lower().lstrip(".")
    if not suffix:
        text, suffix = text + ".png", "png"
    atomic_write(text, lambda f: fig.savefig(f, format=suffix, **kwargs), binary=True)
    return text


def _nonfinite_at(data: Any, where: str = "") -> str | None:
    """The key path of the first NaN/Infinity in ``data`` (``layers[2].score``), or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "the value"
    if isinstance(data, dict):
        items: Any = ((f"{where}.{k}" if where else str(k), v) for k, v in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(data))
    else:
        return None
    for key, value in items:
        found = _nonfinite_at(value, key)
        if found is not None:
            return found
    return None


def json_text(data: Any, path: str | os.PathLike = "", **kwargs: Any) -> str:
    """``json.dumps(data, allow_nan=False)``: strict JSON, never NaN/Infinity (which JSON does not have and most readers
    refuse). A non-finite number is a one-line ValueError naming ``path`` and where in ``data`` it sits."""
    try:
        return json.dumps(data, allow_nan=False, **kwargs)
    except ValueError:
        where = _nonfinite_at(data)
        if where is None:
            raise
        raise ValueError(f"fastsel: {path or 'JSON output'}: not written, {where} is not a finite number "
                         "(NaN/Infinity cannot be written as JSON)") from None


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """:func:`json_text` of ``data`` (strict JSON) written atomically to ``path``, with a final newline."""
    atomic_write_text(path, json_text(data, path, indent=indent) + "\n")
