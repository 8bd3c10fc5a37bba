"""Iceberg maintenance on the real stack: a bronze table holding a day and 3 hours of
15-minute intervals as the DAG's steady state leaves them - one snapshot per interval
with the offload's summary, one data file per interval and symbol, one ledger row per
interval - then the IcebergMaintenanceOperator (the k2_iceberg_maintenance DAG's task) in
process, on this module's catalog and ledger: it waits for a running offload's lock,
compacts the closed day to at most 2 files per partition value, expires the snapshots,
removes an old orphan file and keeps a young one; afterwards `k2 verify`,
`k2 watermark repair` and `k2 reoffload` still work. The plan refuses to expire a
snapshot whose interval the ledger lacks.

The first interval is offloaded by the real Spark job (it creates the table as the
offload does); the next 107 are appended with pyiceberg, each interval's rows read from
ClickHouse with the figures and snapshot summary the job would write: one Spark job per
interval would take the suite ten minutes (a catch-up job writes a batch of intervals as
one file per partition value)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from k2.config import load_tables
from k2.feed import run_feed
from k2.iceberg import iso_utc
from k2.intervals import INTERVAL
from k2.maintenance import plan_maintenance
from k2.schema import apply_schema
from k2.watermarks import offload_lock
from tests.integration.airflow_handle import wait_until
from tests.integration.spark_job import job_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATALOG = "k2_test_maintenance"
LEDGER_DB = "k2_maintenance_test"
SPEC = load_tables().get("bronze_trades_binance")
DAY0 = datetime(2026, 11, 3, tzinfo=timezone.utc)
DAY1 = DAY0 + timedelta(days=1)
OFFLOADED_END = DAY1 + timedelta(hours=3)
FEED_END = DAY1 + timedelta(hours=6)
SYMBOLS = ["BTC", "ETH"]


@pytest.fixture(scope="module")
def offloaded(ch_client, job_stack, store):
    """[DAY0, DAY1 + 3h) offloaded interval by interval and ledgered (see the module doc)."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    from k2 import iceberg as ib
    from k2 import quality
    from k2.checksum import clickhouse_interval_filter_sql, interval_parameters
    from k2.intervals import split_range

    apply_schema(ch_client)
    stats = run_feed(ch_client, history=FEED_END - DAY0, rate=0.2, seed=21, end=FEED_END, progress=None,
                     symbols=SYMBOLS, exchanges=["binance"], live=False)
    assert stats.total_rows > 10_000
    store.initialize(SPEC.name, DAY0)
    first = (DAY0, DAY0 + INTERVAL)
    proc = subprocess.run(job_argv(SPEC.name, *first, "scheduled__first"), env=job_stack.env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("K2_OFFLOAD_RESULT ")]
    r = json.loads(line.split(" ", 1)[1])
    store.commit_interval(SPEC.name, *first, int(r["rows"]), int(r["checksum"]), int(r["snapshot_id"]), r["run_id"])

    table = job_stack.catalog.load_table(SPEC.iceberg_table)
    target = schema_to_pyarrow(table.schema(), include_field_ids=False)
    columns = ib.describe_source(ch_client, SPEC)
    types = {c.name: c.clickhouse_type for c in columns}
    rules = quality.rules(SPEC, types)
    select = (f"SELECT {', '.join(f'`{c.name}`' for c in columns)} FROM `{SPEC.source}` "
              f"WHERE {clickhouse_interval_filter_sql(SPEC.event_time_column)}")
    for start, end in split_range(first[1], OFFLOADED_END):
        run_id = f"scheduled__{start:%Y-%m-%dT%H:%M}"
        figures = quality.clickhouse_split_checksum(ch_client, SPEC, rules, types, start, end)
        assert figures.quarantined.rows == 0
        rows = ch_client.query_arrow(select, parameters=interval_parameters(start, end), use_strings=True)
        table.append(rows.cast(target), snapshot_properties=ib.snapshot_properties(
            SPEC, start, end, run_id=run_id, rows=figures.good.rows, checksum=figures.good.checksum,
            attempt_id=f"{run_id}-1"))
        store.commit_interval(SPEC.name, start, end, figures.good.rows, figures.good.checksum,
                              table.current_snapshot().snapshot_id, run_id)
    assert store.get(SPEC.name).watermark_ts == OFFLOADED_END
    assert len(table.snapshots()) >= 4 * 27
    return table


def _files_per_partition(job_stack) -> Counter:
    """Data files of the current snapshot per (day, symbol) partition value."""
    table = job_stack.catalog.load_table(SPEC.iceberg_table)
    files = table.inspect.files().to_pylist()
    return Counter((f["partition"]["event_time_day"], f["partition"]["symbol"]) for f in files)


