"""DAG integrity: the dags folder parses fast and cleanly into the 9 offload DAGs, built as designed."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.config import OVERRIDE_ENV, SPARK_POOL, ConfigError, load_tables
from k2.intervals import first_interval_start
from k2_dag_factory import (
    EXAMPLE_CONSUMER_DAG_ID,
    EXAMPLE_CONSUMER_TABLES,
    MAINTENANCE_DAG_ID,
    MAX_ACTIVE_RUNS,
    RETENTION_DAG_ID,
    TASK_COMMIT,
    TASK_OFFLOAD,
    TASK_SENSOR,
    build_dags,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO_ROOT / "dags"
DAG_FILES = sorted(DAGS_FOLDER.glob("*.py"))


def _without_overrides(build):
    """`build()` with tables.yaml as written: a session that also runs integration tests has
    their overrides (start date, deadline) in its environment."""
    with pytest.MonkeyPatch.context() as env:
        for variable in OVERRIDE_ENV.values():
            env.delenv(variable, raising=False)
        return build()


SPECS = _without_overrides(lambda: load_tables().tables)
EXPECTED_DAG_IDS = sorted(f"k2_offload_{spec.name}" for spec in SPECS)
PARSE_BUDGET_S = 2.0


@pytest.fixture(scope="session")
def parsed() -> tuple[Any, float]:
    """The DagBag of the dags folder (tables.yaml as written), built once, and how long
    building it took."""
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = _without_overrides(lambda: DagBag(dag_folder=str(DAGS_FOLDER)))
    return bag, time.perf_counter() - started


@pytest.fixture(scope="session")
def dagbag(parsed: tuple[Any, float]) -> Any:
    return parsed[0]


def _dags(dagbag: Any) -> list[Any]:
    return [dagbag.dags[dag_id] for dag_id in sorted(dagbag.dags)]


@pytest.mark.parametrize(
    "dag_file", DAG_FILES, ids=[str(p.relative_to(REPO_ROOT)) for p in DAG_FILES]
)
def test_dag_file_imports_cleanly(dagbag: Any, dag_file: Path) -> None:
    errors = {
        path: err for path, err in dagbag.import_errors.items() if Path(path).name == dag_file.name
    }
    assert errors == {}
    assert any(Path(dag.fileloc) == dag_file for dag in dagbag.dags.values())


def test_no_import_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}


def test_parsing_is_fast(parsed: tuple[Any, float]) -> None:
    assert parsed[1] < PARSE_BUDGET_S, f"parsing the dags folder took {parsed[1]:.2f}s"


def test_exactly_one_dag_per_table_and_the_daily_dags(dagbag: Any) -> None:
    assert sorted(dagbag.dag_ids) == sorted([*EXPECTED_DAG_IDS, RETENTION_DAG_ID, MAINTENANCE_DAG_ID,
                                             EXAMPLE_CONSUMER_DAG_ID])
    assert len(EXPECTED_DAG_IDS) == 9


def test_every_commit_task_announces_its_table_asset_through_its_alias(dagbag: Any) -> None:
    from k2_provider.assets import committed_alias, iceberg_table_asset

    for spec in SPECS:
        commit = dagbag.dags[spec.dag_id].get_task("commit_watermark")
        assert commit.outlets == [committed_alias(spec.dag_id)]
        assert commit.asset == iceberg_table_asset(spec)
        assert commit.asset.uri == f"iceberg://k2/{spec.iceberg_table.replace('.', '/')}"


def test_the_example_consumer_waits_on_the_silver_and_a_gold_asset_paused_and_tagged(dagbag: Any) -> None:
    from k2_provider.assets import iceberg_table_asset

    dag = dagbag.dags[EXAMPLE_CONSUMER_DAG_ID]
    assert dag.is_paused_upon_creation is True and "example" in dag.tags
    specs = {spec.name: spec for spec in SPECS}
    wanted = {iceberg_table_asset(specs[name]).uri for name in EXAMPLE_CONSUMER_TABLES}
    assert {asset.uri for asset in dag.timetable.asset_condition.objects} == wanted  # either one
    assert "silver_trades" in EXAMPLE_CONSUMER_TABLES and any(t.startswith("gold_") for t in EXAMPLE_CONSUMER_TABLES)


def test_the_retention_dag_has_a_task_per_table_runs_daily_and_starts_paused(dagbag: Any) -> None:
    dag = dagbag.dags[RETENTION_DAG_ID]
    assert sorted(t.task_id for t in dag.tasks) == sorted(f"retain_{spec.name}" for spec in SPECS)
    assert {type(t).__name__ for t in dag.tasks} == {"HotRetentionOperator"}
    assert all(t.retries == 0 for t in dag.tasks)  # a kept partition is reported, not retried
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.is_paused_upon_creation is True  # destructive: unpaused by the operator
    assert {"k2", "retention"} <= set(dag.tags)
    assert "retention-blocked" in dag.doc_md


def test_the_maintenance_dag_has_a_task_per_table_runs_daily_and_starts_paused(dagbag: Any) -> None:
    dag = dagbag.dags[MAINTENANCE_DAG_ID]
    assert sorted(t.task_id for t in dag.tasks) == sorted(f"maintain_{spec.name}" for spec in SPECS)
    assert {type(t).__name__ for t in dag.tasks} == {"IcebergMaintenanceOperator"}
    assert {t.application.rsplit("/", 1)[-1] for t in dag.tasks} == {"maintain_iceberg.py"}
    assert all(t.retries == 1 for t in dag.tasks)
    assert type(dag.timetable).__name__ == "CronTriggerTimetable" and dag.timetable.expression == "0 4 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1 and dag.is_paused_upon_creation is True
    assert {"k2", "maintenance"} <= set(dag.tags)
    assert "maintenance-failed" in dag.doc_md


@pytest.mark.parametrize("spec", SPECS, ids=[spec.dag_id for spec in SPECS])
class TestOffloadDag:
    def test_timetable_is_a_15_minute_utc_data_interval(self, dagbag: Any, spec: Any) -> None:
        from airflow.serialization.encoders import coerce_to_core_timetable
        from airflow.timetables.interval import CronDataIntervalTimetable

        timetable = coerce_to_core_timetable(dagbag.dags[spec.dag_id].timetable)
        assert isinstance(timetable, CronDataIntervalTimetable)
        assert timetable.serialize() == {"expression": "*/15 * * * *", "timezone": "UTC"}
        import pendulum

        interval = timetable.infer_manual_data_interval(
            run_after=pendulum.datetime(2026, 3, 1, 10, 7, tz="UTC")
        )
        assert (interval.start, interval.end) == (
            datetime(2026, 3, 1, 9, 45, tzinfo=timezone.utc),
            datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc),
        )

    def test_schedule_settings(self, dagbag: Any, spec: Any) -> None:
        dag = dagbag.dags[spec.dag_id]
        assert dag.catchup is True
        assert dag.start_date == spec.start_date
        assert dag.max_active_runs == MAX_ACTIVE_RUNS
        assert dag.doc_md and spec.iceberg_table in dag.doc_md and "Runbook" in dag.doc_md

    def test_retries_with_exponential_backoff(self, dagbag: Any, spec: Any) -> None:
        for task in dagbag.dags[spec.dag_id].tasks:
            assert task.retries >= 2, task.task_id
            # Airflow 3.3 treats this as a multiplier: 1 (True) would mean a constant delay.
            assert task.retry_exponential_backoff >= 2, task.task_id
            assert task.retry_delay > timedelta(0)

    def test_tags(self, dagbag: Any, spec: Any) -> None:
        tags = set(dagbag.dags[spec.dag_id].tags)
        layer = spec.name.split("_", 1)[0]
        assert {"k2", "offload", layer} <= tags
        assert layer in {"bronze", "silver", "gold"}

    def test_task_chain(self, dagbag: Any, spec: Any) -> None:
        dag = dagbag.dags[spec.dag_id]
        assert sorted(dag.task_ids) == sorted([TASK_SENSOR, TASK_OFFLOAD, TASK_COMMIT])
        assert dag.get_task(TASK_SENSOR).downstream_task_ids == {TASK_OFFLOAD}
        assert dag.get_task(TASK_OFFLOAD).downstream_task_ids == {TASK_COMMIT}
        assert dag.get_task(TASK_COMMIT).downstream_task_ids == set()
        assert dag.get_task(TASK_SENSOR).upstream_task_ids == set()

    def test_tasks_are_configured_from_the_spec(self, dagbag: Any, spec: Any) -> None:
        dag = dagbag.dags[spec.dag_id]
        sensor = dag.get_task(TASK_SENSOR)
        assert (sensor.table, sensor.column) == (spec.completeness.table, spec.completeness.column)
        assert sensor.lateness == spec.allowed_lateness
        assert sensor.deferrable is True
        assert sensor.target == "{{ data_interval_end | ts }}"
        offload = dag.get_task(TASK_OFFLOAD)
        assert (offload.pool, offload.pool_slots) == (SPARK_POOL, 1)
        assert offload.table == spec.name
        assert offload.max_intervals_per_job == spec.max_intervals_per_job
        # one offload of a table at a time: a run waiting for its lock holds no pool slot
        assert offload.max_active_tis_per_dag == 1
        assert offload.application.endswith("spark_jobs/offload_to_iceberg.py")
        assert not offload.env_vars  # built at execute time, never at parse time
        commit = dag.get_task(TASK_COMMIT)
        assert commit.table == spec.name
        assert commit.initial_watermark == first_interval_start(spec.start_date)

    def test_deadline_alert(self, dagbag: Any, spec: Any) -> None:
        from airflow.sdk import AsyncCallback, DeadlineReference

        [alert] = dagbag.dags[spec.dag_id].deadline
        assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT
        assert alert.interval == spec.deadline
        assert isinstance(alert.callback, AsyncCallback)
        assert alert.callback.path == "k2_provider.notifications.deadline.DeadlineMissNotifier"
        assert alert.callback.kwargs["to"]
        assert alert.callback.kwargs["table"] == spec.name

    def test_every_task_emails_when_it_fails_for_good(self, dagbag: Any, spec: Any) -> None:
        from k2_provider.notifications.task_failure import TaskFailureNotifier

        for task in dagbag.dags[spec.dag_id].tasks:
            callbacks = task.on_failure_callback or []
            assert any(isinstance(cb, TaskFailureNotifier) for cb in callbacks), task.task_id
            assert not any(isinstance(cb, TaskFailureNotifier) for cb in task.on_retry_callback or [])

    def test_dag_serializes_for_the_scheduler(self, dagbag: Any, spec: Any) -> None:
        from airflow.serialization.serialized_objects import DagSerialization

        serialized = DagSerialization.from_dict(DagSerialization.to_dict(dagbag.dags[spec.dag_id]))
        assert serialized.catchup is True
        assert serialized.get_task(TASK_OFFLOAD).pool == SPARK_POOL
        assert serialized.get_task(TASK_OFFLOAD).max_active_tis_per_dag == 1
        assert type(serialized.timetable).__name__ == "CronDataIntervalTimetable"


def test_offload_arguments_render_to_iso_utc(dagbag: Any) -> None:
    import pendulum

    dag = dagbag.dags[EXPECTED_DAG_IDS[0]]
    task = dag.get_task(TASK_OFFLOAD)
    context = {
        "data_interval_start": pendulum.datetime(2026, 1, 1, 0, 0, tz="UTC"),
        "data_interval_end": pendulum.datetime(2026, 1, 1, 0, 15, tz="UTC"),
        "run_id": "scheduled__2026-01-01T00:15:00+00:00",
    }
    args = task.render_template(task.application_args, context, dag.get_template_env())
    assert args == [
        "--table",
        task.table,
        "--interval-start",
        "2026-01-01T00:00:00+00:00",
        "--interval-end",
        "2026-01-01T00:15:00+00:00",
        "--run-id",
        "scheduled__2026-01-01T00:15:00+00:00",
    ]


def test_first_interval_start_aligns_to_the_schedule() -> None:
    aligned = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert first_interval_start(aligned) == aligned
    assert first_interval_start(aligned + timedelta(minutes=1)) == aligned + timedelta(minutes=15)
    assert (
        first_interval_start(datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))))
        == aligned
    )


# The factory's error isolation


def _write_tables(tmp_path: Path, *entries: dict[str, Any]) -> Path:
    path = tmp_path / "tables.yaml"
    defaults = {
        "start_date": "2026-01-01T00:00:00Z",
        "allowed_lateness": "2m",
        "hot_retention": "7d",
        "deadline": "30m",
    }
    path.write_text(yaml.safe_dump({"defaults": defaults, "tables": list(entries)}))
    return path


def _entry(name: str, **overrides: Any) -> dict[str, Any]:
    return {
        "clickhouse_table": name,
        "event_time_column": "event_time",
        "unique_key": ["trade_id"],
        "iceberg_table": f"cold.{name}",
        **overrides,
    }


def test_strict_mode_fails_parsing_with_the_config_error(tmp_path: Path) -> None:
    path = _write_tables(
        tmp_path, _entry("bronze_good"), _entry("bronze_bad", allowed_lateness="soon")
    )
    with pytest.raises(ConfigError, match="table 'bronze_bad', key 'allowed_lateness'"):
        build_dags(path, strict=True)


def test_strict_is_on_in_tests() -> None:
    import os

    assert os.environ.get("K2_STRICT_DAGS") == "1"


def test_non_strict_mode_skips_only_the_bad_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_tables(
        tmp_path,
        _entry("bronze_good"),
        _entry("bronze_bad", partition_by=["days(event_time)"]),
        _entry("bronze_good"),  # a duplicate is skipped too
        _entry("silver_also_good"),
    )
    with caplog.at_level(logging.ERROR, logger="k2_dag_factory"):
        dags = build_dags(path, strict=False)
    assert sorted(dags) == ["k2_offload_bronze_good", "k2_offload_silver_also_good"]
    assert "bronze_bad" in caplog.text and "partition_by" in caplog.text
    assert "listed twice" in caplog.text


def test_non_strict_mode_skips_a_dag_that_fails_to_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_tables(
        tmp_path, _entry("bronze_good"), _entry("platinum_table")
    )  # no layer prefix
    with caplog.at_level(logging.ERROR, logger="k2_dag_factory"):
        dags = build_dags(path, strict=False)
    assert list(dags) == ["k2_offload_bronze_good"]
    assert "platinum_table" in caplog.text
    with pytest.raises(ConfigError, match="platinum_table"):
        build_dags(path, strict=True)


def test_non_strict_mode_keeps_the_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The lenient path applies K2_START_DATE and K2_DEADLINE, per table too, as the strict one."""
    path = _write_tables(tmp_path, _entry("bronze_good"), _entry("bronze_bad", partition_by=["days(x)"]),
                         _entry("silver_also_good"))
    monkeypatch.setenv("K2_START_DATE", "2026-11-30T18:00:00Z,silver_also_good=2026-11-30T12:00:00Z")
    monkeypatch.setenv("K2_DEADLINE", "7m")
    with caplog.at_level(logging.ERROR, logger="k2_dag_factory"):
        dags = build_dags(path, strict=False)
    assert sorted(dags) == ["k2_offload_bronze_good", "k2_offload_silver_also_good"]
    assert dags["k2_offload_bronze_good"].start_date.isoformat() == "2026-11-30T18:00:00+00:00"
    assert dags["k2_offload_silver_also_good"].start_date.isoformat() == "2026-11-30T12:00:00+00:00"
    assert all(d.deadline[0].interval.total_seconds() == 420 for d in dags.values())


