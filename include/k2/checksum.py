"""The one definition of an interval's order-independent row checksum.

A row's checksum covers the whole offloaded row, keys and values: the columns are the
table's unique key in key order, then every other column of the source in name order
(the same order in every engine, whatever order each lists them in). Per row they are
rendered to a canonical string

    row = render(c1) + '\\x1f' + render(c2) + ...

with strings as they are, integers in decimal, decimals in plain notation with all the
digits of their scale ('-1.500000'), booleans as 'true'/'false', dates as 'YYYY-MM-DD',
timestamps as epoch milliseconds (floor) and NULL as the two characters ``\\N``.
Floating-point columns are left out (no canonical text form across engines; the row-level
detail of `k2 verify` still compares them). The row hash is the first 8 bytes of
MD5(row, UTF-8) read as a big-endian unsigned 64-bit integer. An interval's checksum is
the sum of its row hashes modulo 2**64, together with its row count: a row missing, a row
twice, or one value changed each change it.

Three implementations of the same thing, kept side by side so they cannot drift:

- ClickHouse SQL (runs in the hot tier; ClickHouse >= 24.3),
- Spark SQL / Column expressions (runs on the executors of the offload job),
- pyarrow + hashlib (for tables read with pyiceberg, e.g. `k2 verify`).

tests/unit/test_checksum.py checks that all three agree.

CHECKSUM_VERSION numbers this definition; the ledger records which one each interval's
checksum was made with (version 1 covered the unique key only), so a comparison never
mixes the two. Identifiers always come from a validated TableSpec and are checked again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any

from k2.config import identifier

if TYPE_CHECKING:  # heavy imports stay lazy so DAG parsing and the CLI start fast
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame

    from k2.config import TableSpec

KEY_SEPARATOR = "\x1f"
NULL_TOKEN = "\\N"
MODULUS = 1 << 64
CHECKSUM_VERSION = 2  # 1: unique key only; 2: every column (keys and values)


class Kind(str, Enum):
    """How a column is rendered into the row's canonical string."""

    STRING = "string"
    INTEGER = "integer"
    TIMESTAMP = "timestamp"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"


class ChecksumError(ValueError):
    """A column whose type has no canonical form here."""


@dataclass(frozen=True)
class IntervalChecksum:
    rows: int
    checksum: int  # in [0, 2**64)

    def __post_init__(self) -> None:
        if not 0 <= self.checksum < MODULUS:
            object.__setattr__(self, "checksum", self.checksum % MODULUS)

    def to_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "checksum": self.checksum}

    def __str__(self) -> str:
        return f"{self.rows} rows, checksum {self.checksum:016x}"


def _ident(name: str) -> str:
    return identifier(name, error=ChecksumError)


def row_columns(spec: TableSpec, kinds: Mapping[str, Kind | None]) -> list[tuple[str, Kind]]:
    """The columns a row's checksum covers, with their kinds, in checksum order: the
    spec's unique key in key order, then the other columns of `kinds` by name. A column
    whose kind is None (floating point) is left out; a key column cannot be."""
    missing = [c for c in spec.unique_key if c not in kinds]
    if missing:
        raise ChecksumError(
            f"table {spec.name!r}: unique_key column(s) {missing} not found in {spec.source}"
        )
    for c in spec.unique_key:
        if kinds[c] is None:
            raise ChecksumError(f"table {spec.name!r}: key column {c!r} is floating point; "
                                "checksums support String, integer, Decimal, Bool, Date and DateTime keys")
    values = sorted(c for c, kind in kinds.items() if kind is not None and c not in spec.unique_key)
    return [(_ident(c), kinds[c]) for c in [*spec.unique_key, *values]]  # type: ignore[misc]


def _kinds(names: Iterable[str], kind_of: Callable[[str], Kind | None]) -> dict[str, Kind | None]:
    return {name: kind_of(name) for name in names}


# --------------------------------------------------------------------------------------
# Kinds from each engine's types


