"""Hot-tier retention: a ClickHouse partition older than its table's ``hot_retention`` is
dropped only behind a verified offload, and is otherwise kept and reported.

A partition P of a table (its partition key is ``toYYYYMMDD(c)``, ``toYYYYMM(c)`` or
``toYear(c)``; P holds the rows whose ``c`` lies in [start, end)) is dropped when

1. it is old: ``end`` <= now - hot_retention;
2. every 15-minute interval that P's rows fall in (by the table's event time) is in the
   offload ledger, and the watermark has passed the last of them;
3. a verification made now - rows and checksum per interval, ClickHouse against the Iceberg
   table, restricted on both sides to P's rows (c in [start, end)) - is clean.

Anything else keeps P, with the reasons (the intervals and what is wrong with them).

Dropping (:func:`apply_table`) holds the table's offload lock (no offload of the table runs),
stops the table's merges, and moves P to ``<table>__retiring`` only when P is as it was
verified, then drops it there only when the moved rows are exactly those (a fingerprint of
every stored column); rows inserted meanwhile stay in the table or are moved back. Then it records the dropped range in the watermark store (k2_hot_retention):
from there on the table's offloads refuse the intervals before the boundary (their rows are
gone from ClickHouse; offloading them again would empty them in Iceberg) and ``k2 verify``
compares only what the hot tier still holds.

The hot + cold view ``<table>_all`` (k2.hotcold) follows: the first drop creates it, and
the boundary it splits on moves to P's end after P is verified and before P leaves the
table (back, when P is kept after all), so the view never counts a row twice or misses one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from k2 import checksum as ck
from k2 import hotcold
from k2 import iceberg as ib
from k2.config import TableSpec, quote_identifier
from k2.intervals import INTERVAL, floor_interval
from k2.verify import ColumnRange, verify_table
from k2.watermarks import WatermarkStore, offload_lock

_KEY = re.compile(r"^\s*(toYYYYMMDD|toYYYYMM|toYear)\(\s*`?([A-Za-z_][A-Za-z0-9_]*)`?\s*\)\s*$")
_PART = re.compile(r"^[A-Za-z0-9_]+$")
SHOWN_INTERVALS = 5
MAX_LEDGER_STEP = timedelta(days=1)  # the longest ledgered interval looked back for  # intervals named per reason; the count says how many there are


class RetentionError(RuntimeError):
    """A table whose partitions retention cannot reason about."""


@dataclass(frozen=True)
class PartitionKey:
    """A ClickHouse partition key by calendar period of one time column."""

    function: str  # toYYYYMMDD | toYYYYMM | toYear
    column: str

    def bounds(self, partition_id: str) -> tuple[datetime, datetime]:
        """[start, end) of the column's values in the partition with that id (UTC)."""
        try:
            if self.function == "toYYYYMMDD":
                start = datetime.strptime(partition_id, "%Y%m%d").replace(tzinfo=timezone.utc)
                return start, start + timedelta(days=1)
            if self.function == "toYYYYMM":
                start = datetime.strptime(partition_id, "%Y%m").replace(tzinfo=timezone.utc)
                year, month = divmod(start.month, 12)
                return start, start.replace(year=start.year + year, month=month + 1)
            start = datetime.strptime(partition_id, "%Y").replace(tzinfo=timezone.utc)
            return start, start.replace(year=start.year + 1)
        except ValueError:
            raise RetentionError(
                f"partition id {partition_id!r} does not match the partition key "
                f"{self.function}({self.column})"
            ) from None


def partition_key(client: Any, table: str) -> PartitionKey:
    """The table's partition key, read from ClickHouse (system.tables)."""
    rows = client.query(
        "SELECT partition_key FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        parameters={"t": table},
    ).result_rows
    if not rows:
        raise RetentionError(f"ClickHouse has no table {table!r} in the current database")
    key = rows[0][0]
    match = _KEY.match(key or "")
    if match is None:
        raise RetentionError(
            f"table {table!r} is partitioned by {key!r}; retention drops partitions by day, month or "
            "year of a time column (toYYYYMMDD(c), toYYYYMM(c), toYear(c))"
        )
    return PartitionKey(match.group(1), match.group(2))


