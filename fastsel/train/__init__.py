"""Training a planned model: the loop, evaluation with the task metric, the cached frozen prefix, rank
stability, saving and loading what was trained."""
from fastsel.train.trainer import *  # noqa: F401,F403
from fastsel.train import heads  # noqa: F401,E402 - registers --head warmup:STEPS
