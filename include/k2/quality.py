"""Bad-row quarantine: the row-quality checks of a table, defined once, rendered per engine.

tables.yaml lists a table's `quality_checks`; `rules(spec, column_types)` resolves them
against the source's ClickHouse columns into `Failure`s - one way a row can fail, with
the reason recorded for it - and `key_not_null` is always among them (a row without its
whole unique key cannot be MERGEd). Each failure is a boolean condition that is never
NULL (a NULL in a checked column fails the check), rendered three ways side by side,
as k2.checksum does for the checksum:

- ClickHouse SQL (the offload's expected figures, `k2 verify`, the late-rows check),
- Spark SQL (the offload job splits the rows it read),
- pyarrow (row-level detail of `k2 verify`; unit tests check all three agree).

A row is *good* when no failure holds; the offload MERGEs good rows into the table and
writes the others to its quarantine table (`quarantine_table_name`) with the reasons
of every check they fail (`k2_reason`, e.g. "positive(price),allowed_values(side)").
An interval's figures are split the same way everywhere: good rows (count and key
checksum, what the main table must hold and what the ledger records) and quarantined
rows (what the quarantine table must hold for the interval).

All identifiers come from a validated TableSpec and are checked again here; allowed
values are validated string literals.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from k2 import checksum as ck
from k2.config import (
    ALLOWED_VALUE,
    CHECK_ALLOWED_VALUES,
    CHECK_KEY_NOT_NULL,
    CHECK_NOT_IN_FUTURE,
    CHECK_POSITIVE,
    identifier,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from k2.config import TableSpec

QUARANTINE_SUFFIX = "__quarantine"
# Columns the quarantine table adds to the source's columns.
REASON_COLUMN = "k2_reason"
INTERVAL_START_COLUMN = "k2_interval_start"
INTERVAL_END_COLUMN = "k2_interval_end"
RUN_ID_COLUMN = "k2_run_id"
QUARANTINED_AT_COLUMN = "k2_quarantined_at"
QUARANTINE_COLUMNS = (REASON_COLUMN, INTERVAL_START_COLUMN, INTERVAL_END_COLUMN, RUN_ID_COLUMN,
                      QUARANTINED_AT_COLUMN)
REASON_SEPARATOR = ","

_NUMERIC = re.compile(r"^(U?Int(8|16|32|64|128|256)|Float(32|64)|Decimal(32|64|128|256)?\(.*\))$")
_STRING = re.compile(r"^(String|FixedString\(\d+\))$")
_TIME = re.compile(r"^DateTime(64)?(\(.*\))?$")


class QualityError(ValueError):
    """A check that does not fit the source's columns (missing column, wrong type)."""


def _ident(name: str) -> str:
    return identifier(name, error=QualityError)


def quarantine_table_name(spec: TableSpec) -> str:
    """namespace.table of the quarantine table: the table's name + '__quarantine', next to it."""
    namespace, table = spec.iceberg_table.split(".")
    return f"{_ident(namespace)}.{_ident(table)}{QUARANTINE_SUFFIX}"


@dataclass(frozen=True)
class Failure:
    """One way a row fails: `kind` over `columns` (and `values` / `reference`).

    null: any of `columns` is NULL; the other kinds have one column.
    """

    reason: str
    kind: str  # "null" | "not_positive" | "not_allowed" | "later_than"
    columns: tuple[str, ...]
    values: tuple[str, ...] = ()
    reference: str | None = None
    tolerance_ms: int = 0


@dataclass(frozen=True)
class Rules:
    """A table's failures, in config order (key_not_null first)."""

    table: str
    failures: tuple[Failure, ...]

    def __bool__(self) -> bool:
        return bool(self.failures)

    @property
    def reasons(self) -> list[str]:
        return [f.reason for f in self.failures]


