"""The three checksum implementations (ClickHouse SQL, Spark, pyarrow) agree on the same rows."""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

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
    "price": "Decimal(38, 18)",
    "small": "Nullable(Decimal(20, 6))",
    "maker": "Bool",
    "day": "Date",
    "ratio": "Float64",  # left out of the checksum
}
# Value edge cases: zero and values under 1e-6 (which Arrow writes with an exponent),
# negative, large, NULL, booleans both ways.
PRICES = ["0", "0.000000000000000001", "-1.5", "123456789012345678.123456789012345678",
          "0.0000001", "65000.25"]
SMALLS = ["0.000001", None, "-0.5", "0", "99999999999999.999999", None]


def _values(i: int) -> tuple[object, ...]:
    """The value columns of row i: price, small, maker, day, ratio."""
    n = len(PRICES)
    return (Decimal(PRICES[i % n]), None if SMALLS[i % n] is None else Decimal(SMALLS[i % n]),
            i % 3 == 0, date(2026, 11, 1 + i % 28), i / 7)


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
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Decimal):
        return f"'{value}'"
    if isinstance(value, date):
        return f"toDate('{value.isoformat()}')"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'").replace("\x1f", "\\x1F")
    return f"'{text}'"


@pytest.fixture(scope="module")
def chdb_session():
    from chdb.session import Session

    session = Session()
    columns = ", ".join(f"{name} {t}" for name, t in CH_TYPES.items())
    for table in ("bronze_trades_binance", "t_nullable_key"):
        session.query(f"CREATE TABLE {table} ({columns}) ENGINE = MergeTree ORDER BY trade_id")
    rows = [(*r, None if i % 2 else f"n{i}", *_values(i)) for i, r in enumerate(ROWS + OUTSIDE)]
    rows.append(("OLD", 5, BEFORE_1970, None, *_values(len(rows))))
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
        pa.field("price", pa.decimal128(38, 18), nullable=False),
        pa.field("small", pa.decimal128(20, 6)),
        pa.field("maker", pa.bool_(), nullable=False),
        pa.field("day", pa.date32(), nullable=False),
        pa.field("ratio", pa.float64(), nullable=False),
    ]))


def _python_checksum(table: pa.Table, columns: list[tuple[str, ck.Kind]]) -> ck.IntervalChecksum:
    """The definition in plain Python over the rows' values (Arrow's to_pylist)."""
    names = [name for name, _ in columns]
    rows = [[row[n] for n in names] for row in table.to_pylist()]
    return ck.IntervalChecksum(len(rows), sum(ck.row_hash(ck.canonical_row(r)) for r in rows))


def test_row_hash_definition():
    key = "BTCUSDT\x1f18446744073709551615"
    assert ck.row_hash(key) == int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "big")
    assert ck.canonical_row(["BTCUSDT", 2**64 - 1]) == key
    assert ck.canonical_row(["x", None, START]) == f"x\x1f\\N\x1f{ck.to_epoch_ms(START)}"
    assert ck.canonical_row([Decimal("0E-18"), Decimal("1E-7").quantize(Decimal("1E-18")), True,
                             date(2026, 1, 2), Decimal(20)]) == \
        "0.000000000000000000\x1f0.000000100000000000\x1ftrue\x1f2026-01-02\x1f20"
    assert ck.to_epoch_ms(BEFORE_1970) == -1


def test_checksum_columns_are_keys_then_values_by_name(binance):
    kinds = {c: ck.kind_from_clickhouse(c, t) for c, t in CH_TYPES.items()}
    assert ck.row_columns(binance, kinds) == [
        ("symbol", ck.Kind.STRING), ("trade_id", ck.Kind.INTEGER), ("day", ck.Kind.DATE),
        ("event_time", ck.Kind.TIMESTAMP), ("maker", ck.Kind.BOOLEAN), ("note", ck.Kind.STRING),
        ("price", ck.Kind.DECIMAL), ("small", ck.Kind.DECIMAL),
    ]  # ratio (Float64) left out


def test_clickhouse_sql_matches_python(chdb_session, binance):
    table = _ch_rows_as_iceberg_arrow(chdb_session, binance, START, END)
    python = _python_checksum(table, ck.arrow_row_columns(binance, table.schema))
    assert _ch_interval(chdb_session, binance, START, END) == python
    assert python.rows == 6  # the rows at END and just before START are outside