def _day(moment: datetime):
    return moment.date()


def _cli_env(job_stack, ledger_dsn) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")},
            **job_stack.clickhouse.to_env(), **job_stack.iceberg.to_env(), "K2_WATERMARK_DSN": ledger_dsn,
            # the table's first interval here (a repair rebuilds the watermark from it)
            "K2_START_DATE": f"{SPEC.name}={DAY0:%Y-%m-%dT%H:%M:%SZ}"}


def _k2(env, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("k2")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_plan_never_expires_a_snapshot_whose_intervals_are_not_ledgered(offloaded, store, ledger_dsn):
    import psycopg

    now = datetime.now(timezone.utc)
    plan = plan_maintenance(SPEC, table=offloaded, store=store, now=now, snapshot_retention=timedelta(0))
    assert plan.compact_before == DAY1  # the watermark's day is still being written
    assert plan.expire_before == now and plan.held_back == ()
    # An interval disappears from the ledger: its snapshot and every later one are kept, the
    # plan's line names the interval.
    lost = (DAY0 + timedelta(hours=5), DAY0 + timedelta(hours=5) + INTERVAL)
    with psycopg.connect(ledger_dsn) as conn:
        entry = conn.execute("DELETE FROM k2_offload_ledger WHERE table_name = %s AND interval_start = %s "
                             "RETURNING *", (SPEC.name, lost[0])).fetchone()
    try:
        held = plan_maintenance(SPEC, table=offloaded, store=store, now=now, snapshot_retention=timedelta(0))
        (commit,) = [s for s in offloaded.snapshots()
                     if s.summary.additional_properties.get("k2.interval-start") == iso_utc(lost[0])]
        assert held.held_back == (lost,)
        # expire_snapshots removes the snapshots strictly older than the cutoff: that one stays
        assert held.expire_before == datetime.fromtimestamp(commit.timestamp_ms / 1000, tz=timezone.utc)
        assert any("1 interval(s) committed in Iceberg but not in the offload ledger, first "
                   "[2026-11-03T05:00:00+00:00, 2026-11-03T05:15:00+00:00)" in line for line in held.describe())
    finally:
        with psycopg.connect(ledger_dsn) as conn:
            conn.execute("INSERT INTO k2_offload_ledger VALUES (" + ", ".join(["%s"] * len(entry)) + ")", entry)


def test_the_operator_waits_for_the_offload_lock_then_compacts_expires_and_removes_orphans(
        offloaded, stack, job_stack, store, ledger_dsn, monkeypatch):
    from k2_provider.operators.maintenance import IcebergMaintenanceOperator

    before = _files_per_partition(job_stack)
    closed = [(d, s) for (d, s) in before if d == _day(DAY0)]
    assert len(closed) == 2 and all(before[p] == 96 for p in closed), before  # a file per interval
    open_day = {p: n for p, n in before.items() if p[0] == _day(DAY1)}
    assert all(n == 12 for n in open_day.values()), open_day
    snapshot_ids = [s.snapshot_id for s in offloaded.snapshots()]

    # Two files no snapshot references: one older than the 3-day safety margin, one young.
    data_dir = Path(offloaded.location().removeprefix("file:")) / "data"
    old_orphan, young_orphan = data_dir / "orphan-old.parquet", data_dir / "orphan-young.parquet"
    for orphan in (old_orphan, young_orphan):
        orphan.write_bytes(b"not referenced by any snapshot")
    four_days_ago = time.time() - 4 * 86_400
    os.utime(old_orphan, (four_days_ago, four_days_ago))

    c, ice = stack.credentials, job_stack.iceberg
    postgres = {"conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
                "login": c["postgres_user"], "password": c["postgres_password"]}
    monkeypatch.setenv("AIRFLOW_CONN_ICEBERG_DEFAULT", json.dumps({
        **postgres, "schema": "k2", "extra": {"warehouse": ice.warehouse, "catalog_name": CATALOG}}))
    monkeypatch.setenv("AIRFLOW_CONN_K2_WATERMARKS", json.dumps({**postgres, "schema": LEDGER_DB}))
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    for name, value in job_stack.env.items():  # this venv's spark-submit and the stack's Spark settings
        if not name.startswith("K2_"):
            monkeypatch.setenv(name, value)

    operator = IcebergMaintenanceOperator(task_id=f"maintain_{SPEC.name}", table=SPEC.name,
                                          snapshot_retention=timedelta(0), lock_poll_interval=0.2)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["results"] = operator.execute(context={"run_id": "manual__maintenance_test"})
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    import psycopg

    def waiting() -> bool:
        with psycopg.connect(ledger_dsn, autocommit=True) as conn:
            return bool(conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'k2 offload maintenance%%'"
            ).fetchone()[0])

    # An offload of the table holds its lock: maintenance waits for it, changing nothing.
    with offload_lock(ledger_dsn, SPEC.name, holder="an offload", log=logging.getLogger("test")):
        worker = threading.Thread(target=run, name="maintenance")
        worker.start()
        wait_until(waiting, 120, "the maintenance task's session waiting for the offload lock")
        assert operator.stage == "lock" and "results" not in outcome and "error" not in outcome
        current = job_stack.catalog.load_table(SPEC.iceberg_table).current_snapshot().snapshot_id
        assert current == offloaded.current_snapshot().snapshot_id
    worker.join(timeout=900)
    assert not worker.is_alive(), "maintenance did not finish in 15 min"
    assert "error" not in outcome, outcome.get("error")

    results = {r["iceberg_table"]: r for r in outcome["results"]}
    main = results[SPEC.iceberg_table]
    after = _files_per_partition(job_stack)
    assert all(after[p] <= 2 for p in closed), after  # the target: <= 2 per partition value and day
    assert main["rewritten_data_files"] == sum(before[p] for p in closed)
    assert {p: n for p, n in after.items() if p[0] == _day(DAY1)} == open_day  # not closed: untouched
    table = job_stack.catalog.load_table(SPEC.iceberg_table)
    assert len(table.snapshots()) == main["snapshots"] == 1  # snapshot_retention 0, the newest kept
    assert main["expired_snapshots"] >= len(snapshot_ids)
    assert main["data_files"] == sum(after.values())
    assert [Path(p).name for p in main["orphan_files"]] == ["orphan-old.parquet"]
    assert not old_orphan.exists() and young_orphan.exists()
    young_orphan.unlink()


