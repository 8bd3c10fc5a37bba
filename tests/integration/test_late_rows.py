"""Late rows end to end (fault matrix item 8) on the real components: the ClickHouse
endpoint, the watermark trigger, spark-submit of the offload job with Iceberg, PostgreSQL
(ledger and watermark), Airflow's StatsD client into the stack's statsd_exporter, and the
`k2` CLI as a subprocess.

Within the allowed lateness a row is included: the completeness trigger holds the interval
until it is complete. Later than that, rows are detected and counted by the commit of a
later interval (`late_rows` metric, a warning naming the interval and the re-offload
command) and by `k2 verify`; `k2 reoffload` then replaces the interval, and Iceberg holds
exactly one copy of every row.

Isolation: the ClickHouse tables live in this module's own database, the Iceberg tables in
a catalog name and warehouse of their own, the ledger in a PostgreSQL database of its own,
so the session's Airflow DAGs (same table names) are not affected, and vice versa.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from k2 import checksum as ck
from k2 import iceberg as ib
from k2.config import load_tables
from k2.feed import run_feed
from k2.intervals import INTERVAL as Q
from k2.schema import apply_schema
from k2.verify import late_rows
from k2.watermarks import WatermarkStore
from tests.integration.test_offload_job import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTC = timezone.utc
SPEC = load_tables().get("bronze_trades_kraken")
# Two days back at 10:00 UTC: in the past (rows from the future are refused as bad rows) and
# far from the session's Airflow intervals.
_TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
I0 = (_TODAY - timedelta(days=2) + timedelta(hours=10), _TODAY - timedelta(days=2) + timedelta(hours=10) + Q)
I1 = (I0[1], I0[1] + Q)
I0_Z = f"{I0[0]:%Y-%m-%dT%H:%M:%SZ}"
CATALOG = "k2_test_late_rows"
WATERMARK_DB = "k2_test_late_rows"
K2 = str(Path(sys.executable).with_name("k2"))


@pytest.fixture(scope="module")
def watermark_dsn(stack):
    with psycopg.connect(stack.postgres_dsn("k2"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {WATERMARK_DB}")
        conn.execute(f"CREATE DATABASE {WATERMARK_DB}")
    return stack.postgres_dsn(WATERMARK_DB)


@pytest.fixture(scope="module")
def cli_env(job_stack, watermark_dsn):
    """The `k2` CLI pointed at this module's ClickHouse database, catalog and ledger."""
    ch, ice = job_stack.clickhouse, job_stack.iceberg
    return {**os.environ, **ch.to_env(), **ice.to_env(), "K2_WATERMARK_DSN": watermark_dsn}


@pytest.fixture
def task_connections(stack, job_stack, monkeypatch):
    """The Airflow connections commit_watermark uses, on this module's database and ledger."""
    ch = job_stack.clickhouse
    c = stack.credentials
    monkeypatch.setenv("AIRFLOW_CONN_CLICKHOUSE_DEFAULT", json.dumps({
        "conn_type": "clickhouse", "host": stack.host, "port": stack.clickhouse_port,
        "login": c["clickhouse_user"], "password": c["clickhouse_password"], "schema": ch.database,
    }))
    monkeypatch.setenv("AIRFLOW_CONN_K2_WATERMARKS", json.dumps({
        "conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
        "login": c["postgres_user"], "password": c["postgres_password"], "schema": WATERMARK_DB,
    }))


@pytest.fixture
def stats_to_exporter(stack, monkeypatch):
    """Airflow's StatsD client in this process sends to the stack's statsd_exporter, as a
    task's does; restored afterwards. Yields a reader of k2_late_rows_total for the table."""
    from k2 import metrics
    from k2.local.monitoring import MonitoringStack, airflow_metrics_env

    mon = MonitoringStack.for_local_stack(stack)
    for key, value in airflow_metrics_env(mon).items():
        monkeypatch.setenv(key, value)
    metrics.configure_stats(force=True)

    def late_rows_total() -> float:
        url = f"http://{mon.host}:{mon.statsd_exporter_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        pattern = rf'^{metrics.LATE_ROWS.prometheus}{{table="{SPEC.name}"}} (\S+)$'
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    yield late_rows_total
    monkeypatch.undo()
    metrics.configure_stats(force=True)