def rules(spec: TableSpec, column_types: Mapping[str, str]) -> Rules:
    """The table's checks resolved against its source's columns (name -> ClickHouse type).

    key_not_null covers the Nullable key columns only (the others cannot hold NULL).
    Raises QualityError naming the table and the column when a check does not fit.
    """

    def column(name: str, check: str, want: re.Pattern[str], kind: str) -> str:
        if name not in column_types:
            raise QualityError(f"table {spec.name!r}: quality check {check} names column {name!r}, "
                               f"which {spec.source} does not have")
        base, _ = ck.clickhouse_base_type(column_types[name])
        if not want.match(base):
            raise QualityError(f"table {spec.name!r}: quality check {check} needs a {kind} column; "
                               f"{name!r} is {column_types[name]}")
        return _ident(name)

    failures: list[Failure] = []
    checks = list(spec.quality_checks)
    if not any(c.check == CHECK_KEY_NOT_NULL for c in checks):
        failures += _key_not_null(spec, column_types)
    for check in checks:
        if check.check == CHECK_KEY_NOT_NULL:
            failures += _key_not_null(spec, column_types)
        elif check.check == CHECK_POSITIVE:
            name = column(check.columns[0], "positive", _NUMERIC, "numeric")
            failures.append(Failure(f"positive({name})", "not_positive", (name,)))
        elif check.check == CHECK_ALLOWED_VALUES:
            name = column(check.columns[0], "allowed_values", _STRING, "String")
            for value in check.values:
                if not ALLOWED_VALUE.match(value):
                    raise QualityError(f"table {spec.name!r}: allowed value {value!r} is not a plain string")
            failures.append(Failure(f"allowed_values({name})", "not_allowed", (name,), values=check.values))
        elif check.check == CHECK_NOT_IN_FUTURE:
            name = column(check.columns[0], "not_in_future", _TIME, "DateTime")
            assert check.reference is not None
            reference = column(check.reference, "not_in_future", _TIME, "DateTime")
            tolerance_ms = int(check.tolerance.total_seconds() * 1000)
            failures.append(Failure(f"not_in_future({name})", "later_than", (name,),
                                    reference=reference, tolerance_ms=tolerance_ms))
        else:  # config validation makes this unreachable
            raise QualityError(f"table {spec.name!r}: unknown quality check {check.check!r}")
    return Rules(spec.name, tuple(failures))


def _key_not_null(spec: TableSpec, column_types: Mapping[str, str]) -> list[Failure]:
    nullable = tuple(_ident(name) for name in spec.unique_key
                     if name in column_types and ck.clickhouse_base_type(column_types[name])[1])
    return [Failure(CHECK_KEY_NOT_NULL, "null", nullable)] if nullable else []


# --------------------------------------------------------------------------------------
# ClickHouse


def _string(value: str) -> str:
    """A string literal of an allowed value (the same in ClickHouse and Spark SQL)."""
    if not ALLOWED_VALUE.match(value):
        raise QualityError(f"{value!r} is not a plain string value")
    return f"'{value}'"


def _failure_sql(failure: Failure, column: Callable[[str], str], is_null: Callable[[str], str],
                 time_ms: Callable[[str], str]) -> str:
    """A check's failure condition in one SQL dialect: ``column(name)`` is the column's
    expression, ``is_null(expr)`` the dialect's null test, ``time_ms(name)`` the column as
    epoch milliseconds."""
    if failure.kind == "null":
        return "(" + " OR ".join(is_null(column(c)) for c in failure.columns) + ")"
    col = column(failure.columns[0])
    if failure.kind == "not_positive":
        return f"({is_null(col)} OR {col} <= 0)"
    if failure.kind == "not_allowed":
        return f"({is_null(col)} OR {col} NOT IN ({', '.join(_string(v) for v in failure.values)}))"
    if failure.kind == "later_than":
        assert failure.reference is not None
        ref = column(failure.reference)
        return (f"({is_null(col)} OR {is_null(ref)} OR "
                f"{time_ms(failure.columns[0])} > {time_ms(failure.reference)} + {int(failure.tolerance_ms)})")
    raise QualityError(f"unknown failure kind {failure.kind!r}")


def clickhouse_failure_sql(failure: Failure, column_types: Mapping[str, str]) -> str:
    return _failure_sql(failure, lambda c: f"`{_ident(c)}`", lambda e: f"isNull({e})",
                        lambda c: ck.clickhouse_time_ms_sql(c, column_types[c]))