def test_verify_repair_and_reoffload_work_after_maintenance(offloaded, ch_client, job_stack, store, ledger_dsn):
    env = _cli_env(job_stack, ledger_dsn)
    window = ["--from", f"{DAY0:%Y-%m-%dT%H:%M:%SZ}", "--to", f"{OFFLOADED_END:%Y-%m-%dT%H:%M:%SZ}"]
    verified = _k2(env, "verify", "--table", SPEC.name, *window)
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]

    # The snapshots that committed the intervals are gone: the ledger is the record, and
    # a repair keeps it (intervals older than the table's retained history stay).
    planned = _k2(env, "maintenance", "plan", "--table", SPEC.name)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    assert "compact: rows before 2026-11-04T00:00:00+00:00" in planned.stdout
    assert "(cold.bronze_trades_binance, 1 snapshot(s))" in planned.stdout

    ledger = store.ledger_all(SPEC.name)
    assert len(ledger) == 96 + 12
    repaired = _k2(env, "watermark", "repair", "--table", SPEC.name)
    assert repaired.returncode == 0, repaired.stdout[-3000:] + repaired.stderr[-3000:]
    assert store.ledger_all(SPEC.name) == ledger
    assert store.get(SPEC.name).watermark_ts == OFFLOADED_END

    # A late row in a compacted day: the re-offload replaces the interval inside the day's
    # file (the compacted file holds other intervals too), one copy of each row.
    start = DAY0 + timedelta(hours=10)
    ch_client.command(
        "INSERT INTO bronze_trades_binance SELECT * REPLACE (trade_id + 4000000000000000 AS trade_id) "
        "FROM bronze_trades_binance WHERE event_time >= {s:DateTime64(3, 'UTC')} "
        "AND event_time < {e:DateTime64(3, 'UTC')} ORDER BY event_time LIMIT 1",
        parameters={"s": start, "e": start + INTERVAL})
    late = _k2(env, "verify", "--table", SPEC.name, "--from", f"{start:%Y-%m-%dT%H:%M:%SZ}",
               "--to", f"{start + INTERVAL:%Y-%m-%dT%H:%M:%SZ}")
    assert late.returncode == 1 and "late rows: 1" in late.stdout, late.stdout[-3000:]
    redo = _k2(env, "reoffload", "--table", SPEC.name, "--interval-start", f"{start:%Y-%m-%dT%H:%M:%SZ}")
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    clean = _k2(env, "verify", "--table", SPEC.name, *window)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    assert store.ledger_entry(SPEC.name, start).rows == next(
        e.rows for e in ledger if e.interval_start == start) + 1
