"""Shared test setup: the repository root, strict DAG parsing, and the two lanes.

`make test` runs the suite on two pytest-xdist workers, scheduled by `LaneScheduling`:

- the *Airflow lane*: the modules of AIRFLOW_LANE_MODULES, whose tests use the session's
  Airflow (`airflow_running`), are one work unit, so one worker runs all of them, on one
  stack and one Airflow, in collection order (their modules say which DAGs they own; see
  tests/README.md);
- the *other lane*: unit, DAG-integrity and job-level tests, each module a unit of its
  own, so a module's expensive module-scoped fixture (a Spark job) runs once.

The Airflow lane is the longest; it is put first so that it starts at once. Within it,
tests marked `late` run last: their clock is the session's age (test_fault_stopped_feed).

The lanes are scheduled here rather than with `--dist loadgroup` because xdist 3.8 marks a
group by rewriting `item._nodeid`, which pytest 9 no longer reads: the groups silently
vanish and every worker starts an Airflow of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_LANE = "airflow"
# Every module with a test on the session's Airflow; collection fails if one is missing.
AIRFLOW_LANE_MODULES = frozenset(
    f"tests/integration/{name}.py"
    for name in (
        "test_assets",
        "test_deadline_email",
        "test_failure_email",
        "test_faults_airflow",
        "test_offload_dag",
        "test_outage_catchup",
        "test_fault_stopped_feed",
        "test_runbook_drills",
        "test_scale_out",
        "test_ui_drills",
    )
)

# A bad table spec must fail the test run, not be skipped with a log line.
os.environ.setdefault("K2_STRICT_DAGS", "1")


def _module_path(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _in_airflow_lane(item: pytest.Item) -> bool:
    return _module_path(item.nodeid) in AIRFLOW_LANE_MODULES


def pytest_itemcollected(item: pytest.Item) -> None:
    if "airflow_running" in getattr(item, "fixturenames", ()) and not _in_airflow_lane(item):
        raise pytest.UsageError(
            f"{item.nodeid} uses the session's Airflow: add {_module_path(item.nodeid)} to "
            "AIRFLOW_LANE_MODULES in tests/conftest.py, or it starts a second Airflow"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable: modules keep their order otherwise.
    items.sort(key=lambda item: (not _in_airflow_lane(item), item.get_closest_marker("late") is not None))


@pytest.hookimpl(optionalhook=True)  # xdist's hook: absent under `-p no:xdist`
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        """The Airflow lane as one work unit, every other module as one."""

        def _split_scope(self, nodeid: str) -> str:
            module = _module_path(nodeid)
            return AIRFLOW_LANE if module in AIRFLOW_LANE_MODULES else module

    return LaneScheduling(config, log)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
