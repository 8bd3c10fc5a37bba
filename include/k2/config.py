"""The table specs: `include/config/tables.yaml`, loaded with yaml.safe_load and validated.

Every SQL identifier the project uses comes from here, so validation is strict:
identifiers must be plain names, durations must parse, and an error names the
table and the key that is wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from k2.intervals import parse_utc

# The project's checkout: include/k2/config.py is two levels below it.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TABLES_FILE = REPO_ROOT / "include" / "config" / "tables.yaml"
# The jars every offload job gets (`make setup` fetches them through Maven).
SPARK_JARS_DIR = REPO_ROOT / "spark_jobs" / "jars"
# Overrides the config's start_date (e.g. the local stack starts at its feed history).
START_DATE_ENV = "K2_START_DATE"
DEADLINE_ENV = "K2_DEADLINE"
# Overrides the config's end_date (e.g. `k2 demo --until-caught-up` ends at its start).
END_DATE_ENV = "K2_END_DATE"
# Environment overrides of a key for every table, or for some (a local stack starting at
# its feed history; a staging or test deployment with a tighter deadline): see
# environment_overrides().
OVERRIDE_ENV = {"start_date": START_DATE_ENV, "end_date": END_DATE_ENV, "deadline": DEADLINE_ENV}
# The Airflow pool that bounds concurrent Spark offload jobs (the DAGs use it; a deployment
# creates it with its slots).
SPARK_POOL = "k2_spark"
# Who gets deadline-miss and alert emails (Airflow's notifier and Alertmanager alike).
ALERT_TO_ENV = "K2_ALERT_EMAIL_TO"
DEFAULT_ALERT_TO = "k2-oncall@localhost"

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PARTITION_TRANSFORM = re.compile(
    r"^(?:(?P<fn>year|month|day|hour|identity)\((?P<col>[A-Za-z_][A-Za-z0-9_]*)\)"
    r"|(?:bucket|truncate)\((?P<n>[1-9][0-9]*),\s*(?P<col2>[A-Za-z_][A-Za-z0-9_]*)\)"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))$"
)
DURATION = re.compile(r"^(?P<n>[0-9]+)(?P<unit>s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# One day of 15-minute intervals.
MAX_INTERVALS_PER_JOB = 96


class ConfigError(ValueError):
    """A tables.yaml problem, with the table and key it concerns."""


def parse_duration(text: str, *, positive: bool = False) -> timedelta:
    """'90s', '15m', '6h', '7d' -> timedelta. Raises ValueError with the accepted forms
    (``positive``: also for a zero duration)."""
    match = DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 6h or 7d")
    value = timedelta(seconds=int(match["n"]) * _UNIT_SECONDS[match["unit"]])
    if positive and value <= timedelta(0):
        raise ValueError(f"{text!r} is not a positive duration")
    return value


def identifier(value: str, what: str = "", error: type[Exception] = ValueError) -> str:
    """value when it is a plain SQL identifier; else ``error`` naming it (and ``what`` it is).

    The one check every SQL identifier passes (table specs, the hook's queries, checksums,
    quality checks, Iceberg names): no SQL ever comes from run-time input.
    """
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        label = f"{what} " if what else ""
        raise error(f"{label}{value!r} is not a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return value


def quote_identifier(value: str) -> str:
    """A checked identifier in backquotes (ClickHouse and Spark SQL)."""
    return f"`{identifier(value)}`"



class Completeness(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: str
    column: str

    _check = field_validator("table", "column")(identifier)


# Row-quality checks (tables.yaml `quality_checks`; k2.quality renders them per engine).
CHECK_KEY_NOT_NULL = "key_not_null"
CHECK_POSITIVE = "positive"
CHECK_ALLOWED_VALUES = "allowed_values"
CHECK_NOT_IN_FUTURE = "not_in_future"
CHECK_NAMES = (CHECK_KEY_NOT_NULL, CHECK_POSITIVE, CHECK_ALLOWED_VALUES, CHECK_NOT_IN_FUTURE)
# Allowed values become SQL string literals: printable text without quotes or backslashes.
ALLOWED_VALUE = re.compile(r"^[^'\\\x00-\x1f\x7f]{1,128}$")


class QualityCheck(BaseModel):
    """One row-quality check, normalized from its YAML form (see `_quality_checks`).

    A row fails `positive` when a column is NULL or <= 0, `allowed_values` when the column
    is NULL or not one of `values`, `not_in_future` when the column is NULL, `reference`
    is NULL or the column is more than `tolerance` after `reference`, and `key_not_null`
    when any unique_key column is NULL.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: str
    columns: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    reference: str | None = None
    tolerance: timedelta = timedelta(0)


