"""Row-quality checks: tables.yaml validation, and the three renderings of the checks
(ClickHouse SQL, Spark SQL, pyarrow) agreeing on the same rows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from k2 import checksum as ck
from k2 import quality
from k2.config import DEFAULT_TABLES_FILE, ConfigError, TableSpec, load_tables

UTC = timezone.utc
START = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
END = START + timedelta(minutes=15)
DEFAULTS = {"start_date": "2026-01-01T00:00:00Z", "allowed_lateness": "2m", "hot_retention": "7d",
            "deadline": "30m"}

CHECKS: list[Any] = [
    "key_not_null",
    {"positive": ["price", "quantity"]},
    {"allowed_values": {"side": ["buy", "sell"]}},
    {"not_in_future": {"reference": "ingested_at", "tolerance": "1m"}},
]
CH_TYPES = {
    "n": "UInt8",
    "symbol": "LowCardinality(Nullable(String))",
    "trade_id": "Nullable(UInt64)",
    "event_time": "DateTime64(3, 'UTC')",
    "price": "Decimal(38, 18)",
    "quantity": "Nullable(Decimal(38, 18))",
    "side": "LowCardinality(String)",
    "ingested_at": "DateTime64(3, 'UTC')",
}
T = START + timedelta(minutes=5)
# n, symbol, trade_id, event_time, price, quantity, side, ingested_at -> expected reasons
ROWS: list[tuple[tuple[Any, ...], str]] = [
    ((1, "BTC-USD", 1, T, "10.5", "1", "buy", T), ""),
    ((2, None, 2, T, "10", "1", "buy", T), "key_not_null"),
    ((3, "BTC-USD", None, T, "10", "1", "sell", T), "key_not_null"),
    ((4, "BTC-USD", 4, T, "0", "1", "buy", T), "positive(price)"),
    ((5, "BTC-USD", 5, T, "-1", "1", "buy", T), "positive(price)"),
    ((6, "BTC-USD", 6, T, "10", None, "buy", T), "positive(quantity)"),
    ((7, "BTC-USD", 7, T, "10", "1", "hold", T), "allowed_values(side)"),
    ((8, "BTC-USD", 8, T, "10", "1", "buy", T - timedelta(seconds=60, milliseconds=1)),
     "not_in_future(event_time)"),
    ((9, "BTC-USD", 9, T, "10", "1", "sell", T - timedelta(seconds=60)), ""),  # at the tolerance
    ((10, None, 10, T + timedelta(minutes=5), "0", "0.000000000000000001", "x", T),
     "key_not_null,positive(price),allowed_values(side),not_in_future(event_time)"),
    ((11, "ETH-USD", 11, T, "0.000000000000000001", "2", "sell", T + timedelta(hours=1)), ""),
    # outside the interval: never counted
    ((12, "BTC-USD", 12, END, "0", "1", "buy", END), "positive(price)"),
]


def _spec(checks: list[Any] | None = CHECKS, **overrides: Any) -> TableSpec:
    entry: dict[str, Any] = {
        "clickhouse_table": "t_quality", "event_time_column": "event_time",
        "unique_key": ["symbol", "trade_id"], "iceberg_table": "cold.t_quality", **DEFAULTS,
        "quality_checks": checks, **overrides,
    }
    return TableSpec(**entry)


# --------------------------------------------------------------------------------------
# tables.yaml


def _error(tmp_path: Path, checks: Any) -> str:
    path = tmp_path / "tables.yaml"
    entry = {"clickhouse_table": "bronze_trades_x", "event_time_column": "event_time",
             "unique_key": ["symbol", "trade_id"], "iceberg_table": "cold.bronze_trades_x",
             "quality_checks": checks}
    path.write_text(yaml.safe_dump({"defaults": DEFAULTS, "tables": [entry]}))
    with pytest.raises(ConfigError) as err:
        load_tables(path)
    message = str(err.value)
    assert "table 'bronze_trades_x', key 'quality_checks'" in message, message
    return message


def test_project_checks_are_parsed() -> None:
    config = load_tables(DEFAULT_TABLES_FILE)
    kraken = config.get("bronze_trades_kraken")
    names = [(c.check, c.columns) for c in kraken.quality_checks]
    assert names[0] == ("key_not_null", ())
    assert ("allowed_values", ("side",)) in names and ("positive", ("volume",)) in names
    future = [c for c in kraken.quality_checks if c.check == "not_in_future"][0]
    assert (future.columns, future.reference, future.tolerance) == (("event_time",), "ingested_at",
                                                                    timedelta(minutes=1))
    gold = config.get("gold_ohlcv_1h")
    assert {c.columns for c in gold.quality_checks if c.check == "positive"} == {
        ("open",), ("high",), ("low",), ("close",)}


def test_a_valid_spec_normalizes_every_form() -> None:
    spec = _spec(["key_not_null", {"positive": "price"},
                  {"allowed_values": {"side": ["buy", "sell"], "kind": ["m"]}},
                  {"not_in_future": {"column": "event_time", "reference": "ingested_at"}}])
    assert [(c.check, c.columns) for c in spec.quality_checks] == [
        ("key_not_null", ()), ("positive", ("price",)), ("allowed_values", ("side",)),
        ("allowed_values", ("kind",)), ("not_in_future", ("event_time",))]
    assert spec.quality_checks[-1].tolerance == timedelta(0)
    assert _spec(None).quality_checks == ()


@pytest.mark.parametrize(
    "checks, message",
    [
        ("key_not_null", "must be a list"),
        (["no_nulls"], "check #1: unknown check 'no_nulls'"),
        (["positive"], "'positive' needs arguments"),
        ([{"positive": []}], "needs a column or a list of columns"),
        ([{"positive": ["price; DROP TABLE x"]}], "not a plain SQL identifier"),
        ([{"positive": ["price"], "extra": 1}], "one-key mapping"),
        ([{"allowed_values": {"side": []}}], "non-empty list of values"),
        ([{"allowed_values": {"side": ["buy", "it's"]}}], "without quotes or backslashes"),
        ([{"allowed_values": {"side": ["buy", 1]}}], "without quotes or backslashes"),
        ([{"allowed_values": {"si de": ["buy"]}}], "not a plain SQL identifier"),
        ([{"not_in_future": {"column": "event_time"}}], "needs a reference column"),
        ([{"not_in_future": {"reference": "ingested_at", "tolerance": "soon"}}], "90s, 15m, 6h or 7d"),
        ([{"not_in_future": {"reference": "ingested_at", "slack": "1m"}}], "unknown keys ['slack']"),
        ([{"key_not_null": {"columns": ["a"]}}], "takes no arguments"),
        (["key_not_null", {"positive": ["price"]}, {"positive": "price"}], "positive(price) is listed twice"),
    ],
)
def test_bad_checks_name_table_key_and_check(tmp_path: Path, checks: Any, message: str) -> None:
    assert message in _error(tmp_path, checks)


def test_checks_must_fit_the_source_columns() -> None:
    with pytest.raises(quality.QualityError, match="'t_quality'.*'quantity'.*does not have"):
        quality.rules(_spec(), {k: v for k, v in CH_TYPES.items() if k != "quantity"})
    with pytest.raises(quality.QualityError, match="positive needs a numeric column; 'side'"):
        quality.rules(_spec([{"positive": ["side"]}]), CH_TYPES)
    with pytest.raises(quality.QualityError, match="allowed_values needs a String column; 'price'"):
        quality.rules(_spec([{"allowed_values": {"price": ["1"]}}]), CH_TYPES)
    with pytest.raises(quality.QualityError, match="not_in_future needs a DateTime column; 'side'"):
        quality.rules(_spec([{"not_in_future": {"reference": "side"}}]), CH_TYPES)


def test_rules_and_names() -> None:
    rules = quality.rules(_spec(), CH_TYPES)
    assert rules.reasons == ["key_not_null", "positive(price)", "positive(quantity)",
                             "allowed_values(side)", "not_in_future(event_time)"]
    assert rules.failures[0].columns == ("symbol", "trade_id")  # both are Nullable
    # key_not_null is always applied, and only to Nullable key columns
    implicit = quality.rules(_spec([]), CH_TYPES)
    assert implicit.reasons == ["key_not_null"]
    plain = dict(CH_TYPES, symbol="LowCardinality(String)", trade_id="UInt64")
    assert not quality.rules(_spec([]), plain)
    assert quality.clickhouse_good_sql(quality.rules(_spec([]), plain), plain) == "1"
    assert quality.spark_bad_sql(quality.rules(_spec([]), plain)) == "false"
    assert quality.quarantine_table_name(_spec()) == "cold.t_quality__quarantine"


def test_late_rows_count_only_good_rows() -> None:
    from k2.verify import late_rows_sql

    sql = late_rows_sql(_spec(), CH_TYPES)
    assert "AND NOT ((isNull(`symbol`) OR isNull(`trade_id`))" in sql
    assert "`side` NOT IN ('buy', 'sell')" in sql


# --------------------------------------------------------------------------------------
# The renderings agree


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return f"toDateTime64('{value.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}', 3, 'UTC')"
    if isinstance(value, int):
        return str(value)
    return f"'{value}'"


@pytest.fixture(scope="module")
def chdb_session():
    from chdb.session import Session

    session = Session()
    columns = ", ".join(f"{name} {t}" for name, t in CH_TYPES.items())
    session.query(f"CREATE TABLE t_quality ({columns}) ENGINE = MergeTree ORDER BY n")
    values = ", ".join("(" + ", ".join(_literal(v) for v in row) + ")" for row, _ in ROWS)
    session.query(f"INSERT INTO t_quality VALUES {values}")
    yield session
    session.close()


def _ch_arrow(session, sql: str, params: dict | None = None) -> pa.Table:
    result = session.query(sql, "Arrow", params=params or {})
    return pa.ipc.open_file(pa.py_buffer(result.bytes())).read_all()


def _in_interval() -> list[tuple[tuple[Any, ...], str]]:
    return [(row, reason) for row, reason in ROWS if START <= row[3] < END]


def test_clickhouse_reasons_and_split(chdb_session) -> None:
    spec = _spec()
    rules = quality.rules(spec, CH_TYPES)
    got = _ch_arrow(chdb_session, f"SELECT n, {quality.clickhouse_reason_sql(rules, CH_TYPES)} AS reason, "
                                  f"{quality.clickhouse_bad_sql(rules, CH_TYPES)} AS bad "
                                  "FROM t_quality ORDER BY n").to_pylist()
    assert [(r["n"], r["reason"]) for r in got] == [(row[0], reason) for row, reason in ROWS]
    assert [bool(r["bad"]) for r in got] == [bool(reason) for _, reason in ROWS]

    split = _ch_arrow(chdb_session, quality.clickhouse_split_sql(spec, rules, CH_TYPES),
                      ck.interval_parameters(START, END)).to_pylist()[0]
    # The definition in plain Python over the interval's rows as ClickHouse returns them
    stored = {r["n"]: r for r in _ch_arrow(chdb_session, "SELECT * FROM t_quality").to_pylist()}
    names = [c for c, _ in ck.row_columns(spec, {c: ck.kind_from_clickhouse(c, t) for c, t in CH_TYPES.items()})]
    rows = _in_interval()
    good = [[stored[r[0]][c] for c in names] for r, reason in rows if not reason]
    bad = [[stored[r[0]][c] for c in names] for r, reason in rows if reason]

    def figures(values: list[list[Any]]) -> ck.IntervalChecksum:
        return ck.IntervalChecksum(len(values), sum(ck.row_hash(ck.canonical_row(v)) for v in values))

    assert ck.IntervalChecksum(split["good_rows"], split["good_checksum"]) == figures(good)
    assert ck.IntervalChecksum(split["bad_rows"], split["bad_checksum"]) == figures(bad)
    assert (len(good), len(bad)) == (3, 8)

    present = _ch_arrow(chdb_session, "SELECT count() AS c FROM t_quality WHERE "
                        + quality.clickhouse_key_present_sql(rules, CH_TYPES)).to_pylist()[0]["c"]
    assert present == len(ROWS) - 3


def test_pyarrow_matches_clickhouse(chdb_session) -> None:
    rules = quality.rules(_spec(), CH_TYPES)
    table = _ch_arrow(chdb_session, "SELECT * FROM t_quality ORDER BY n")
    # as pyiceberg returns it: microsecond timestamps, UInt64 as decimal(20,0)
    iceberg_like = table.cast(pa.schema([
        pa.field("n", pa.int32()), pa.field("symbol", pa.large_string()),
        pa.field("trade_id", pa.decimal128(20, 0)), pa.field("event_time", pa.timestamp("us", tz="UTC")),
        pa.field("price", pa.decimal128(38, 18)), pa.field("quantity", pa.decimal128(38, 18)),
        pa.field("side", pa.large_string()), pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
    ]))
    expected = [reason for _, reason in ROWS]
    for batch in (table, iceberg_like):
        assert quality.arrow_reasons(batch, rules).to_pylist() == expected
        assert quality.arrow_bad_mask(batch, rules).to_pylist() == [bool(r) for r in expected]
    assert quality.arrow_reasons(table.slice(0, 0), rules).to_pylist() == []


@pytest.mark.slow
def test_spark_matches_clickhouse(spark, chdb_session) -> None:
    from pyspark.sql import types as S

    spec = _spec()
    rules = quality.rules(spec, CH_TYPES)
    schema = S.StructType([
        S.StructField("n", S.IntegerType(), False), S.StructField("symbol", S.StringType(), True),
        S.StructField("trade_id", S.DecimalType(20, 0), True),
        S.StructField("event_time", S.TimestampType(), False),
        S.StructField("price", S.DecimalType(38, 18), False),
        S.StructField("quantity", S.DecimalType(38, 18), True),
        S.StructField("side", S.StringType(), False), S.StructField("ingested_at", S.TimestampType(), False),
    ])
    data = [
        (n, symbol, None if tid is None else Decimal(tid), et, Decimal(price),
         None if qty is None else Decimal(qty), side, ing)
        for (n, symbol, tid, et, price, qty, side, ing), _ in ROWS
    ]
    df = spark.createDataFrame(data, schema)
    got = df.selectExpr("n", f"{quality.spark_reason_sql(rules)} AS reason",
                        f"{quality.spark_bad_sql(rules)} AS bad").orderBy("n").collect()
    assert [(r["n"], r["reason"]) for r in got] == [(row[0], reason) for row, reason in ROWS]
    assert [r["bad"] for r in got] == [bool(reason) for _, reason in ROWS]

    in_interval = df.where(f"event_time >= TIMESTAMP '{START.isoformat()}' "
                           f"AND event_time < TIMESTAMP '{END.isoformat()}'")
    split = quality.spark_split_checksum(in_interval, ck.spark_row_columns(spec, schema), rules)
    ch = _ch_arrow(chdb_session, quality.clickhouse_split_sql(spec, rules, CH_TYPES),
                   ck.interval_parameters(START, END)).to_pylist()[0]
    assert split == quality.SplitChecksum(ck.IntervalChecksum(ch["good_rows"], ch["good_checksum"]),
                                          ck.IntervalChecksum(ch["bad_rows"], ch["bad_checksum"]))
    assert split.rows_read == 11
    empty = quality.spark_split_checksum(df.limit(0), ck.spark_row_columns(spec, schema), rules)
    assert empty.rows_read == 0 and empty.good == ck.IntervalChecksum(0, 0)


def test_project_checks_fit_the_project_schema(chdb_session) -> None:
    """Every table's checks resolve against its real ClickHouse columns, and the SQL runs."""
    import chdb.session

    from k2.schema import schema_statements

    session = chdb.session.Session()
    try:
        for statement in schema_statements():
            session.query(statement)
        for spec in load_tables(DEFAULT_TABLES_FILE).tables:
            described = _ch_arrow(session, f"DESCRIBE TABLE {spec.source}").to_pylist()
            types = {r["name"]: r["type"] for r in described}
            rules = quality.rules(spec, types)
            assert rules, spec.name  # every table has checks that can fail
            result = _ch_arrow(session, quality.clickhouse_split_sql(spec, rules, types),
                               ck.interval_parameters(START, END)).to_pylist()[0]
            assert result["good_rows"] == result["bad_rows"] == 0
    finally:
        session.close()
