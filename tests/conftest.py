"""Shared fixtures."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
