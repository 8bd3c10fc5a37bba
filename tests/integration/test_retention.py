"""Hot-tier retention on the real stack: a bronze table with 2.5 days of trades in ClickHouse,
2 of them offloaded to Iceberg by one Spark job and ledgered; retention (k2.retention) drops
an old day partition only after verifying it, keeps one with an interval missing from the
ledger and one whose rows differ from Iceberg's, keeps a partition that changed while it was
verified, and afterwards verification and the offload's retention boundary hold."""

from __future__ import annotations

import json
import logging
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from k2 import checksum as ck
from k2 import hotcold, quality, retention
from k2 import iceberg as ib
from k2.config import load_tables
from k2.feed import run_feed
from k2.intervals import INTERVAL, split_range
from k2.offload import RetiredIntervalError, offload_range
from k2.schema import apply_schema
from k2.verify import ColumnRange, verify_table
from tests.integration.spark_job import job_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATALOG = "k2_test_retention"
LEDGER_DB = "k2_retention_test"
SPEC = load_tables().get("bronze_trades_binance")
DAY0 = datetime(2026, 11, 10, tzinfo=timezone.utc)
DAY1, DAY2 = DAY0 + timedelta(days=1), DAY0 + timedelta(days=2)
FEED_END = DAY2 + timedelta(hours=12)
# hot_retention (7d) after the end of DAY1's partition: DAY0 and DAY1 are old, DAY2 is young
NOW = DAY2 + SPEC.hot_retention + timedelta(minutes=1)


@pytest.fixture(scope="module")
def offloaded(ch_client, job_stack, store):
    """2.5 days of trades in ClickHouse; [DAY0, DAY2) offloaded in 6-hour steps and ledgered."""
    apply_schema(ch_client)
    stats = run_feed(ch_client, history=FEED_END - DAY0, rate=0.4, seed=11, end=FEED_END,
                     progress=None, symbols=["BTC", "ETH"], exchanges=["binance"], live=False)
    assert stats.total_rows > 30_000
    proc = subprocess.run(job_argv(SPEC.name, DAY0, DAY2, "retention-test", "--interval-step", "6h"),
                          env=job_stack.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("K2_OFFLOAD_RESULT ")]
    assert len(results) == 8
    store.initialize(SPEC.name, DAY0)
    for r in results:
        store.commit_interval(SPEC.name, datetime.fromisoformat(r["interval_start"]),
                              datetime.fromisoformat(r["interval_end"]), int(r["rows"]),
                              int(r["checksum"]), int(r["snapshot_id"]), "retention-test")
    assert store.get(SPEC.name).watermark_ts == DAY2
    return results


def _view_figures(ch_client, span) -> ck.IntervalChecksum:
    """Count and checksum (every column) of bronze_trades_binance_all over `span`."""
    view = SPEC.model_copy(update={"read_from": hotcold.view_name(SPEC)})
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, view)}
    return ck.clickhouse_interval_checksum(ch_client, view, types, *span)


class _Watching:
    """A ClickHouse client that reads the hot + cold view over `span` after each step of a
    retention run that changes where a row is: the boundary insert, the move, the drop."""

    STEPS = (("INSERT INTO k2_hot_boundary", "boundary moved"), ("MOVE PARTITION", "partition moved out"),
             ("DROP PARTITION", "partition dropped"))

    def __init__(self, client, span, seen: list) -> None:
        self._client, self._span, self._seen = client, span, seen

    def __getattr__(self, name):
        return getattr(self._client, name)

    def command(self, sql, *args, **kwargs):
        result = self._client.command(sql, *args, **kwargs)
        step = next((label for marker, label in self.STEPS if marker in sql), None)
        moved_back = "__retiring` MOVE" in sql
        if step is not None and not moved_back and hotcold.boundary(self._client, SPEC) > hotcold.EPOCH:
            self._seen.append((step, _view_figures(self._client, self._span)))
        return result


def _plan(ch_client, job_stack, store):
    decisions = retention.plan_table(SPEC, ch_client=ch_client, catalog=job_stack.catalog, store=store, now=NOW)
    return {d.partition.partition_id: d for d in decisions}


