"""Hooks that turn a forward/backward into fp32 accumulators, knowing nothing of metrics: the per-example
squared-gradient engine with its per-layer-type rules, and the hidden-state taps."""
from fastsel.capture.per_example import *  # noqa: F401,F403
from fastsel.capture.taps import *  # noqa: F401,F403
