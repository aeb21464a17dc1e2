"""The GPU check (bench/gpu_check.py, the entry point) in modules of one idea each:

- :mod:`.harness`: timers, interleaved rounds (median and min), extra peak memory, memory housekeeping;
- :mod:`.config`: the full (GPU) and dry (CPU) configuration;
- :mod:`.run`: one run (its JSON, deadline, and the wrapper that records each section);
- :mod:`.agreement`: how a measured result is compared with its reference;
- :mod:`.backends`: which backend a measured call runs, and bf16 autocast;
- :mod:`.sections`: one module per section (env, gemm, linear, error, fisher, variability, profile);
- :mod:`.summary`: the summary table.

Imported as a top-level package: bench/ is on sys.path (gpu_check.py puts it there; the script's own folder
is there anyway when it runs as ``python bench/gpu_check.py``).
"""