def _count(ch_client, start, end) -> int:
    return ch_client.query(
        "SELECT count() FROM bronze_trades_binance WHERE event_time >= {s:DateTime64(3, 'UTC')} "
        "AND event_time < {e:DateTime64(3, 'UTC')}", parameters={"s": start, "e": end}).first_row[0]


def test_old_verified_partitions_are_droppable_young_ones_are_not(offloaded, ch_client, job_stack, store):
    plan = _plan(ch_client, job_stack, store)
    assert set(plan) == {"20261110", "20261111", "20261112"}
    day0 = plan["20261110"]
    assert day0.droppable, day0.line()
    assert len(day0.intervals) == 96 and day0.intervals[0] == (DAY0, DAY0 + INTERVAL)
    assert day0.rows == _count(ch_client, DAY0, DAY1)
    assert plan["20261111"].droppable
    assert plan["20261112"].young and not plan["20261112"].droppable


def test_a_partition_with_an_interval_missing_from_the_ledger_is_kept(offloaded, ch_client, job_stack, store,
                                                                     ledger_dsn):
    import psycopg

    with psycopg.connect(ledger_dsn) as conn:
        entry = conn.execute(
            "DELETE FROM k2_offload_ledger WHERE table_name = %s AND interval_start = %s RETURNING *",
            (SPEC.name, DAY1 + timedelta(hours=6))).fetchone()
    assert entry is not None
    try:
        decision = _plan(ch_client, job_stack, store)["20261111"]
        assert not decision.droppable
        assert "24 interval(s) not in the offload ledger: [2026-11-11T06:00Z, 06:15Z)" in decision.line()
    finally:
        with psycopg.connect(ledger_dsn) as conn:
            conn.execute("INSERT INTO k2_offload_ledger VALUES (" + ", ".join(["%s"] * len(entry)) + ")", entry)
    assert _plan(ch_client, job_stack, store)["20261111"].droppable


def test_a_partition_that_changes_while_it_is_verified_is_kept(offloaded, ch_client, job_stack, store,
                                                              ledger_dsn, monkeypatch):
    """An insert into the partition between its verification and the drop: nothing is dropped,
    the new row and the old ones stay, and nothing is recorded as retired."""
    real_decide = retention.decide
    inserted: list[int] = []

    def decide_then_insert(spec, partition, *args, **kwargs):
        decision = real_decide(spec, partition, *args, **kwargs)
        if partition.partition_id == "20261110" and not inserted:
            ch_client.command(
                "INSERT INTO bronze_trades_binance SELECT * REPLACE (trade_id + 1000000000000000 AS trade_id) "
                "FROM bronze_trades_binance WHERE toYYYYMMDD(event_time) = 20261110 ORDER BY trade_id LIMIT 1")
            inserted.append(1)
        return decision

    day0_rows = _count(ch_client, DAY0, DAY1)
    monkeypatch.setattr(retention, "decide", decide_then_insert)
    decisions = retention.apply_table(SPEC, ch_client=ch_client, catalog=job_stack.catalog, store=store,
                                      dsn=ledger_dsn, now=NOW, log=lambda _line: None)
    assert inserted and len(decisions) == 1
    assert not decisions[0].dropped
    assert "changed while it was verified" in decisions[0].line()
    assert _count(ch_client, DAY0, DAY1) == day0_rows + 1
    assert store.retention_boundary(SPEC.name) is None
    # the extra row goes again, so that DAY0 verifies for the next test
    ch_client.command("ALTER TABLE bronze_trades_binance DELETE WHERE trade_id > 1000000000000000",
                      settings={"mutations_sync": 2})
    assert _count(ch_client, DAY0, DAY1) == day0_rows


