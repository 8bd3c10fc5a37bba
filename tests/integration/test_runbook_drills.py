"""Runbook drills on the session's Airflow (docs/operations/runbooks.md, run as written by
tests/runbooks.py, each in the state its section describes): "Import errors" (a broken DAG
file deployed), "Late rows" with "Performance degradation" (late rows replaced by
`k2 reoffload` and by a cleared run, which another holder of the offload lock slows down),
"Scheduler recovery" (the scheduler killed) and "Maintenance failed" (the maintenance DAG
stale: paused, never run). The other sections are drilled where their state arises:
test_failure_email ("First look", "Offload failure", "Watermark recovery"),
test_deadline_email, test_outage_catchup ("High lag", "Catch-up backlog"),
test_fault_stopped_feed, test_late_rows ("Quarantined rows"), test_retention and
test_metrics_pipeline_drill.

Tables used here: bronze_trades_kraken, after test_faults_airflow is done with it (this
module runs after it in the Airflow lane). Rows inserted late into bronze_trades_kraken
reach silver and gold in ClickHouse through the materialized views; no later Airflow test
verifies those tables.

About 6 minutes in the suite: the dag-processor's parse loops, two re-offloads, a held run,
a run queued while the scheduler was down and one table's maintenance, twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest

from k2.config import load_tables
from k2.intervals import INTERVAL
from k2.local import airflow
from k2.watermarks import WatermarkStore
from tests.integration.airflow_handle import wait_until
from tests.integration.test_faults_airflow import _caught_up, _offload_lock_held, _top_up, _verify_clean
from tests.integration.test_late_rows import _insert_trades, _next_trade_id
from tests.runbooks import REPO_ROOT, Drill

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = load_tables().get("bronze_trades_kraken")


def _drill(stack, section: str, **values: str) -> Drill:
    return Drill(section, home=stack.home, table=SPEC.name, env_file=stack.home / "airflow.env", values=values)


def _scheduled_offloads(airflow_running) -> list[datetime]:
    """Interval starts of the table's successful scheduled runs, oldest first."""
    rows = airflow_running.sql(
        "SELECT data_interval_start FROM dag_run WHERE dag_id = %s AND run_type = 'scheduled' "
        "AND state = 'success' ORDER BY data_interval_start", SPEC.dag_id)
    return [row[0] for row in rows]


def _window(start: datetime) -> dict[str, str]:
    return {"<start>": start.isoformat(), "<end>": (start + INTERVAL).isoformat()}


def _run_state(airflow_running, run_id: str) -> str | None:
    rows = airflow_running.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", SPEC.dag_id, run_id)
    return rows[0][0] if rows else None


BROKEN_DAG = REPO_ROOT / "dags" / "k2_runbook_drill_broken.py"


def _import_errors(airflow_running) -> list[str]:
    return [row[0] for row in airflow_running.sql("SELECT filename FROM import_error")]


def test_import_errors_runbook_finds_the_broken_file(stack, airflow_running):
    """A DAG file that fails to import is deployed to the bundle (the session's dags folder);
    the dag-processor records the error. The runbook's look names the file (tables.yaml
    itself loads, the DAG integrity tests fail on it); the fix is a corrected file, after
    which the error list is empty."""
    # (The dag-processor's safe mode parses only files that mention both "airflow" and "dag".)
    BROKEN_DAG.write_text('"""An Airflow DAG file with an error."""\n\nfrom k2_dag_factory import no_such_factory\n')
    try:
        wait_until(lambda: any(name.endswith(BROKEN_DAG.name) for name in _import_errors(airflow_running)), 300,
                   f"the dag-processor recording {BROKEN_DAG.name}'s import error", 3)
        with _drill(stack, "Import errors") as drill:
            listed = drill.run("airflow dags list-import-errors", expect=1).stdout  # 1: there are errors
            assert BROKEN_DAG.name in listed and "no_such_factory" in listed, listed
            drill.run("load_tables()")
            assert BROKEN_DAG.name in drill.run("pytest tests/dags", expect=1).stdout
            BROKEN_DAG.write_text('"""An Airflow DAG file, corrected: it holds no DAG."""\n')
            wait_until(lambda: not any(name.endswith(BROKEN_DAG.name) for name in _import_errors(airflow_running)),
                       300, f"{BROKEN_DAG.name}'s import error cleared", 3)
            assert BROKEN_DAG.name not in drill.run("airflow dags list-import-errors").stdout
    finally:
        BROKEN_DAG.unlink(missing_ok=True)


