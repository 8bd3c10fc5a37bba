"""Fault matrix, Airflow level: faults around the offload DAG on the real scheduler,
triggerer and LocalExecutor, PostgreSQL, the ClickHouse endpoint, Spark and Iceberg.
Each test ends with `verify_table` clean and prints the rows lost and duplicated it
measured (docs/reliability-airflow.md quotes them).

Tables used here (by no other test module): gold_ohlcv_15m (commit fails), gold_ohlcv_30m
(ClickHouse outage), bronze_trades_kraken (two runs at once, clear while running, clear
after compaction: every interval holds rows, unlike a 30-minute candle table's),
gold_ohlcv_1h (backfill). Each test pauses the DAGs it
unpaused, so their catch-up does not load later tests.

Over 4 minutes (about 9 in the suite): six fault scenarios, each driving real DAG runs
through retries (10 s, 20 s, 40 s backoff), Spark jobs and a backfill on the scheduler.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from k2 import iceberg as ib
from k2.config import load_tables
from k2.intervals import INTERVAL
from k2.local import airflow
from k2.local.stack import CLICKHOUSE
from k2.verify import verify_table
from k2.watermarks import WatermarkStore
from tests.integration.airflow_handle import airflow_sql, poll
from tests.integration.conftest import LIVE_EXCHANGES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TABLES = load_tables()


def _top_up(hot_data) -> datetime:
    """Trades from the newest in ClickHouse up to now (ids continue above what ClickHouse
    holds, so no key repeats), of the session's live exchanges (conftest.LIVE_EXCHANGES).
    Returns the new end of the data."""
    from k2.feed import run_feed

    newest = hot_data.query("SELECT max(event_time) FROM silver_trades").result_rows[0][0]
    now = datetime.now(timezone.utc)
    if newest is not None:
        newest = newest.replace(tzinfo=timezone.utc) if newest.tzinfo is None else newest
        if now - newest > timedelta(seconds=10):
            run_feed(hot_data, history=now - newest, rate=None, seed=int(now.timestamp()) % 10_000,
                     end=now, progress=None, exchanges=LIVE_EXCHANGES)
    return now


@pytest.fixture(autouse=True)
def _hot_tier_up_to_now(hot_data) -> datetime:
    """The session's trades end when `hot_data` was written; a DAG unpaused half an hour later
    creates runs for intervals after that, whose sensors wait (up to an hour) and hold the
    DAG's active-run slots. Trades up to now make every closed interval complete."""
    return _top_up(hot_data)


