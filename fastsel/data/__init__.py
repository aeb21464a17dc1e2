"""Tasks and their data, one module an idea:

- ``specs``: the GLUE/SuperGLUE task registry (``TaskSpec``, ``TASKS``, ``get_task``) and the label orders;
- ``examples``: ``Examples``, the raw examples of one split, and their seeded (optionally class-balanced)
  subsampling;
- ``readers``: reading a split from GLUE TSV, SuperGLUE JSONL, the Hugging Face hub or a custom CSV/TSV/JSONL
  file (``load_examples``, ``load_custom_examples``, ``examples_for``);
- ``features``: tokenisation and collation (``tokenize_examples``, ``PadCollator``, ``make_dataloader``);
- ``task_metrics``: the official task metrics (``TASK_METRICS``);
- ``settings``: ``DataSettings``, the task or custom file a command reads (shared by score and finetune);
- ``corpus``: corpora larger than memory: the tokenised Arrow cache, length-bucketed batch schedules, sharding,
  the prefetching reader.
"""
from fastsel.data.specs import *  # noqa: F401,F403
from fastsel.data.examples import *  # noqa: F401,F403
from fastsel.data.readers import *  # noqa: F401,F403
from fastsel.data.features import *  # noqa: F401,F403
from fastsel.data.task_metrics import *  # noqa: F401,F403
from fastsel.data.corpus import *  # noqa: F401,F403
from fastsel.data.settings import *  # noqa: F401,F403