def test_late_rows_runbook_and_a_rerun_held_by_another_lock_holder(stack, hot_data, airflow_running):
    """Late rows reach two offloaded intervals. The "Late rows" runbook finds both and
    replaces one with `k2 reoffload`, the other by clearing its run in Airflow. That re-run
    is slowed by contention - another holder of the table's offload lock (as a maintenance
    run or a `k2 reoffload` would be) keeps its offload waiting: the "Performance
    degradation" look shows the durations and the running run, and when the holder finishes
    the run commits, in the time to recover that section quotes."""
    # Caught up first (every closed interval complete in ClickHouse): the re-run below is then
    # the table's only run, held by the lock alone, not queued behind catch-up runs.
    airflow_running.unpause(SPEC.dag_id)
    try:
        _caught_up(stack, SPEC, _top_up(hot_data))
    finally:
        airflow_running.pause_quietly(SPEC.dag_id)
    store = WatermarkStore(stack.postgres_dsn("k2"))
    ledgered = {entry.interval_start for entry in store.ledger_all(SPEC.name)}
    scheduled = [start for start in _scheduled_offloads(airflow_running) if start in ledgered]
    assert len(scheduled) >= 2, f"{SPEC.dag_id} needs two offloaded intervals with scheduled runs: {scheduled}"
    by_cli, by_airflow = scheduled[0], scheduled[1]
    next_id = _next_trade_id(hot_data)
    _insert_trades(hot_data, [next_id, next_id + 1], [by_cli + timedelta(minutes=m) for m in (4, 9)])
    _insert_trades(hot_data, [next_id + 2, next_id + 3], [by_airflow + timedelta(minutes=m) for m in (2, 13)])
    run_id = airflow_running.sql("SELECT run_id FROM dag_run WHERE dag_id = %s AND run_type = 'scheduled' "
                                 "AND data_interval_start = %s", SPEC.dag_id, by_airflow)[0][0]

    with _drill(stack, "Late rows") as drill:
        found = drill.run("k2 verify --table T", expect=1).stdout
        for start in (by_cli, by_airflow):
            assert f"late rows: 2 in [{start.isoformat()}" in found, found
        report = json.loads(drill.run("--json", expect=1, **_window(by_cli)).stdout)
        late = [item for table in report for item in table["late_rows"]]
        assert [(item["start"], item["rows"]) for item in late] == [(by_cli.isoformat(), 2)], late
        assert "late rows now 0." in drill.run("k2 reoffload", **_window(by_cli)).stdout
        drill.run("k2 verify --table T --from <start> --to <end>", **_window(by_cli))
        # Through Airflow: the cleared run re-offloads its own interval - behind the lock.
        with _drill(stack, "Performance degradation") as slow, _offload_lock_held(stack, SPEC.name) as release:
            before = store.ledger_entry(SPEC.name, by_airflow)
            airflow_running.unpause(SPEC.dag_id)
            try:
                drill.run("airflow tasks clear", **_window(by_airflow))
                wait_until(lambda: airflow_running.sql(
                    "SELECT 1 FROM task_instance WHERE dag_id = %s AND run_id = %s AND task_id = 'offload_to_iceberg' "
                    "AND state = 'running' AND try_number > 1", SPEC.dag_id, run_id), 300,
                    f"{run_id}'s offload running again")
                for query in ("k2_offload_duration_seconds_bucket", "k2_cycle_duration_seconds_bucket"):
                    answer = json.loads(slow.run(query).stdout)
                    assert answer["status"] == "success", answer
                assert run_id in slow.run("--state running").stdout
                assert store.ledger_entry(SPEC.name, by_airflow) == before, "committed while the lock was held"
                released = time.monotonic()
                release()
                assert airflow_running.run_state_by_id(SPEC.dag_id, run_id) == "success"
                slow.recovered(time.monotonic() - released)
            finally:
                airflow_running.pause_quietly(SPEC.dag_id)
        drill.run("k2 verify --table T --from <start> --to <end>", **_window(by_airflow))
    for start in (by_cli, by_airflow):
        _verify_clean(stack, hot_data, SPEC, start, start + INTERVAL, "late rows runbook")


def _scheduler_heartbeat_age(airflow_running) -> float:
    rows = airflow_running.sql("SELECT extract(epoch FROM now() - max(latest_heartbeat)) FROM job "
                               "WHERE job_type = 'SchedulerJob'")
    return float(rows[0][0]) if rows and rows[0][0] is not None else float("inf")


