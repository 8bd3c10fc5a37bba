"""The offload as a library (k2.offload): the job's arguments for a planned range, one offload
through a caller's spark-submit, and the operator handing its settings to it."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest

from k2.catchup import CatchupPlan
from k2.config import load_tables
from k2.intervals import INTERVAL as STEP
from k2.offload import (
    OffloadResultError,
    job_arguments,
    offload_range,
    result_line,
    spark_submit_command,
)
from k2.runtime_env import IcebergSettings
from k2_provider.operators import offload as offload_operator
from k2_provider.operators.offload import OffloadToIcebergOperator

START = datetime(2026, 12, 6, 10, 0, tzinfo=timezone.utc)
PLAN = CatchupPlan(intervals=((START, START + STEP), (START + STEP, START + 2 * STEP)), reason="test")
ICEBERG = IcebergSettings("k2", "postgresql://127.0.0.1:1/k2", "k2", "secret", "file:///nowhere")
LOG = logging.getLogger("test")


def test_the_job_gets_the_planned_range_in_steps_and_no_driver_line_by_default() -> None:
    arguments = job_arguments("bronze_trades_binance", PLAN.intervals, "scheduled__x")
    assert arguments[arguments.index("--interval-start") + 1] == START.isoformat()
    assert arguments[arguments.index("--interval-end") + 1] == (START + 2 * STEP).isoformat()
    assert arguments[arguments.index("--interval-step") + 1] == "900s"
    assert "--driver-max-rows" not in arguments  # the job's own default
    assert job_arguments("t", PLAN.intervals, "r", driver_max_rows=0)[-2:] == ["--driver-max-rows", "0"]


def test_an_interval_that_is_not_whole_seconds_is_refused() -> None:
    with pytest.raises(ValueError, match="whole number of seconds"):
        job_arguments("t", [(START, START + timedelta(milliseconds=1500))], "r")


def test_spark_submit_command_puts_conf_and_jars_before_the_application() -> None:
    argv = spark_submit_command(["--table", "t"], master="local[2]", jars=["/a.jar", "/b.jar"],
                                conf={"spark.x": "1"}, binary="spark-submit")
    assert argv[:3] == ["spark-submit", "--master", "local[2]"]
    assert argv[argv.index("--jars") + 1] == "/a.jar,/b.jar"
    assert "spark.x=1" in argv
    assert argv[-3].endswith("spark_jobs/offload_to_iceberg.py") and argv[-2:] == ["--table", "t"]


def _printed(spec, run_id: str, intervals) -> list[str]:
    return ["some log line"] + [
        result_line({"table": spec.name, "interval_start": s.isoformat(), "interval_end": e.isoformat(),
                     "run_id": run_id, "rows": 10 * n, "checksum": n, "snapshot_id": 100 + n})
        for n, (s, e) in enumerate(intervals, start=1)
    ]


def test_offload_range_submits_the_job_and_reads_its_results_back(monkeypatch) -> None:
    spec = load_tables().get("silver_trades")
    monkeypatch.setattr("k2.iceberg.load_catalog", lambda settings: (_ for _ in ()).throw(OSError("down")))
    submitted = []

    def submit(arguments):
        submitted.append(arguments)
        return _printed(spec, "run_1", PLAN.intervals)

    done = offload_range(spec, PLAN.intervals, "run_1", iceberg=ICEBERG, submit=submit, log=LOG)
    assert submitted == [job_arguments(spec.name, PLAN.intervals, "run_1")]
    assert [(r["rows"], r["snapshot_id"]) for r in done.results] == [(10, 101), (20, 102)]
    assert done.results[1]["interval_start"] == (START + STEP).isoformat()


def test_offload_range_fails_when_an_interval_has_no_result(monkeypatch) -> None:
    spec = load_tables().get("silver_trades")
    monkeypatch.setattr("k2.iceberg.load_catalog", lambda settings: (_ for _ in ()).throw(OSError("down")))
    with pytest.raises(OffloadResultError, match=r"no Iceberg snapshot and no K2_OFFLOAD_RESULT line"):
        offload_range(spec, PLAN.intervals, "run_1", iceberg=ICEBERG, log=LOG,
                      submit=lambda arguments: _printed(spec, "run_1", PLAN.intervals[:1]))


def test_the_operator_offloads_through_the_library_with_its_driver_line(monkeypatch) -> None:
    seen = {}

    def fake_offload_range(spec, intervals, run_id, **kwargs):
        seen.update(spec=spec.name, intervals=intervals, run_id=run_id, **kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(offload_operator, "offload_range", fake_offload_range)
    operator = OffloadToIcebergOperator(task_id="offload", table="silver_trades", driver_max_rows=0)
    with pytest.raises(RuntimeError, match="stop here"):
        operator._offload({}, {}, ICEBERG, load_tables().get("silver_trades"), PLAN, "scheduled__x")
    assert seen["spec"] == "silver_trades" and seen["intervals"] == PLAN.intervals
    assert seen["driver_max_rows"] == 0 and seen["iceberg"] == ICEBERG
    assert operator.conf["spark.sql.catalog.k2.uri"] == "jdbc:postgresql://127.0.0.1:1/k2"


def test_a_negative_driver_max_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="driver_max_rows must be >= 0, got -1"):
        OffloadToIcebergOperator(task_id="offload", table="bronze_trades_binance", driver_max_rows=-1)
