"""Shared test setup: the repository root, strict DAG parsing, and the two lanes.

`make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`):

- the *Airflow lane*: every test that uses the session's Airflow (`airflow_running`) is
  one xdist group, so all of them run in one worker, on one stack and one Airflow, in
  collection order (their modules say which DAGs they own; see
  tests/integration/conftest.py);
- the *other lane*: unit, DAG-integrity and job-level tests, each module a group of its
  own, so a module's expensive module-scoped fixture (a Spark job) runs once.

The Airflow lane is the longest; it is put first so that it starts at once. Within it,
tests marked `late` run last: their clock is the session's age (test_fault_stopped_feed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_LANE = "airflow"

# A bad table spec must fail the test run, not be skipped with a log line.
os.environ.setdefault("K2_STRICT_DAGS", "1")


def _on_session_airflow(item: pytest.Item) -> bool:
    return "airflow_running" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before xdist turns the groups into node-id suffixes
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("xdist"):  # the marker is xdist's
        for item in items:
            group = AIRFLOW_LANE if _on_session_airflow(item) else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))
    # Stable: modules keep their order otherwise.
    items.sort(key=lambda item: (not _on_session_airflow(item), item.get_closest_marker("late") is not None))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