def clickhouse_bad_sql(rules: Rules, column_types: Mapping[str, str]) -> str:
    """UInt8 expression: 1 when the row fails any check (never NULL)."""
    if not rules:
        return "0"
    return "(" + " OR ".join(clickhouse_failure_sql(f, column_types) for f in rules.failures) + ")"


def clickhouse_good_sql(rules: Rules, column_types: Mapping[str, str]) -> str:
    """The row passes every check: a WHERE condition."""
    return "1" if not rules else f"NOT {clickhouse_bad_sql(rules, column_types)}"


def clickhouse_key_present_sql(rules: Rules, column_types: Mapping[str, str]) -> str:
    """The row has its whole unique key (a WHERE condition; "1" when no key column is Nullable)."""
    nulls = [f for f in rules.failures if f.kind == "null"]
    return " AND ".join(f"NOT {clickhouse_failure_sql(f, column_types)}" for f in nulls) or "1"


def clickhouse_reason_sql(rules: Rules, column_types: Mapping[str, str]) -> str:
    """String expression: the reasons of the failed checks, comma-separated ('' when good)."""
    if not rules:
        return "''"
    parts = ", ".join(
        f"if({clickhouse_failure_sql(f, column_types)}, '{f.reason}', '')" for f in rules.failures
    )
    return f"arrayStringConcat(arrayFilter(x -> x != '', [{parts}]), '{REASON_SEPARATOR}')"


@dataclass(frozen=True)
class SplitChecksum:
    """An interval's figures split by the checks: the good rows (MERGEd into the table) and
    the quarantined rows (written to the quarantine table). Rows read = good + quarantined."""

    good: ck.IntervalChecksum
    quarantined: ck.IntervalChecksum

    @property
    def rows_read(self) -> int:
        return self.good.rows + self.quarantined.rows

    def __str__(self) -> str:
        return f"{self.rows_read} rows read: {self.good} good, {self.quarantined} quarantined"


def clickhouse_split_sql(spec: TableSpec, rules: Rules, column_types: Mapping[str, str]) -> str:
    """`SELECT good rows, good checksum, quarantined rows, quarantined checksum` of one
    interval of spec.source (parameters: k2.checksum.interval_parameters)."""
    row_hash = ck.clickhouse_row_hash_sql(ck.clickhouse_row_columns(spec, column_types))
    bad = clickhouse_bad_sql(rules, column_types)
    return (
        f"SELECT countIf(NOT {bad}) AS good_rows, sumWithOverflowIf({row_hash}, NOT {bad}) AS good_checksum, "
        f"countIf({bad}) AS bad_rows, sumWithOverflowIf({row_hash}, {bad}) AS bad_checksum "
        f"FROM `{_ident(spec.source)}` WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)}"
    )


def clickhouse_split_checksum(client: Any, spec: TableSpec, rules: Rules, column_types: Mapping[str, str],
                              start: datetime, end: datetime) -> SplitChecksum:
    row = client.query(clickhouse_split_sql(spec, rules, column_types),
                       parameters=ck.interval_parameters(start, end)).result_rows[0]
    good_rows, good_sum, bad_rows, bad_sum = (int(v or 0) for v in row)
    return SplitChecksum(ck.IntervalChecksum(good_rows, good_sum), ck.IntervalChecksum(bad_rows, bad_sum))


# --------------------------------------------------------------------------------------
# Spark


def spark_failure_sql(failure: Failure, alias: str | None = None) -> str:
    prefix = f"`{_ident(alias)}`." if alias else ""
    return _failure_sql(failure, lambda c: f"{prefix}`{_ident(c)}`", lambda e: f"{e} IS NULL",
                        lambda c: f"unix_millis({prefix}`{_ident(c)}`)")


def spark_bad_sql(rules: Rules, alias: str | None = None) -> str:
    """Spark SQL boolean: the row fails any check (never NULL)."""
    if not rules:
        return "false"
    return "(" + " OR ".join(spark_failure_sql(f, alias) for f in rules.failures) + ")"


