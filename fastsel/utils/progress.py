"""Progress bars for long work (tqdm), off when not asked for or when output is not a terminal."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "ex", disable: bool = False) -> Iterator[tqdm]:
    """A tqdm bar showing items/s; ``disable`` or a silent stderr turns it into a no-op counter."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    try:
        yield bar
    finally:
        bar.close()
