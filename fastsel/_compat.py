"""Old module paths (fastsel 0.1's flat layout), kept importable for code written against them.

``import fastsel.fisher`` gives :mod:`fastsel.scores.fisher` itself (the same module object, so monkeypatching
works); an old module whose contents were split (``fastsel.scoring``, ``fastsel.variability``, ...) gives a
module that looks each name up in the new modules, under its old name. Nothing inside fastsel imports these.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

# old module -> new module (moved whole)
MOVED = {
    "atomic": "utils.atomic", "progress": "utils.progress", "models": "hf.loading", "layers": "hf.layer_map",
    "per_example": "capture.per_example", "confidence": "scores.confidence", "fisher": "scores.fisher",
    "plot": "scores.plot", "metrics": "data.task_metrics", "stream": "data.corpus", "checkpoint": "pipeline.checkpoint",
    "distributed": "pipeline.distributed", "apply": "tuners.apply", "adapters": "tuners.adapters",
    "tune_cli": "cli.tune", "info": "cli.info",
}
# old module -> the new modules its names now live in (searched in order)
SPLIT = {
    "scoring": ("pipeline.config", "pipeline.registry", "pipeline.checks", "pipeline.context", "pipeline.inmemory",
                "pipeline.drivers.fisher", "pipeline.run"),
    "variability": ("scores.variability", "capture.taps", "hf.io", "pipeline.drivers.variability"),
    "probing": ("scores.probing", "pipeline.drivers.probing"),
}
# names that changed: (old module, old name) -> new name
RENAMED = {
    ("metrics", "METRICS"): "TASK_METRICS", ("stream", "plan_batches"): "schedule_batches",
    ("probing", "TASK_METRICS"): "PROBE_METRICS", ("scoring", "_load_examples"): "examples_for",
}


class _SplitModule(types.ModuleType):
    def __init__(self, name: str, sources: tuple[str, ...], old: str) -> None:
        super().__init__(name, f"Old path of {', '.join('fastsel.' + s for s in sources)}.")
        self._sources, self._old = sources, old

    def __getattr__(self, attr: str):
        new = RENAMED.get((self._old, attr), attr)
        for src in self._sources:
            mod = importlib.import_module(f"fastsel.{src}")
            if hasattr(mod, new):
                return getattr(mod, new)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _RenamingModule(_SplitModule):
    """A moved module whose names partly changed: attribute access falls through to the new module."""


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len("fastsel."):] if fullname.startswith("fastsel.") else None
        if old in MOVED or old in SPLIT:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name[len("fastsel."):]
        if old in SPLIT:
            return _SplitModule(spec.name, SPLIT[old], old)
        if any(o == old for o, _ in RENAMED):
            return _RenamingModule(spec.name, (MOVED[old],), old)
        return importlib.import_module(f"fastsel.{MOVED[old]}")

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
