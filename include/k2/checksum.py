"""The one definition of an interval's order-independent row checksum.

Per row, the unique-key columns are rendered to a canonical key string

    key = render(c1) + '\\x1f' + render(c2) + ...

with strings as they are, integers in decimal, timestamps as epoch milliseconds
(floor) and NULL as the two characters ``\\N``. The row hash is the first 8 bytes
of MD5(key, UTF-8) read as a big-endian unsigned 64-bit integer. An interval's
checksum is the sum of its row hashes modulo 2**64, together with its row count.

Three implementations of the same thing, kept side by side so they cannot drift:

- ClickHouse SQL (runs in the hot tier; ClickHouse >= 24.3),
- Spark SQL / Column expressions (runs on the executors of the offload job),
- pyarrow + hashlib (for tables read with pyiceberg, e.g. `k2 verify`).

tests/unit/test_checksum.py checks that all three agree.

Only key columns of three kinds are supported (string, integer, timestamp): the
kinds the table specs use, and the ones with one obvious canonical text form.
Identifiers always come from a validated TableSpec and are checked again here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
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



class KeyKind(str, Enum):
    STRING = "string"
    INTEGER = "integer"
    TIMESTAMP = "timestamp"


class ChecksumError(ValueError):
    """A key column whose type has no canonical form here."""


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


def key_columns(spec: TableSpec, kinds: Mapping[str, KeyKind]) -> list[tuple[str, KeyKind]]:
    """The spec's unique key with each column's kind, in key order."""
    missing = [c for c in spec.unique_key if c not in kinds]
    if missing:
        raise ChecksumError(
            f"table {spec.name!r}: unique_key column(s) {missing} not found in {spec.source}"
        )
    return [(_ident(c), kinds[c]) for c in spec.unique_key]


# --------------------------------------------------------------------------------------
# Kinds from each engine's types


def clickhouse_base_type(ch_type: str) -> tuple[str, bool]:
    """A ClickHouse type without its LowCardinality/Nullable wrappers, and whether it is nullable."""
    t, nullable = ch_type.strip(), False
    while (m := re.fullmatch(r"(LowCardinality|Nullable)\((.*)\)", t)) is not None:
        nullable = nullable or m.group(1) == "Nullable"
        t = m.group(2).strip()
    return t, nullable


def kind_from_clickhouse(column: str, ch_type: str) -> KeyKind:
    base, _ = clickhouse_base_type(ch_type)
    if base == "String":
        return KeyKind.STRING
    if re.fullmatch(r"U?Int(8|16|32|64)", base):
        return KeyKind.INTEGER
    if base.startswith("DateTime64(") or base == "DateTime" or base.startswith("DateTime("):
        return KeyKind.TIMESTAMP
    raise ChecksumError(
        f"key column {column!r} has ClickHouse type {ch_type}; checksums support String, "
        "(U)Int8-64, DateTime and DateTime64 key columns"
    )


def kind_from_arrow(column: str, arrow_type: pa.DataType) -> KeyKind:
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return KeyKind.STRING
    if pa.types.is_integer(t) or (pa.types.is_decimal(t) and t.scale == 0):
        return KeyKind.INTEGER
    if pa.types.is_timestamp(t):
        return KeyKind.TIMESTAMP
    raise ChecksumError(f"key column {column!r} has Arrow type {arrow_type}; no canonical form")


def kind_from_spark(column: str, spark_type: Any) -> KeyKind:
    from pyspark.sql import types as T

    if isinstance(spark_type, T.StringType):
        return KeyKind.STRING
    if isinstance(spark_type, (T.ByteType, T.ShortType, T.IntegerType, T.LongType)):
        return KeyKind.INTEGER
    if isinstance(spark_type, T.DecimalType) and spark_type.scale == 0:
        return KeyKind.INTEGER
    if isinstance(spark_type, (T.TimestampType, T.TimestampNTZType)):
        return KeyKind.TIMESTAMP
    raise ChecksumError(f"key column {column!r} has Spark type {spark_type}; no canonical form")


# --------------------------------------------------------------------------------------
# ClickHouse


def _clickhouse_render(column: str, ch_type: str) -> str:
    kind = kind_from_clickhouse(column, ch_type)
    base, nullable = clickhouse_base_type(ch_type)
    col = f"`{_ident(column)}`"
    if kind is KeyKind.STRING:
        expr = f"toString({col})"
    elif kind is KeyKind.INTEGER:
        expr = f"toString({col})"
    elif base.startswith("DateTime64"):
        expr = f"toString(toUnixTimestamp64Milli({col}))"
    else:  # DateTime: whole seconds
        expr = f"toString(toInt64(toUnixTimestamp({col})) * 1000)"
    if nullable:
        expr = f"ifNull({expr}, '\\\\N')"
    return expr


def clickhouse_row_hash_sql(columns: Sequence[tuple[str, str]]) -> str:
    """UInt64 row-hash expression over (column, ClickHouse type) pairs, in key order."""
    if not columns:
        raise ChecksumError("a checksum needs at least one key column")
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

    column_types maps column name -> ClickHouse type (DESCRIBE of spec.source).
    """
    keys = [(c, column_types[c]) for c, _ in key_columns(spec, _ch_kinds(spec, column_types))]
    return (
        f"SELECT count() AS rows, sumWithOverflow({clickhouse_row_hash_sql(keys)}) AS checksum "
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


def _ch_kinds(spec: TableSpec, column_types: Mapping[str, str]) -> dict[str, KeyKind]:
    return {c: kind_from_clickhouse(c, column_types[c]) for c in spec.unique_key if c in column_types}


# --------------------------------------------------------------------------------------
# Spark


def _spark_md5_sql(columns: Sequence[tuple[str, KeyKind]], alias: str | None) -> str:
    """Spark SQL: the hex MD5 of the row's canonical key string."""
    if not columns:
        raise ChecksumError("a checksum needs at least one key column")
    prefix = f"`{_ident(alias)}`." if alias else ""
    parts = []
    for name, kind in columns:
        col = f"{prefix}`{_ident(name)}`"
        if kind is KeyKind.TIMESTAMP:
            expr = f"CAST(unix_millis({col}) AS STRING)"
        else:
            expr = f"CAST({col} AS STRING)"
        parts.append(f"coalesce({expr}, '\\\\N')")
    key = parts[0] if len(parts) == 1 else "concat(" + ", '\\u001F', ".join(parts) + ")"
    return f"md5({key})"


def spark_row_hash_sql(columns: Sequence[tuple[str, KeyKind]], alias: str | None = None) -> str:
    """Spark SQL expression of the row hash as DECIMAL(20,0) (unsigned 64-bit value)."""
    return f"CAST(conv(substr({_spark_md5_sql(columns, alias)}, 1, 16), 16, 10) AS DECIMAL(20,0))"


def spark_row_hash_halves_sql(columns: Sequence[tuple[str, KeyKind]],
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


def spark_checksum_sql(columns: Sequence[tuple[str, KeyKind]], condition: str | None = None,
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


def spark_row_hash(columns: Sequence[tuple[str, KeyKind]]) -> Column:
    from pyspark.sql import functions as F

    return F.expr(spark_row_hash_sql(columns))


def spark_checksum(df: DataFrame, columns: Sequence[tuple[str, KeyKind]]) -> IntervalChecksum:
    """Count and checksum of a DataFrame (one Spark job; the sums are exact, the mod is here)."""
    return spark_checksum_of(df.selectExpr(*spark_checksum_sql(columns)).first())


def spark_key_columns(spec: TableSpec, schema: Any) -> list[tuple[str, KeyKind]]:
    fields = {f.name: f.dataType for f in schema.fields}
    return key_columns(spec, {c: kind_from_spark(c, fields[c]) for c in spec.unique_key if c in fields})


# --------------------------------------------------------------------------------------
# Python / pyarrow


def to_epoch_ms(value: datetime) -> int:
    if value.tzinfo is None:
        raise ChecksumError(f"{value!r} has no timezone")
    delta = value.astimezone(timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def row_hash(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big")


def canonical_key(values: Sequence[Any]) -> str:
    """The canonical key string of Python values (str, int, tz-aware datetime, None)."""
    out = []
    for v in values:
        if v is None:
            out.append(NULL_TOKEN)
        elif isinstance(v, datetime):
            out.append(str(to_epoch_ms(v)))
        elif isinstance(v, bool):
            raise ChecksumError("boolean key values have no canonical form")
        elif isinstance(v, int):
            out.append(str(v))
        elif isinstance(v, str):
            out.append(v)
        else:  # Decimal with scale 0 (UInt64 stored as decimal(20,0))
            out.append(str(int(v)))
    return KEY_SEPARATOR.join(out)


def arrow_key_columns(spec: TableSpec, schema: pa.Schema) -> list[tuple[str, KeyKind]]:
    names = set(schema.names)
    return key_columns(
        spec, {c: kind_from_arrow(c, schema.field(c).type) for c in spec.unique_key if c in names}
    )


def _arrow_render(array: pa.Array | pa.ChunkedArray, kind: KeyKind) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind is KeyKind.TIMESTAMP:
        raw = pc.cast(array, pa.int64())
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[array.type.unit]
        if per_ms is None:
            ms = pc.multiply(raw, 1000)
        elif per_ms == 1:
            ms = raw
        else:  # floor division, as ClickHouse and Spark do, also before 1970
            ms = _floor_div(raw, per_ms)
        rendered = pc.cast(ms, pa.string())
    else:
        rendered = pc.cast(array, pa.string())
    return pc.fill_null(rendered, NULL_TOKEN)


def _floor_div(values: pa.Array, divisor: int) -> pa.Array:
    import pyarrow.compute as pc

    quotient = pc.divide(values, divisor)  # integer division truncates toward zero
    remainder = pc.subtract(values, pc.multiply(quotient, divisor))
    return pc.if_else(pc.less(remainder, 0), pc.subtract(quotient, 1), quotient)


def arrow_canonical_keys(batch: pa.RecordBatch | pa.Table,
                         columns: Sequence[tuple[str, KeyKind]]) -> pa.Array:
    """A string array with each row's canonical key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return pa.array([], pa.string())
    rendered = [_arrow_render(batch.column(name), kind) for name, kind in columns]
    if len(rendered) == 1:
        return rendered[0]
    return pc.binary_join_element_wise(*rendered, KEY_SEPARATOR)


def arrow_row_hashes(batch: pa.RecordBatch | pa.Table,
                     columns: Sequence[tuple[str, KeyKind]]) -> list[int]:
    md5 = hashlib.md5
    return [
        int.from_bytes(md5(key.encode("utf-8")).digest()[:8], "big")
        for key in arrow_canonical_keys(batch, columns).to_pylist()
    ]


def arrow_checksum(batches: Iterable[pa.RecordBatch | pa.Table],
                   columns: Sequence[tuple[str, KeyKind]]) -> IntervalChecksum:
    rows = 0
    total = 0
    for batch in batches:
        rows += batch.num_rows
        total += sum(arrow_row_hashes(batch, columns))
    return IntervalChecksum(rows=rows, checksum=total % MODULUS)
