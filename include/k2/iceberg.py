"""The Iceberg side, shared by the Spark job, the CLI and the Airflow provider.

- the catalog: one Iceberg JDBC catalog in PostgreSQL, read by Spark
  (`org.apache.iceberg.jdbc.JdbcCatalog`) and by pyiceberg (`SqlCatalog`), with
  `jdbc.schema-version=V1` so both list the same tables (V1 adds the
  `iceberg_type` column; pyiceberg's rows, where it is NULL, still count as tables);
- the Spark conf the offload job needs (non-secret; the JDBC password is added by
  the job at run time from the environment, never on a command line);
- the type mapping ClickHouse -> Iceberg -> Spark (the table schema is derived from
  ClickHouse's DESCRIBE of the source, not written by hand);
- the snapshot summary properties an offload commit carries (one interval, or a batch of
  contiguous intervals in one snapshot), and `find_offload_snapshot` which reads them back
  interval by interval.

Type mapping (ClickHouse -> Iceberg), chosen to be lossless:

    Bool                       boolean
    Int8/16/32, UInt8/16       int
    UInt32, Int64              long
    UInt64                     decimal(20,0)   Iceberg has no unsigned types; `long`
                                               would wrap values >= 2**63 to negative
                                               numbers, decimal(20,0) holds the whole
                                               range 0..2**64-1 exactly
    Float32 / Float64          float / double
    Decimal(P,S), P <= 38      decimal(P,S)    (Decimal32/64/128(S) likewise)
    String                     string          (must be valid UTF-8)
    Date, Date32               date
    DateTime, DateTime64(p<=6) timestamptz     microseconds, UTC (an instant; the
                                               ClickHouse column timezone only affects
                                               display)
    Nullable(T)                optional T      (everything else is required)
    LowCardinality(T)          T

Anything else (Int128+, Decimal256, DateTime64(7-9), FixedString, Enum, UUID,
Array, Map, Tuple, JSON, ...) is refused with an error naming the column, rather
than mapped approximately.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from k2 import quality
from k2.checksum import CHECKSUM_VERSION, clickhouse_base_type
from k2.config import identifier
from k2.intervals import parse_utc
from k2.quality import INTERVAL_START_COLUMN, quarantine_table_name

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import Schema
    from pyiceberg.types import IcebergType

    from k2.config import TableSpec
    from k2.runtime_env import IcebergSettings

ICEBERG_EXTENSIONS = "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions"
JDBC_CATALOG_IMPL = "org.apache.iceberg.jdbc.JdbcCatalog"
JDBC_SCHEMA_VERSION = "V1"
# S3FileIO for s3:// locations (iceberg-aws-bundle, spark_jobs/pom.xml), Hadoop's for file: ones:
# tables a catalog made before its warehouse moved to object storage stay readable.
RESOLVING_FILE_IO = "org.apache.iceberg.io.ResolvingFileIO"

# Snapshot summary keys written by every offload commit.
PROP_TABLE = "k2.table"
PROP_INTERVAL_START = "k2.interval-start"
PROP_INTERVAL_END = "k2.interval-end"
PROP_RUN_ID = "k2.run-id"
PROP_ROWS = "k2.rows"
PROP_CHECKSUM = "k2.checksum"
PROP_ATTEMPT_ID = "k2.attempt-id"  # unique per job execution: finds *this* commit
PROP_QUARANTINED_ROWS = "k2.quarantined-rows"  # rows of the interval in the quarantine table
PROP_CHECKSUM_VERSION = "k2.checksum-version"  # k2.checksum.CHECKSUM_VERSION; absent: 1
# A batch commit (several contiguous intervals of one length in one snapshot): the other
# keys describe the whole range, this one each interval's figures (batch_snapshot_properties).
PROP_INTERVALS = "k2.intervals"
SNAPSHOT_PROPERTY_CONF_PREFIX = "spark.sql.iceberg.snapshot-property."

# Table properties of tables the offload creates. Copy-on-write keeps the data files
# free of delete files, so every reader (pyiceberg included) sees plain Parquet.
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.merge.mode": "copy-on-write",
    "write.update.mode": "copy-on-write",
    "write.delete.mode": "copy-on-write",
    "write.merge.isolation-level": "serializable",
    "write.parquet.compression-codec": "zstd",
    # The offload stages each interval's commit, audits it, then publishes it (WAP)
    "write.wap.enabled": "true",
}



class UnsupportedType(ValueError):
    """A ClickHouse column type with no faithful Iceberg type."""


class SchemaMismatch(RuntimeError):
    """An existing Iceberg table whose columns differ from the ClickHouse source."""


def _ident(name: str, what: str = "identifier") -> str:
    return identifier(name, what)


# --------------------------------------------------------------------------------------
# Catalog access


def catalog_name(settings: IcebergSettings) -> str:
    return _ident(settings.catalog_name, "Iceberg catalog name")


def spark_conf(settings: IcebergSettings) -> dict[str, str]:
    """The non-secret Spark conf of the offload job (also for SparkSubmitOperator(conf=...)).

    The JDBC password is *not* in it: the job reads K2_ICEBERG_CATALOG_PASSWORD from its
    environment and sets it on the SparkSession (see spark_secret_conf).
    """
    prefix = f"spark.sql.catalog.{catalog_name(settings)}"
    return {
        "spark.sql.extensions": ICEBERG_EXTENSIONS,
        prefix: "org.apache.iceberg.spark.SparkCatalog",
        f"{prefix}.catalog-impl": JDBC_CATALOG_IMPL,
        f"{prefix}.uri": settings.jdbc_uri,
        f"{prefix}.jdbc.user": settings.user,
        f"{prefix}.jdbc.schema-version": JDBC_SCHEMA_VERSION,
        f"{prefix}.warehouse": settings.warehouse,
        **{f"{prefix}.{key}": value for key, value in _spark_s3_conf(settings).items()},
        "spark.sql.session.timeZone": "UTC",
        # Intervals are small; AQE coalesces shuffle partitions, this bounds the start.
        "spark.sql.shuffle.partitions": "16",
        "spark.ui.showConsoleProgress": "false",
    }


def _spark_s3_conf(settings: IcebergSettings) -> dict[str, str]:
    """The catalog's S3FileIO properties for a warehouse on object storage (none on a path).
    The FileIO travels to the executors with each task, so they need no settings of their own."""
    if not settings.on_object_store:
        return {}
    conf = {"io-impl": RESOLVING_FILE_IO,
            "s3.path-style-access": "true" if settings.s3_path_style_access else "false"}
    if settings.s3_endpoint:
        conf["s3.endpoint"] = settings.s3_endpoint
    if settings.s3_region:
        conf["client.region"] = settings.s3_region
    return conf


def spark_secret_conf(settings: IcebergSettings) -> dict[str, str]:
    """The secret part of the catalog conf; set on the SparkSession builder at run time.

    Spark redacts keys matching 'password' or 'secret' in its UI and event logs.
    """
    prefix = f"spark.sql.catalog.{catalog_name(settings)}"
    conf = {f"{prefix}.jdbc.password": settings.password}
    if settings.on_object_store and settings.s3_access_key_id:
        conf[f"{prefix}.s3.access-key-id"] = settings.s3_access_key_id
        conf[f"{prefix}.s3.secret-access-key"] = settings.s3_secret_access_key
    return conf


def pyiceberg_s3_properties(settings: IcebergSettings) -> dict[str, str]:
    """pyiceberg's FileIO properties for a warehouse on object storage (none on a path)."""
    if not settings.on_object_store:
        return {}
    props = {"s3.force-virtual-addressing": "false" if settings.s3_path_style_access else "true"}
    for key, value in (("s3.endpoint", settings.s3_endpoint), ("s3.region", settings.s3_region),
                       ("s3.access-key-id", settings.s3_access_key_id),
                       ("s3.secret-access-key", settings.s3_secret_access_key)):
        if value:
            props[key] = value
    return props


