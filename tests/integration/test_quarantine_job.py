"""Fault matrix item 10, job level: bad rows are quarantined, counted and reconciled.

A table of this module's own (Nullable key columns, so that a NULL key can exist) gets
good rows and one bad row of each kind in one interval; the real offload job (spark-submit
against the session stack) must write the good rows to the table and exactly the bad ones,
with their reasons, to `<table>__quarantine`; rows read = written + quarantined; a re-run
leaves one copy in both tables; `verify_table` is clean. Prints the measured counts
(QUARANTINE lines).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from k2 import checksum as ck
from k2 import iceberg as ib
from k2 import quality
from k2.config import load_tables
from k2.verify import verify_table
from tests.integration.test_offload_job import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTC = timezone.utc
I0 = (datetime(2026, 11, 26, 10, 0, tzinfo=UTC), datetime(2026, 11, 26, 10, 15, tzinfo=UTC))
I1 = (I0[1], datetime(2026, 11, 26, 10, 30, tzinfo=UTC))
CATALOG = "k2_test_quarantine"
TABLE = "trades_q"
GOOD_PER_INTERVAL = 300
DDL = f"""
CREATE TABLE {TABLE} (
    symbol       LowCardinality(Nullable(String)),
    trade_id     Nullable(UInt64),
    event_time   DateTime64(3, 'UTC'),
    price        Decimal(38, 18),
    quantity     Decimal(38, 18),
    side         LowCardinality(String),
    ingested_at  DateTime64(3, 'UTC'),
    note         String
) ENGINE = MergeTree ORDER BY event_time
"""
CHECKS = [
    "key_not_null",
    {"positive": ["price", "quantity"]},
    {"allowed_values": {"side": ["buy", "sell"]}},
    {"not_in_future": {"reference": "ingested_at", "tolerance": "1m"}},
]
# note -> symbol, trade_id (None: a fresh one), price, side, event time an hour after
# ingestion, and the reasons expected in k2_reason
BAD = {
    "null_symbol": ("NULL", None, "10", "'buy'", False, "key_not_null"),
    "null_trade_id": ("'BTC-USD'", "NULL", "10", "'sell'", False, "key_not_null"),
    "zero_price": ("'BTC-USD'", None, "0", "'buy'", False, "positive(price)"),
    "negative_price": ("'ETH-USD'", None, "-3.5", "'sell'", False, "positive(price)"),
    "future_time": ("'BTC-USD'", None, "10", "'buy'", True, "not_in_future(event_time)"),
    "unknown_side": ("'ETH-USD'", None, "10", "'hold'", False, "allowed_values(side)"),
    "several": ("NULL", None, "0", "'x'", True,
                "key_not_null,positive(price),allowed_values(side),not_in_future(event_time)"),
}


@pytest.fixture(scope="module")
def tables_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tables.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": {"start_date": "2026-01-01T00:00:00Z", "allowed_lateness": "2m",
                     "hot_retention": "7d", "deadline": "30m"},
        "tables": [{"clickhouse_table": TABLE, "event_time_column": "event_time",
                    "unique_key": ["symbol", "trade_id"], "iceberg_table": f"cold.{TABLE}",
                    "partition_by": ["day(event_time)"], "quality_checks": CHECKS}],
    }))
    return path


@pytest.fixture(scope="module")
def spec(tables_file):
    return load_tables(tables_file).get(TABLE)


def _ts(moment: datetime) -> str:
    return f"toDateTime64('{moment.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}', 3, 'UTC')"


@pytest.fixture(scope="module")
def filled(ch_client):
    ch_client.command(DDL)
    rows = []
    for start, _ in (I0, I1):
        for i in range(GOOD_PER_INTERVAL):
            at = start + timedelta(seconds=2 * i, milliseconds=i)
            trade_id = ck.to_epoch_ms(start) // 1000 + i
            rows.append(f"('BTC-USD', {trade_id}, {_ts(at)}, {100 + i}.25, 0.5, "
                        f"'{'buy' if i % 2 else 'sell'}', {_ts(at + timedelta(seconds=1))}, 'good')")
    for n, (note, (symbol, trade_id, price, side, future, _)) in enumerate(BAD.items()):
        at = I0[0] + timedelta(minutes=7, seconds=n)
        ingested = at - timedelta(hours=1) if future else at + timedelta(seconds=1)
        rows.append(f"({symbol}, {trade_id or 9_000_000 + n}, {_ts(at)}, {price}, 1, {side}, "
                    f"{_ts(ingested)}, '{note}')")
    ch_client.command(f"INSERT INTO {TABLE} VALUES {', '.join(rows)}")
    return len(rows)


def _scan(catalog, name: str, interval) -> list[dict]:
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    table = catalog.load_table(name)
    return table.scan(row_filter=And(GreaterThanOrEqual("event_time", interval[0].isoformat()),
                                     LessThan("event_time", interval[1].isoformat()))).to_arrow().to_pylist()


def _offload(env, tables_file, interval, run_id) -> dict:
    result, _, wall = run_job(env, TABLE, interval, run_id, "--tables-config", str(tables_file))
    print(f"\nQUARANTINE {run_id}: read {result['rows_read']}, written {result['rows']}, quarantined "
          f"{result['quarantined_rows']} ({wall:.1f} s wall)")
    return result


def _check_interval(catalog, spec, ch_client, result, run_id, bad_notes):
    main = _scan(catalog, spec.iceberg_table, I0)
    held = _scan(catalog, quality.quarantine_table_name(spec), I0)
    assert result["rows_read"] == result["rows"] + result["quarantined_rows"]
    assert (result["rows"], result["quarantined_rows"]) == (len(main), len(held))
    assert Counter(r["note"] for r in main) == Counter({"good": GOOD_PER_INTERVAL,
                                                        **{n: 1 for n in BAD if n not in bad_notes}})
    # exactly one copy of each bad row, with the reasons of every check it fails
    assert sorted((r["note"], r[quality.REASON_COLUMN]) for r in held) == sorted(
        (note, BAD[note][-1]) for note in bad_notes)
    assert {r[quality.RUN_ID_COLUMN] for r in held} == {run_id}
    assert {r[quality.INTERVAL_START_COLUMN] for r in held} == {I0[0]}
    summary = catalog.load_table(spec.iceberg_table).snapshot_by_id(
        result["snapshot_id"]).summary.additional_properties
    assert summary[ib.PROP_QUARANTINED_ROWS] == str(len(bad_notes))
    assert summary[ib.PROP_ROWS] == str(len(main))
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=I0[0], end=I0[1],
                          compare_values=True)
    totals = report.totals()
    print(f"QUARANTINE verify: ClickHouse {totals['clickhouse_rows']} good + "
          f"{totals['clickhouse_quarantined_rows']} bad rows; Iceberg {totals['iceberg_rows']} + "
          f"quarantine {totals['iceberg_quarantined_rows']}; lost {totals['missing']}, duplicated "
          f"{totals['duplicated']}, unexpected {totals['unexpected']}, mismatched {totals['mismatched']}")
    assert report.ok, report.format()
    assert totals["clickhouse_quarantined_rows"] == totals["iceberg_quarantined_rows"] == len(bad_notes)


def test_bad_rows_are_quarantined_and_reruns_keep_one_copy(filled, spec, tables_file, ch_client, job_stack):
    env, catalog = job_stack.env, job_stack.catalog
    first = _offload(env, tables_file, I0, "scheduled__i0")
    assert first["rows_read"] == GOOD_PER_INTERVAL + len(BAD)
    assert (first["rows"], first["quarantined_rows"]) == (GOOD_PER_INTERVAL, len(BAD))
    assert first["quarantine_table"] == f"cold.{TABLE}__quarantine"
    _check_interval(catalog, spec, ch_client, first, "scheduled__i0", list(BAD))

    # retry / clear: the same interval again -> still one copy in both tables
    again = _offload(env, tables_file, I0, "manual__i0_again")
    assert (again["rows"], again["quarantined_rows"]) == (first["rows"], first["quarantined_rows"])
    assert again["quarantine_snapshot_id"] != first["quarantine_snapshot_id"]
    _check_interval(catalog, spec, ch_client, again, "manual__i0_again", list(BAD))

    # the data is repaired upstream and the interval re-run: the row moves to the table
    ch_client.command(f"ALTER TABLE {TABLE} UPDATE price = 1 WHERE note = 'zero_price'",
                      settings={"mutations_sync": 2})
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=I0[0], end=I0[1])
    assert not report.ok and "quarantine:" in report.format()
    repaired = _offload(env, tables_file, I0, "manual__i0_repaired")
    remaining = [n for n in BAD if n != "zero_price"]
    assert (repaired["rows"], repaired["quarantined_rows"]) == (GOOD_PER_INTERVAL + 1, len(remaining))
    _check_interval(catalog, spec, ch_client, repaired, "manual__i0_repaired", remaining)

    # a clean interval writes nothing to the quarantine table
    quarantine = catalog.load_table(quality.quarantine_table_name(spec))
    before = [s.snapshot_id for s in quarantine.snapshots()]
    clean = _offload(env, tables_file, I1, "scheduled__i1")
    assert (clean["rows"], clean["quarantined_rows"], clean["quarantine_snapshot_id"]) == (
        GOOD_PER_INTERVAL, 0, None)
    assert [s.snapshot_id for s in catalog.load_table(quality.quarantine_table_name(spec)).snapshots()] == before
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=I0[0], end=I1[1])
    assert report.ok, report.format()
    assert report.totals()["iceberg_rows"] == 2 * GOOD_PER_INTERVAL + 1
    print(f"QUARANTINE measured: {first['rows_read']} rows read in I0 = {first['rows']} written + "
          f"{first['quarantined_rows']} quarantined; re-run: {again['rows']} + {again['quarantined_rows']} "
          "(one copy each); rows lost 0, duplicated 0")


def test_duplicate_keys_still_stop_the_interval(filled, spec, tables_file, ch_client, job_stack):
    env, catalog = job_stack.env, job_stack.catalog
    snapshots = [s.snapshot_id for s in catalog.load_table(spec.iceberg_table).snapshots()]
    # two rows with NULL trade_id are bad rows, not duplicates; two copies of a whole key are
    ch_client.command(
        f"INSERT INTO {TABLE} SELECT * FROM {TABLE} WHERE note = 'good' AND "
        f"{ck.clickhouse_interval_filter_sql('event_time')} ORDER BY event_time LIMIT 1",
        parameters=ck.interval_parameters(*I1))
    _, proc, _ = run_job(env, TABLE, I1, "manual__dup", "--tables-config", str(tables_file), expect=1)
    assert "duplicate unique keys" in proc.stdout + proc.stderr
    assert [s.snapshot_id for s in catalog.load_table(spec.iceberg_table).snapshots()] == snapshots
