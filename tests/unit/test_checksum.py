"""The three checksum implementations (ClickHouse SQL, Spark, pyarrow) agree on the same rows."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from k2 import checksum as ck
from k2.config import TableSpec, load_tables

UTC = timezone.utc
START = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
END = START + timedelta(minutes=15)

# Edge cases: UInt64 above 2**63, unicode, the separator and '\N' inside values,
# a timestamp before 1970, the interval's first and last millisecond.
ROWS = [
    ("BTCUSDT", 1, START),
    ("BTCUSDT", 2**64 - 1, START + timedelta(minutes=3, milliseconds=7)),
    ("ETHUSDT", 2**63, START + timedelta(minutes=14, seconds=59, milliseconds=999)),
    ("ÄÖÜ-€", 42, START + timedelta(seconds=1)),
    ("A\x1fB", 7, START + timedelta(seconds=2)),
    ("\\N", 0, START + timedelta(seconds=3)),
]
OUTSIDE = [("BTCUSDT", 99, END), ("BTCUSDT", 98, START - timedelta(milliseconds=1))]
BEFORE_1970 = datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)

CH_TYPES = {
    "symbol": "LowCardinality(String)",
    "trade_id": "UInt64",
    "event_time": "DateTime64(3, 'UTC')",
    "note": "Nullable(String)",
}


@pytest.fixture(scope="module")
def binance() -> TableSpec:
    return load_tables().get("bronze_trades_binance")


def nullable_spec() -> TableSpec:
    return TableSpec(
        clickhouse_table="t_nullable_key",
        event_time_column="event_time",
        unique_key=["symbol", "note", "event_time"],
        allowed_lateness="2m",
        iceberg_table="cold.t_nullable_key",
        hot_retention="7d",
        deadline="30m",
        start_date="2026-01-01T00:00:00Z",
    )


def _sql_literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return f"toDateTime64('{value.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}', 3, 'UTC')"
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'").replace("\x1f", "\\x1F")
    return f"'{text}'"


@pytest.fixture(scope="module")
def chdb_session():
    from chdb.session import Session

    session = Session()
    session.query(
        "CREATE TABLE bronze_trades_binance (symbol LowCardinality(String), trade_id UInt64, "
        "event_time DateTime64(3, 'UTC'), note Nullable(String)) ENGINE = MergeTree ORDER BY trade_id"
    )
    session.query(
        "CREATE TABLE t_nullable_key (symbol LowCardinality(String), trade_id UInt64, "
        "event_time DateTime64(3, 'UTC'), note Nullable(String)) ENGINE = MergeTree ORDER BY trade_id"
    )
    rows = [(*r, None if i % 2 else f"n{i}") for i, r in enumerate(ROWS + OUTSIDE)]
    rows.append(("OLD", 5, BEFORE_1970, None))
    values = ", ".join("(" + ", ".join(_sql_literal(v) for v in row) + ")" for row in rows)
    session.query(f"INSERT INTO bronze_trades_binance VALUES {values}")
    session.query(f"INSERT INTO t_nullable_key VALUES {values}")
    yield session
    session.close()


def _ch_interval(session, spec: TableSpec, start: datetime, end: datetime) -> ck.IntervalChecksum:
    result = session.query(
        ck.clickhouse_interval_checksum_sql(spec, CH_TYPES), "CSV",
        params=ck.interval_parameters(start, end),
    )
    rows, checksum = str(result).strip().split(",")
    return ck.IntervalChecksum(int(rows), int(checksum))


def _ch_rows_as_iceberg_arrow(session, spec: TableSpec, start: datetime, end: datetime) -> pa.Table:
    """The interval as pyiceberg would return it: UInt64 -> decimal(20,0), ms -> us timestamps."""
    result = session.query(
        f"SELECT * FROM {spec.source} WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)}",
        "Arrow", params=ck.interval_parameters(start, end),
    )
    table = pa.ipc.open_file(pa.py_buffer(result.bytes())).read_all()
    return table.cast(pa.schema([
        pa.field("symbol", pa.large_string(), nullable=False),
        pa.field("trade_id", pa.decimal128(20, 0), nullable=False),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("note", pa.large_string()),
    ]))


def test_row_hash_definition():
    key = "BTCUSDT\x1f18446744073709551615"
    assert ck.row_hash(key) == int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "big")
    assert ck.canonical_key(["BTCUSDT", 2**64 - 1]) == key
    assert ck.canonical_key(["x", None, START]) == f"x\x1f\\N\x1f{ck.to_epoch_ms(START)}"
    assert ck.to_epoch_ms(BEFORE_1970) == -1


def test_clickhouse_sql_matches_python(chdb_session, binance):
    expected_rows = [(s, i) for s, i, _ in ROWS]
    python = ck.IntervalChecksum(
        len(expected_rows), sum(ck.row_hash(ck.canonical_key(r)) for r in expected_rows) % ck.MODULUS
    )
    assert _ch_interval(chdb_session, binance, START, END) == python
    assert python.rows == 6  # the rows at END and just before START are outside


def test_clickhouse_sql_matches_pyarrow(chdb_session, binance):
    table = _ch_rows_as_iceberg_arrow(chdb_session, binance, START, END)
    keys = ck.arrow_key_columns(binance, table.schema)
    assert keys == [("symbol", ck.KeyKind.STRING), ("trade_id", ck.KeyKind.INTEGER)]
    assert ck.arrow_checksum(table.to_batches(max_chunksize=2), keys) == _ch_interval(
        chdb_session, binance, START, END
    )


def test_nullable_and_timestamp_keys_agree(chdb_session):
    spec = nullable_spec()
    start = BEFORE_1970 - timedelta(days=1)
    table = _ch_rows_as_iceberg_arrow(chdb_session, spec, start, END)
    keys = ck.arrow_key_columns(spec, table.schema)
    assert [k for _, k in keys] == [ck.KeyKind.STRING, ck.KeyKind.STRING, ck.KeyKind.TIMESTAMP]
    ch = _ch_interval(chdb_session, spec, start, END)
    assert ch.rows == 8
    assert ck.arrow_checksum([table], keys) == ch
    python = sum(
        ck.row_hash(ck.canonical_key([r["symbol"], r["note"], r["event_time"]])) for r in table.to_pylist()
    ) % ck.MODULUS
    assert python == ch.checksum


def test_empty_interval_is_zero(chdb_session, binance):
    empty = _ch_interval(chdb_session, binance, END + timedelta(days=1), END + timedelta(days=2))
    assert empty == ck.IntervalChecksum(0, 0)
    assert ck.arrow_checksum([], [("symbol", ck.KeyKind.STRING)]) == empty


def test_sum_wraps_modulo_2_64():
    big = ck.IntervalChecksum(2, 2**64 + 5)
    assert big.checksum == 5


@pytest.mark.parametrize(
    "column, ch_type",
    [("price", "Decimal(38, 18)"), ("flag", "Bool"), ("tags", "Array(String)"), ("x", "Float64")],
)
def test_unsupported_key_types_name_the_column(column, ch_type):
    with pytest.raises(ck.ChecksumError, match=column):
        ck.clickhouse_row_hash_sql([(column, ch_type)])


def test_identifiers_are_checked():
    with pytest.raises(ck.ChecksumError):
        ck.clickhouse_row_hash_sql([("symbol`; DROP TABLE x; --", "String")])
    with pytest.raises(ck.ChecksumError):
        ck.spark_row_hash_sql([("a b", ck.KeyKind.STRING)])


def test_missing_key_column_names_table_and_column(binance):
    with pytest.raises(ck.ChecksumError, match="trade_id"):
        ck.clickhouse_interval_checksum_sql(binance, {"symbol": "String", "event_time": "DateTime64(3)"})


@pytest.mark.slow
def test_spark_matches_clickhouse(spark, chdb_session, binance):
    from pyspark.sql import types as T

    for spec, start in ((binance, START), (nullable_spec(), BEFORE_1970 - timedelta(days=1))):
        table = _ch_rows_as_iceberg_arrow(chdb_session, spec, start, END)
        schema = T.StructType([
            T.StructField("symbol", T.StringType(), False),
            T.StructField("trade_id", T.DecimalType(20, 0), False),
            T.StructField("event_time", T.TimestampType(), False),
            T.StructField("note", T.StringType(), True),
        ])
        df = spark.createDataFrame(table.to_pylist(), schema)
        keys = ck.spark_key_columns(spec, df.schema)
        assert ck.spark_checksum(df, keys) == _ch_interval(chdb_session, spec, start, END)
    empty = spark.createDataFrame([], schema)
    assert ck.spark_checksum(empty, ck.spark_key_columns(binance, schema)) == ck.IntervalChecksum(0, 0)