def _insert_trades(client, trade_ids: list[int], times: list[datetime]) -> None:
    rows = ", ".join(
        f"({9_000_000_000 + trade_id}, {trade_id}, 'XBT/USD', 50000.5, 0.01, "
        f"{ck.to_epoch_ms(t) / 1000:.3f}, 'b', 'l', '')"
        for trade_id, t in zip(trade_ids, times)
    )
    client.command(
        "INSERT INTO bronze_trades_kraken (sequence_number, trade_id, pair, price, volume, trade_time, "
        f"side, order_type, misc) VALUES {rows}"
    )


def _next_trade_id(client) -> int:
    return int(client.query("SELECT max(trade_id) FROM bronze_trades_kraken").first_row[0]) + 1_000


def _clickhouse_rows(client, interval) -> int:
    types = {c.name: c.clickhouse_type for c in ib.describe_source(client, SPEC)}
    return ck.clickhouse_interval_checksum(client, SPEC, types, *interval).rows


def _iceberg_trade_ids(job_stack, ids: list[int]) -> list[int]:
    from pyiceberg.expressions import In

    table = job_stack.catalog.load_table(SPEC.iceberg_table)
    found = table.scan(row_filter=In("trade_id", [str(i) for i in ids]), selected_fields=("trade_id",))
    return sorted(int(v) for v in found.to_arrow().column("trade_id").to_pylist())


def _commit(result: dict, interval, capsys) -> tuple[dict, str]:
    """commit_watermark's execute, as the task runs it, with the offload's XCom; returns its
    result and what its task logger wrote."""
    from k2.offload import normalize_result
    from k2_provider.operators.watermark_commit import WatermarkCommitOperator

    op = WatermarkCommitOperator(task_id="commit_watermark", table=SPEC.name, initial_watermark=I0[0])
    xcom = {**normalize_result(result), "intervals": [normalize_result(result)]}
    context = {
        "ti": SimpleNamespace(xcom_pull=lambda task_ids: xcom),
        "data_interval_start": interval[0],
        "data_interval_end": interval[1],
        "dag": SimpleNamespace(dag_id=SPEC.dag_id),
    }
    capsys.readouterr()
    committed = op.execute(context)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    sys.stdout.write(text)
    return committed, text


