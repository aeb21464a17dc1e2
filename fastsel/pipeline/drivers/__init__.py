"""One driver per metric: its in-memory run, its streamed consumer, its flags; each registers itself in
:mod:`fastsel.pipeline.registry` on import."""
from fastsel.pipeline.drivers import fisher, probing, variability  # noqa: F401