def clickhouse_base_type(ch_type: str) -> tuple[str, bool]:
    """A ClickHouse type without its LowCardinality/Nullable wrappers, and whether it is nullable."""
    t, nullable = ch_type.strip(), False
    while (m := re.fullmatch(r"(LowCardinality|Nullable)\((.*)\)", t)) is not None:
        nullable = nullable or m.group(1) == "Nullable"
        t = m.group(2).strip()
    return t, nullable


def clickhouse_decimal_scale(ch_type: str) -> int | None:
    """The scale of a ClickHouse Decimal type, None for another type."""
    base, _ = clickhouse_base_type(ch_type)
    if m := re.fullmatch(r"Decimal\(\s*\d+\s*,\s*(\d+)\s*\)", base):
        return int(m.group(1))
    if m := re.fullmatch(r"Decimal(?:32|64|128|256)\(\s*(\d+)\s*\)", base):
        return int(m.group(1))
    return None


def kind_from_clickhouse(column: str, ch_type: str) -> Kind | None:
    base, _ = clickhouse_base_type(ch_type)
    if base in ("String", "UUID") or base.startswith("FixedString(") or base.startswith("Enum"):
        return Kind.STRING
    if re.fullmatch(r"U?Int(8|16|32|64)", base):
        return Kind.INTEGER
    if (scale := clickhouse_decimal_scale(base)) is not None:
        return Kind.DECIMAL if scale else Kind.INTEGER
    if base == "Bool":
        return Kind.BOOLEAN
    if base in ("Date", "Date32"):
        return Kind.DATE
    if base.startswith("DateTime64(") or base == "DateTime" or base.startswith("DateTime("):
        return Kind.TIMESTAMP
    if base in ("Float32", "Float64"):
        return None
    raise ChecksumError(
        f"column {column!r} has ClickHouse type {ch_type}; checksums support String, (U)Int8-64, "
        "Decimal, Bool, Date, DateTime and DateTime64 columns (Float columns are left out)"
    )


def kind_from_arrow(column: str, arrow_type: pa.DataType) -> Kind | None:
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return Kind.STRING
    if pa.types.is_integer(t):
        return Kind.INTEGER
    if pa.types.is_decimal(t):
        return Kind.DECIMAL if t.scale else Kind.INTEGER
    if pa.types.is_boolean(t):
        return Kind.BOOLEAN
    if pa.types.is_date(t):
        return Kind.DATE
    if pa.types.is_timestamp(t):
        return Kind.TIMESTAMP
    if pa.types.is_floating(t):
        return None
    raise ChecksumError(f"column {column!r} has Arrow type {arrow_type}; no canonical form")


def kind_from_spark(column: str, spark_type: Any) -> Kind | None:
    from pyspark.sql import types as T

    if isinstance(spark_type, T.StringType):
        return Kind.STRING
    if isinstance(spark_type, (T.ByteType, T.ShortType, T.IntegerType, T.LongType)):
        return Kind.INTEGER
    if isinstance(spark_type, T.DecimalType):
        return Kind.DECIMAL if spark_type.scale else Kind.INTEGER
    if isinstance(spark_type, T.BooleanType):
        return Kind.BOOLEAN
    if isinstance(spark_type, T.DateType):
        return Kind.DATE
    if isinstance(spark_type, (T.TimestampType, T.TimestampNTZType)):
        return Kind.TIMESTAMP
    if isinstance(spark_type, (T.FloatType, T.DoubleType)):
        return None
    raise ChecksumError(f"column {column!r} has Spark type {spark_type}; no canonical form")


# --------------------------------------------------------------------------------------
# ClickHouse


def _clickhouse_render(column: str, ch_type: str) -> str:
    kind = kind_from_clickhouse(column, ch_type)
    base, nullable = clickhouse_base_type(ch_type)
    col = f"`{_ident(column)}`"
    if kind is Kind.DECIMAL:
        expr = f"toDecimalString({col}, {clickhouse_decimal_scale(base)})"
    elif kind is not Kind.TIMESTAMP:  # strings, integers, 'true'/'false', 'YYYY-MM-DD'
        expr = f"toString({col})"
    elif base.startswith("DateTime64"):
        expr = f"toString(toUnixTimestamp64Milli({col}))"
    else:  # DateTime: whole seconds
        expr = f"toString(toInt64(toUnixTimestamp({col})) * 1000)"
    if nullable:
        expr = f"ifNull({expr}, '\\\\N')"
    return expr