def _k2(env, *args: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    proc = subprocess.run([K2, *args], env=env, capture_output=True, text=True, timeout=900)
    print(f"\n$ k2 {' '.join(args)}  (exit {proc.returncode}, {time.monotonic() - started:.1f} s)\n"
          f"{proc.stdout}{proc.stderr[-2000:] if proc.returncode not in (0, 1) else ''}")
    return proc


def _hot_complete(target: datetime, wait: float) -> bool:
    """Whether the table's completeness trigger (the deferred wait_for_hot_data) fires for
    `target` within `wait` seconds, on the clickhouse_default connection."""
    from k2_provider.triggers.clickhouse_watermark import ClickHouseWatermarkTrigger

    trigger = ClickHouseWatermarkTrigger(
        table=SPEC.completeness.table,
        column=SPEC.completeness.column,
        target=target,
        lateness_seconds=SPEC.allowed_lateness.total_seconds(),
        poke_interval=0.5,
    )

    async def first_event():
        try:
            return await asyncio.wait_for(trigger.run().__anext__(), timeout=wait)
        except asyncio.TimeoutError:
            return None

    event = asyncio.run(first_event())
    return event is not None and event.payload.get("status") == "complete"


def test_late_rows_are_included_detected_counted_and_reoffloaded(
    stack, ch_client, job_stack, job_env, cli_env, watermark_dsn, task_connections, stats_to_exporter, capsys
):
    started = time.monotonic()
    apply_schema(ch_client)
    lateness = SPEC.allowed_lateness
    # The feed has reached I0's end + 1 min: I0 is not complete yet (2 min allowed lateness).
    run_feed(ch_client, history=timedelta(minutes=31), rate=None, seed=3, end=I0[1] + timedelta(minutes=1),
             progress=None)

    # a) A row of I0 arrives within the allowed lateness: before the trigger lets I0 go.
    assert not _hot_complete(I0[1], wait=3), "I0 released before it was complete"
    within_id = _next_trade_id(ch_client)
    _insert_trades(ch_client, [within_id], [I0[1] - timedelta(seconds=20)])
    run_feed(ch_client, history=I1[1] + lateness + timedelta(minutes=1) - (I0[1] + timedelta(minutes=1)),
             rate=None, seed=4, end=I1[1] + lateness + timedelta(minutes=1), progress=None)
    assert _hot_complete(I1[1], wait=30), "I0 and I1 not released once complete"

    result0, proc0, wall0 = run_job(job_env, SPEC.name, I0, f"scheduled__{I0[0].isoformat()}")
    i0_rows = _clickhouse_rows(ch_client, I0)
    assert result0["rows"] == i0_rows > 100, (result0, proc0.stdout[-3000:], proc0.stderr[-5000:])
    assert _iceberg_trade_ids(job_stack, [within_id]) == [within_id]
    committed0, log0 = _commit(result0, I0, capsys)
    assert committed0["watermark_ts"] == I0[1].isoformat()
    assert "late rows" not in log0
    print(f"\nMEASURED a) I0 offloaded: {i0_rows:,} rows in ClickHouse = {result0['rows']:,} in Iceberg, "
          f"the row within the allowed lateness included (spark-submit {wall0:.1f} s)")

    # b) After I0 was offloaded and committed, three more of its rows arrive: too late.
    late_ids = list(range(_next_trade_id(ch_client), _next_trade_id(ch_client) + 3))
    _insert_trades(ch_client, late_ids, [I0[0] + timedelta(minutes=m) for m in (3, 7, 11)])
    assert _clickhouse_rows(ch_client, I0) == i0_rows + 3

    result1, _, wall1 = run_job(job_env, SPEC.name, I1, f"scheduled__{I1[0].isoformat()}")
    counter_before = stats_to_exporter()
    committed1, log1 = _commit(result1, I1, capsys)
    command = f"k2 reoffload --table {SPEC.name} --interval-start {I0_Z}"
    warning = f"{SPEC.name} [{I0[0].isoformat()}, {I0[1].isoformat()}): 3 late rows in ClickHouse beyond the {i0_rows} offloaded"
    assert warning in log1 and command in log1, log1
    deadline = time.monotonic() + 30  # UDP: give the exporter a moment
    while (counted := stats_to_exporter() - counter_before) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counted == 3, f"k2_late_rows_total rose by {counted}, expected 3"
    assert committed1["watermark_ts"] == I1[1].isoformat()
    # A retry of that commit finds the same rows: it warns again but does not count them twice.
    _, log1_retry = _commit(result1, I1, capsys)
    assert warning in log1_retry, log1_retry
    time.sleep(3)  # UDP: a second count would have arrived by now
    assert stats_to_exporter() - counter_before == 3, "the retry counted the late rows again"

    verify_late = _k2(cli_env, "verify", "--table", SPEC.name, "--json")
    assert verify_late.returncode == 1, verify_late.stderr[-3000:]
    (report,) = json.loads(verify_late.stdout)
    assert not report["ok"]
    first = report["intervals"][0]
    assert first["start"] == ib.iso_utc(I0[0]) and first["missing"] == 3, first
    assert (first["clickhouse"]["rows"], first["iceberg"]["rows"]) == (i0_rows + 3, i0_rows)
    assert report["intervals"][1]["ok"]
    assert report["late_rows"] == [{
        "start": report["intervals"][0]["start"], "end": report["intervals"][0]["end"],
        "rows": 3, "ledger_rows": i0_rows, "command": command,
    }]
    text = _k2(cli_env, "verify", "--table", SPEC.name)
    assert text.returncode == 1 and "MISMATCH" in text.stdout
    assert "late rows: 3 in [" in text.stdout and command in text.stdout

    # c) The one documented command re-offloads I0 (it refuses an interval not complete yet).
    not_yet = I1[1] + Q
    refused = _k2(cli_env, "reoffload", "--table", SPEC.name, "--interval-start", f"{not_yet:%Y-%m-%dT%H:%M:%SZ}")
    assert refused.returncode == 1 and "is not complete in ClickHouse yet" in refused.stderr, refused.stderr
    reoffload_started = time.monotonic()
    redo = _k2(cli_env, *command.split()[1:])
    reoffload_wall = time.monotonic() - reoffload_started
    assert redo.returncode == 0, redo.stderr[-5000:]
    assert f"{i0_rows + 3:,} rows ({i0_rows:,} rows before)" in redo.stdout and "late rows now 0" in redo.stdout

    clean = _k2(cli_env, "verify", "--table", SPEC.name, "--json")
    assert clean.returncode == 0, clean.stdout[-3000:]
    (report,) = json.loads(clean.stdout)
    assert report["ok"] and report["late_rows"] == []
    assert report["totals"]["clickhouse_rows"] == report["totals"]["iceberg_rows"] == i0_rows + 3 + result1["rows"]
    assert report["totals"]["duplicated"] == report["totals"]["missing"] == 0
    assert _iceberg_trade_ids(job_stack, [within_id, *late_ids]) == sorted([within_id, *late_ids])
    entry = WatermarkStore(watermark_dsn).ledger_entry(SPEC.name, I0[0])
    assert entry.rows == i0_rows + 3 and entry.run_id.startswith("reoffload__")
    assert WatermarkStore(watermark_dsn).get(SPEC.name).watermark_ts == I1[1]
    assert late_rows(ch_client, SPEC, {I0: entry.rows, I1: result1["rows"]}) == {}
    print(
        f"\nMEASURED late rows: I0 {i0_rows:,} rows offloaded (1 row within the allowed lateness included), "
        f"3 late rows detected by the commit of I1 (warning + k2_late_rows_total +{counted:.0f}) and by "
        f"`k2 verify` (exit 1, missing 3); `{command}` took {reoffload_wall:.1f} s; then verify clean: "
        f"{report['totals']['iceberg_rows']:,} rows over I0+I1, 0 missing, 0 duplicated. "
        f"Spark jobs {wall0:.1f} s + {wall1:.1f} s; whole scenario {time.monotonic() - started:.1f} s"
    )



def _quarantined(job_stack, interval) -> list[int]:
    """Trade ids in the quarantine table for that interval."""
    from pyiceberg.expressions import EqualTo

    from k2 import quality

    table = job_stack.catalog.load_table(quality.quarantine_table_name(SPEC))
    rows = table.scan(row_filter=EqualTo(quality.INTERVAL_START_COLUMN, interval[0].isoformat())).to_arrow()
    return sorted(int(v) for v in rows.column("trade_id").to_pylist())


def test_the_quarantine_runbook_repairs_a_bad_row(stack, ch_client, job_stack, watermark_dsn):
    """The runbook's "Quarantined rows", as written (tests/runbooks.py), against this module's
    ClickHouse database, catalog and ledger (after the test above): a trade with price 0
    reaches I1 and the interval's re-run sets it aside in the quarantine table - the state
    K2RowsQuarantined reports. The look verifies both halves; the fix corrects the row in
    ClickHouse and re-offloads the interval: the row moves from the quarantine to the table."""
    from tests.runbooks import Drill

    env = {**job_stack.clickhouse.to_env(), **job_stack.iceberg.to_env(), "K2_WATERMARK_DSN": watermark_dsn}
    bad = _next_trade_id(ch_client)
    _insert_trades(ch_client, [bad], [I1[0] + timedelta(minutes=6)])
    ch_client.command(f"ALTER TABLE bronze_trades_kraken UPDATE price = 0 WHERE trade_id = {bad}",
                      settings={"mutations_sync": 2})
    i1 = f"{I1[0]:%Y-%m-%dT%H:%M:%SZ}"
    rerun = _k2({**os.environ, **env}, "reoffload", "--table", SPEC.name, "--interval-start", i1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _quarantined(job_stack, I1) == [bad]
    with Drill("Quarantined rows", home=stack.home, table=SPEC.name, env=env,
               values={"<interval start>": I1[0].isoformat(), "<interval end>": I1[1].isoformat()}) as drill:
        drill.run("k2 verify")  # the bad row is in the quarantine: both halves match ClickHouse
        ch_client.command(f"ALTER TABLE bronze_trades_kraken UPDATE price = 50000.5 WHERE trade_id = {bad}",
                          settings={"mutations_sync": 2})
        drill.run("k2 reoffload")
        drill.run("k2 verify")
    assert _quarantined(job_stack, I1) == []
    assert _iceberg_trade_ids(job_stack, [bad]) == [bad]