def test_end_date_schedules_the_last_interval_ending_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K2_END_DATE (`k2 demo --until-caught-up`): the last run's interval ends at the end date;
    the timetable schedules none after it, however long the scheduler runs."""
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.timetables.base import TimeRestriction

    path = _write_tables(tmp_path, _entry("bronze_good"), _entry("silver_open"))
    monkeypatch.setenv("K2_START_DATE", "2026-11-30T18:00:00Z")
    monkeypatch.setenv("K2_END_DATE", "2026-11-30T18:30:00Z,silver_open=2026-11-30T18:40:00Z")
    dags = build_dags(path, strict=True)

    def interval_ends(dag: Any) -> list[str]:  # as the scheduler schedules the serialized DAG
        dag = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        timetable, ends, last = dag.timetable, [], None
        restriction = TimeRestriction(dag.start_date, dag.end_date, catchup=True)
        for _ in range(10):
            info = timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
            if info is None:
                break
            last = info.data_interval
            ends.append(last.end.strftime("%H:%M"))
        return ends

    assert interval_ends(dags["k2_offload_bronze_good"]) == ["18:15", "18:30"]
    # Not on the grid: the last interval is the one ending before it.
    assert interval_ends(dags["k2_offload_silver_open"]) == ["18:15", "18:30"]
    monkeypatch.setenv("K2_END_DATE", "18:30")
    with pytest.raises(ConfigError, match="end_date"):
        build_dags(path, strict=True)
