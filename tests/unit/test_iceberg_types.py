"""ClickHouse -> Iceberg -> Spark type mapping, partition transforms and catalog conf."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pyiceberg import types as T

from k2 import iceberg as ib
from k2.config import load_tables
from k2.runtime_env import IcebergSettings

SETTINGS = IcebergSettings(
    catalog_name="k2",
    uri="postgresql://127.0.0.1:5432/k2",
    user="k2",
    password="p@ss:w/rd",
    warehouse="file:///tmp/warehouse",
)


@pytest.mark.parametrize(
    "ch_type, expected, required",
    [
        ("UInt64", T.DecimalType(20, 0), True),
        ("Nullable(UInt64)", T.DecimalType(20, 0), False),
        ("UInt32", T.LongType(), True),
        ("UInt16", T.IntegerType(), True),
        ("UInt8", T.IntegerType(), True),
        ("Int64", T.LongType(), True),
        ("Int32", T.IntegerType(), True),
        ("Int8", T.IntegerType(), True),
        ("Bool", T.BooleanType(), True),
        ("Float32", T.FloatType(), True),
        ("Float64", T.DoubleType(), True),
        ("Decimal(38, 18)", T.DecimalType(38, 18), True),
        ("Decimal(20, 6)", T.DecimalType(20, 6), True),
        ("Decimal64(4)", T.DecimalType(18, 4), True),
        ("String", T.StringType(), True),
        ("LowCardinality(String)", T.StringType(), True),
        ("LowCardinality(Nullable(String))", T.StringType(), False),
        ("Date", T.DateType(), True),
        ("DateTime", T.TimestamptzType(), True),
        ("DateTime('UTC')", T.TimestamptzType(), True),
        ("DateTime64(3, 'UTC')", T.TimestamptzType(), True),
        ("DateTime64(6)", T.TimestamptzType(), True),
        ("Nullable(DateTime64(3, 'UTC'))", T.TimestamptzType(), False),
    ],
)
def test_mapping(ch_type, expected, required):
    assert ib.iceberg_type("c", ch_type) == (expected, required)


@pytest.mark.parametrize(
    "ch_type",
    [
        "UInt128", "Int128", "UInt256", "Decimal(76, 10)", "Decimal256(3)", "DateTime64(9, 'UTC')",
        "FixedString(16)", "UUID", "Enum8('a' = 1)", "Array(String)", "Map(String, UInt64)",
        "Tuple(a UInt8)", "JSON", "IPv4", "Nullable(Array(UInt8))",
    ],
)
def test_unsupported_types_name_the_column(ch_type):
    with pytest.raises(ib.UnsupportedType, match="column 'odd_col'") as err:
        ib.iceberg_type("odd_col", ch_type)
    assert ch_type in str(err.value)


def test_uint64_does_not_wrap():
    """The reason for decimal(20,0): 2**64-1 survives ClickHouse -> Arrow -> Spark's type."""
    import pyarrow as pa

    values = pa.array([0, 2**63, 2**64 - 1], pa.uint64())
    itype, _ = ib.iceberg_type("trade_id", "UInt64")
    cast = values.cast(pa.decimal128(itype.precision, itype.scale), safe=True)
    assert [int(v) for v in cast.to_pylist()] == [0, 2**63, 2**64 - 1]