def clickhouse_row_columns(spec: TableSpec, column_types: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (column, ClickHouse type) pairs a row's checksum covers, in checksum order, of a
    source whose columns are `column_types` (DESCRIBE: name -> type)."""
    kinds = _kinds(column_types, lambda c: kind_from_clickhouse(c, column_types[c]))
    return [(c, column_types[c]) for c, _ in row_columns(spec, kinds)]


def clickhouse_row_hash_sql(columns: Sequence[tuple[str, str]]) -> str:
    """UInt64 row-hash expression over (column, ClickHouse type) pairs, in checksum order
    (clickhouse_row_columns)."""
    if not columns:
        raise ChecksumError("a checksum needs at least one column")
    parts = [_clickhouse_render(name, ch_type) for name, ch_type in columns]
    key = parts[0] if len(parts) == 1 else "concat(" + ", '\\x1F', ".join(parts) + ")"
    return f"reinterpretAsUInt64(reverse(substring(MD5({key}), 1, 8)))"


def clickhouse_time_ms_sql(column: str, ch_type: str) -> str:
    """Int64 epoch-millisecond expression for an event-time column."""
    base, _ = clickhouse_base_type(ch_type)
    col = f"`{_ident(column)}`"
    if base.startswith("DateTime64"):
        return f"toUnixTimestamp64Milli({col})"
    if base == "DateTime" or base.startswith("DateTime("):
        return f"(toInt64(toUnixTimestamp({col})) * 1000)"
    raise ChecksumError(f"event-time column {column!r} has type {ch_type}; expected DateTime64")


def clickhouse_interval_filter_sql(column: str) -> str:
    """`[start, end)` on an event-time column, bound to {k2_start_ms:Int64}, {k2_end_ms:Int64}."""
    col = f"`{_ident(column)}`"
    return (
        f"{col} >= fromUnixTimestamp64Milli({{k2_start_ms:Int64}}, 'UTC') "
        f"AND {col} < fromUnixTimestamp64Milli({{k2_end_ms:Int64}}, 'UTC')"
    )


def interval_parameters(start: datetime, end: datetime) -> dict[str, int]:
    return {"k2_start_ms": to_epoch_ms(start), "k2_end_ms": to_epoch_ms(end)}


def clickhouse_interval_checksum_sql(spec: TableSpec, column_types: Mapping[str, str]) -> str:
    """`SELECT rows, checksum` of spec.source over one interval (parameters: interval_parameters).

    column_types maps column name -> ClickHouse type (DESCRIBE of spec.source): the
    checksum covers all of them.
    """
    row_hash = clickhouse_row_hash_sql(clickhouse_row_columns(spec, column_types))
    return (
        f"SELECT count() AS rows, sumWithOverflow({row_hash}) AS checksum "
        f"FROM `{_ident(spec.source)}` "
        f"WHERE {clickhouse_interval_filter_sql(spec.event_time_column)}"
    )


def clickhouse_interval_checksum(client: Any, spec: TableSpec, column_types: Mapping[str, str],
                                 start: datetime, end: datetime) -> IntervalChecksum:
    """Run clickhouse_interval_checksum_sql through a clickhouse-connect client."""
    result = client.query(
        clickhouse_interval_checksum_sql(spec, column_types),
        parameters=interval_parameters(start, end),
    )
    rows, checksum = result.result_rows[0]
    return IntervalChecksum(rows=int(rows), checksum=int(checksum or 0))


# --------------------------------------------------------------------------------------
# Spark


def _spark_md5_sql(columns: Sequence[tuple[str, Kind]], alias: str | None) -> str:
    """Spark SQL: the hex MD5 of the row's canonical string."""
    if not columns:
        raise ChecksumError("a checksum needs at least one column")
    prefix = f"`{_ident(alias)}`." if alias else ""
    parts = []
    for name, kind in columns:
        col = f"{prefix}`{_ident(name)}`"
        if kind is Kind.TIMESTAMP:
            expr = f"CAST(unix_millis({col}) AS STRING)"
        else:  # decimals: plain notation with the scale's digits, as Spark casts them
            expr = f"CAST({col} AS STRING)"
        parts.append(f"coalesce({expr}, '\\\\N')")
    key = parts[0] if len(parts) == 1 else "concat(" + ", '\\u001F', ".join(parts) + ")"
    return f"md5({key})"


def spark_row_hash_sql(columns: Sequence[tuple[str, Kind]], alias: str | None = None) -> str:
    """Spark SQL expression of the row hash as DECIMAL(20,0) (unsigned 64-bit value)."""
    return f"CAST(conv(substr({_spark_md5_sql(columns, alias)}, 1, 16), 16, 10) AS DECIMAL(20,0))"


def spark_row_hash_halves_sql(columns: Sequence[tuple[str, Kind]],
                              alias: str | None = None) -> tuple[str, str]:
    """The row hash as two BIGINT expressions, its high and its low 32 bits.

    Summing the halves as BIGINT is exact for up to 2**31 rows and much cheaper than a
    DECIMAL(20,0) sum; combine the two sums with `combine_halves`.
    """
    md5 = _spark_md5_sql(columns, alias)
    return (f"CAST(conv(substr({md5}, 1, 8), 16, 10) AS BIGINT)",
            f"CAST(conv(substr({md5}, 9, 8), 16, 10) AS BIGINT)")


def combine_halves(high_sum: int | None, low_sum: int | None) -> int:
    """The checksum (mod 2**64) from the sums of the row hashes' high and low halves."""
    return (((high_sum or 0) << 32) + (low_sum or 0)) % MODULUS


def spark_checksum_sql(columns: Sequence[tuple[str, Kind]], condition: str | None = None,
                       prefix: str = "") -> list[str]:
    """Aggregate expressions `<prefix>rows`, `<prefix>high`, `<prefix>low` of the rows
    matching `condition` (Spark SQL, None: all rows); see spark_checksum_of."""
    high, low = spark_row_hash_halves_sql(columns)
    if condition is None:
        return [f"count(1) AS {prefix}rows", f"sum({high}) AS {prefix}high", f"sum({low}) AS {prefix}low"]
    return [f"count_if({condition}) AS {prefix}rows",
            f"sum(CASE WHEN {condition} THEN {high} END) AS {prefix}high",
            f"sum(CASE WHEN {condition} THEN {low} END) AS {prefix}low"]


def spark_checksum_of(row: Any, prefix: str = "") -> IntervalChecksum:
    """The IntervalChecksum of one result row of spark_checksum_sql's expressions."""
    return IntervalChecksum(rows=int(row[f"{prefix}rows"] or 0),
                            checksum=combine_halves(row[f"{prefix}high"], row[f"{prefix}low"]))


def spark_row_hash(columns: Sequence[tuple[str, Kind]]) -> Column:
    from pyspark.sql import functions as F

    return F.expr(spark_row_hash_sql(columns))


def spark_checksum(df: DataFrame, columns: Sequence[tuple[str, Kind]]) -> IntervalChecksum:
    """Count and checksum of a DataFrame (one Spark job; the sums are exact, the mod is here)."""
    return spark_checksum_of(df.selectExpr(*spark_checksum_sql(columns)).first())


def spark_row_columns(spec: TableSpec, schema: Any, names: Iterable[str] | None = None
                      ) -> list[tuple[str, Kind]]:
    """The checksum's columns of a Spark schema: `names` (default: all of its fields)."""
    fields = {f.name: f.dataType for f in schema.fields}
    return row_columns(spec, _kinds(fields if names is None else [n for n in names if n in fields],
                                    lambda c: kind_from_spark(c, fields[c])))


# --------------------------------------------------------------------------------------
# Python / pyarrow


def to_epoch_ms(value: datetime) -> int:
    if value.tzinfo is None:
        raise ChecksumError(f"{value!r} has no timezone")
    delta = value.astimezone(timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def row_hash(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big")


def canonical_row(values: Sequence[Any]) -> str:
    """The canonical string of Python values in checksum order (str, int, bool, date,
    tz-aware datetime, None, and Decimal carrying its column's scale as its exponent, as
    Arrow's to_pylist returns them)."""
    out = []
    for v in values:
        if v is None:
            out.append(NULL_TOKEN)
        elif isinstance(v, datetime):
            out.append(str(to_epoch_ms(v)))
        elif isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, (int, str)):
            out.append(str(v))
        elif isinstance(v, Decimal):
            out.append(_plain_decimal(v, max(0, -int(v.as_tuple().exponent))))
        else:  # a date
            out.append(v.isoformat())
    return KEY_SEPARATOR.join(out)


def _plain_decimal(value: Decimal, scale: int) -> str:
    return f"{value:.{scale}f}" if scale else str(int(value))


def arrow_row_columns(spec: TableSpec, schema: pa.Schema, names: Iterable[str] | None = None
                      ) -> list[tuple[str, Kind]]:
    """The checksum's columns of an Arrow schema: `names` (default: all of its fields; a
    table read from Iceberg may hold columns the source no longer has)."""
    present = set(schema.names)
    chosen = schema.names if names is None else [n for n in names if n in present]
    return row_columns(spec, _kinds(chosen, lambda c: kind_from_arrow(c, schema.field(c).type)))


def _arrow_render(array: pa.Array | pa.ChunkedArray, kind: Kind) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind is Kind.TIMESTAMP:
        raw = pc.cast(array, pa.int64())
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[array.type.unit]
        if per_ms is None:
            ms = pc.multiply(raw, 1000)
        elif per_ms == 1:
            ms = raw
        else:  # floor division, as ClickHouse and Spark do, also before 1970
            ms = _floor_div(raw, per_ms)
        rendered = pc.cast(ms, pa.string())
    elif kind is Kind.DECIMAL:
        rendered = _arrow_plain_decimals(array)
    else:
        rendered = pc.cast(array, pa.string())
    return pc.fill_null(rendered, NULL_TOKEN)


def _arrow_plain_decimals(array: pa.Array) -> pa.Array:
    """Decimals as plain strings with all the scale's digits ('0.000100'). Arrow's cast
    writes exponents for values under 1e-6 and for zero ('0E-18'); those rows alone are
    rendered again in Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rendered = pc.cast(array, pa.string())
    exponent = pc.fill_null(pc.match_substring(rendered, "E"), False)
    if not pc.any(exponent).as_py():
        return rendered
    scale = array.type.scale
    texts = rendered.to_pylist()
    for i in pc.indices_nonzero(exponent).to_pylist():
        texts[i] = _plain_decimal(Decimal(texts[i]), scale)
    return pa.array(texts, pa.string())


def _floor_div(values: pa.Array, divisor: int) -> pa.Array:
    import pyarrow.compute as pc

    quotient = pc.divide(values, divisor)  # integer division truncates toward zero
    remainder = pc.subtract(values, pc.multiply(quotient, divisor))
    return pc.if_else(pc.less(remainder, 0), pc.subtract(quotient, 1), quotient)


def arrow_canonical_rows(batch: pa.RecordBatch | pa.Table,
                         columns: Sequence[tuple[str, Kind]]) -> pa.Array:
    """A string array with each row's canonical string over `columns`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return pa.array([], pa.string())
    rendered = [_arrow_render(batch.column(name), kind) for name, kind in columns]
    if len(rendered) == 1:
        return rendered[0]
    return pc.binary_join_element_wise(*rendered, KEY_SEPARATOR)


def arrow_row_hashes(batch: pa.RecordBatch | pa.Table,
                     columns: Sequence[tuple[str, Kind]]) -> list[int]:
    md5 = hashlib.md5
    return [
        int.from_bytes(md5(key.encode("utf-8")).digest()[:8], "big")
        for key in arrow_canonical_rows(batch, columns).to_pylist()
    ]


def arrow_checksum(batches: Iterable[pa.RecordBatch | pa.Table],
                   columns: Sequence[tuple[str, Kind]]) -> IntervalChecksum:
    rows = 0
    total = 0
    for batch in batches:
        rows += batch.num_rows
        total += sum(arrow_row_hashes(batch, columns))
    return IntervalChecksum(rows=rows, checksum=total % MODULUS)
