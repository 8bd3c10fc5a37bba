"""Fault matrix, Airflow level: faults around the offload DAG on the real scheduler,
triggerer and LocalExecutor, PostgreSQL, the ClickHouse endpoint, Spark and Iceberg.
Each test ends with `verify_table` clean and prints the rows lost and duplicated it
measured (docs/reliability-airflow.md quotes them).

Tables used here (never by test_offload_dag.py): gold_ohlcv_15m."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import psycopg
import pytest

from k2 import iceberg as ib
from k2.config import load_tables
from k2.local import airflow
from k2.verify import verify_table
from k2.watermarks import WatermarkStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL = timedelta(minutes=15)
TABLES = load_tables()


def _is_paused(stack, dag_id: str) -> bool | None:
    with psycopg.connect(stack.postgres_dsn("airflow")) as conn:
        row = conn.execute("SELECT is_paused FROM dag WHERE dag_id = %s", (dag_id,)).fetchone()
    return None if row is None else bool(row[0])


def _unpause(airflow_running, dag_id: str) -> None:
    """Unpause, and check it held: an unpause issued while the dag-processor is still
    registering the DAG (created paused) has been seen not to stick."""
    deadline = time.monotonic() + 600  # registration takes minutes on a loaded machine
    while True:
        try:
            airflow_running.cli("dags", "unpause", dag_id)
        except AssertionError:
            pass  # not registered yet
        time.sleep(3)
        if _is_paused(airflow_running.stack, dag_id) is False:
            return
        assert time.monotonic() < deadline, f"{dag_id} is still paused"


def _task_instances(stack, dag_id: str, interval_start: datetime) -> dict[str, tuple[int, str | None]]:
    """task_id -> (try_number, state) of the newest run of that interval."""
    with psycopg.connect(stack.postgres_dsn("airflow")) as conn:
        rows = conn.execute(
            """
            SELECT ti.task_id, ti.try_number, ti.state FROM task_instance ti
            WHERE ti.dag_id = %s AND ti.run_id = (
                SELECT run_id FROM dag_run WHERE dag_id = %s AND data_interval_start = %s
                ORDER BY id DESC LIMIT 1)
            """,
            (dag_id, dag_id, interval_start),
        ).fetchall()
    return {r[0]: (int(r[1] or 0), r[2]) for r in rows}


def _interval_snapshots(stack, spec, start: datetime, end: datetime) -> list[ib.OffloadSnapshot]:
    """Every offload snapshot of [start, end) the table's metadata still lists (not only the newest)."""
    table = ib.load_catalog(airflow.iceberg_settings(stack)).load_table(spec.iceberg_table)
    found = []
    for snapshot in table.snapshots():
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        offload = ib.offload_snapshot_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms, summary)
        if offload is not None and (offload.interval_start, offload.interval_end) == (start, end):
            found.append(offload)
    return found


def _verify_clean(stack, client, spec, start, end, label: str) -> None:
    catalog = ib.load_catalog(airflow.iceberg_settings(stack))
    report = verify_table(spec, ch_client=client, catalog=catalog, start=start, end=end)
    totals = report.totals()
    print(f"\n[{label}] {spec.name} [{start.isoformat()}, {end.isoformat()}): "
          f"rows lost={totals.get('missing')} duplicated={totals.get('duplicated')} "
          f"mismatched={totals.get('mismatched')}")
    assert report.ok, report.format()
    assert totals.get("missing") == 0 and totals.get("duplicated") == 0, report.format()


FAIL_FUNCTION = "k2_test_refuse_ledger"


def _refuse_ledger_writes(stack, table: str) -> None:
    """A real PostgreSQL fault: a trigger that makes every ledger write of `table` fail."""
    with psycopg.connect(stack.postgres_dsn("k2")) as conn:
        conn.execute(
            f"""
            CREATE OR REPLACE FUNCTION {FAIL_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'fault injection: ledger write of % refused', NEW.table_name; END $$
            """
        )
        conn.execute(f"DROP TRIGGER IF EXISTS {FAIL_FUNCTION} ON k2_offload_ledger")
        conn.execute(
            f"CREATE TRIGGER {FAIL_FUNCTION} BEFORE INSERT OR UPDATE ON k2_offload_ledger FOR EACH ROW "
            f"WHEN (NEW.table_name = '{table}') EXECUTE FUNCTION {FAIL_FUNCTION}()"
        )


def _allow_ledger_writes(stack) -> None:
    with psycopg.connect(stack.postgres_dsn("k2")) as conn:
        conn.execute(f"DROP TRIGGER IF EXISTS {FAIL_FUNCTION} ON k2_offload_ledger")


def test_commit_watermark_fails_after_the_write_then_only_it_retries(stack, hot_data, airflow_running, start_date):
    """Item 2: the Iceberg write succeeded, the ledger write failed (PostgreSQL refused it).
    Airflow retries commit_watermark alone; no second copy is written (one snapshot for
    the interval); the ledger ends consistent with the table."""
    spec = TABLES.get("gold_ohlcv_15m")
    start, end = start_date, start_date + INTERVAL
    store = WatermarkStore(stack.postgres_dsn("k2"))
    store.migrate()
    _refuse_ledger_writes(stack, spec.name)
    try:
        _unpause(airflow_running, spec.dag_id)
        deadline = time.monotonic() + 600
        while True:
            tis = _task_instances(stack, spec.dag_id, start)
            commit_try, commit_state = tis.get("commit_watermark", (0, None))
            if commit_state in ("up_for_retry", "failed") or (commit_try >= 2 and commit_state != "success"):
                break
            assert commit_state != "success", "the commit succeeded although the ledger refused it"
            assert time.monotonic() < deadline, f"commit_watermark never failed: {tis}"
            time.sleep(2)
        assert store.ledger_entry(spec.name, start) is None
        written = _interval_snapshots(stack, spec, start, end)
        assert len(written) == 1, written  # the write happened before the commit failed
    finally:
        _allow_ledger_writes(stack)

    assert airflow_running.wait_for_run(spec.dag_id, start, timeout=600) == "success"
    tis = _task_instances(stack, spec.dag_id, start)
    print(f"\n[commit fails] tries: {tis}")
    assert tis["offload_to_iceberg"][0] == 1, f"the offload ran again: {tis}"
    assert tis["commit_watermark"][0] >= 2, tis
    snapshots = _interval_snapshots(stack, spec, start, end)
    assert len(snapshots) == 1, f"a second copy was written: {snapshots}"
    entry = store.ledger_entry(spec.name, start)
    assert entry is not None and entry.snapshot_id == snapshots[0].snapshot_id
    assert (entry.rows, entry.checksum) == (snapshots[0].rows, snapshots[0].checksum)
    assert store.get(spec.name).watermark_ts >= end
    _verify_clean(stack, hot_data, spec, start, end, "commit fails")
