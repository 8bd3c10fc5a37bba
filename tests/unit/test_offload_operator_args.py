"""The offload operator's arguments of the Spark job: the planned range, and the line
between the driver's and the executors' write when the DAG sets one."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from k2.catchup import CatchupPlan
from k2_provider.operators.offload import OffloadToIcebergOperator

START = datetime(2026, 12, 6, 10, 0, tzinfo=timezone.utc)
STEP = timedelta(minutes=15)
PLAN = CatchupPlan(intervals=((START, START + STEP), (START + STEP, START + 2 * STEP)), reason="test")


def test_the_job_gets_the_planned_range_in_steps_and_no_driver_line_by_default() -> None:
    operator = OffloadToIcebergOperator(task_id="offload", table="bronze_trades_binance")
    arguments = operator._job_arguments(PLAN, "scheduled__x")
    assert arguments[arguments.index("--interval-start") + 1] == START.isoformat()
    assert arguments[arguments.index("--interval-end") + 1] == (START + 2 * STEP).isoformat()
    assert arguments[arguments.index("--interval-step") + 1] == "900s"
    assert "--driver-max-rows" not in arguments  # the job's own default


def test_driver_max_rows_reaches_the_job() -> None:
    operator = OffloadToIcebergOperator(task_id="offload", table="bronze_trades_binance", driver_max_rows=0)
    arguments = operator._job_arguments(PLAN, "scheduled__x")
    assert arguments[-2:] == ["--driver-max-rows", "0"]


def test_a_negative_driver_max_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="driver_max_rows must be >= 0, got -1"):
        OffloadToIcebergOperator(task_id="offload", table="bronze_trades_binance", driver_max_rows=-1)
