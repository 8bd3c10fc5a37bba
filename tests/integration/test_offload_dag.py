"""The offload DAGs end to end on real services: the Airflow scheduler, triggerer and
LocalExecutor run the sensor, the Spark job and the watermark commit; then ClickHouse,
Iceberg (read with pyiceberg), the ledger and `k2 verify` must agree.

About 2.5 minutes in the suite: three DAGs catch up two intervals each through
the real scheduler, then a cleared run offloads again.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timedelta, timezone

import pytest

from k2 import checksum as ck
from k2.config import load_tables
from k2.feed import run_feed
from k2.iceberg import load_catalog
from k2.intervals import INTERVAL
from k2.local import airflow
from k2.verify import verify_table
from k2.watermarks import WatermarkStore
from tests.integration.conftest import LIVE_EXCHANGES, OUTAGE_TABLE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TABLES = load_tables()


def _clickhouse_figures(client, spec, start, end) -> tuple[int, int]:
    types = {row[0]: row[1] for row in client.query(f"DESCRIBE TABLE {spec.source}").result_rows}
    figures = ck.clickhouse_interval_checksum(client, spec, types, start, end)
    return figures.rows, figures.checksum


def _iceberg_figures(stack, spec, start, end) -> tuple[int, int]:
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    table = load_catalog(airflow.iceberg_settings(stack)).load_table(spec.iceberg_table)
    column = spec.event_time_column
    scan = table.scan(
        row_filter=And(GreaterThanOrEqual(column, start.isoformat()), LessThan(column, end.isoformat())),
    )
    rows = scan.to_arrow()
    figures = ck.arrow_checksum([rows], ck.arrow_row_columns(spec, rows.schema))
    return figures.rows, figures.checksum


def _verify(stack, client, spec, start, end):
    catalog = load_catalog(airflow.iceberg_settings(stack))
    return verify_table(spec, ch_client=client, catalog=catalog, start=start, end=end)


@pytest.mark.parametrize("table", ["bronze_trades_binance", "silver_trades", "gold_ohlcv_5m"])
def test_scheduled_runs_offload_their_intervals(stack, hot_data, airflow_running, start_date, table):
    spec = TABLES.get(table)
    airflow_running.unpause(spec.dag_id)
    intervals = [(start_date, start_date + INTERVAL), (start_date + INTERVAL, start_date + 2 * INTERVAL)]
    store = WatermarkStore(stack.postgres_dsn("k2"))
    for start, end in intervals:
        assert airflow_running.wait_for_run(spec.dag_id, start) == "success"
        expected = _clickhouse_figures(hot_data, spec, start, end)
        assert expected[0] > 0
        entry = store.ledger_entry(table, start)
        assert entry is not None, "commit_watermark left no ledger row"
        assert (entry.rows, entry.checksum) == expected
        assert _iceberg_figures(stack, spec, start, end) == expected
    assert store.get(table).watermark_ts >= intervals[-1][1]
    report = _verify(stack, hot_data, spec, intervals[0][0], intervals[-1][1])
    assert report.ok, report.format()


def test_cleared_run_is_replaced_not_duplicated(stack, hot_data, airflow_running, start_date):
    """A user clears a successful run (UI or `airflow tasks clear`): the interval is
    offloaded again into a new snapshot, and Iceberg still holds one copy of each row."""
    spec = TABLES.get("bronze_trades_binance")
    start, end = start_date, start_date + INTERVAL
    assert airflow_running.wait_for_run(spec.dag_id, start) == "success"
    store = WatermarkStore(stack.postgres_dsn("k2"))
    before = store.ledger_entry(spec.name, start)

    airflow_running.cli(
        "tasks", "clear", spec.dag_id, "--start-date", start.isoformat(), "--end-date", start.isoformat(), "--yes"
    )
    deadline = time.monotonic() + 600
    while (entry := store.ledger_entry(spec.name, start)).committed_at <= before.committed_at:
        assert time.monotonic() < deadline, "the cleared run did not commit again"
        time.sleep(3)
    assert entry.snapshot_id != before.snapshot_id
    expected = _clickhouse_figures(hot_data, spec, start, end)
    assert _iceberg_figures(stack, spec, start, end) == expected
    report = _verify(stack, hot_data, spec, start, end)
    assert report.ok and report.totals()["duplicated"] == 0, report.format()


def test_sensor_waits_for_incomplete_interval_then_proceeds(stack, hot_data, airflow_running, monkeypatch):
    """The trigger against the real ClickHouse: an interval ending in the future is not
    complete; once the feed writes past it plus the allowed lateness, the trigger fires."""
    spec = TABLES.get("bronze_trades_kraken")
    monkeypatch.setenv("AIRFLOW_CONN_CLICKHOUSE_DEFAULT", airflow_running.env["AIRFLOW_CONN_CLICKHOUSE_DEFAULT"])
    from k2_provider.triggers.clickhouse_watermark import ClickHouseWatermarkTrigger

    target = datetime.now(timezone.utc) + timedelta(minutes=5)
    trigger = ClickHouseWatermarkTrigger(
        table=spec.completeness.table,
        column=spec.completeness.column,
        target=target,
        lateness_seconds=spec.allowed_lateness.total_seconds(),
        poke_interval=0.5,
    )

    async def scenario():
        events = trigger.run().__aiter__()
        waiting = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(3)
        assert not waiting.done(), f"fired before the data was complete: {waiting.result()}"
        await asyncio.to_thread(
            run_feed, hot_data, history=timedelta(minutes=10), rate=None, seed=8,
            end=target + spec.allowed_lateness + timedelta(minutes=1), progress=None,
            exchanges=LIVE_EXCHANGES,
        )
        started = time.monotonic()
        event = await asyncio.wait_for(waiting, timeout=30)
        return event, time.monotonic() - started

    event, seconds = asyncio.run(scenario())
    assert event.payload["status"] == "complete", event.payload
    assert seconds < 30


def test_health_reports_components_and_lag(stack, airflow_running, start_date):
    """`k2 health` against the running stack: services and Airflow healthy; a table whose
    watermark is hours behind and not moving is critical (exit 2) and named: the outage
    table, whose history starts hours back and whose DAG has not run yet (its catch-up is
    test_outage_catchup.py's, later in the lane)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from k2.intervals import first_interval_start

    k2 = str(Path(sys.executable).with_name("k2"))
    store = WatermarkStore(stack.postgres_dsn("k2"))
    store.migrate()
    stale_table = OUTAGE_TABLE
    # Where its first run's commit would put it; the spec read now, with the session's
    # start-date override of that table.
    stale_since = store.initialize(stale_table, first_interval_start(load_tables().get(stale_table).start_date))
    stale_minutes = (datetime.now(timezone.utc) - stale_since.watermark_ts).total_seconds() / 60
    assert stale_minutes > 180, stale_since

    result = subprocess.run([k2, "health", "--json"], env=airflow_running.env, capture_output=True, text=True,
                            timeout=120)
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert result.returncode == 2 and report["status"] == "critical", result.stdout
    assert checks["service postgres"]["status"] == "ok"
    assert checks["service clickhouse"]["status"] == "ok"
    assert checks["airflow scheduler"]["status"] == "ok", checks["airflow scheduler"]
    assert checks["dag import errors"]["status"] == "ok"
    assert checks[f"lag {stale_table}"]["status"] == "critical"
    shown = re.search(r"^lag ([0-9]+) min", checks[f"lag {stale_table}"]["detail"])
    assert shown and abs(int(shown.group(1)) - stale_minutes) <= 2, (stale_minutes, checks[f"lag {stale_table}"])
    # The test feed stopped when the session started, so this lag grows with the session:
    # its status must be what the alert thresholds say for the store's watermark.
    from k2.health import thresholds

    limits = thresholds()
    lag = (datetime.now(timezone.utc) - store.get("bronze_trades_binance").watermark_ts).total_seconds()
    expected = "critical" if lag > limits.lag_critical_seconds else "warning" if lag > limits.lag_warning_seconds else "ok"
    offloaded = checks["lag bronze_trades_binance"]
    if abs(lag - limits.lag_warning_seconds) > 60 and abs(lag - limits.lag_critical_seconds) > 60:
        assert offloaded["status"] == expected, (lag, offloaded)
    assert "last success 20" in offloaded["detail"], offloaded


def _prometheus_query(url: str, promql: str) -> list[dict]:
    import json
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_task_and_airflow_metrics_reach_prometheus(stack, airflow_running, start_date):
    """StatsD from the real tasks (provider code) and from Airflow itself arrives at
    statsd_exporter and is scraped by Prometheus, under the names metrics.py defines."""
    from k2 import metrics
    from k2.local.monitoring import MonitoringStack

    spec = TABLES.get("bronze_trades_binance")
    assert airflow_running.wait_for_run(spec.dag_id, start_date) == "success"
    prometheus = MonitoringStack.for_local_stack(stack).prometheus_url
    label = f'{{table="{spec.name}"}}'
    wanted = {
        "rows": f"{metrics.OFFLOAD_ROWS.prometheus}{label}",
        "watermark": f"{metrics.WATERMARK.prometheus}{label}",
        "last_success": f"{metrics.LAST_SUCCESS.prometheus}{label}",
        "duration": f"{metrics.OFFLOAD_DURATION.prometheus}_count{label}",
        "scheduler": "airflow_scheduler_heartbeat_total",
        "task_finished": f'airflow_ti_finish_total{{dag_id="{spec.dag_id}",state="success"}}',
    }
    deadline = time.monotonic() + 120  # a scrape every 15 s
    found: dict[str, list] = {}
    while time.monotonic() < deadline:
        found = {name: _prometheus_query(prometheus, q) for name, q in wanted.items()}
        if all(found.values()):
            break
        time.sleep(5)
    missing = [name for name, series in found.items() if not series]
    assert not missing, f"not in Prometheus: {[wanted[m] for m in missing]}"
    assert float(found["rows"][0]["value"][1]) > 0
    watermark = WatermarkStore(stack.postgres_dsn("k2")).get(spec.name).watermark_ts
    assert float(found["watermark"][0]["value"][1]) == watermark.timestamp()
