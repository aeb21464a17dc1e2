"""Old path of :mod:`fastsel.ops.backend`, kept for code that imported it: the same module object.

(An alias rather than a re-export, so that ``monkeypatch.setattr(fastsel._backend, "EXTENSION", ...)`` still
changes what the ops see.)
"""
import sys

from fastsel.ops import backend

sys.modules[__name__] = backend
