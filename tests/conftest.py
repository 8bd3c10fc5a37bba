"""Shared test setup: the repository root and strict DAG parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A bad table spec must fail the test run, not be skipped with a log line.
os.environ.setdefault("K2_STRICT_DAGS", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