def test_schema_and_spark_ddl_for_bronze():
    columns = [
        ib.SourceColumn("sequence_number", "UInt64"),
        ib.SourceColumn("trade_id", "UInt64"),
        ib.SourceColumn("symbol", "LowCardinality(String)"),
        ib.SourceColumn("price", "Decimal(38, 18)"),
        ib.SourceColumn("is_buyer_maker", "Bool"),
        ib.SourceColumn("event_time", "DateTime64(3, 'UTC')"),
        ib.SourceColumn("note", "Nullable(String)"),
    ]
    schema = ib.iceberg_schema(columns)
    assert [f.name for f in schema.fields] == [c.name for c in columns]
    assert [f.field_id for f in schema.fields] == list(range(1, 8))
    assert schema.find_field("note").required is False
    assert schema.find_field("event_time").field_type == T.TimestamptzType()

    spec = load_tables().get("bronze_trades_binance")
    sql = ib.create_table_sql(SETTINGS, spec, columns)
    assert sql.startswith("CREATE TABLE IF NOT EXISTS `k2`.`cold`.`bronze_trades_binance` (")
    assert "`trade_id` decimal(20,0) NOT NULL" in sql
    assert "`event_time` timestamp NOT NULL" in sql
    assert "`note` string," in sql or "`note` string)" in sql
    assert "PARTITIONED BY (days(`event_time`), `symbol`)" in sql
    assert "'format-version'='2'" in sql


def test_spark_struct_matches_ddl():
    from pyspark.sql import types as S

    struct = ib.spark_struct([ib.SourceColumn("a", "UInt64"), ib.SourceColumn("b", "Nullable(DateTime64(3))")])
    assert struct == S.StructType([
        S.StructField("a", S.DecimalType(20, 0), False),
        S.StructField("b", S.TimestampType(), True),
    ])


def test_schema_differences():
    from pyspark.sql import types as S

    columns = [ib.SourceColumn("a", "UInt64"), ib.SourceColumn("b", "String")]
    same = ib.spark_struct(columns)
    assert ib.schema_differences(columns, same) == []
    other = S.StructType([S.StructField("a", S.LongType(), False)])
    problems = ib.schema_differences(columns, other)
    assert any("'a' is bigint in Iceberg" in p for p in problems)
    assert any("'b'" in p and "missing" in p for p in problems)


@pytest.mark.parametrize(
    "table, expected",
    [
        ("bronze_trades_kraken", "days(`event_time`), `pair`"),
        ("gold_ohlcv_1m", "months(`window_start`)"),
        ("gold_ohlcv_1d", "years(`window_start`)"),
    ],
)
def test_partition_transforms_from_config(table, expected):
    assert ib.spark_partition_sql(load_tables().get(table)) == expected


def test_partition_column_must_exist():
    spec = load_tables().get("bronze_trades_binance")
    with pytest.raises(ib.SchemaMismatch, match="symbol"):
        ib.spark_partition_sql(spec, ["event_time"])


def test_spark_conf_has_no_password():
    conf = ib.spark_conf(SETTINGS)
    assert conf["spark.sql.catalog.k2.catalog-impl"] == "org.apache.iceberg.jdbc.JdbcCatalog"
    assert conf["spark.sql.catalog.k2.uri"] == "jdbc:postgresql://127.0.0.1:5432/k2"
    assert conf["spark.sql.catalog.k2.jdbc.schema-version"] == "V1"
    assert conf["spark.sql.extensions"] == ib.ICEBERG_EXTENSIONS
    assert conf["spark.sql.session.timeZone"] == "UTC"
    assert all(SETTINGS.password not in v for v in conf.values())
    assert not any("password" in k for k in conf)
    assert ib.spark_secret_conf(SETTINGS) == {"spark.sql.catalog.k2.jdbc.password": SETTINGS.password}


def test_sqlalchemy_url_escapes_password():
    from sqlalchemy.engine import make_url

    url = make_url(ib.sqlalchemy_url(SETTINGS))
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "k2", SETTINGS.password, "127.0.0.1", 5432, "k2"
    )


def test_bad_catalog_name_is_refused():
    bad = IcebergSettings("k2; drop", SETTINGS.uri, "k2", "", SETTINGS.warehouse)
    with pytest.raises(ValueError, match="catalog name"):
        ib.spark_conf(bad)