def arrow_s3_options(settings: IcebergSettings) -> dict[str, Any]:
    """Keyword arguments of pyarrow.fs.S3FileSystem for the warehouse's store (the Spark job's
    own reads and writes of data files, on the driver and the executors)."""
    options: dict[str, Any] = {"force_virtual_addressing": not settings.s3_path_style_access}
    if settings.s3_endpoint:
        parts = urlsplit(settings.s3_endpoint)
        options["endpoint_override"] = parts.netloc or settings.s3_endpoint
        options["scheme"] = parts.scheme or "https"
    if settings.s3_region:
        options["region"] = settings.s3_region
    if settings.s3_access_key_id:
        options["access_key"] = settings.s3_access_key_id
        options["secret_key"] = settings.s3_secret_access_key
    return options


def arrow_filesystem(location: str, s3_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of an Iceberg location: a local path, or an object on
    S3 with `s3_options` (arrow_s3_options). The path keeps the location's escapes
    (pair=ETH%2FUSD is a folder of that name), which pyarrow's FileSystem.from_uri would decode."""
    import pyarrow.fs as pafs

    scheme, separator, rest = location.partition(":")
    if not separator or scheme == "file":
        return pafs.LocalFileSystem(), ("/" + rest.lstrip("/") if separator else location)
    if scheme in {"s3", "s3a"}:
        return pafs.S3FileSystem(**dict(s3_options or {})), rest.removeprefix("//")
    fs, _ = pafs.FileSystem.from_uri(location)
    authority, _, key = rest.removeprefix("//").partition("/")
    return fs, f"{authority}/{key}"


def spark_session(settings: IcebergSettings, app_name: str) -> Any:
    """The SparkSession of a k2 Spark job on the catalog of `settings` (UTC session time
    zone; what spark-submit or the Airflow operator already set wins; the catalog's
    password from the settings, never from the command line)."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    submitted = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    for key, value in spark_conf(settings).items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    builder = builder.config("spark.sql.session.timeZone", "UTC")  # the jobs' SQL assumes it
    for key, value in spark_secret_conf(settings).items():
        if value:
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def sqlalchemy_url(settings: IcebergSettings) -> str:
    """postgresql+psycopg://user:password@host:port/db for pyiceberg's SqlCatalog."""
    from sqlalchemy.engine import URL

    parts = urlsplit(settings.uri)
    if parts.scheme not in {"postgresql", "postgres"}:
        raise ValueError(f"K2_ICEBERG_CATALOG_URI must be postgresql://host:port/db, got {parts.scheme}://")
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    url = URL.create(
        "postgresql+psycopg",
        username=settings.user,
        password=settings.password or None,
        host=parts.hostname,
        port=parts.port,
        database=parts.path.lstrip("/") or None,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def load_catalog(settings: IcebergSettings) -> Catalog:
    """pyiceberg's view of the same JDBC catalog Spark writes to."""
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(catalog_name(settings), uri=sqlalchemy_url(settings), warehouse=settings.warehouse,
                      **pyiceberg_s3_properties(settings))


# --------------------------------------------------------------------------------------
# ClickHouse source schema -> Iceberg / Spark


@dataclass(frozen=True)
class SourceColumn:
    name: str
    clickhouse_type: str


def describe_source(client: Any, spec: TableSpec) -> list[SourceColumn]:
    """The columns of spec.source as ClickHouse describes them (EPHEMERAL ones skipped)."""
    result = client.query(f"DESCRIBE TABLE `{_ident(spec.source)}`")
    names = result.column_names
    columns = []
    for row in result.result_rows:
        record = dict(zip(names, row))
        if record.get("default_type") == "EPHEMERAL":
            continue
        columns.append(SourceColumn(_ident(record["name"], "column"), record["type"]))
    if not columns:
        raise SchemaMismatch(f"ClickHouse {spec.source} has no columns")
    return columns


def iceberg_type(column: str, ch_type: str) -> tuple[IcebergType, bool]:
    """(Iceberg type, required) for one ClickHouse column. Raises UnsupportedType."""
    from pyiceberg import types as T

    base, nullable = clickhouse_base_type(ch_type)
    simple: dict[str, IcebergType] = {
        "Bool": T.BooleanType(),
        "Int8": T.IntegerType(),
        "Int16": T.IntegerType(),
        "Int32": T.IntegerType(),
        "UInt8": T.IntegerType(),
        "UInt16": T.IntegerType(),
        "UInt32": T.LongType(),
        "Int64": T.LongType(),
        "UInt64": T.DecimalType(20, 0),
        "Float32": T.FloatType(),
        "Float64": T.DoubleType(),
        "String": T.StringType(),
        "Date": T.DateType(),
        "Date32": T.DateType(),
        "DateTime": T.TimestamptzType(),
    }
    result: IcebergType | None = simple.get(base)
    if result is None:
        if m := re.fullmatch(r"Decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)", base):
            precision, scale = int(m.group(1)), int(m.group(2))
            if precision <= 38:
                result = T.DecimalType(precision, scale)
        elif m := re.fullmatch(r"Decimal(32|64|128)\(\s*(\d+)\s*\)", base):
            precision = {"32": 9, "64": 18, "128": 38}[m.group(1)]
            result = T.DecimalType(precision, int(m.group(2)))
        elif re.fullmatch(r"DateTime\(\s*'[^']*'\s*\)", base):
            result = T.TimestamptzType()
        elif m := re.fullmatch(r"DateTime64\(\s*(\d)\s*(,\s*'[^']*'\s*)?\)", base):
            if int(m.group(1)) <= 6:
                result = T.TimestamptzType()
    if result is None:
        raise UnsupportedType(
            f"column {column!r}: ClickHouse type {ch_type} has no faithful Iceberg type "
            "(supported: Bool, (U)Int8-64, Float32/64, Decimal(P<=38,S), String, Date, "
            "DateTime, DateTime64(<=6), wrapped in Nullable/LowCardinality)"
        )
    return result, not nullable


def iceberg_schema(columns: Sequence[SourceColumn]) -> Schema:
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField

    fields = []
    for field_id, column in enumerate(columns, start=1):
        itype, required = iceberg_type(column.name, column.clickhouse_type)
        fields.append(NestedField(field_id, column.name, itype, required=required))
    return Schema(*fields)


def spark_sql_type(itype: IcebergType) -> str:
    from pyiceberg import types as T

    if isinstance(itype, T.DecimalType):
        return f"decimal({itype.precision},{itype.scale})"
    names = {
        T.BooleanType: "boolean",
        T.IntegerType: "int",
        T.LongType: "bigint",
        T.FloatType: "float",
        T.DoubleType: "double",
        T.StringType: "string",
        T.DateType: "date",
        T.TimestamptzType: "timestamp",  # Spark TIMESTAMP = instant (local-time-zone semantics)
    }
    for cls, name in names.items():
        if isinstance(itype, cls):
            return name
    raise UnsupportedType(f"Iceberg type {itype} has no Spark mapping here")


def spark_columns_ddl(columns: Sequence[SourceColumn]) -> str:
    """`a bigint NOT NULL, b string, ...` for CREATE TABLE."""
    parts = []
    for column in columns:
        itype, required = iceberg_type(column.name, column.clickhouse_type)
        parts.append(f"`{column.name}` {spark_sql_type(itype)}{' NOT NULL' if required else ''}")
    return ", ".join(parts)


def spark_data_type(itype: IcebergType) -> Any:
    """The pyspark DataType of an Iceberg type (no JVM needed)."""
    from pyiceberg import types as I
    from pyspark.sql import types as S

    if isinstance(itype, I.DecimalType):
        return S.DecimalType(itype.precision, itype.scale)
    names = {
        I.BooleanType: S.BooleanType,
        I.IntegerType: S.IntegerType,
        I.LongType: S.LongType,
        I.FloatType: S.FloatType,
        I.DoubleType: S.DoubleType,
        I.StringType: S.StringType,
        I.DateType: S.DateType,
        I.TimestamptzType: S.TimestampType,
    }
    for cls, spark_cls in names.items():
        if isinstance(itype, cls):
            return spark_cls()
    raise UnsupportedType(f"Iceberg type {itype} has no Spark mapping here")


def spark_struct(columns: Sequence[SourceColumn]) -> Any:
    """The pyspark StructType of the offload's source DataFrame."""
    from pyspark.sql.types import StructField, StructType

    fields = []
    for column in columns:
        itype, required = iceberg_type(column.name, column.clickhouse_type)
        fields.append(StructField(column.name, spark_data_type(itype), nullable=not required))
    return StructType(fields)


_PARTITION = re.compile(
    r"^(?:(?P<fn>year|month|day|hour|identity)\((?P<col>\w+)\)"
    r"|(?P<fn2>bucket|truncate)\((?P<n>\d+),\s*(?P<col2>\w+)\)"
    r"|(?P<plain>\w+))$"
)
_SPARK_TRANSFORM = {"year": "years", "month": "months", "day": "days", "hour": "hours"}


def spark_partition_sql(spec: TableSpec, column_names: Sequence[str] | None = None) -> str:
    """spec.partition_by as Spark DDL transforms: 'day(event_time)' -> 'days(`event_time`)'."""
    out = []
    for item in spec.partition_by:
        m = _PARTITION.match(item)
        if not m:
            raise ValueError(f"table {spec.name!r}: bad partition transform {item!r}")
        column = _ident(m.group("col") or m.group("col2") or m.group("plain"), "partition column")
        if column_names is not None and column not in column_names:
            raise SchemaMismatch(
                f"table {spec.name!r}: partition_by {item!r} names column {column!r}, "
                f"which {spec.source} does not have"
            )
        if m.group("fn") in _SPARK_TRANSFORM:
            out.append(f"{_SPARK_TRANSFORM[m.group('fn')]}(`{column}`)")
        elif m.group("fn2"):
            out.append(f"{m.group('fn2')}({int(m.group('n'))}, `{column}`)")
        else:  # identity(col) or a plain column
            out.append(f"`{column}`")
    return ", ".join(out)


def spark_table_name(settings: IcebergSettings, spec: TableSpec) -> str:
    namespace, table = spec.iceberg_table.split(".")
    return f"`{catalog_name(settings)}`.`{_ident(namespace)}`.`{_ident(table)}`"


def quarantine_columns(columns: Sequence[SourceColumn]) -> list[SourceColumn]:
    """The quarantine table's columns: the source's, all optional (a bad row may lack any
    value), then why and when each row was set aside (k2.quality.QUARANTINE_COLUMNS)."""
    extra = {
        quality.REASON_COLUMN: "String",
        quality.INTERVAL_START_COLUMN: "DateTime64(3, 'UTC')",
        quality.INTERVAL_END_COLUMN: "DateTime64(3, 'UTC')",
        quality.RUN_ID_COLUMN: "String",
        quality.QUARANTINED_AT_COLUMN: "DateTime64(6, 'UTC')",
    }
    clashing = [c.name for c in columns if c.name in extra]
    if clashing:
        raise SchemaMismatch(f"source columns {clashing} clash with the quarantine table's own columns")
    out = [SourceColumn(c.name, c.clickhouse_type if clickhouse_base_type(c.clickhouse_type)[1]
                        else f"Nullable({c.clickhouse_type})") for c in columns]
    return out + [SourceColumn(name, f"Nullable({t})") for name, t in extra.items()]


def quarantine_spark_table_name(settings: IcebergSettings, spec: TableSpec) -> str:
    namespace, table = quarantine_table_name(spec).split(".")
    return f"`{catalog_name(settings)}`.`{_ident(namespace)}`.`{_ident(table)}`"


def create_quarantine_table_sql(settings: IcebergSettings, spec: TableSpec,
                                columns: Sequence[SourceColumn]) -> str:
    """CREATE TABLE IF NOT EXISTS of the quarantine table (`columns`: the source's)."""
    props = ", ".join(f"'{k}'='{v}'" for k, v in TABLE_PROPERTIES.items())
    return (
        f"CREATE TABLE IF NOT EXISTS {quarantine_spark_table_name(settings, spec)} "
        f"({spark_columns_ddl(quarantine_columns(columns))}) USING iceberg "
        f"PARTITIONED BY (months(`{INTERVAL_START_COLUMN}`)) "
        f"TBLPROPERTIES ({props}, 'k2.source'='{_ident(spec.source)}', 'k2.quarantine-of'='{spec.iceberg_table}')"
    )


def create_table_sql(settings: IcebergSettings, spec: TableSpec, columns: Sequence[SourceColumn]) -> str:
    partition = spark_partition_sql(spec, [c.name for c in columns])
    props = ", ".join(f"'{k}'='{v}'" for k, v in TABLE_PROPERTIES.items())
    return (
        f"CREATE TABLE IF NOT EXISTS {spark_table_name(settings, spec)} ({spark_columns_ddl(columns)}) "
        f"USING iceberg{f' PARTITIONED BY ({partition})' if partition else ''} "
        f"TBLPROPERTIES ({props}, 'k2.source'='{_ident(spec.source)}')"
    )


def schema_differences(columns: Sequence[SourceColumn], actual: Any) -> list[str]:
    """Differences between the schema derived from ClickHouse and an existing table's
    Spark schema (`spark.table(name).schema`); empty when the offload can write."""
    expected = spark_struct(columns)
    have = {f.name: f for f in actual.fields}
    problems = []
    for field in expected.fields:
        existing = have.get(field.name)
        if existing is None:
            problems.append(f"column {field.name!r} ({field.dataType.simpleString()}) is missing in Iceberg")
        elif existing.dataType != field.dataType:
            problems.append(
                f"column {field.name!r} is {existing.dataType.simpleString()} in Iceberg, "
                f"ClickHouse maps to {field.dataType.simpleString()}"
            )
        elif not existing.nullable and field.nullable:
            problems.append(f"column {field.name!r} is required in Iceberg but Nullable in ClickHouse")
    wanted = {f.name for f in expected.fields}
    for name, field in have.items():
        if name not in wanted and not field.nullable:
            problems.append(f"required column {name!r} exists only in Iceberg")
    return problems


def _safe_promotion(old: Any, new: Any) -> bool:
    """Whether Iceberg can change a column from Spark type `old` to `new` in place
    (the spec's promotions: int -> long, float -> double, decimal(P,S) -> decimal(P',S), P' > P)."""
    from pyspark.sql import types as S

    if isinstance(old, S.IntegerType) and isinstance(new, S.LongType):
        return True
    if isinstance(old, S.FloatType) and isinstance(new, S.DoubleType):
        return True
    return (isinstance(old, S.DecimalType) and isinstance(new, S.DecimalType)
            and new.scale == old.scale and new.precision > old.precision)


@dataclass
class SchemaEvolution:
    """How an existing Iceberg table follows ClickHouse's schema: `changes` are safe
    (`ALTER TABLE` clauses: new optional columns, type promotions, NOT NULL dropped);
    `refused` are not, and nothing may be changed or written while there are any."""

    changes: list[tuple[str, str]] = field(default_factory=list)  # (column, ALTER TABLE clause)
    refused: list[str] = field(default_factory=list)

    def statements(self, table: str) -> list[str]:
        return [f"ALTER TABLE {table} {clause}" for _, clause in self.changes]


def schema_evolution(columns: Sequence[SourceColumn], actual: Any) -> SchemaEvolution:
    """The evolution that makes an existing table (`spark.table(name).schema`) take the
    rows of `columns` (DESCRIBE of ClickHouse). A new column is added as optional even when
    ClickHouse's is not Nullable: the rows already offloaded have no value for it."""
    expected = spark_struct(columns)
    have = {f.name: f for f in actual.fields}
    plan = SchemaEvolution()
    for f in expected.fields:
        existing = have.get(f.name)
        name, new_type = f"`{f.name}`", f.dataType.simpleString()
        if existing is None:
            plan.changes.append((f.name, f"ADD COLUMNS ({name} {new_type})"))
            continue
        if existing.dataType != f.dataType:
            if _safe_promotion(existing.dataType, f.dataType):
                plan.changes.append((f.name, f"ALTER COLUMN {name} TYPE {new_type}"))
            else:
                plan.refused.append(
                    f"column {f.name!r} is {existing.dataType.simpleString()} in Iceberg but "
                    f"ClickHouse now maps it to {new_type}, which is not a safe Iceberg type "
                    "promotion (int->long, float->double, decimal precision widening)"
                )
                continue
        if not existing.nullable and f.nullable:
            plan.changes.append((f.name, f"ALTER COLUMN {name} DROP NOT NULL"))
    wanted = {f.name for f in expected.fields}
    for name, existing in have.items():
        if name not in wanted and not existing.nullable:
            plan.refused.append(f"required column {name!r} exists only in Iceberg")
    return plan


# --------------------------------------------------------------------------------------
# Snapshot summaries: which interval a commit holds


def iso_utc(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"{value!r} has no timezone")
    return value.astimezone(timezone.utc).isoformat()


def _parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_utc(text)
    except ValueError:  # not a time this project wrote
        return None


def snapshot_properties(spec: TableSpec, start: datetime, end: datetime, *, run_id: str,
                        rows: int, checksum: int, attempt_id: str,
                        quarantined_rows: int = 0) -> dict[str, str]:
    """k2.rows / k2.checksum are the rows written to the table (those passing the quality
    checks); k2.quarantined-rows the interval's rows written to the quarantine table."""
    return {
        PROP_TABLE: spec.name,
        PROP_INTERVAL_START: iso_utc(start),
        PROP_INTERVAL_END: iso_utc(end),
        PROP_RUN_ID: run_id,
        PROP_ROWS: str(rows),
        PROP_CHECKSUM: str(checksum),
        PROP_ATTEMPT_ID: attempt_id,
        PROP_QUARANTINED_ROWS: str(quarantined_rows),
        PROP_CHECKSUM_VERSION: str(CHECKSUM_VERSION),
    }


@dataclass(frozen=True)
class IntervalFigures:
    """What one interval of a batch commit holds: rows and checksum written to the table,
    rows set aside in the quarantine table."""

    start: datetime
    end: datetime
    rows: int
    checksum: int
    quarantined_rows: int = 0


def batch_snapshot_properties(spec: TableSpec, intervals: Sequence[IntervalFigures], *, run_id: str,
                              attempt_id: str) -> dict[str, str]:
    """The summary of one commit that replaces several contiguous intervals of one length.

    The common keys describe the whole range (rows and checksum are the sums, the checksum
    mod 2**64 like every interval checksum); PROP_INTERVALS lists each interval's figures,
    in order, so that readers find every interval as if it had a commit of its own
    (offload_snapshots_from_summary).
    """
    if not intervals:
        raise ValueError("a batch commit needs at least one interval")
    step = intervals[0].end - intervals[0].start
    for before, after in zip(intervals, intervals[1:]):
        if after.start != before.end or after.end - after.start != step:
            raise ValueError(f"batch intervals must be contiguous and {step} long; "
                             f"[{iso_utc(after.start)}, {iso_utc(after.end)}) is not")
    properties = snapshot_properties(
        spec, intervals[0].start, intervals[-1].end, run_id=run_id,
        rows=sum(i.rows for i in intervals), checksum=sum(i.checksum for i in intervals) % 2**64,
        attempt_id=attempt_id, quarantined_rows=sum(i.quarantined_rows for i in intervals),
    )
    properties[PROP_INTERVALS] = json.dumps({
        "step_seconds": int(step.total_seconds()),
        "rows": [i.rows for i in intervals],
        # strings: a JSON reader other than Python's may hold numbers as doubles
        "checksums": [str(i.checksum) for i in intervals],
        "quarantined_rows": [i.quarantined_rows for i in intervals],
    }, separators=(",", ":"))
    return properties


def snapshot_property_conf(properties: Mapping[str, str]) -> dict[str, str]:
    """Session conf that makes Iceberg add `properties` to the SQL statement's snapshot."""
    return {SNAPSHOT_PROPERTY_CONF_PREFIX + k: v for k, v in properties.items()}


@dataclass(frozen=True)
class OffloadSnapshot:
    table: str
    iceberg_table: str
    snapshot_id: int
    interval_start: datetime
    interval_end: datetime
    run_id: str
    rows: int
    checksum: int
    attempt_id: str | None
    committed_at: datetime
    # Iceberg's own summary figures of the commit (None when the summary lacks them).
    added_files_size: int | None = None  # bytes of the data files the commit added
    total_data_files: int | None = None  # data files of the table after the commit
    quarantined_rows: int = 0  # rows of the interval set aside in the quarantine table
    checksum_version: int = 1  # which definition `checksum` follows (k2.checksum)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "iceberg_table": self.iceberg_table,
            "snapshot_id": self.snapshot_id,
            "interval_start": iso_utc(self.interval_start),
            "interval_end": iso_utc(self.interval_end),
            "run_id": self.run_id,
            "rows": self.rows,
            "checksum": self.checksum,
            "attempt_id": self.attempt_id,
            "committed_at": iso_utc(self.committed_at),
            "added_files_size": self.added_files_size,
            "total_data_files": self.total_data_files,
            "quarantined_rows": self.quarantined_rows,
        }


def offload_snapshot_from_summary(spec: TableSpec, snapshot_id: int, timestamp_ms: int,
                                  summary: Mapping[str, str]) -> OffloadSnapshot | None:
    """The offload commit a snapshot summary describes, as written: for a batch commit, its
    whole range (use offload_snapshots_from_summary for its intervals)."""
    if summary.get(PROP_TABLE) != spec.name:
        return None
    start = _parse_iso(summary.get(PROP_INTERVAL_START))
    end = _parse_iso(summary.get(PROP_INTERVAL_END))
    if start is None or end is None:
        return None
    try:
        rows = int(summary.get(PROP_ROWS, ""))
        checksum = int(summary.get(PROP_CHECKSUM, ""))
        checksum_version = int(summary.get(PROP_CHECKSUM_VERSION, "1"))
    except ValueError:
        return None
    return OffloadSnapshot(
        table=spec.name,
        iceberg_table=spec.iceberg_table,
        snapshot_id=int(snapshot_id),
        interval_start=start,
        interval_end=end,
        run_id=summary.get(PROP_RUN_ID, ""),
        rows=rows,
        checksum=checksum,
        attempt_id=summary.get(PROP_ATTEMPT_ID),
        committed_at=datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc),
        added_files_size=summary_int(summary, "added-files-size"),
        total_data_files=summary_int(summary, "total-data-files"),
        quarantined_rows=summary_int(summary, PROP_QUARANTINED_ROWS) or 0,
        checksum_version=checksum_version,
    )


