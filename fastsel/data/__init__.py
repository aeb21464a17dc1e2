"""Tasks and their data: GLUE/SuperGLUE/custom readers, sampling, tokenisation and collation, the tokenised
corpus cache with its batch schedules, and the official task metrics."""
from fastsel.data.tasks import *  # noqa: F401,F403
from fastsel.data.task_metrics import *  # noqa: F401,F403
from fastsel.data.corpus import *  # noqa: F401,F403