def test_snapshot_properties_round_trip():
    spec = load_tables().get("bronze_trades_binance")
    start = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    end = datetime(2026, 11, 26, 10, 15, tzinfo=timezone.utc)
    props = ib.snapshot_properties(spec, start, end, run_id="scheduled__x", rows=3,
                                   checksum=2**64 - 1, attempt_id="abc")
    assert props[ib.PROP_INTERVAL_START] == "2026-11-26T10:00:00+00:00"
    conf = ib.snapshot_property_conf(props)
    assert conf["spark.sql.iceberg.snapshot-property.k2.run-id"] == "scheduled__x"
    found = ib.offload_snapshot_from_summary(spec, 7, 1_000, {**props, "operation": "overwrite"})
    assert found is not None
    assert (found.interval_start, found.interval_end, found.rows, found.checksum) == (start, end, 3, 2**64 - 1)
    assert ib.offload_snapshot_from_summary(load_tables().get("silver_trades"), 7, 1_000, props) is None


def _batch(spec, start: datetime, n: int, *, rows=(5, 0, 7), checksums=(11, 0, 2**64 - 2)):
    step = timedelta(minutes=15)
    return [ib.IntervalFigures(start + k * step, start + (k + 1) * step, rows[k], checksums[k], k)
            for k in range(n)]


def test_batch_snapshot_is_read_back_interval_by_interval():
    spec = load_tables().get("bronze_trades_binance")
    start = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    figures = _batch(spec, start, 3)
    props = ib.batch_snapshot_properties(spec, figures, run_id="scheduled__b", attempt_id="att")
    # The common keys describe the whole range, with summed figures (checksum mod 2**64).
    assert (props[ib.PROP_INTERVAL_START], props[ib.PROP_INTERVAL_END]) == (
        "2026-11-26T10:00:00+00:00", "2026-11-26T10:45:00+00:00")
    assert (props[ib.PROP_ROWS], props[ib.PROP_CHECKSUM]) == ("12", str((11 + 2**64 - 2) % 2**64))
    summary = {**props, "added-files-size": "900", "total-data-files": "4"}
    found = ib.offload_snapshots_from_summary(spec, 7, 1_000, summary)
    assert [(f.interval_start, f.interval_end, f.rows, f.checksum, f.quarantined_rows) for f in found] == [
        (f.start, f.end, f.rows, f.checksum, f.quarantined_rows) for f in figures]
    assert {(f.snapshot_id, f.run_id, f.attempt_id, f.total_data_files) for f in found} == {(7, "scheduled__b", "att", 4)}
    assert [f.added_files_size for f in found] == [900, 0, 0]  # the sum stays the commit's
    # A single-interval commit is one interval, as before.
    single = ib.snapshot_properties(spec, start, start + timedelta(minutes=15), run_id="r", rows=1,
                                    checksum=2, attempt_id="a")
    assert [f.rows for f in ib.offload_snapshots_from_summary(spec, 8, 1_000, single)] == [1]


def test_batch_snapshot_whose_figures_do_not_add_up_is_no_evidence():
    spec = load_tables().get("bronze_trades_binance")
    start = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    props = ib.batch_snapshot_properties(spec, _batch(spec, start, 3), run_id="r", attempt_id="a")
    for key, value in ((ib.PROP_ROWS, "13"), (ib.PROP_INTERVAL_END, "2026-11-26T11:00:00+00:00"),
                       (ib.PROP_INTERVALS, "{not json"), (ib.PROP_INTERVALS, '{"step_seconds": 900}')):
        assert ib.offload_snapshots_from_summary(spec, 7, 1_000, {**props, key: value}) == [], key
    assert ib.offload_snapshots_from_summary(load_tables().get("silver_trades"), 7, 1_000, props) == []


def test_batch_intervals_must_be_contiguous_and_of_one_length():
    spec = load_tables().get("bronze_trades_binance")
    start = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    a, b = _batch(spec, start, 2)
    gap = ib.IntervalFigures(b.start + timedelta(minutes=15), b.end + timedelta(minutes=15), 1, 1)
    with pytest.raises(ValueError, match="contiguous"):
        ib.batch_snapshot_properties(spec, [a, gap], run_id="r", attempt_id="a")
    with pytest.raises(ValueError, match="at least one"):
        ib.batch_snapshot_properties(spec, [], run_id="r", attempt_id="a")