def test_apply_drops_verified_partitions_and_keeps_one_that_differs(offloaded, ch_client, job_stack, store,
                                                                    ledger_dsn):
    # One value of a row of DAY1 changes in ClickHouse after the offload (a corrected price:
    # same keys, same count): DAY1 no longer verifies, its checksum covering values.
    victim = ch_client.query(
        "SELECT trade_id FROM bronze_trades_binance WHERE event_time >= {s:DateTime64(3, 'UTC')} "
        "ORDER BY event_time LIMIT 1", parameters={"s": DAY1 + timedelta(hours=3)}).first_row[0]
    ch_client.command(f"ALTER TABLE bronze_trades_binance UPDATE price = price + 0.01 WHERE trade_id = {int(victim)}",
                      settings={"mutations_sync": 2})
    day0_rows, day1_rows = _count(ch_client, DAY0, DAY1), _count(ch_client, DAY1, DAY2)
    # The figures of a range across the coming boundary (DAY1), before retention: the rows
    # passing the checks, every column
    span = (DAY0 + timedelta(hours=12), DAY1 + timedelta(hours=12))
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, SPEC)}
    expected = quality.clickhouse_split_checksum(ch_client, SPEC, quality.rules(SPEC, types), types, *span).good
    assert expected.rows > 1000
    seen = []
    lines: list[str] = []
    decisions = retention.apply_table(SPEC, ch_client=_Watching(ch_client, span, seen), catalog=job_stack.catalog,
                                      store=store, dsn=ledger_dsn, now=NOW, log=lines.append)
    by_id = {d.partition.partition_id: d for d in decisions}
    assert by_id["20261110"].dropped and by_id["20261110"].rows == day0_rows
    assert not by_id["20261111"].dropped
    assert "1 interval(s) differ between ClickHouse and Iceberg: [2026-11-11T03:00Z, 03:15Z)" in by_id["20261111"].line()
    assert "20261112" not in by_id  # it stops at the first partition it keeps
    assert _count(ch_client, DAY0, DAY1) == 0  # dropped
    assert _count(ch_client, DAY1, DAY2) == day1_rows  # kept, every row
    assert any("KEPT" in line for line in lines)

    boundary = store.retention_boundary(SPEC.name)
    assert (boundary.column, boundary.hot_from, boundary.offloadable_from) == ("event_time", DAY1, DAY1)

    # The hot + cold view returned the same rows at every step of the run: the boundary
    # moved to DAY1 (DAY0 from Iceberg, ClickHouse still holding it), DAY0 moved out of the
    # table, DAY0 dropped; and now.
    assert [step for step, _ in seen] == ["boundary moved", "partition moved out", "partition dropped"]
    assert all(figures == expected for _, figures in seen), seen
    assert hotcold.boundary(ch_client, SPEC) == DAY1
    assert _view_figures(ch_client, span) == expected
    assert _view_figures(ch_client, (DAY0, DAY2)).rows == day0_rows + day1_rows

    # What ClickHouse still holds verifies against Iceberg; the retired day is not compared.
    report = verify_table(SPEC, ch_client=ch_client, catalog=job_stack.catalog, start=DAY0, end=DAY1 + timedelta(hours=3),
                          restrict=ColumnRange(boundary.column, boundary.hot_from), detail=False)
    assert report.ok, report.format()

    # An offload of a retired interval is refused before any Spark job.
    submitted = []
    with pytest.raises(RetiredIntervalError, match="before the hot tier's retention boundary"):
        offload_range(SPEC, split_range(DAY0 + timedelta(hours=1), DAY0 + timedelta(hours=2)), "manual__x",
                      iceberg=job_stack.iceberg, submit=submitted.append, log=logging.getLogger("test"),
                      offloadable_from=boundary.offloadable_from)
    assert submitted == []