@dataclass(frozen=True)
class HotPartition:
    partition_id: str
    start: datetime
    end: datetime
    rows: int
    parts: tuple[str, ...]


def hot_partitions(client: Any, table: str, key: PartitionKey) -> list[HotPartition]:
    """The table's partitions with their active parts, oldest first."""
    rows = client.query(
        "SELECT partition_id, sum(rows), arraySort(groupArray(name)) FROM system.parts "
        "WHERE database = currentDatabase() AND table = {t:String} AND active "
        "GROUP BY partition_id HAVING sum(rows) > 0 ORDER BY partition_id",
        parameters={"t": table},
    ).result_rows
    found = []
    for partition_id, count, parts in rows:
        start, end = key.bounds(partition_id)
        found.append(HotPartition(partition_id, start, end, int(count), tuple(parts)))
    return sorted(found, key=lambda p: p.start)


@dataclass
class Decision:
    """What retention does with one partition, and why."""

    table: str
    column: str
    partition: HotPartition
    intervals: list[tuple[datetime, datetime]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    young: bool = False
    rows: int = 0  # verified rows (ClickHouse) of the partition
    checksum: int = 0
    dropped: bool = False

    @property
    def droppable(self) -> bool:
        return not self.young and not self.reasons

    @property
    def intervals_end(self) -> datetime:
        return self.intervals[-1][1] if self.intervals else self.partition.start

    def line(self) -> str:
        p = self.partition
        head = (f"{self.table} partition {p.partition_id} ({self.column} in [{p.start:%Y-%m-%d}, "
                f"{p.end:%Y-%m-%d}), {p.rows:,} rows, {len(p.parts)} part(s), {len(self.intervals)} interval(s))")
        if self.young:
            return f"{head}: younger than the table's hot_retention, kept"
        if self.dropped:
            return f"{head}: dropped after verification ({self.rows:,} rows, checksum {self.checksum:016x})"
        if self.droppable:
            return f"{head}: verified, can be dropped"
        return f"{head}: KEPT - " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        p = self.partition
        return {
            "table": self.table, "partition": p.partition_id, "column": self.column,
            "start": p.start.isoformat(), "end": p.end.isoformat(), "rows": p.rows,
            "parts": list(p.parts), "intervals": len(self.intervals), "young": self.young,
            "droppable": self.droppable, "dropped": self.dropped, "reasons": self.reasons,
        }


def _named(intervals: Sequence[tuple[datetime, datetime]]) -> str:
    shown = ", ".join(f"[{s:%Y-%m-%dT%H:%M}Z, {e:%H:%M}Z)" for s, e in intervals[:SHOWN_INTERVALS])
    more = len(intervals) - SHOWN_INTERVALS
    return shown + (f" and {more} more" if more > 0 else "")


def _event_time_range(client: Any, spec: TableSpec, key: PartitionKey, types: dict[str, str],
                      partition: HotPartition) -> tuple[datetime, datetime] | None:
    """min and max of the table's event time over the partition's rows (None: no rows)."""
    restrict, params = ColumnRange(key.column, partition.start, partition.end).clickhouse_sql(types)
    event = ck.clickhouse_time_ms_sql(spec.event_time_column, types[spec.event_time_column])
    first, last, count = client.query(
        f"SELECT min({event}), max({event}), count() FROM {quote_identifier(spec.source)} "
        f"WHERE 1{restrict}",
        parameters=params,
    ).first_row
    if not count:
        return None
    as_time = lambda ms: datetime.fromtimestamp(int(ms) / 1000, timezone.utc)  # noqa: E731
    return as_time(first), as_time(last)


def decide(spec: TableSpec, partition: HotPartition, key: PartitionKey, *, ch_client: Any,
           catalog: Any, store: WatermarkStore, types: dict[str, str], now: datetime) -> Decision:
    """Whether the partition may be dropped now (see the module doc), with the reasons if not."""
    decision = Decision(spec.name, key.column, partition)
    if partition.end > now - spec.hot_retention:
        decision.young = True
        return decision
    span = _event_time_range(ch_client, spec, key, types, partition)
    if span is None:
        return decision  # no rows: nothing to lose
    first = floor_interval(span[0])
    last_end = floor_interval(span[1]) + INTERVAL
    decision.intervals = [(first + i * INTERVAL, first + (i + 1) * INTERVAL)
                          for i in range((last_end - first) // INTERVAL)]
    # Ledger entries of any length (a catch-up job may ledger longer steps) that cover the grid.
    entries = store.ledger_range(spec.name, first - MAX_LEDGER_STEP, last_end)
    missing = [(s, e) for s, e in decision.intervals
               if not any(x.interval_start <= s and e <= x.interval_end for x in entries)]
    if missing:
        decision.reasons.append(f"{len(missing)} interval(s) not in the offload ledger: {_named(missing)}")
    watermark = store.get(spec.name)
    if watermark is None or watermark.watermark_ts < last_end:
        at = watermark.watermark_ts.isoformat() if watermark else "not set"
        decision.reasons.append(f"the watermark ({at}) has not passed the partition's last interval "
                                f"(ending {last_end.isoformat()})")
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=first, end=last_end,
                          detail=False, restrict=ColumnRange(key.column, partition.start, partition.end))
    failed = [(r.start, r.end) for r in report.intervals if not r.ok]
    if failed:
        worst = next(r for r in report.intervals if not r.ok)
        decision.reasons.append(
            f"{len(failed)} interval(s) differ between ClickHouse and Iceberg: {_named(failed)} "
            f"(first: ClickHouse {worst.clickhouse}, Iceberg {worst.iceberg})"
        )
    decision.reasons += report.notes
    decision.rows = sum(r.clickhouse.rows for r in report.intervals)
    decision.checksum = sum(r.clickhouse.checksum for r in report.intervals) % 2**64
    return decision


def plan_table(spec: TableSpec, *, ch_client: Any, catalog: Any, store: WatermarkStore,
               now: datetime | None = None) -> list[Decision]:
    """A decision per partition of the table, oldest first (read-only)."""
    now = now or datetime.now(timezone.utc)
    key = partition_key(ch_client, spec.name)
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, spec)}
    if key.column not in types:
        raise RetentionError(f"{spec.source} has no column {key.column!r}, {spec.name}'s partition column")
    return [decide(spec, p, key, ch_client=ch_client, catalog=catalog, store=store, types=types, now=now)
            for p in hot_partitions(ch_client, spec.name, key)]


