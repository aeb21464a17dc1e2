"""Hooks that turn a forward/backward into fp32 accumulators, knowing nothing of metrics: the per-example
squared-gradient engine (per_example) with its per-layer-type rules (rules), the shared-parameter tracker
(tracker) and the sums it fills (accumulator), and the hidden-state taps."""
from fastsel.capture.accumulator import *  # noqa: F401,F403
from fastsel.capture.per_example import *  # noqa: F401,F403
from fastsel.capture.rules import *  # noqa: F401,F403
from fastsel.capture.taps import *  # noqa: F401,F403
