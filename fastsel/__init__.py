"""fastsel: which layers of a pretrained encoder to fine-tune, and fine-tuning only those."""
from __future__ import annotations

__version__ = "0.1.0"

from fastsel.ops.backend import EXTENSION  # noqa: E402,F401