def _caught_up(stack, spec, data_end: datetime, timeout: float = 900) -> None:
    """Every interval the hot tier can complete - those ending by `data_end` minus the allowed
    lateness - has a finished run, the newest one included. Right after an unpause the
    scheduler has not created the catch-up runs yet, so "nothing queued or running" alone
    would hold too early."""
    step = INTERVAL.total_seconds()
    complete_end = datetime.fromtimestamp(
        (data_end - spec.allowed_lateness).timestamp() // step * step, timezone.utc)

    def waiting() -> list[tuple]:
        pending = airflow_sql(
            stack,
            "SELECT run_id, state, data_interval_end FROM dag_run WHERE dag_id = %s "
            "AND state IN ('queued', 'running') AND data_interval_end <= %s",
            spec.dag_id, complete_end,
        )
        newest = airflow_sql(
            stack,
            "SELECT 1 FROM dag_run WHERE dag_id = %s AND data_interval_end = %s AND state = 'success'",
            spec.dag_id, complete_end,
        )
        return pending + ([] if newest else [("(no finished run yet)", None, complete_end)])

    assert poll(lambda: not waiting(), timeout, 3), (
        f"{spec.dag_id} not caught up to {complete_end}: {waiting()}")


def _task_instances(stack, dag_id: str, interval_start: datetime) -> dict[str, tuple[int, str | None]]:
    """task_id -> (try_number, state) of the newest run of that interval."""
    rows = airflow_sql(
        stack,
        """
        SELECT ti.task_id, ti.try_number, ti.state FROM task_instance ti
        WHERE ti.dag_id = %s AND ti.run_id = (
            SELECT run_id FROM dag_run WHERE dag_id = %s AND data_interval_start = %s
            ORDER BY id DESC LIMIT 1)
        """,
        dag_id, dag_id, interval_start,
    )
    return {r[0]: (int(r[1] or 0), r[2]) for r in rows}


def _interval_snapshots(stack, spec, start: datetime, end: datetime) -> list[ib.OffloadSnapshot]:
    """Every offload snapshot of [start, end) the table's metadata still lists (not only the newest)."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        table = ib.load_catalog(airflow.iceberg_settings(stack)).load_table(spec.iceberg_table)
    except NoSuchTableError:  # nothing offloaded yet: the first offload creates the table
        return []
    found = []
    for snapshot in table.snapshots():
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        found.extend(offload for offload in ib.offload_snapshots_from_summary(
            spec, snapshot.snapshot_id, snapshot.timestamp_ms, summary)
            if (offload.interval_start, offload.interval_end) == (start, end))
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
        airflow_running.unpause(spec.dag_id)
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


# --------------------------------------------------------------------------------------
# Helpers for items 3-6

SENSOR, OFFLOAD, COMMIT = "wait_for_hot_data", "offload_to_iceberg", "commit_watermark"


def _runs(stack, dag_id: str, interval_start: datetime) -> list[dict[str, Any]]:
    """Every run of that interval, oldest first."""
    rows = airflow_sql(
        stack,
        "SELECT run_id, run_type, state, backfill_id FROM dag_run "
        "WHERE dag_id = %s AND data_interval_start = %s ORDER BY id",
        dag_id, interval_start,
    )
    return [dict(zip(("run_id", "run_type", "state", "backfill_id"), r)) for r in rows]


def _activity(stack, dag_id: str) -> str:
    """The DAG's unfinished runs with their task states, and who holds the Spark pool: what a
    failed wait should show."""
    from k2.config import SPARK_POOL

    runs = airflow_sql(
        stack,
        "SELECT r.run_id, r.state, r.data_interval_start, "
        "string_agg(ti.task_id || '=' || coalesce(ti.state, 'none'), ', ' ORDER BY ti.task_id) "
        "FROM dag_run r LEFT JOIN task_instance ti ON ti.dag_id = r.dag_id AND ti.run_id = r.run_id "
        "WHERE r.dag_id = %s AND r.state IN ('queued', 'running') "
        "GROUP BY r.run_id, r.state, r.data_interval_start ORDER BY r.data_interval_start",
        dag_id,
    )
    pool = airflow_sql(
        stack,
        "SELECT dag_id, run_id, state FROM task_instance WHERE pool = %s "
        "AND state IN ('queued', 'running', 'scheduled')",
        SPARK_POOL,
    )
    lines = [f"  run {r[0]} {r[1]} interval {r[2]}: {r[3]}" for r in runs]
    lines += [f"  pool {SPARK_POOL}: {p[0]} {p[1]} {p[2]}" for p in pool]
    return "\n".join(lines) or "  nothing in flight"


def _run_tis(stack, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    """task_id -> try_number, state, start_date, end_date of one run."""
    rows = airflow_sql(
        stack,
        "SELECT task_id, try_number, state, start_date, end_date FROM task_instance "
        "WHERE dag_id = %s AND run_id = %s",
        dag_id, run_id,
    )
    return {
        r[0]: {"try": int(r[1] or 0), "state": r[2], "start": r[3], "end": r[4]} for r in rows
    }


def _task_log(airflow_running, dag_id: str, run_id: str, task_id: str) -> str:
    """Every log file Airflow wrote for that task of that run (all attempts, trigger logs)."""
    folder = (
        Path(airflow_running.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"])
        / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    )
    if not folder.is_dir():
        return ""
    return "\n".join(
        f"== {path.name}\n{path.read_text(errors='replace')}" for path in sorted(folder.rglob("*")) if path.is_file()
    )


def _attempt_log(airflow_running, dag_id: str, run_id: str, task_id: str, attempt: int) -> str:
    path = (
        Path(airflow_running.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"])
        / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"attempt={attempt}.log"
    )
    return path.read_text(errors="replace") if path.is_file() else ""


def _spark_jobs_of(run_id: str) -> list[int]:
    """Pids of offload jobs (spark-submit, its JVM, the PySpark driver) of that run still alive."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "offload_to_iceberg.py" in cmdline and run_id in cmdline:
            pids.append(int(proc.name))
    return pids


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _snapshot_counts(stack, spec, intervals) -> dict[str, int]:
    return {start.strftime("%H:%M"): len(_interval_snapshots(stack, spec, start, end)) for start, end in intervals}


@contextmanager
def _clickhouse_outage(stack, outages: list[float]) -> Iterator[None]:
    """A real outage: the ClickHouse endpoint's process is stopped for the block and started
    again after it (also when the block fails); its length is appended to `outages`."""
    started = time.monotonic()
    CLICKHOUSE.stop(stack)
    try:
        yield
    finally:
        CLICKHOUSE.start(stack)
        outages.append(round(time.monotonic() - started, 1))


def _ensure_clickhouse_up(stack) -> None:
    if not CLICKHOUSE.healthy(stack):
        if CLICKHOUSE.pid(stack) is not None:
            CLICKHOUSE.stop(stack)
        CLICKHOUSE.start(stack)


# --------------------------------------------------------------------------------------
# Item 3: ClickHouse unreachable while sensing and while reading


def test_clickhouse_outage_while_sensing_and_reading_retries_then_succeeds(
    stack, hot_data, airflow_running, start_date
):
    """The ClickHouse endpoint is stopped twice (< 60 s each, so other DAGs' retries absorb it):

    1. while the first run's sensor checks: the check on the worker and the trigger's query
       fail; the sensor logs a warning and keeps polling (no failed try), then passes;
    2. from the start of the offload's first try until it failed: the Spark job cannot read
       ClickHouse, the try fails with a message saying so, Airflow retries it after the
       retry delay and the retry offloads the interval.

    Nothing partial reaches Iceberg: one offload snapshot per interval, verify clean."""
    spec = TABLES.get("gold_ohlcv_30m")
    dag_id = spec.dag_id
    intervals = [(start_date, start_date + INTERVAL), (start_date + INTERVAL, start_date + 2 * INTERVAL)]
    first = intervals[0][0]
    outages: list[float] = []
    began = time.monotonic()
    airflow_running.wait_registered(dag_id)
    try:
        with _clickhouse_outage(stack, outages):
            airflow_running.set_paused(dag_id, False)
            deferred = poll(lambda: _task_instances(stack, dag_id, first).get(SENSOR, (0, None))[1] == "deferred", 45)
            if deferred:
                time.sleep(3)  # the trigger's first query runs at once: let it fail too
        assert poll(lambda: _task_instances(stack, dag_id, first).get(SENSOR, (0, None))[1] == "success", 240), (
            f"the sensor did not pass once ClickHouse was back: {_task_instances(stack, dag_id, first)}"
        )
        # The second outage begins once the offload's first try runs (not when the sensor
        # passed: on a loaded machine the try may wait in the queue longer than an outage
        # may last); its Spark job reaches ClickHouse seconds later, after the JVM starts.
        assert poll(lambda: _task_instances(stack, dag_id, first).get(OFFLOAD, (0, None))[1] == "running",
                     240, 0.2), f"the offload did not start: {_task_instances(stack, dag_id, first)}"
        with _clickhouse_outage(stack, outages):
            def offload_try_failed() -> bool:
                number, state = _task_instances(stack, dag_id, first).get(OFFLOAD, (0, None))
                return state in ("up_for_retry", "failed") or number >= 2
            poll(offload_try_failed, 50)
        for start, _end in intervals:
            assert airflow_running.wait_for_run(dag_id, start, timeout=600) == "success"
    finally:
        _ensure_clickhouse_up(stack)
        airflow_running.pause_quietly(dag_id)

    [run] = [r for r in _runs(stack, dag_id, first) if r["run_type"] == "scheduled"]
    tis = _run_tis(stack, dag_id, run["run_id"])
    print(f"\n[clickhouse outage] outages (s): {outages}; tries: "
          f"{ {k: (v['try'], v['state']) for k, v in tis.items()} }; took {time.monotonic() - began:.0f} s")
    assert all(o < 60 for o in outages), outages
    sensor_log = _task_log(airflow_running, dag_id, run["run_id"], SENSOR)
    assert "ClickHouse unreachable" in sensor_log, sensor_log[-3000:]
    assert tis[SENSOR]["try"] == 1, f"the sensor failed a try instead of waiting: {tis}"
    assert tis[OFFLOAD]["try"] >= 2, f"the offload never met the outage: {tis}"
    failed_try = _attempt_log(airflow_running, dag_id, run["run_id"], OFFLOAD, 1)
    assert "cannot connect to ClickHouse" in failed_try, failed_try[-3000:]
    counts = _snapshot_counts(stack, spec, intervals)
    print(f"[clickhouse outage] offload snapshots per interval: {counts}")
    assert set(counts.values()) == {1}, counts
    _verify_clean(stack, hot_data, spec, intervals[0][0], intervals[-1][1], "clickhouse outage")


# --------------------------------------------------------------------------------------
# Item 4: two runs of one interval at once; a clear while the offload runs


@contextmanager
def _offload_lock_held(stack, table: str) -> Iterator[Callable[[], None]]:
    """Hold the table's offload lock as a writer outside Airflow would; yields release()."""
    from k2.catchup import offload_lock_key

    conn = psycopg.connect(stack.postgres_dsn("k2"), autocommit=True, application_name="k2 fault test")
    conn.execute("SELECT pg_advisory_lock(%s)", (offload_lock_key(table),))
    try:
        yield conn.close
    finally:
        conn.close()


def test_two_runs_of_one_interval_at_once_leave_one_copy(
    stack, hot_data, airflow_running, start_date, _hot_tier_up_to_now
):
    """Two runs with the same data interval in flight at once (two operators trigger the
    same interval; a manual run beside the scheduled one is the same case). Once the DAG has
    caught up (so no scheduled run holds its active-run slots), the test holds the table's
    offload lock as a writer outside Airflow would and triggers both: the offload that starts
    waits for the lock and nothing is written; after release the offloads run one after the
    other (max_active_tis_per_dag=1 and the lock) and every row is in Iceberg once."""
    spec = TABLES.get("bronze_trades_kraken")
    dag_id = spec.dag_id
    first, first_end = start_date, start_date + INTERVAL
    twins = [f"manual__k2_fault_twin_{int(time.time())}_{n}" for n in (1, 2)]
    began = time.monotonic()
    airflow_running.wait_registered(dag_id)
    try:
        airflow_running.set_paused(dag_id, False)
        _caught_up(stack, spec, _hot_tier_up_to_now)
        with _offload_lock_held(stack, spec.name) as release:
            before = _snapshot_counts(stack, spec, [(first, first_end)])
            for nth, run_id in enumerate(twins, start=1):
                airflow_running.trigger(dag_id, run_id, first, first_end, nth=nth)

            def offload_waiting() -> list[str]:
                return [r for r in twins if _run_tis(stack, dag_id, r).get(OFFLOAD, {}).get("state") == "running"]

            waiting = poll(offload_waiting, 300, 2)
            assert waiting, f"no offload started:\n{_activity(stack, dag_id)}"
            both = [r for r in _runs(stack, dag_id, first) if r["run_id"] in twins]
            assert all(r["state"] == "running" for r in both) and len(both) == 2, (
                f"the two runs of {first} are not in flight together: {both}")
            # The running offload has met the lock and says so in its log: it is blocked.
            blocked = poll(lambda: "waiting for the offload lock" in _task_log(airflow_running, dag_id, waiting[0], OFFLOAD),
                            120, 1)
            assert blocked, f"{waiting[0]}: the offload never reported waiting for the lock"
            held = _snapshot_counts(stack, spec, [(first, first_end)])
            assert held == before, f"an offload wrote while another writer held the lock: {before} -> {held}"
            release()
        assert "waiting for the offload lock" in _task_log(airflow_running, dag_id, waiting[0], OFFLOAD)
        for run_id in twins:
            assert airflow_running.run_state_by_id(dag_id, run_id, timeout=600) == "success"
        offloads = sorted(
            (ti["start"], ti["end"], run_id)
            for run_id in twins
            for ti in [_run_tis(stack, dag_id, run_id)[OFFLOAD]]
        )
        (_s1, end1, run1), (start2, _e2, run2) = offloads
        assert end1 <= start2, f"offloads of {run1} and {run2} overlapped: {offloads}"
        counts = _snapshot_counts(stack, spec, [(first, first_end)])
        print(f"\n[two runs at once] offload snapshots of the interval: {before} -> {counts}")
        _verify_clean(stack, hot_data, spec, first, first_end, "two runs at once")
    finally:
        airflow_running.pause_quietly(dag_id)
    print(f"[two runs at once] took {time.monotonic() - began:.0f} s")


def _pending_deadline(stack, dag_id: str, run_id: str):
    """The run's pending (not missed) deadline time, None when it has none."""
    rows = airflow_sql(stack, "SELECT d.deadline_time FROM deadline d JOIN dag_run r ON r.id = d.dagrun_id "
                              "WHERE r.dag_id = %s AND r.run_id = %s AND NOT d.missed", dag_id, run_id)
    return rows[0][0] if rows else None


def test_clear_while_the_offload_runs_leaves_one_copy(stack, hot_data, airflow_running, start_date):
    """The UI's Clear (the REST API's clearTaskInstances) of a run whose offload's Spark job is
    running, within the run's deadline: the try is stopped (its Spark job with it), the
    deadline moves with the new queued time, and the offload runs again as a new try; then
    `airflow tasks clear` of its not-yet-run commit, the deadline still pending. One copy of
    each row. On Airflow 3.3.2 both clears need the backport of apache/airflow#70368's fix
    (k2_provider.compat.deadline_clear): without it they answer 500 and exit 1."""
    spec = TABLES.get("bronze_trades_kraken")
    dag_id = spec.dag_id
    second, second_end = start_date + INTERVAL, start_date + 2 * INTERVAL
    cleared = f"manual__k2_fault_clear_{int(time.time())}"
    began = time.monotonic()
    try:
        airflow_running.set_paused(dag_id, False)
        airflow_running.trigger(dag_id, cleared, second, second_end)
        assert poll(lambda: _spark_jobs_of(cleared), 300, 1), f"the Spark job of {cleared} never started"
        pending = _pending_deadline(stack, dag_id, cleared)
        assert pending is not None, "the run's DAGRUN_QUEUED_AT deadline is not pending"
        airflow_running.api("POST", f"/dags/{dag_id}/clearTaskInstances", {
            "dry_run": False, "dag_run_id": cleared, "task_ids": [OFFLOAD], "include_downstream": True,
            "only_failed": False, "reset_dag_runs": True})
        moved = _pending_deadline(stack, dag_id, cleared)
        assert moved is not None and moved > pending, (pending, moved)  # from the new queued time
        retried = poll(lambda: _run_tis(stack, dag_id, cleared).get(OFFLOAD, {}).get("try", 0) >= 2, 300, 1)
        assert retried, f"the cleared offload never started a new try: {_run_tis(stack, dag_id, cleared)}"
        # The manual run's logical date is one second after its interval's start (see trigger()).
        logical = (second + timedelta(seconds=1)).isoformat()
        assert _pending_deadline(stack, dag_id, cleared) is not None
        airflow_running.cli("tasks", "clear", dag_id, "-s", logical, "-e", logical, "-t", COMMIT, "-y")
        assert airflow_running.run_state_by_id(dag_id, cleared, timeout=600) == "success"
        tis = _run_tis(stack, dag_id, cleared)
        print(f"\n[clear while running] tries: { {k: (v['try'], v['state']) for k, v in tis.items()} }")
        assert tis[OFFLOAD]["try"] >= 2, tis
        leftover = poll(lambda: not _spark_jobs_of(cleared), 30)
        assert leftover, f"Spark processes of the cleared try still run: {_spark_jobs_of(cleared)}"
        counts = _snapshot_counts(stack, spec, [(second, second_end)])
        print(f"[clear while running] offload snapshots of the interval: {counts}; took {time.monotonic() - began:.0f} s")
    finally:
        airflow_running.pause_quietly(dag_id)
    _verify_clean(stack, hot_data, spec, second, second_end, "clear while running")


# --------------------------------------------------------------------------------------
# Item 5: `airflow tasks clear` of a past run after the table was compacted


def test_clear_of_a_past_run_after_compaction_re_offloads_without_duplicates(
    stack, hot_data, airflow_running, start_date, tmp_path
):
    """rewrite_data_files merges the files of two intervals into one that straddles their
    boundary; `airflow tasks clear` of the first interval's scheduled run then re-offloads
    it (MERGE): replaced, not duplicated, the other interval untouched."""
    from tests.integration.test_offload_job import _spark_sql

    spec = TABLES.get("bronze_trades_kraken")
    dag_id = spec.dag_id
    boundary = start_date + INTERVAL
    if (boundary.hour, boundary.minute) == (0, 0):
        # The table is partitioned by day: no data file can straddle midnight.
        boundary += INTERVAL
        closed = boundary + INTERVAL + spec.allowed_lateness + timedelta(seconds=30)
        time.sleep(max(0.0, (closed - datetime.now(timezone.utc)).total_seconds()))
        _top_up(hot_data)
    intervals = [(boundary - INTERVAL, boundary), (boundary, boundary + INTERVAL)]
    (first, first_end), (_second, second_end) = intervals
    began = time.monotonic()
    try:
        airflow_running.set_paused(dag_id, False)
        scheduled = {}
        for start, _end in intervals:
            assert poll(lambda: [r for r in _runs(stack, dag_id, start) if r["run_type"] == "scheduled"], 300, 2)
            [run] = [r for r in _runs(stack, dag_id, start) if r["run_type"] == "scheduled"]
            assert airflow_running.run_state_by_id(dag_id, run["run_id"], timeout=600) == "success"
            scheduled[start] = run["run_id"]
        before = {s.snapshot_id for s in _interval_snapshots(stack, spec, first, first_end)}

        ice = airflow.iceberg_settings(stack)
        env = {**airflow_running.env, **ice.to_env(),
               "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        # Compaction holds the table's offload lock, as a maintenance job beside the offload
        # must: the DAG's later runs (still catching up on a slow machine) wait instead of
        # committing into the table while the rewrite is being planned and committed.
        with _offload_lock_held(stack, spec.name):
            [compacted] = _spark_sql(env, [
                f"CALL `{ice.catalog_name}`.system.rewrite_data_files(table => '{spec.iceberg_table}', "
                # rewrite-all: every file is rewritten, however few and small (bin-packing alone may skip them)
                "options => map('rewrite-all', 'true'))",
            ], tmp_path)
        print(f"\n[clear after compaction] {compacted}")
        assert compacted["rewritten_data_files_count"] >= compacted["added_data_files_count"] >= 1, compacted
        table = ib.load_catalog(ice).load_table(spec.iceberg_table)
        bounds = [
            (_utc(f["readable_metrics"][spec.event_time_column]["lower_bound"]),
             _utc(f["readable_metrics"][spec.event_time_column]["upper_bound"]))
            for f in table.inspect.files().to_pylist()
        ]
        # A file holds rows of both intervals: a filter overwrite of one interval would fail.
        assert any(low < first_end <= high for low, high in bounds), f"no data file straddles {first_end}: {bounds}"

        # On Airflow 3.3.2 -t is a substring of the task id, not a regex: "^offload_to_iceberg$"
        # matches nothing and the command clears nothing, exit code 0.
        airflow_running.cli("tasks", "clear", dag_id, "-s", first.isoformat(), "-e", first.isoformat(),
                            "-t", OFFLOAD, "-d", "-y")
        assert airflow_running.run_state_by_id(dag_id, scheduled[first], timeout=600) == "success"
    finally:
        airflow_running.pause_quietly(dag_id)
    tis = _run_tis(stack, dag_id, scheduled[first])
    after = _interval_snapshots(stack, spec, first, first_end)
    new = [s for s in after if s.snapshot_id not in before]
    print(f"[clear after compaction] tries: { {k: (v['try'], v['state']) for k, v in tis.items()} }; "
          f"new snapshots of the interval: {[(s.run_id, s.rows) for s in new]}; took {time.monotonic() - began:.0f} s")
    assert tis[OFFLOAD]["try"] >= 2 and tis[COMMIT]["try"] >= 2, tis
    assert len(new) == 1 and new[0].run_id == scheduled[first], new
    _verify_clean(stack, hot_data, spec, first, second_end, "clear after compaction")


# --------------------------------------------------------------------------------------
# Item 6: `airflow backfill create`, then again with --reprocess-behavior completed


def _latest_backfill(stack, dag_id: str) -> tuple[int, datetime | None] | None:
    rows = airflow_sql(
        stack, "SELECT id, completed_at FROM backfill WHERE dag_id = %s ORDER BY id DESC LIMIT 1", dag_id
    )
    return None if not rows else (rows[0][0], rows[0][1])


def _backfill(airflow_running, dag_id: str, start: datetime, last: datetime, *extra: str) -> int:
    """`airflow backfill create` over [start, last] (logical dates, inclusive); waits until
    Airflow marks the backfill completed; returns its id."""
    stack = airflow_running.stack
    previous = _latest_backfill(stack, dag_id)
    out = airflow_running.cli("backfill", "create", "--dag-id", dag_id, "--from-date", start.isoformat(),
                              "--to-date", last.isoformat(), *extra)
    print(f"\n$ airflow backfill create --dag-id {dag_id} --from-date {start.isoformat()} "
          f"--to-date {last.isoformat()} {' '.join(extra)}\n{out.stdout.strip()[-1500:]}")
    backfill = _latest_backfill(stack, dag_id)
    assert backfill is not None and backfill != previous, "no backfill was created"
    # Backfill runs are scheduled only while the DAG is unpaused.
    airflow_running.set_paused(dag_id, False)
    done = poll(lambda: (_latest_backfill(stack, dag_id) or (0, None))[1], 900, 3)
    assert done, f"backfill {backfill[0]} of {dag_id} not completed"
    return backfill[0]


def test_backfill_create_then_reprocess_completed_offloads_each_interval_once(
    stack, hot_data, airflow_running, start_date
):
    """`airflow backfill create` (Airflow 3's replacement of `airflow dags backfill`) over two
    intervals of a DAG that has no runs yet, then the same range with
    `--reprocess-behavior completed`. Backfill runs never skip or batch (k2.catchup): each
    re-offloads exactly its own interval. Every interval ends in Iceberg once; one offload
    snapshot per interval per backfill."""
    spec = TABLES.get("gold_ohlcv_1h")
    dag_id = spec.dag_id
    intervals = [(start_date, start_date + INTERVAL), (start_date + INTERVAL, start_date + 2 * INTERVAL)]
    began = time.monotonic()
    airflow_running.wait_registered(dag_id)
    assert airflow_running.is_paused(dag_id), f"{dag_id} must start paused"
    assert not any(_runs(stack, dag_id, s) for s, _ in intervals), "the backfill's DAG already has runs"
    try:
        # Created while the DAG is paused, so catch-up does not create scheduled runs of these
        # dates first (a backfill with the default reprocess behaviour would skip them).
        first_id = _backfill(airflow_running, dag_id, intervals[0][0], intervals[-1][0])
        runs = {s: _runs(stack, dag_id, s) for s, _ in intervals}
        print(f"[backfill] runs: {runs}")
        for start, _end in intervals:
            [run] = runs[start]
            assert (run["run_type"], run["state"], run["backfill_id"]) == ("backfill", "success", first_id), run
        counts = _snapshot_counts(stack, spec, intervals)
        print(f"[backfill] offload snapshots per interval: {counts}")
        assert set(counts.values()) == {1}, counts
        _verify_clean(stack, hot_data, spec, intervals[0][0], intervals[-1][1], "backfill")

        second_id = _backfill(airflow_running, dag_id, intervals[0][0], intervals[-1][0],
                              "--reprocess-behavior", "completed")
        runs = {s: _runs(stack, dag_id, s) for s, _ in intervals}
        print(f"[backfill reprocess] runs: {runs}")
        for start, _end in intervals:
            [run] = runs[start]  # the completed run was cleared and reused, not a second run
            assert (run["run_type"], run["state"], run["backfill_id"]) == ("backfill", "success", second_id), run
            tis = _run_tis(stack, dag_id, run["run_id"])
            assert tis[OFFLOAD]["try"] == 2, tis
        counts = _snapshot_counts(stack, spec, intervals)
        print(f"[backfill reprocess] offload snapshots per interval: {counts}; took {time.monotonic() - began:.0f} s")
        assert set(counts.values()) == {2}, counts  # one per backfill: re-offloaded, not skipped
    finally:
        airflow_running.pause_quietly(dag_id)
    _verify_clean(stack, hot_data, spec, intervals[0][0], intervals[-1][1], "backfill reprocess")