def _one_check(item: Any, event_time_column: str | None) -> list[QualityCheck]:
    """A YAML entry -> QualityCheck(s). Raises ValueError saying what is wrong."""
    if isinstance(item, str):
        if item == CHECK_KEY_NOT_NULL:
            return [QualityCheck(check=item)]
        if item in CHECK_NAMES:
            raise ValueError(f"{item!r} needs arguments, e.g. {_EXAMPLES[item]}")
        raise ValueError(f"unknown check {item!r}; known: {', '.join(CHECK_NAMES)}")
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"{item!r} is not a check: write a name or a one-key mapping, e.g. "
                         f"{_EXAMPLES[CHECK_POSITIVE]}")
    (name, args), = item.items()
    if name not in CHECK_NAMES:
        raise ValueError(f"unknown check {name!r}; known: {', '.join(CHECK_NAMES)}")
    if name == CHECK_KEY_NOT_NULL:
        if args not in (None, True):
            raise ValueError(f"{name!r} takes no arguments")
        return [QualityCheck(check=name)]
    if name == CHECK_POSITIVE:
        columns = [args] if isinstance(args, str) else args
        if not isinstance(columns, list) or not columns:
            raise ValueError(f"{name!r} needs a column or a list of columns, e.g. {_EXAMPLES[name]}")
        return [QualityCheck(check=name, columns=(identifier(c),)) for c in columns]
    if name == CHECK_ALLOWED_VALUES:
        if not isinstance(args, dict) or not args:
            raise ValueError(f"{name!r} needs a mapping column -> values, e.g. {_EXAMPLES[name]}")
        checks = []
        for column, values in args.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{name!r} of {column!r} needs a non-empty list of values")
            for value in values:
                if not isinstance(value, str) or not ALLOWED_VALUE.match(value):
                    raise ValueError(
                        f"{name!r} of {column!r}: {value!r} is not a string of 1-128 printable "
                        "characters without quotes or backslashes"
                    )
            checks.append(QualityCheck(check=name, columns=(identifier(column),), values=tuple(values)))
        return checks
    # not_in_future
    if not isinstance(args, dict) or "reference" not in args:
        raise ValueError(f"{name!r} needs a reference column, e.g. {_EXAMPLES[name]}")
    unknown = set(args) - {"column", "reference", "tolerance"}
    if unknown:
        raise ValueError(f"{name!r} has unknown keys {sorted(unknown)} (column, reference, tolerance)")
    column = args.get("column") or event_time_column
    if column is None:
        raise ValueError(f"{name!r} needs a column")
    tolerance = parse_duration(args.get("tolerance", "0s"))
    return [QualityCheck(check=name, columns=(identifier(column),),
                         reference=identifier(args["reference"]), tolerance=tolerance)]


_EXAMPLES = {
    CHECK_KEY_NOT_NULL: "key_not_null",
    CHECK_POSITIVE: "{positive: [price, quantity]}",
    CHECK_ALLOWED_VALUES: "{allowed_values: {side: [buy, sell]}}",
    CHECK_NOT_IN_FUTURE: "{not_in_future: {column: event_time, reference: ingested_at, tolerance: 1m}}",
}