def offload_snapshots_from_summary(spec: TableSpec, snapshot_id: int, timestamp_ms: int,
                                   summary: Mapping[str, str]) -> list[OffloadSnapshot]:
    """Every interval an offload commit replaced, in order: one for a single-interval commit,
    each interval of a batch commit (same snapshot, run and attempt; the commit's
    added-files-size is on its first interval, 0 on the others, so that sums stay true).
    [] when the summary is not an offload commit of `spec`, or a batch's figures do not add
    up to its range (such a commit is not evidence of any interval)."""
    whole = offload_snapshot_from_summary(spec, snapshot_id, timestamp_ms, summary)
    if whole is None:
        return []
    raw = summary.get(PROP_INTERVALS)
    if raw is None:
        return [whole]
    try:
        batch = json.loads(raw)
        step = timedelta(seconds=int(batch["step_seconds"]))
        rows = [int(v) for v in batch["rows"]]
        checksums = [int(v) for v in batch["checksums"]]
        quarantined = [int(v) for v in batch["quarantined_rows"]]
    except (ValueError, TypeError, KeyError):
        return []
    n = len(rows)
    if (n == 0 or step <= timedelta(0) or len(checksums) != n or len(quarantined) != n
            or whole.interval_start + n * step != whole.interval_end
            or sum(rows) != whole.rows or sum(checksums) % 2**64 != whole.checksum):
        return []
    return [
        replace(whole, interval_start=whole.interval_start + k * step,
                interval_end=whole.interval_start + (k + 1) * step, rows=rows[k],
                checksum=checksums[k], quarantined_rows=quarantined[k],
                added_files_size=whole.added_files_size if k == 0 else 0)
        for k in range(n)
    ]


