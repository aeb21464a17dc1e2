"""bench/ftcompare/config.py: per-task option values and the strategy list."""
from __future__ import annotations

import pytest
from ftcompare.config import for_task, parse_per_task, strategy_table


def test_per_task_values():
    assert parse_per_task("64") == {"*": 64}
    v = parse_per_task("64,rte=128, SST2=32")
    assert v == {"*": 64, "rte": 128, "sst2": 32}
    assert for_task(v, "rte") == 128 and for_task(v, "cola") == 64 and for_task(v, "sst2") == 32
    with pytest.raises(ValueError):
        for_task({"rte": 1}, "cola")


def test_strategy_list_is_the_issues():
    names = [s[0] for s in strategy_table()]
    assert names == ["full", "fisher-top-1", "fisher-top-2", "fisher-top-3", "fisher-bottom-1", "position-top-1",
                     "position-top-3", "random-1", "random-3", "lstar-down-2", "lstar-down-2-trunc", "bitfit", "lora-i",
                     "spafit-1-3-i", "adapters"]
    assert [s[0] for s in strategy_table(["bitfit", "full", ""])] == ["full", "bitfit"]
    assert [s[0] for s in strategy_table(["adapters-all"])] == ["adapters-all"]
    with pytest.raises(SystemExit):
        strategy_table(["fisher-top-9x"])