class TableSpec(BaseModel):
    """One offloaded table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clickhouse_table: str
    read_from: str | None = None
    event_time_column: str
    unique_key: list[str] = Field(min_length=1)
    completeness: Completeness | None = None
    allowed_lateness: timedelta
    iceberg_table: str
    partition_by: list[str] = Field(default_factory=list)
    hot_retention: timedelta
    deadline: timedelta
    start_date: datetime
    # Iceberg maintenance (k2.maintenance): snapshots older than this are expired (once the
    # ledger holds every interval they committed); files in the table's folder that no
    # snapshot references and that are older than orphan_file_retention are removed.
    snapshot_retention: timedelta = timedelta(days=2)
    orphan_file_retention: timedelta = timedelta(days=3)
    # The end of the last interval to offload (exclusive), on the 15-minute grid; None: no end.
    end_date: datetime | None = None
    # Catch-up: the most 15-minute intervals one Spark job offloads (k2.catchup). A bigger
    # batch saves JVM starts but holds the table's offload lock longer.
    max_intervals_per_job: int = Field(default=16, ge=1, le=MAX_INTERVALS_PER_JOB, strict=True)
    # Rows failing a check go to the quarantine table instead of iceberg_table (k2.quality).
    # key_not_null is always applied: a row without its whole key cannot be MERGEd.
    quality_checks: tuple[QualityCheck, ...] = ()

    @field_validator("clickhouse_table", "read_from", "event_time_column")
    @classmethod
    def _plain_identifier(cls, value: str | None) -> str | None:
        return None if value is None else identifier(value)

    @field_validator("unique_key")
    @classmethod
    def _key_identifiers(cls, value: list[str]) -> list[str]:
        return [identifier(v) for v in value]

    @field_validator("iceberg_table")
    @classmethod
    def _namespaced(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) != 2:
            raise ValueError(f"{value!r} must be namespace.table")
        for part in parts:
            identifier(part)
        return value

    @field_validator("partition_by")
    @classmethod
    def _transforms(cls, value: list[str]) -> list[str]:
        for item in value:
            if not PARTITION_TRANSFORM.match(item):
                raise ValueError(
                    f"{item!r} is not a partition transform such as day(col), hour(col), "
                    "bucket(16, col), truncate(4, col) or a column name"
                )
        return value

    @field_validator("allowed_lateness", "hot_retention", "deadline", "snapshot_retention",
                     "orphan_file_retention", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        return value if value is None else parse_utc(value)

    @field_validator("quality_checks", mode="before")
    @classmethod
    def _quality_checks(cls, value: Any, info: Any) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ValueError("must be a list of checks, e.g. [key_not_null, {positive: [price]}]")
        checks: list[QualityCheck] = []
        for index, item in enumerate(value):
            if isinstance(item, QualityCheck):
                checks.append(item)
                continue
            try:
                checks.extend(_one_check(item, info.data.get("event_time_column")))
            except ValueError as exc:
                raise ValueError(f"check #{index + 1}: {exc}") from None
        seen = set()
        for check in checks:
            key = (check.check, check.columns)
            if key in seen:
                what = f"{check.check}({', '.join(check.columns)})" if check.columns else check.check
                raise ValueError(f"{what} is listed twice")
            seen.add(key)
        return tuple(checks)

    @model_validator(mode="after")
    def _completeness_default(self) -> TableSpec:
        if self.completeness is None:
            object.__setattr__(
                self,
                "completeness",
                Completeness(table=self.clickhouse_table, column=self.event_time_column),
            )
        return self

    # Derived names used across the project
    @property
    def name(self) -> str:
        return self.clickhouse_table

    @property
    def source(self) -> str:
        """What the offload selects from."""
        return self.read_from or self.clickhouse_table

    @property
    def dag_id(self) -> str:
        return f"k2_offload_{self.clickhouse_table}"

    @property
    def iceberg_namespace(self) -> str:
        return self.iceberg_table.split(".")[0]


class TablesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tables: list[TableSpec]

    def get(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        known = ", ".join(t.name for t in self.tables)
        raise ConfigError(f"unknown table {name!r}; tables.yaml has: {known}")


def _error_message(path: Path, raw_tables: list[Any], err: ValidationError,
                   index: int | None = None) -> str:
    """ConfigError text naming table and key; ``index``: err is of that one entry alone."""
    lines = [f"{path}: invalid table spec"]
    for detail in err.errors():
        loc = list(detail["loc"])
        if index is not None:
            loc = ["tables", index, *loc]
        where = "tables.yaml"
        if len(loc) >= 2 and loc[0] == "tables" and isinstance(loc[1], int):
            index = loc[1]
            entry = raw_tables[index] if index < len(raw_tables) else {}
            table = entry.get("clickhouse_table", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
            key = ".".join(str(part) for part in loc[2:]) or "(entry)"
            where = f"table {table!r}, key {key!r}"
        lines.append(f"  {where}: {detail['msg']}")
    return "\n".join(lines)


def _read_tables_file(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """(defaults, raw table entries) of tables.yaml. Raises ConfigError naming the file."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("tables"), list):
        raise ConfigError(f"{path}: expected a mapping with a 'tables' list")
    unknown = set(document) - {"defaults", "tables"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}")
    return dict(document.get("defaults") or {}), document["tables"]