def test_scheduler_recovery_runbook_after_the_scheduler_died(stack, hot_data, airflow_running):
    """The scheduler process dies (SIGKILL, as the OOM killer would). The runbook's look
    finds it dead; a run triggered meanwhile stays queued; the scheduler is restarted as
    `make run` would, and the run completes - the time to recover the section quotes."""
    scheduler = airflow.COMPONENT_BY_NAME["airflow-scheduler"]
    end = _top_up(hot_data)
    start = datetime.fromtimestamp((end - SPEC.allowed_lateness).timestamp() // 900 * 900, timezone.utc) - INTERVAL
    run_id = f"manual__runbook_scheduler_{int(start.timestamp())}"
    with _drill(stack, "Scheduler recovery") as drill:
        pid = scheduler.pid(stack)
        assert pid, "the session's scheduler is not running"
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: scheduler.pid(stack) is None, 30, "the scheduler process gone")
        # Airflow calls a scheduler dead once its heartbeat is older than the health threshold.
        wait_until(lambda: _scheduler_heartbeat_age(airflow_running) > 35, 120, "the scheduler's heartbeat stale", 2)
        airflow_running.unpause(SPEC.dag_id)
        airflow_running.trigger(SPEC.dag_id, run_id, start, start + INTERVAL)
        try:
            drill.run("k2 health", expect=(1, 2))
            assert "airflow-scheduler" in drill.run("k2 local status", expect=(0, 1)).stdout
            drill.run("airflow jobs check --job-type SchedulerJob", expect=1)
            drill.run("--job-type TriggererJob")
            drill.run("tail -n 100")
            assert _run_state(airflow_running, run_id) == "queued", "a run started with no scheduler"
            restarted = time.monotonic()
            assert scheduler.start(stack), "the scheduler did not start"
            assert airflow_running.run_state_by_id(SPEC.dag_id, run_id) == "success"
            drill.recovered(time.monotonic() - restarted)
            drill.run("--limit 1")
            drill.run("k2 watermark show")
        finally:
            if scheduler.pid(stack) is None:
                scheduler.start(stack)
            airflow_running.pause_quietly(SPEC.dag_id)
    _verify_clean(stack, hot_data, SPEC, start, start + INTERVAL, "scheduler recovery runbook")


MAINTENANCE_DAG = "k2_iceberg_maintenance"


def test_maintenance_runbook_runs_the_stale_dag_now_and_clears_a_task(stack, airflow_running):
    """K2MaintenanceStale's first cause, as the session has it: the maintenance DAG was
    created paused and has never run. The runbook's look finds no run; its fix triggers a
    run now and unpauses the DAG, then clears one table's task, which runs. (The drill marks
    the run's tasks skipped before the unpause, so that the clear's run of one table's task is
    the one Spark job, not nine.) The DAG is paused again afterwards."""
    task = f"maintain_{SPEC.name}"
    airflow_running.wait_registered(MAINTENANCE_DAG)
    logical = datetime.now(timezone.utc).replace(microsecond=0)
    with _drill(stack, "Maintenance failed", **{"<now>": logical.isoformat(),
                                                  "<run's logical date>": logical.isoformat()}) as drill:
        assert "manual__" not in drill.run("list-runs k2_iceberg_maintenance").stdout
        drill.run("k2 watermark show")
        try:
            drill.run("airflow dags trigger")
            (run_id,), = wait_until(lambda: airflow_running.sql(
                "SELECT run_id FROM dag_run WHERE dag_id = %s AND logical_date = %s", MAINTENANCE_DAG, logical),
                60, "the triggered maintenance run")
            tasks = [row[0] for row in airflow_running.sql(
                "SELECT task_id FROM task_instance WHERE dag_id = %s AND run_id = %s", MAINTENANCE_DAG, run_id)]
            assert task in tasks, f"the run has no {task}: {tasks}"
            for other in tasks:
                airflow_running.api("PATCH", f"/dags/{MAINTENANCE_DAG}/dagRuns/{run_id}/taskInstances/{other}",
                                    {"new_state": "skipped"})
            drill.run("airflow dags unpause")
            assert airflow_running.run_state_by_id(MAINTENANCE_DAG, run_id, timeout=900) == "success"
            states = drill.run("states-for-dag-run", **{"<run id>": run_id}).stdout
            assert task in states and "failed" not in states, states
            drill.run("airflow tasks clear")
            wait_until(lambda: airflow_running.sql(
                "SELECT 1 FROM task_instance WHERE dag_id = %s AND run_id = %s AND task_id = %s "
                "AND state = 'success'", MAINTENANCE_DAG, run_id, task), 600,
                f"{task} run after the clear", 3)
        finally:
            airflow_running.pause_quietly(MAINTENANCE_DAG)
