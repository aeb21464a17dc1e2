"""The seeded comparison of fine-tuning strategies (bench/finetune_compare.py, the entry point) in modules of
one idea each:

- :mod:`.config`: the strategies, learning rates and per-task option values;
- :mod:`.stats`: mean ± std, Welch and paired t-tests, the sign test, the verdict label;
- :mod:`.jobs`: the scoring and training jobs, and the settings check of finished runs;
- :mod:`.results`: run directories -> records -> the aggregate, comparisons and verdicts;
- :mod:`.report`: the markdown tables and the plot;
- :mod:`.costs`: the cost model (fit, estimates, makespan);
- :mod:`.sizing`: the dry run (token statistics of the data, cost references on disk);
- :mod:`.runner`: the subprocess scheduler.

Imported as a top-level package: bench/ is on sys.path (finetune_compare.py puts it there).
"""