def test_clickhouse_sql_matches_pyarrow(chdb_session, binance):
    table = _ch_rows_as_iceberg_arrow(chdb_session, binance, START, END)
    columns = ck.arrow_row_columns(binance, table.schema)
    assert columns[:2] == [("symbol", ck.Kind.STRING), ("trade_id", ck.Kind.INTEGER)]
    assert ck.arrow_checksum(table.to_batches(max_chunksize=2), columns) == _ch_interval(
        chdb_session, binance, START, END
    )


def test_a_changed_value_changes_the_checksum(chdb_session, binance):
    """One value of one row moved (a candle's close, a corrected price): same keys and
    count, another checksum."""
    table = _ch_rows_as_iceberg_arrow(chdb_session, binance, START, END)
    columns = ck.arrow_row_columns(binance, table.schema)
    prices = table.column("price").to_pylist()
    prices[2] = prices[2] + Decimal("0.000000000000000001")
    changed = table.set_column(table.schema.get_field_index("price"), "price",
                               pa.array(prices, pa.decimal128(38, 18)))
    before, after = ck.arrow_checksum([table], columns), ck.arrow_checksum([changed], columns)
    assert before.rows == after.rows and before.checksum != after.checksum


def test_nullable_and_timestamp_keys_agree(chdb_session):
    spec = nullable_spec()
    start = BEFORE_1970 - timedelta(days=1)
    table = _ch_rows_as_iceberg_arrow(chdb_session, spec, start, END)
    columns = ck.arrow_row_columns(spec, table.schema)
    assert [k for _, k in columns[:3]] == [ck.Kind.STRING, ck.Kind.STRING, ck.Kind.TIMESTAMP]
    ch = _ch_interval(chdb_session, spec, start, END)
    assert ch.rows == 8
    assert ck.arrow_checksum([table], columns) == ch
    assert _python_checksum(table, columns) == ch


def test_empty_interval_is_zero(chdb_session, binance):
    empty = _ch_interval(chdb_session, binance, END + timedelta(days=1), END + timedelta(days=2))
    assert empty == ck.IntervalChecksum(0, 0)
    assert ck.arrow_checksum([], [("symbol", ck.Kind.STRING)]) == empty


def test_sum_wraps_modulo_2_64():
    big = ck.IntervalChecksum(2, 2**64 + 5)
    assert big.checksum == 5


@pytest.mark.parametrize(
    "column, ch_type",
    [("tags", "Array(String)"), ("attrs", "Map(String, String)"), ("pos", "Tuple(Float64, Float64)")],
)
def test_unsupported_types_name_the_column(column, ch_type):
    with pytest.raises(ck.ChecksumError, match=column):
        ck.clickhouse_row_hash_sql([(column, ch_type)])


def test_a_floating_point_key_is_refused(binance):
    with pytest.raises(ck.ChecksumError, match="trade_id.*floating point"):
        ck.clickhouse_row_columns(binance, {"symbol": "String", "trade_id": "Float64"})


def test_identifiers_are_checked():
    with pytest.raises(ck.ChecksumError):
        ck.clickhouse_row_hash_sql([("symbol`; DROP TABLE x; --", "String")])
    with pytest.raises(ck.ChecksumError):
        ck.spark_row_hash_sql([("a b", ck.Kind.STRING)])


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
            T.StructField("price", T.DecimalType(38, 18), False),
            T.StructField("small", T.DecimalType(20, 6), True),
            T.StructField("maker", T.BooleanType(), False),
            T.StructField("day", T.DateType(), False),
            T.StructField("ratio", T.DoubleType(), False),
        ])
        df = spark.createDataFrame(table.to_pylist(), schema)
        keys = ck.spark_row_columns(spec, df.schema)
        assert ck.spark_checksum(df, keys) == _ch_interval(chdb_session, spec, start, END)
    empty = spark.createDataFrame([], schema)
    assert ck.spark_checksum(empty, ck.spark_row_columns(binance, schema)) == ck.IntervalChecksum(0, 0)