def spark_reason_sql(rules: Rules, alias: str | None = None) -> str:
    """Spark SQL string: the reasons of the failed checks, comma-separated ('' when good)."""
    if not rules:
        return "''"
    parts = ", ".join(f"CASE WHEN {spark_failure_sql(f, alias)} THEN '{f.reason}' END"
                      for f in rules.failures)
    return f"concat_ws('{REASON_SEPARATOR}', {parts})"


def spark_split_checksum(df: Any, columns: Sequence[tuple[str, ck.Kind]], rules: Rules) -> SplitChecksum:
    """Good and quarantined figures of a DataFrame in one Spark job."""
    bad = spark_bad_sql(rules)  # never NULL
    row = df.selectExpr(*ck.spark_checksum_sql(columns, f"NOT {bad}", "good_"),
                        *ck.spark_checksum_sql(columns, bad, "bad_")).first()
    return SplitChecksum(ck.spark_checksum_of(row, "good_"), ck.spark_checksum_of(row, "bad_"))


# --------------------------------------------------------------------------------------
# pyarrow


def _plain(array: Any) -> Any:
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array


def _epoch_ms(array: Any) -> Any:
    """Timestamps of any unit -> int64 epoch milliseconds, floored like ClickHouse and Spark."""
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = pc.cast(array, pa.int64())
    per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[array.type.unit]
    if per_ms is None:
        return pc.multiply(raw, 1000)
    if per_ms == 1:
        return raw
    quotient = pc.divide(raw, per_ms)
    remainder = pc.subtract(raw, pc.multiply(quotient, per_ms))
    return pc.if_else(pc.less(remainder, 0), pc.subtract(quotient, 1), quotient)


def arrow_failure_mask(batch: pa.RecordBatch | pa.Table, failure: Failure) -> pa.Array:
    """Boolean array (no NULLs): the rows that fail `failure`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if failure.kind == "null":
        mask = pc.is_null(_plain(batch.column(failure.columns[0])))
        for name in failure.columns[1:]:
            mask = pc.or_(mask, pc.is_null(_plain(batch.column(name))))
        return mask
    col = _plain(batch.column(failure.columns[0]))
    if failure.kind == "not_positive":
        zero = pa.scalar(0, col.type) if pa.types.is_decimal(col.type) else 0
        mask = pc.or_kleene(pc.is_null(col), pc.less_equal(col, zero))
    elif failure.kind == "not_allowed":
        allowed = pc.is_in(col, value_set=pa.array(list(failure.values), col.type))
        mask = pc.or_kleene(pc.is_null(col), pc.invert(allowed))
    elif failure.kind == "later_than":
        assert failure.reference is not None
        ref = _plain(batch.column(failure.reference))
        later = pc.greater(_epoch_ms(col), pc.add(_epoch_ms(ref), failure.tolerance_ms))
        mask = pc.or_kleene(pc.or_kleene(pc.is_null(col), pc.is_null(ref)), later)
    else:
        raise QualityError(f"unknown failure kind {failure.kind!r}")
    return pc.fill_null(mask, True)


def arrow_bad_mask(batch: pa.RecordBatch | pa.Table, rules: Rules) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pa.array([False] * batch.num_rows, pa.bool_())
    for failure in rules.failures:
        mask = pc.or_(mask, arrow_failure_mask(batch, failure))
    return mask


def arrow_reasons(batch: pa.RecordBatch | pa.Table, rules: Rules) -> pa.Array:
    """String array: each row's failed-check reasons, comma-separated ('' when good)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not rules or batch.num_rows == 0:
        return pa.array([""] * batch.num_rows, pa.string())
    # '' for a passed check, then the separators of the empty parts removed (reasons hold no
    # separator). binary_join_element_wise's null_handling="skip" drops all-NULL rows here.
    parts = [pc.if_else(arrow_failure_mask(batch, f), f.reason, "") for f in rules.failures]
    joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, REASON_SEPARATOR)
    squeezed = pc.replace_substring_regex(joined, f"{REASON_SEPARATOR}+", REASON_SEPARATOR)
    return pc.utf8_trim(squeezed, REASON_SEPARATOR)
