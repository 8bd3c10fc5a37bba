"""One query over hot + cold: per table a ClickHouse view ``<table>_all`` that returns the
rows before the table's retention boundary from Iceberg (ClickHouse's own Iceberg reader)
and the rows from it on from ClickHouse, each row once.

    SELECT count(), sum(quantity) FROM bronze_trades_binance_all
    WHERE event_time >= '2026-10-01' AND event_time < '2026-12-01'

The boundary is where hot-tier retention (k2.retention) has dropped partitions up to: a
row in ``k2_hot_boundary`` per table (a ReplacingMergeTree in the hot tier's database),
on the table's partition column. Retention moves it forward *after* verifying a
partition against Iceberg and *before* it moves the partition out of the table, and back
when it has to keep the partition after all; so at every moment of a retention run a
row before the boundary is read from Iceberg, where its verified copy is, and a row from
the boundary on from ClickHouse, where it still is. Before any retention the boundary is
1970-01-01 and the view is the hot table.

The view returns the rows that pass the table's quality checks (k2.quality) on both
sides: the others are in ``<iceberg_table>__quarantine``, not in the Iceberg table. Its
columns and their types are the source's (``read_from``); the Iceberg side is cast to them.

Where ClickHouse reads Iceberg from: a warehouse on a path the ClickHouse server can read
(``icebergLocal``: the local stack, a shared mount). For a warehouse on object storage or
behind a REST catalog, docs/architecture.md ("One query over hot and cold") shows the
same view over ``icebergS3`` or a ``DataLakeCatalog`` database.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from k2 import iceberg as ib
from k2 import quality
from k2.config import identifier, quote_identifier

if TYPE_CHECKING:
    from k2.config import TableSpec

BOUNDARY_TABLE = "k2_hot_boundary"
VIEW_SUFFIX = "_all"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class HotColdError(ValueError):
    """A view that cannot be made (a warehouse ClickHouse cannot read, a missing column)."""


def view_name(spec: TableSpec) -> str:
    return identifier(spec.name + VIEW_SUFFIX)


def ensure_boundary_table(client: Any) -> None:
    client.command(
        f"CREATE TABLE IF NOT EXISTS {BOUNDARY_TABLE} (table_name String, column String, "
        "hot_from DateTime64(3, 'UTC'), version UInt64) "
        "ENGINE = ReplacingMergeTree(version) ORDER BY table_name"
    )


def set_boundary(client: Any, spec: TableSpec, column: str, hot_from: datetime) -> None:
    """Rows of `spec` whose `column` is before `hot_from` are read from Iceberg from now on
    (the boundary table exists: ensure_boundary_table)."""
    client.command(
        f"INSERT INTO {BOUNDARY_TABLE} SELECT {{t:String}}, {{c:String}}, "
        "fromUnixTimestamp64Milli({h:Int64}, 'UTC'), toUInt64(toUnixTimestamp64Nano(now64(9)))",
        parameters={"t": spec.name, "c": identifier(column),
                    "h": int(hot_from.astimezone(timezone.utc).timestamp() * 1000)},
    )


def boundary(client: Any, spec: TableSpec) -> datetime:
    """The boundary the view uses now (1970-01-01: no retention yet; the boundary table
    exists: ensure_boundary_table)."""
    value = client.query(_boundary_sql(spec)).first_row[0]
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _boundary_sql(spec: TableSpec) -> str:
    return (f"SELECT argMax(hot_from, version) FROM {BOUNDARY_TABLE} "
            f"WHERE table_name = '{identifier(spec.name)}'")


def iceberg_source(location: str) -> str:
    """The ClickHouse table function reading the Iceberg table at `location`."""
    parts = urlsplit(location)
    if parts.scheme in ("", "file"):
        path = unquote(parts.path) if parts.scheme else location
        if "'" in path or "\\" in path:
            raise HotColdError(f"Iceberg table location {location!r} cannot be quoted into a view")
        return f"icebergLocal('{path}')"
    raise HotColdError(
        f"ClickHouse cannot read the Iceberg table at {location!r} with icebergLocal: the view "
        "is made for a warehouse on a path the ClickHouse server can read; for object storage "
        "see docs/architecture.md (\"One query over hot and cold\")")


def view_sql(spec: TableSpec, column_types: dict[str, str], location: str, partition_column: str) -> str:
    """CREATE OR REPLACE VIEW ``<table>_all`` (column_types: DESCRIBE of the source, in order)."""
    if partition_column not in column_types:
        raise HotColdError(f"{spec.source} has no column {partition_column!r} to split hot and cold on")
    columns = list(column_types)
    cold = ", ".join(f"CAST({quote_identifier(c)} AS {column_types[c]}) AS {quote_identifier(c)}"
                     for c in columns)  # types as the server's DESCRIBE wrote them
    hot = ", ".join(quote_identifier(c) for c in columns)
    split = quote_identifier(partition_column)
    good = quality.clickhouse_good_sql(quality.rules(spec, column_types), column_types)
    at = f"({_boundary_sql(spec)})"
    return (
        f"CREATE OR REPLACE VIEW {quote_identifier(view_name(spec))} AS\n"
        f"SELECT {cold} FROM {iceberg_source(location)} WHERE {split} < {at}\n"
        f"UNION ALL\n"
        f"SELECT {hot} FROM {quote_identifier(spec.source)} WHERE {split} >= {at} AND {good}"
    )


def create_view(client: Any, catalog: Any, spec: TableSpec, partition_column: str) -> str:
    """Create (or replace) the table's hot + cold view; its name. The Iceberg table must exist."""
    ensure_boundary_table(client)
    location = catalog.load_table(spec.iceberg_table).location()
    types = {c.name: c.clickhouse_type for c in ib.describe_source(client, spec)}
    client.command(view_sql(spec, types, location, partition_column))
    return view_name(spec)
