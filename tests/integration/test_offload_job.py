"""The offload job end to end: spark-submit against the real local stack.

ClickHouse (chDB endpoint) and PostgreSQL come from the session `stack` fixture; the
ClickHouse tables live in this module's own database (`ch_client`), the Iceberg tables
in a catalog name and warehouse of their own, so other modules are not affected.
The scenarios run in file order and build on each other (one Spark job per step).

About 3.5 minutes in the suite: seven distinct offload scenarios, one Spark job each.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest

from k2 import checksum as ck
from k2 import iceberg as ib
from k2.config import load_tables
from k2.feed import run_feed
from k2.schema import apply_schema
from k2.verify import verify_table
from tests.integration.spark_job import (
    JOB,
    job_argv,
    submit_argv,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTC = timezone.utc
FEED_END = datetime(2026, 11, 26, 11, 0, tzinfo=UTC)
I0 = (datetime(2026, 11, 26, 10, 0, tzinfo=UTC), datetime(2026, 11, 26, 10, 15, tzinfo=UTC))
I1 = (I0[1], datetime(2026, 11, 26, 10, 30, tzinfo=UTC))
EMPTY = (datetime(2026, 11, 26, 12, 0, tzinfo=UTC), datetime(2026, 11, 26, 12, 15, tzinfo=UTC))
CATALOG = "k2_test_offload"

TABLES = load_tables()
BRONZE = TABLES.get("bronze_trades_binance")
GOLD = TABLES.get("gold_ohlcv_1m")


@pytest.fixture(scope="module")
def filled(ch_client):
    apply_schema(ch_client)
    stats = run_feed(ch_client, history=timedelta(hours=1), rate=None, seed=1, end=FEED_END, progress=None)
    assert stats.total_rows > 10_000
    return stats


def run_job(env, table, interval, run_id, *extra, expect=0):
    argv = job_argv(table, interval[0], interval[1], run_id, *extra)
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    if proc.returncode != expect:
        pytest.fail(
            f"offload exited {proc.returncode} (expected {expect}) after {wall:.1f} s\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    result = None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("K2_OFFLOAD_RESULT ")]
    if expect == 0:
        assert lines, proc.stdout
        assert proc.stdout.strip().splitlines()[-1] == lines[-1], "the result must be the last line"
        result = json.loads(lines[-1].split(" ", 1)[1])
    return result, proc, wall


def clickhouse_figures(ch_client, spec, interval):
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, spec)}
    return ck.clickhouse_interval_checksum(ch_client, spec, types, *interval)


def iceberg_figures(catalog, spec, interval):
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    table = catalog.load_table(spec.iceberg_table)
    scan = table.scan(row_filter=And(
        GreaterThanOrEqual(spec.event_time_column, interval[0].isoformat()),
        LessThan(spec.event_time_column, interval[1].isoformat()),
    ))
    batches = list(scan.to_arrow_batch_reader())
    if not batches:
        return ck.IntervalChecksum(0, 0)
    return ck.arrow_checksum(batches, ck.arrow_row_columns(spec, batches[0].schema))


def assert_clean(ch_client, catalog, spec, start, end):
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=start, end=end)
    assert report.ok, report.format()
    assert all(r.duplicated == 0 for r in report.intervals)
    return report


def test_first_offload_of_an_interval(filled, ch_client, catalog, job_env):
    result, proc, wall = run_job(job_env, BRONZE.name, I0, "scheduled__2026-11-26T10:00:00+00:00")
    expected = clickhouse_figures(ch_client, BRONZE, I0)
    assert expected.rows > 1000
    assert (result["rows"], result["checksum"]) == (expected.rows, expected.checksum)
    assert result["table"] == BRONZE.name and result["run_id"].startswith("scheduled__")
    # a local master: the driver's threads read, write and audit; one slice per 250k rows
    assert "data file(s) by the driver" in proc.stdout + proc.stderr
    assert result["slices"] == 1
    assert iceberg_figures(catalog, BRONZE, I0) == expected
    assert_clean(ch_client, catalog, BRONZE, *I0)

    table = catalog.load_table(BRONZE.iceberg_table)
    schema = table.schema()
    assert str(schema.find_field("trade_id").field_type) == "decimal(20, 0)"
    assert str(schema.find_field("event_time").field_type) == "timestamptz"
    assert [f.transform.__class__.__name__ for f in table.spec().fields] == ["DayTransform", "IdentityTransform"]
    summary = table.snapshot_by_id(result["snapshot_id"]).summary.additional_properties
    assert summary[ib.PROP_INTERVAL_START] == "2026-11-26T10:00:00+00:00"
    assert summary[ib.PROP_ROWS] == str(expected.rows)
    found = ib.find_offload_snapshot(catalog, BRONZE, *I0)
    assert found is not None and found.snapshot_id == result["snapshot_id"]
    print(
        f"\nPERF one 15-min interval of {BRONZE.name}: {result['rows']:,} rows, spark-submit wall "
        f"{wall:.1f} s (JVM start included) = {result['rows'] / wall:,.0f} rows/s; "
        f"job-internal {result['seconds']:.1f} s"
    )


def test_second_interval(filled, ch_client, catalog, job_env):
    """On the executors (a cluster's path: --driver-max-rows 0), in 4 slices."""
    result, proc, wall = run_job(job_env, BRONZE.name, I1, "scheduled__2026-11-26T10:15:00+00:00",
                                 "--slices", "4", "--driver-max-rows", "0")
    assert result["slices"] == 4
    assert "data file(s) by the executors" in proc.stdout + proc.stderr
    assert_clean(ch_client, catalog, BRONZE, I0[0], I1[1])
    print(f"\nPERF second interval: {result['rows']:,} rows in {wall:.1f} s wall")


def test_rerun_replaces_and_picks_up_a_late_row(filled, ch_client, catalog, job_env):
    before = ib.find_offload_snapshot(catalog, BRONZE, *I0)
    late_id = 9_000_000_001
    late_ms = ck.to_epoch_ms(I0[0] + timedelta(minutes=5))
    ch_client.command(
        "INSERT INTO bronze_trades_binance (sequence_number, trade_id, symbol, price, quantity, "
        "quote_quantity, trade_time_ms, is_buyer_maker) VALUES "
        f"(9000000001, {late_id}, 'BTCUSDT', 1.5, 2, 3, {late_ms}, true)"
    )
    report = verify_table(BRONZE, ch_client=ch_client, catalog=catalog, start=I0[0], end=I0[1])
    assert not report.ok and report.intervals[0].missing == 1, report.format()

    result, _, _ = run_job(job_env, BRONZE.name, I0, "manual__rerun")
    assert result["snapshot_id"] != before.snapshot_id
    assert ib.find_offload_snapshot(catalog, BRONZE, *I0).run_id == "manual__rerun"
    assert_clean(ch_client, catalog, BRONZE, I0[0], I1[1])
    table = catalog.load_table(BRONZE.iceberg_table)
    late = table.scan(row_filter=f"trade_id = {late_id}").to_arrow()
    assert late.num_rows == 1
    # the re-run rewrote only files of its own interval
    summary = table.snapshot_by_id(result["snapshot_id"]).summary.additional_properties
    assert int(summary.get("deleted-records", "0")) == result["rows"] - 1


def _spark_sql(env, statements, tmp_path):
    """Run SQL statements in a Spark session on the test catalog; returns each first row."""
    script = tmp_path / "statements.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from pyspark.sql import SparkSession
        from k2.iceberg import spark_conf, spark_secret_conf
        from k2.runtime_env import IcebergSettings
        s = IcebergSettings.from_env()
        b = SparkSession.builder.appName("k2-test-maintenance")
        for k, v in {{**spark_conf(s), **spark_secret_conf(s)}}.items():
            b = b.config(k, v)
        spark = b.getOrCreate()
        for statement in {statements!r}:
            row = spark.sql(statement).first()
            print("ROW", json.dumps(row.asDict() if row else None, default=str))
        spark.stop()
    """))
    proc = subprocess.run(
        submit_argv(script),
        env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        # The cause is near the top of a Java stack trace, far above its tail.
        causes = [line for line in proc.stderr.splitlines()
                  if re.search(r"(Exception|Error)\b", line) and not line.lstrip().startswith("at ")]
        raise AssertionError(f"spark-submit exit {proc.returncode}; exception lines:\n" + "\n".join(causes[:12])
                             + "\n--- stderr tail ---\n" + proc.stderr[-3000:])
    return [json.loads(l[4:]) for l in proc.stdout.splitlines() if l.startswith("ROW ")]


def test_rerun_after_compaction_repairs_to_one_copy(filled, ch_client, catalog, job_env, tmp_path):
    target = f"`{CATALOG}`.{BRONZE.iceberg_table}"
    in_i0 = (f"{BRONZE.event_time_column} >= TIMESTAMP '{I0[0].isoformat()}' "
             f"AND {BRONZE.event_time_column} < TIMESTAMP '{I0[1].isoformat()}'")
    compacted, _ = _spark_sql(job_env, [
        f"CALL `{CATALOG}`.system.rewrite_data_files(table => '{BRONZE.iceberg_table}', "
        "options => map('min-input-files', '1'))",
        # foreign duplicates: someone appends copies of ten rows of the interval
        f"INSERT INTO {target} SELECT * FROM {target} WHERE {in_i0} LIMIT 10",
    ], tmp_path)
    assert compacted["rewritten_data_files_count"] > compacted["added_data_files_count"] >= 1
    table = catalog.load_table(BRONZE.iceberg_table)
    # compacted files now hold rows of both intervals: a filter overwrite of one interval would fail
    bounds = [f["readable_metrics"]["event_time"] for f in table.inspect.files().to_pylist()]
    assert any(b["lower_bound"] < I1[0] <= b["upper_bound"] for b in bounds), bounds

    gone = ch_client.query(
        "SELECT trade_id FROM bronze_trades_binance WHERE "
        f"{ck.clickhouse_interval_filter_sql('event_time')} ORDER BY trade_id LIMIT 1",
        parameters=ck.interval_parameters(*I0),
    ).result_rows[0][0]
    ch_client.command(f"ALTER TABLE bronze_trades_binance DELETE WHERE trade_id = {gone}",
                      settings={"mutations_sync": 2})

    report = verify_table(BRONZE, ch_client=ch_client, catalog=catalog, start=I0[0], end=I0[1])
    damaged = report.intervals[0]
    assert (damaged.duplicated, damaged.unexpected, damaged.missing) == (10, 1, 0), report.format()
    assert "duplicated e.g.:" in report.format()

    result, proc, _ = run_job(job_env, BRONZE.name, I0, "manual__after_compaction")
    # the files straddle the interval: not droppable whole, so the rows were replaced by MERGE
    output = proc.stdout + proc.stderr
    assert "span the interval's bounds (compacted); replacing its rows with a MERGE" in output, output[-3000:]
    report = assert_clean(ch_client, catalog, BRONZE, I0[0], I1[1])
    assert sum(r.clickhouse.rows for r in report.intervals) == sum(r.iceberg.rows for r in report.intervals)
    assert catalog.load_table(BRONZE.iceberg_table).scan(row_filter=f"trade_id = {gone}").to_arrow().num_rows == 0
    assert result["rows"] == clickhouse_figures(ch_client, BRONZE, I0).rows


def test_gold_view(filled, ch_client, catalog, job_env):
    result, _, wall = run_job(job_env, GOLD.name, I0, "scheduled__gold")
    assert result["rows"] > 0
    assert iceberg_figures(catalog, GOLD, I0) == clickhouse_figures(ch_client, GOLD, I0)
    assert_clean(ch_client, catalog, GOLD, *I0)
    schema = catalog.load_table(GOLD.iceberg_table).schema()
    assert str(schema.find_field("trade_count").field_type) == "decimal(20, 0)"
    assert str(schema.find_field("vwap").field_type) == "decimal(38, 18)"
    print(f"\nPERF {GOLD.name}: {result['rows']:,} rows in {wall:.1f} s wall")


def test_empty_interval_is_recorded(filled, ch_client, catalog, job_env):
    result, _, _ = run_job(job_env, GOLD.name, EMPTY, "scheduled__empty")
    assert (result["rows"], result["checksum"]) == (0, 0)
    found = ib.find_offload_snapshot(catalog, GOLD, *EMPTY)
    assert found is not None
    assert (found.snapshot_id, found.rows, found.run_id) == (result["snapshot_id"], 0, "scheduled__empty")
    assert_clean(ch_client, catalog, GOLD, *EMPTY)


def test_missing_env_var_is_named(job_env):
    env = {k: v for k, v in job_env.items() if k != "K2_ICEBERG_CATALOG_URI"}
    _, proc, _ = run_job(env, BRONZE.name, I0, "x", expect=2)
    # spark-submit's PythonRunner merges the driver's stderr into its stdout
    output = proc.stdout + proc.stderr
    assert "offload_to_iceberg: error: environment variable K2_ICEBERG_CATALOG_URI is not set" in output
    assert "K2_OFFLOAD_RESULT" not in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--interval-start", "2026-11-26T10:00:00", "--interval-end", "2026-11-26T10:15:00+00:00"],
         "has no timezone"),
        (["--interval-start", "2026-11-26T10:15:00Z", "--interval-end", "2026-11-26T10:00:00Z"],
         "--interval-end must be after --interval-start"),
        (["--interval-start", "yesterday", "--interval-end", "2026-11-26T10:00:00Z"], "not an ISO-8601 time"),
        (["--table", "no_such_table", "--interval-start", "2026-11-26T10:00:00Z",
          "--interval-end", "2026-11-26T10:15:00Z"], "unknown table 'no_such_table'"),
    ],
)
def test_bad_arguments_are_clear(args, message, capsys):
    """Argument errors exit 2 before any Spark or service is touched (checked in-process)."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("offload_to_iceberg", JOB)
    job = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(job)
    argv = ["--table", BRONZE.name, "--run-id", "r", *args] if "--table" not in args else ["--run-id", "r", *args]
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert "offload_to_iceberg: error:" in err and message in err, err


def test_verify_finds_value_mismatches(filled, ch_client, catalog):
    """The checksum covers values as well as keys: one changed price under an equal key
    makes the interval differ, and the row detail names the key as mismatched."""
    changed = ch_client.query(
        "SELECT trade_id FROM bronze_trades_binance WHERE "
        f"{ck.clickhouse_interval_filter_sql('event_time')} ORDER BY trade_id LIMIT 1",
        parameters=ck.interval_parameters(*I1),
    ).result_rows[0][0]
    ch_client.command(f"ALTER TABLE bronze_trades_binance UPDATE price = price + 1 WHERE trade_id = {changed}",
                      settings={"mutations_sync": 2})
    full = verify_table(BRONZE, ch_client=ch_client, catalog=catalog, start=I1[0], end=I1[1])
    assert not full.ok
    interval = full.intervals[0]
    assert interval.clickhouse.rows == interval.iceberg.rows
    assert interval.clickhouse.checksum != interval.iceberg.checksum
    assert full.intervals[0].mismatched == 1, full.format()
    assert str(changed) in full.format()
    data = full.to_dict()
    assert data["ok"] is False and data["totals"]["mismatched"] == 1
