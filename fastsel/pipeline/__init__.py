"""Scoring runs: the one metric registry, configs, the in-memory and streamed passes (checkpoints,
several processes), and one driver per metric (registered on import of this package)."""
from fastsel.pipeline import drivers  # noqa: F401  (the metric drivers register themselves)
from fastsel.pipeline.registry import *  # noqa: F401,F403
from fastsel.pipeline.config import *  # noqa: F401,F403
from fastsel.pipeline.context import *  # noqa: F401,F403
from fastsel.pipeline.checks import *  # noqa: F401,F403
from fastsel.pipeline.checkpoint import *  # noqa: F401,F403
from fastsel.pipeline.distributed import *  # noqa: F401,F403
from fastsel.pipeline.outputs import *  # noqa: F401,F403
from fastsel.pipeline.inmemory import *  # noqa: F401,F403
from fastsel.pipeline.streamed import *  # noqa: F401,F403
from fastsel.pipeline.run import *  # noqa: F401,F403