def _with_defaults_and_overrides(entry: Any, defaults: dict[str, Any]) -> Any:
    """A table entry as validated: the file's defaults, the entry, the environment's overrides."""
    if not isinstance(entry, dict):
        return entry
    merged = {**defaults, **entry}
    return {**merged, **environment_overrides(merged.get("clickhouse_table"))}


def load_tables(path: Path | str | None = None) -> TablesConfig:
    """Load and validate tables.yaml. Raises ConfigError naming the table and key."""
    path = Path(path) if path else DEFAULT_TABLES_FILE
    defaults, raw_tables = _read_tables_file(path)
    merged = [_with_defaults_and_overrides(entry, defaults) for entry in raw_tables]
    try:
        config = TablesConfig(tables=merged)
    except ValidationError as err:
        raise ConfigError(_error_message(path, raw_tables, err)) from None
    names = [t.name for t in config.tables]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: tables listed twice: {duplicates}")
    for env in OVERRIDE_ENV.values():
        unknown = sorted(set(_per_table_values(env)) - set(names) - {None})
        if unknown:
            raise ConfigError(f"{env} names tables that {path} does not list: {unknown}")
    return config


def load_table_specs(
    path: Path | str | None = None,
    *,
    strict: bool = True,
    on_error: Callable[[str], None] | None = None,
) -> list[TableSpec]:
    """The table specs of tables.yaml. Strict: as :func:`load_tables` (any error raises).
    Lenient: an entry that fails is reported through ``on_error`` and left out; the others
    are read exactly as the strict path reads them (defaults, environment overrides)."""
    path = Path(path) if path else DEFAULT_TABLES_FILE
    try:
        return list(load_tables(path).tables)
    except ConfigError as exc:
        if strict or on_error is None:
            raise
        on_error(str(exc))
    try:
        defaults, raw_tables = _read_tables_file(path)
    except ConfigError as exc:  # the file as a whole is unusable: nothing to salvage
        on_error(f"no tables: {exc}")
        return []
    specs: list[TableSpec] = []
    for index, entry in enumerate(raw_tables):
        name = entry.get("clickhouse_table", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
        try:
            spec = TableSpec.model_validate(_with_defaults_and_overrides(entry, defaults))
        except ValidationError as err:
            on_error(_error_message(path, raw_tables, err, index=index))
            continue
        except (ValueError, ConfigError) as exc:
            on_error(f"{path}: table {name!r}: {exc}")
            continue
        if any(s.name == spec.name for s in specs):
            on_error(f"{path}: table {spec.name!r} is listed twice: the first entry is kept")
            continue
        specs.append(spec)
    return specs


def _per_table_values(env: str) -> dict[str | None, str]:
    """table -> value of one override variable; the key None holds the value for every table."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return {}
    if "=" not in raw and "," not in raw:
        return {None: raw}
    values: dict[str | None, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        table, sep, value = item.partition("=")
        key = table.strip() if sep else None
        if not item or (sep and not (key and value.strip())) or key in values:
            raise ConfigError(
                f"{env}={raw!r}: expected a value for every table, or comma-separated table=value "
                f"items with at most one bare value for the others (item {item!r})"
            )
        values[key] = (value if sep else table).strip()
    return values


def environment_overrides(table: str | None) -> dict[str, str]:
    """The keys the environment overrides for one table (OVERRIDE_ENV). A variable holds a
    value for every table, or comma-separated ``table=value`` items with at most one bare
    value for the rest, e.g. ``K2_START_DATE=2026-12-01T00:00:00Z,gold_ohlcv_1d=2026-11-30T18:00:00Z``
    (a local stack that starts one table at an older feed history than the others)."""
    overrides: dict[str, str] = {}
    for key, env in OVERRIDE_ENV.items():
        values = _per_table_values(env)
        value = values.get(table, values.get(None))
        if value is not None:
            overrides[key] = value
    return overrides


@lru_cache(maxsize=4)
def cached_tables(path: str | None = None) -> TablesConfig:
    return load_tables(path)