RETIRING_SUFFIX = "__retiring"


def _fingerprint(client: Any, table: str, partition_id: str) -> tuple[int, int]:
    """(rows, sum of a hash of every column) of one partition, as stored."""
    rows, digest = client.query(
        f"SELECT count(), sum(cityHash64(*)) FROM {quote_identifier(table)} WHERE _partition_id = {{p:String}}",
        parameters={"p": partition_id},
    ).first_row
    return int(rows), int(digest or 0)


def _recover(client: Any, table: str, retiring: str, log: Callable[[str], None]) -> None:
    """Partitions a run left in the retiring table (it stopped between move and drop) go back."""
    left = client.query(
        "SELECT DISTINCT partition_id FROM system.parts WHERE database = currentDatabase() "
        "AND table = {t:String} AND active", parameters={"t": retiring}).result_rows
    for (partition_id,) in left:
        client.command(f"ALTER TABLE {quote_identifier(retiring)} MOVE PARTITION ID '{_part_name(partition_id)}' "
                       f"TO TABLE {quote_identifier(table)}")
        log(f"{table} partition {partition_id}: moved back from {retiring}, where an earlier run left it")


def apply_table(spec: TableSpec, *, ch_client: Any, catalog: Any, store: WatermarkStore, dsn: str,
                now: datetime | None = None, dry_run: bool = False,
                log: Callable[[str], None] = print) -> list[Decision]:
    """Drop the table's partitions that :func:`decide` allows, oldest first, stopping at the
    first one it keeps (the hot tier stays one contiguous range).

    Under the table's offload lock, with its merges stopped, per partition: fingerprint its
    rows as stored (count, sum of a hash of every column), decide (verify against Iceberg),
    fingerprint again - a change means an insert or mutation meanwhile: keep - then move the
    partition to ``<table>__retiring`` (atomic: rows inserted from then on go to the table),
    fingerprint it there and drop it there only when it is exactly what was verified; else
    move it back and keep it. A run stopped half-way leaves the partition in the retiring
    table, and the next run moves it back first."""
    now = now or datetime.now(timezone.utc)
    key = partition_key(ch_client, spec.name)
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, spec)}
    table, retiring = spec.name, spec.name + RETIRING_SUFFIX
    decisions: list[Decision] = []
    with offload_lock(dsn, spec.name, holder=f"retention {now:%Y-%m-%dT%H:%M:%SZ}", log=_Log(log)):
        ch_client.command(f"CREATE TABLE IF NOT EXISTS {quote_identifier(retiring)} AS {quote_identifier(table)}")
        _recover(ch_client, table, retiring, log)
        # The hot + cold view's boundary is where the hot tier starts (k2.hotcold)
        retired = store.retention_boundary(spec.name)
        hot_from = retired.hot_from if retired is not None else hotcold.EPOCH
        if not dry_run:
            hotcold.ensure_boundary_table(ch_client)
            if hotcold.boundary(ch_client, spec) != hot_from:
                hotcold.set_boundary(ch_client, spec, key.column, hot_from)
        view_ready = False
        ch_client.command(f"SYSTEM STOP MERGES {quote_identifier(table)}")
        try:
            for partition in hot_partitions(ch_client, table, key):
                before = _fingerprint(ch_client, table, partition.partition_id)
                decision = decide(spec, partition, key, ch_client=ch_client, catalog=catalog, store=store,
                                  types=types, now=now)
                decisions.append(decision)
                if decision.droppable and _fingerprint(ch_client, table, partition.partition_id) != before:
                    decision.reasons.append("the partition changed while it was verified (an insert or a "
                                            "mutation): kept, decided again on the next run")
                if not decision.droppable:
                    if not decision.young:
                        log(decision.line())
                    break
                if dry_run:
                    log(decision.line() + " (dry run: not dropped)")
                    continue
                part = _part_name(partition.partition_id)
                if not view_ready:
                    hotcold.create_view(ch_client, catalog, spec, key.column)
                    view_ready = True
                # Verified: the view reads the partition's rows from Iceberg before they leave
                hotcold.set_boundary(ch_client, spec, key.column, partition.end)
                ch_client.command(f"ALTER TABLE {quote_identifier(table)} MOVE PARTITION ID '{part}' "
                                  f"TO TABLE {quote_identifier(retiring)}")
                if _fingerprint(ch_client, retiring, partition.partition_id) != before:
                    ch_client.command(f"ALTER TABLE {quote_identifier(retiring)} MOVE PARTITION ID '{part}' "
                                      f"TO TABLE {quote_identifier(table)}")
                    hotcold.set_boundary(ch_client, spec, key.column, hot_from)
                    decision.reasons.append("rows arrived while the partition was being dropped: moved back "
                                            "and kept, decided again on the next run")
                    log(decision.line())
                    break
                ch_client.command(f"ALTER TABLE {quote_identifier(retiring)} DROP PARTITION ID '{part}'")
                store.record_retention(spec.name, partition.partition_id, key.column, partition.start,
                                       partition.end, decision.intervals_end, decision.rows, decision.checksum)
                hot_from = partition.end
                decision.dropped = True
                log(decision.line())
        finally:
            ch_client.command(f"SYSTEM START MERGES {quote_identifier(table)}")
    return decisions


def _part_name(name: str) -> str:
    """A partition id as system.parts gives it (checked: it is written into the statement)."""
    if not _PART.match(name):
        raise RetentionError(f"unexpected partition id {name!r}")
    return name


class _Log:
    """offload_lock's logger from a line printer."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log

    def info(self, message: str, *args: Any) -> None:
        self._log(message % args)