def test_the_cli_plans_with_reasons_and_exits_1_for_a_kept_partition(offloaded, job_stack, ledger_dsn):
    """`k2 retention plan` against this module's ClickHouse database, catalog and ledger (the
    test above dropped DAY0 and kept DAY1): today every partition is old, DAY1 differs and
    DAY2 was never fully offloaded."""
    import os
    import sys
    from pathlib import Path

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")},
           **job_stack.clickhouse.to_env(), **job_stack.iceberg.to_env(), "K2_WATERMARK_DSN": ledger_dsn}
    proc = subprocess.run([str(Path(sys.executable).with_name("k2")), "retention", "plan",
                           "--table", SPEC.name, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = {d["partition"]: d for d in json.loads(proc.stdout)}
    assert set(plan) == {"20261111", "20261112"}  # DAY0 is gone from ClickHouse
    assert any("differ between ClickHouse and Iceberg" in r for r in plan["20261111"]["reasons"])
    assert any("not in the offload ledger" in r for r in plan["20261112"]["reasons"])
    assert not plan["20261112"]["young"]
    views = subprocess.run([str(Path(sys.executable).with_name("k2")), "retention", "views", "--table", SPEC.name],
                           env=env, capture_output=True, text=True, timeout=300)
    assert views.returncode == 0, views.stdout[-2000:] + views.stderr[-2000:]
    assert "bronze_trades_binance_all: Iceberg before 2026-11-11T00:00:00+00:00" in views.stdout


def test_the_airflow_task_fails_naming_the_kept_partition(offloaded, stack, ch_client, job_stack, monkeypatch):
    """HotRetentionOperator (the k2_hot_retention DAG's task) on this module's connections:
    DAY1 still differs from Iceberg, so the task fails naming it, and drops nothing."""
    from airflow.sdk.exceptions import AirflowException

    from k2_provider.operators.retention import HotRetentionOperator

    c, ch, ice = stack.credentials, job_stack.clickhouse, job_stack.iceberg
    postgres = {"conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
                "login": c["postgres_user"], "password": c["postgres_password"]}
    monkeypatch.setenv("AIRFLOW_CONN_CLICKHOUSE_DEFAULT", json.dumps({
        "conn_type": "clickhouse", "host": ch.host, "port": ch.port, "login": ch.user,
        "password": ch.password, "schema": ch.database}))
    monkeypatch.setenv("AIRFLOW_CONN_ICEBERG_DEFAULT", json.dumps({
        **postgres, "schema": "k2", "extra": {"warehouse": ice.warehouse, "catalog_name": CATALOG}}))
    monkeypatch.setenv("AIRFLOW_CONN_K2_WATERMARKS", json.dumps({**postgres, "schema": LEDGER_DB}))
    day1_rows = _count(ch_client, DAY1, DAY2)
    with pytest.raises(AirflowException, match=r"partition 20261111 .* KEPT - 1 interval\(s\) differ"):
        HotRetentionOperator(task_id="retain_bronze_trades_binance", table=SPEC.name).execute(context={})
    assert _count(ch_client, DAY1, DAY2) == day1_rows


def test_the_retention_runbook_unblocks_the_partition_that_differs(offloaded, stack, ch_client, job_stack,
                                                                  ledger_dsn):
    """The runbook's "Retention blocked", as written (tests/runbooks.py), against this
    module's ClickHouse database, catalog and ledger: DAY1 is kept because one interval's
    row changed after the offload. The look names it, the fix re-offloads that interval, and
    retention then drops DAY1 after verification - stopping, as the runbook says, at the next
    partition it keeps (DAY2, never fully offloaded)."""
    from tests.runbooks import Drill

    changed = DAY1 + timedelta(hours=3)
    env = {**job_stack.clickhouse.to_env(), **job_stack.iceberg.to_env(), "K2_WATERMARK_DSN": ledger_dsn}
    day1_rows = _count(ch_client, DAY1, DAY2)
    with Drill("Retention blocked", home=stack.home, table=SPEC.name, env=env,
               values={"<start>": changed.isoformat(), "<end>": (changed + INTERVAL).isoformat()}) as drill:
        plan = drill.run("k2 retention plan --table T", expect=1).stdout
        assert "partition 20261111" in plan and "KEPT" in plan and "differ between ClickHouse and Iceberg" in plan, plan
        drill.run("k2 verify", expect=1)
        drill.run("k2 watermark show")
        assert "late rows now 0." in drill.run("k2 reoffload").stdout
        drill.run("k2 verify")
        applied = drill.run("k2 retention apply", expect=1).stdout
        day1 = next(line for line in applied.splitlines() if "partition 20261111" in line)
        assert "dropped after verification" in day1, applied
        assert "partition 20261112" in applied and "not in the offload ledger" in applied, applied
        left = drill.run("k2 retention plan --table T", expect=1).stdout
        assert "20261111" not in left, left
    assert _count(ch_client, DAY1, DAY2) == 0 and day1_rows > 0


GOLD = load_tables().get("gold_ohlcv_30m")  # partitioned by month of window_start, intervals by window_end
OCT31 = datetime(2026, 10, 31, 12, tzinfo=timezone.utc)
NOV1 = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def gold_offloaded(offloaded, ch_client, job_stack, store):
    """Trades from 2026-10-31 12:00 to 2026-11-01 00:30 (candles across a month boundary);
    gold_ohlcv_30m offloaded for [10-31 12:00, 11-01 12:00) by one job in 15-minute intervals
    and ledgered, as the DAG does."""
    run_feed(ch_client, history=timedelta(hours=12, minutes=30), rate=0.4, seed=12,
             end=NOV1 + timedelta(minutes=30), progress=None, symbols=["BTC"], exchanges=["binance"], live=False)
    end = OCT31 + timedelta(days=1)
    proc = subprocess.run(job_argv(GOLD.name, OCT31, end, "retention-gold"),
                          env=job_stack.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    store.initialize(GOLD.name, OCT31)
    for line in proc.stdout.splitlines():
        if line.startswith("K2_OFFLOAD_RESULT "):
            r = json.loads(line.split(" ", 1)[1])
            store.commit_interval(GOLD.name, datetime.fromisoformat(r["interval_start"]),
                                  datetime.fromisoformat(r["interval_end"]), int(r["rows"]), int(r["checksum"]),
                                  int(r["snapshot_id"]), "retention-gold")
    assert store.get(GOLD.name).watermark_ts == end


def test_a_gold_month_is_retired_across_the_month_boundary(gold_offloaded, ch_client, job_stack, store, ledger_dsn):
    """October's candles (window_start) end as late as 11-01 00:00 (window_end): the month is
    verified on its own candles, also in the interval it shares with November's, dropped, and
    that shared interval may not be offloaded again."""
    now = NOV1 + GOLD.hot_retention + timedelta(minutes=1)
    decisions = retention.apply_table(GOLD, ch_client=ch_client, catalog=job_stack.catalog, store=store,
                                      dsn=ledger_dsn, now=now, log=lambda _line: None)
    october = decisions[0]
    assert october.partition.partition_id == "202610" and october.dropped, october.line()
    assert october.intervals[-1] == (NOV1, NOV1 + INTERVAL)  # the 23:30 candle ends at 00:00
    assert decisions[1].partition.partition_id == "202611" and decisions[1].young
    boundary = store.retention_boundary(GOLD.name)
    assert (boundary.column, boundary.hot_from, boundary.offloadable_from) == (
        "window_start", NOV1, NOV1 + INTERVAL)
    left = ch_client.query("SELECT count() FROM gold_ohlcv_30m_final WHERE window_start < {b:DateTime('UTC')}",
                           parameters={"b": NOV1}).first_row[0]
    assert left == 0
    report = verify_table(GOLD, ch_client=ch_client, catalog=job_stack.catalog, start=OCT31, end=OCT31 + timedelta(days=1),
                          restrict=ColumnRange(boundary.column, boundary.hot_from), detail=False)
    assert report.ok, report.format()
    with pytest.raises(RetiredIntervalError):
        offload_range(GOLD, [(NOV1, NOV1 + INTERVAL)], "manual__x", iceberg=job_stack.iceberg,
                      submit=lambda arguments: [], log=logging.getLogger("test"),
                      offloadable_from=boundary.offloadable_from)


def _candle(ch_client, window_start: datetime) -> tuple:
    return ch_client.query(
        "SELECT high, close, volume, trade_count FROM gold_ohlcv_30m_final WHERE symbol = 'BTC-USDT' "
        "AND window_start = {w:DateTime64(3, 'UTC')}", parameters={"w": window_start}).first_row


def _copy_trade(ch_client, trade_id_offset: int, at: datetime, price_factor: int = 1) -> None:
    """A copy of the newest BTCUSDT trade with another trade id, at `at`, price x factor."""
    at_sql = f"toDateTime64('{at:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"
    ch_client.command(
        "INSERT INTO bronze_trades_binance SELECT * REPLACE ("
        f"trade_id + {trade_id_offset} AS trade_id, price * {price_factor} AS price, {at_sql} AS event_time, "
        f"toUInt64(toUnixTimestamp64Milli({at_sql})) AS trade_time_ms, {at_sql} AS ingested_at) "
        "FROM bronze_trades_binance WHERE symbol = 'BTCUSDT' ORDER BY event_time DESC LIMIT 1")


def test_a_late_change_to_a_gold_candle_is_found_by_verify_and_repaired(gold_offloaded, ch_client, job_stack,
                                                                        store, ledger_dsn):
    """A trade inside the 11-01 00:00 candle arrives after the candle was offloaded: the candle
    count stays 1 but its high, close and volume move. The checksum (keys and values) finds it:
    `late_changes` (the commit's late check), `k2 verify` (exit 1, a `changed rows` line with
    the command), then `k2 reoffload` of that interval writes what the _final view now says and
    `k2 verify` is clean."""
    import os
    import sys
    from pathlib import Path

    from k2.verify import late_changes

    interval = (NOV1 + timedelta(minutes=30), NOV1 + timedelta(minutes=45))  # by window_end
    entry = store.ledger_entry(GOLD.name, interval[0])
    assert entry is not None and entry.rows == 1 and entry.interval_end == interval[1]
    before = _candle(ch_client, NOV1)
    _copy_trade(ch_client, 3_000_000_000_000_000, NOV1 + timedelta(minutes=10), price_factor=2)
    # and the market moves on, so that the interval is complete for the re-offload
    _copy_trade(ch_client, 3_000_000_000_000_001, NOV1 + timedelta(hours=1))
    after = _candle(ch_client, NOV1)
    assert after[3] == before[3] + 1 and after[0] > before[0] and after[2] > before[2]

    change = late_changes(ch_client, GOLD, [entry])[interval]
    assert change.values_changed and change.now.rows == change.offloaded.rows == 1

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")},
           **job_stack.clickhouse.to_env(), **job_stack.iceberg.to_env(), "K2_WATERMARK_DSN": ledger_dsn}
    k2 = str(Path(sys.executable).with_name("k2"))
    window = ["--from", f"{interval[0]:%Y-%m-%dT%H:%M:%SZ}", "--to", f"{interval[1]:%Y-%m-%dT%H:%M:%SZ}"]
    found = subprocess.run([k2, "verify", "--table", GOLD.name, *window, "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 1, found.stdout[-2000:] + found.stderr[-2000:]
    (report,) = json.loads(found.stdout)
    (result,) = report["intervals"]
    assert result["clickhouse"]["rows"] == result["iceberg"]["rows"] == 1 and result["mismatched"] == 1
    (late,) = report["late_rows"]
    command = f"k2 reoffload --table {GOLD.name} --interval-start {interval[0]:%Y-%m-%dT%H:%M:%SZ}"
    assert late["rows"] == 0 and late["command"] == command
    text = subprocess.run([k2, "verify", "--table", GOLD.name, *window], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "changed rows: [2026-11-01T00:30:00+00:00, 2026-11-01T00:45:00+00:00)" in text.stdout, text.stdout

    redo = subprocess.run([k2, *command.split()[1:]], env=env, capture_output=True, text=True, timeout=900)
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    clean = subprocess.run([k2, "verify", "--table", GOLD.name, *window], env=env, capture_output=True,
                           text=True, timeout=300)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    repaired = store.ledger_entry(GOLD.name, interval[0])
    assert repaired.rows == 1 and repaired.checksum == change.now.checksum != entry.checksum
    assert late_changes(ch_client, GOLD, [repaired]) == {}