def summary_int(summary: Mapping[str, str], key: str) -> int | None:
    """An integer figure of a snapshot summary (e.g. total-data-files), None when absent."""
    try:
        return int(summary[key])
    except (KeyError, TypeError, ValueError):
        return None


def offload_snapshots_of(table: Any, spec: TableSpec,
                         intervals: Iterable[tuple[datetime, datetime]]
                         ) -> dict[tuple[datetime, datetime], OffloadSnapshot]:
    """The newest offload commit of each of `intervals` on a loaded pyiceberg table's main
    branch (one walk of the current snapshot's ancestry). Intervals never offloaded, or
    whose snapshot has expired, are absent from the result."""
    from pyiceberg.table.snapshots import ancestors_of

    wanted = {(s.astimezone(timezone.utc), e.astimezone(timezone.utc)) for s, e in intervals}
    found: dict[tuple[datetime, datetime], OffloadSnapshot] = {}
    current = table.current_snapshot()
    if current is None or not wanted:
        return found
    for snapshot in ancestors_of(current, table.metadata):
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        for offload in offload_snapshots_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms,
                                                      summary):
            key = (offload.interval_start, offload.interval_end)
            if key in wanted and key not in found:  # newest first: the first one found wins
                found[key] = offload
        if len(found) == len(wanted):
            break
    return found


def find_offload_snapshots(catalog: Catalog, spec: TableSpec,
                           intervals: Iterable[tuple[datetime, datetime]]
                           ) -> dict[tuple[datetime, datetime], OffloadSnapshot]:
    """find_offload_snapshot for several intervals with one table load; {} without the table."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        table = catalog.load_table(spec.iceberg_table)
    except NoSuchTableError:
        return {}
    return offload_snapshots_of(table, spec, intervals)


def find_offload_snapshot(catalog: Catalog, spec: TableSpec, interval_start: datetime,
                          interval_end: datetime) -> OffloadSnapshot | None:
    """The newest offload commit of [interval_start, interval_end) on the table's main branch.

    Walks the current snapshot's ancestry (so a rolled-back commit does not count; a
    later compaction does not hide it). Returns None when the table does not exist, the
    interval was never offloaded, or its snapshot has since been expired — the offload
    ledger in PostgreSQL is the durable record; this is the table's own evidence.
    A caller that wants to skip re-offloading should also compare rows/checksum with
    ClickHouse's current figures for the interval (late rows change them).
    """
    found = find_offload_snapshots(catalog, spec, [(interval_start, interval_end)])
    return next(iter(found.values()), None)
