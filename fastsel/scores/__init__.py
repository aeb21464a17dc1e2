"""Accumulators to numbers: LayerScores (scores.json), the Fisher diagonal and its layer scores, the variability
ratio and its class statistics, CCA / numerical rank / probes, ranking confidence, plots. No CLI, no registry."""
from fastsel.scores.layer_scores import *  # noqa: F401,F403
from fastsel.scores.confidence import *  # noqa: F401,F403
from fastsel.scores.fisher import *  # noqa: F401,F403
from fastsel.scores.variability import *  # noqa: F401,F403
from fastsel.scores.probing import *  # noqa: F401,F403
from fastsel.scores.plot import *  # noqa: F401,F403
