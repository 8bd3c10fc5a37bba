"""The watermark store: per-table contiguous high-water mark and the offload ledger, in PostgreSQL.

Two tables (created by :meth:`WatermarkStore.migrate`, never by hand):

``k2_watermarks``
    One row per table. ``watermark_ts`` is the contiguous high-water mark: every
    interval before it has been offloaded and ledgered. ``sequence_number`` is a
    version counter bumped on every advance; together they are the seed's
    ``(max_timestamp, sequence_number)`` pair, and the sequence is what a commit
    compares-and-sets.

``k2_offload_ledger``
    One row per offloaded interval ``[interval_start, interval_end)``: row count,
    order-independent checksum, Iceberg snapshot id, the Airflow run id that wrote
    it. Re-offloading an interval updates its row.

A commit (:meth:`WatermarkStore.commit_interval`) is one transaction: lock the
table's watermark row (``SELECT ... FOR UPDATE``, so two commits of one table
serialize), upsert the ledger row, then move the watermark to the end of the
contiguous run of ledgered intervals that starts at it. Intervals that finish out
of order are ledgered at once and swept into the watermark when the gap before
them closes, so the result does not depend on completion order.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from logging import Logger
from typing import TYPE_CHECKING, Any

from k2 import iceberg as ib
from k2.catchup import lock_key_parts, offload_lock_key
from k2.checksum import CHECKSUM_VERSION
from k2.intervals import first_interval_start, parse_utc

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)


def reoffload_command(table: str, interval_start: datetime) -> str:
    """The one command that offloads an interval again, e.g. after late rows (`k2 reoffload`:
    its Spark job replaces the interval in Iceberg and the ledger row is re-committed)."""
    start = interval_start.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"k2 reoffload --table {table} --interval-start {start}"

WATERMARKS_TABLE = "k2_watermarks"
LEDGER_TABLE = "k2_offload_ledger"
RETENTION_TABLE = "k2_hot_retention"
SCHEMA_VERSION_TABLE = "k2_schema_version"
# Serializes concurrent migrate() calls (two schedulers or test workers starting together).
_MIGRATION_LOCK_KEY = 0x6B32_5F77_6D  # "k2_wm"
# checksum numeric(20) holds any UInt64 (a ClickHouse sum of cityHash64 wraps at 2^64).
_MAX_CHECKSUM = 2**64 - 1


class WatermarkError(RuntimeError):
    """A watermark-store operation cannot be done as asked."""


class StaleWatermarkError(WatermarkError):
    """The watermark moved since it was read: re-read it and commit again (retryable)."""

    def __init__(self, table: str, expected: int, actual: int) -> None:
        super().__init__(
            f"watermark of {table!r} is at sequence {actual}, not the expected {expected}; "
            "another commit advanced it, re-read and retry"
        )
        self.table = table
        self.expected = expected
        self.actual = actual


class UnknownTableError(WatermarkError):
    """The table has no watermark row yet: call initialize() first."""


# Ordered migrations: (version, description, statements). Append only; never edit an applied one.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "watermarks and offload ledger",
        (
            f"""
            CREATE TABLE {WATERMARKS_TABLE} (
                table_name      text        PRIMARY KEY,
                watermark_ts    timestamptz NOT NULL,
                sequence_number bigint      NOT NULL DEFAULT 0 CHECK (sequence_number >= 0),
                updated_at      timestamptz NOT NULL DEFAULT now()
            )
            """,
            f"""
            CREATE TABLE {LEDGER_TABLE} (
                table_name     text          NOT NULL,
                interval_start timestamptz   NOT NULL,
                interval_end   timestamptz   NOT NULL,
                rows           bigint        NOT NULL CHECK (rows >= 0),
                checksum       numeric(20)   NOT NULL CHECK (checksum >= 0),
                snapshot_id    bigint,
                run_id         text          NOT NULL,
                committed_at   timestamptz   NOT NULL DEFAULT now(),
                PRIMARY KEY (table_name, interval_start),
                CHECK (interval_end > interval_start)
            )
            """,
        ),
    ),
    (
        2,
        "late rows already reported per ledgered interval",
        (
            f"""
            ALTER TABLE {LEDGER_TABLE} ADD COLUMN late_rows_reported bigint NOT NULL DEFAULT 0
                CHECK (late_rows_reported >= 0)
            """,
        ),
    ),
    (
        3,
        "hot-tier partitions dropped behind a verified offload",
        (
            f"""
            CREATE TABLE {RETENTION_TABLE} (
                table_name       text        NOT NULL,
                partition_id     text        NOT NULL,
                partition_column text        NOT NULL,
                range_start      timestamptz NOT NULL,
                range_end        timestamptz NOT NULL,
                intervals_end    timestamptz NOT NULL,
                rows             bigint      NOT NULL CHECK (rows >= 0),
                checksum         numeric(20) NOT NULL CHECK (checksum >= 0),
                dropped_at       timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (table_name, partition_id),
                CHECK (range_end > range_start)
            )
            """,
        ),
    ),
    (
        4,
        "which checksum definition each ledgered interval's checksum follows",
        (
            # intervals ledgered before: their checksums cover the unique key only
            f"""
            ALTER TABLE {LEDGER_TABLE} ADD COLUMN checksum_version smallint NOT NULL DEFAULT 1
                CHECK (checksum_version >= 1)
            """,
            # the checksum ClickHouse had when a change of the interval's rows was last reported
            f"ALTER TABLE {LEDGER_TABLE} ADD COLUMN late_checksum_reported numeric(20)",
        ),
    ),
)

# A re-commit that changes an interval's content (a re-offload took its late rows in) starts
# its late-row count again; an identical re-commit keeps what was already reported.
_SAME_CONTENT = (f"{LEDGER_TABLE}.rows = EXCLUDED.rows AND {LEDGER_TABLE}.checksum = EXCLUDED.checksum "
                 f"AND {LEDGER_TABLE}.checksum_version = EXCLUDED.checksum_version")
_LATE_ROWS_ON_RECOMMIT = f"""late_rows_reported = CASE WHEN {_SAME_CONTENT}
                        THEN {LEDGER_TABLE}.late_rows_reported ELSE 0 END,
                        late_checksum_reported = CASE WHEN {_SAME_CONTENT}
                        THEN {LEDGER_TABLE}.late_checksum_reported END"""
# One interval's ledger row, written or replaced (a commit, a re-offload, a repair).
_LEDGER_UPSERT = f"""
    INSERT INTO {LEDGER_TABLE}
        (table_name, interval_start, interval_end, rows, checksum, snapshot_id, run_id, checksum_version)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (table_name, interval_start) DO UPDATE SET
        interval_end = EXCLUDED.interval_end, rows = EXCLUDED.rows,
        checksum = EXCLUDED.checksum, snapshot_id = EXCLUDED.snapshot_id,
        run_id = EXCLUDED.run_id, checksum_version = EXCLUDED.checksum_version, committed_at = now(),
        {_LATE_ROWS_ON_RECOMMIT}
"""
# The ledger's columns as LedgerEntry holds them (_ledger_entry)
_LEDGER_COLUMNS = ("table_name, interval_start, interval_end, rows, checksum, snapshot_id, run_id, "
                   "committed_at, checksum_version")


@dataclass(frozen=True)
class Watermark:
    table_name: str
    watermark_ts: datetime
    sequence_number: int
    updated_at: datetime


@dataclass(frozen=True)
class LedgerEntry:
    table_name: str
    interval_start: datetime
    interval_end: datetime
    rows: int
    checksum: int
    snapshot_id: int | None
    run_id: str
    committed_at: datetime
    checksum_version: int = CHECKSUM_VERSION  # which definition `checksum` follows (k2.checksum)


def _ledger_entry(r: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(r[0], _utc(r[1]), _utc(r[2]), int(r[3]), int(r[4]), r[5], r[6], _utc(r[7]), int(r[8]))


@dataclass(frozen=True)
class RetentionBoundary:
    """Where a table's hot tier starts after retention dropped its oldest partitions: rows whose
    ``column`` is before ``hot_from`` live in Iceberg only; intervals that start before
    ``offloadable_from`` must never be offloaded again (ClickHouse no longer holds their rows)."""

    table_name: str
    column: str
    hot_from: datetime
    offloadable_from: datetime


@dataclass(frozen=True)
class CommitResult:
    """What a commit did. ``advanced`` is False for an idempotent or out-of-order commit."""

    table_name: str
    interval_start: datetime
    interval_end: datetime
    watermark_ts: datetime
    sequence_number: int
    previous_watermark_ts: datetime
    advanced: bool
    recommit: bool  # the interval was already below the watermark

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table_name,
            "interval_start": self.interval_start.isoformat(),
            "interval_end": self.interval_end.isoformat(),
            "watermark_ts": self.watermark_ts.isoformat(),
            "sequence_number": self.sequence_number,
            "previous_watermark_ts": self.previous_watermark_ts.isoformat(),
            "advanced": self.advanced,
            "recommit": self.recommit,
        }


@dataclass(frozen=True)
class TableStatus:
    """One line of `k2 watermark show`."""

    table_name: str
    watermark_ts: datetime
    sequence_number: int
    updated_at: datetime
    ledgered_intervals: int
    ledgered_rows: int
    last_committed_at: datetime | None
    # Ledgered intervals beyond the watermark: finished out of order, waiting for a gap to close.
    pending_intervals: int


def _utc(value: datetime, what: str = "timestamp") -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    return parse_utc(value, what)


def _contiguous_end(start: datetime, intervals: Sequence[tuple[datetime, datetime]]) -> datetime:
    """End of the run of intervals (sorted by start) that covers [start, end) without a gap."""
    end = start
    for interval_start, interval_end in intervals:
        if interval_start > end:
            break
        if interval_end > end:
            end = interval_end
    return end


@dataclass(frozen=True)
class _Commit:
    """One interval's figures to ledger (times already aware UTC)."""

    table: str
    start: datetime
    end: datetime
    rows: int
    checksum: int
    snapshot_id: int | None
    run_id: str

    def validate(self) -> None:
        if self.end <= self.start:
            raise ValueError(
                f"interval end {self.end.isoformat()} is not after its start {self.start.isoformat()}"
            )
        if self.rows < 0:
            raise ValueError(f"rows must be >= 0, got {self.rows}")
        if not 0 <= self.checksum <= _MAX_CHECKSUM:
            raise ValueError(f"checksum {self.checksum} is outside 0..2^64-1")
        if not self.run_id:
            raise ValueError("run_id is required")


class WatermarkStore:
    """Watermarks and ledger in one PostgreSQL database, reached through a libpq DSN.

    Every call opens its own connection, so one store may be shared by threads.
    """

    def __init__(self, dsn: str, *, connect_timeout: int = 10) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout

    def __repr__(self) -> str:  # the DSN may hold a password
        return "WatermarkStore(<dsn>)"

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        import psycopg

        with psycopg.connect(self._dsn, connect_timeout=self._connect_timeout) as conn:
            yield conn

    # Schema

    def migrate(self) -> list[int]:
        """Create or upgrade the schema; idempotent. Returns the versions applied by this call."""
        applied: list[int] = []
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            conn.execute(
                f"""
                CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} (
                    version     integer     PRIMARY KEY,
                    description text        NOT NULL,
                    applied_at  timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            done = {row[0] for row in conn.execute(f"SELECT version FROM {SCHEMA_VERSION_TABLE}")}
            for version, description, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    f"INSERT INTO {SCHEMA_VERSION_TABLE} (version, description) VALUES (%s, %s)",
                    (version, description),
                )
                applied.append(version)
        if applied:
            log.info("watermark store migrated to version %s", applied[-1])
        return applied

    def schema_version(self) -> int:
        """The highest applied migration, 0 for an empty database."""
        with self._connect() as conn:
            exists = conn.execute("SELECT to_regclass(%s)", (SCHEMA_VERSION_TABLE,)).fetchone()
            if not exists or exists[0] is None:
                return 0
            row = conn.execute(
                f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION_TABLE}"
            ).fetchone()
            return int(row[0]) if row else 0

    # Watermarks

    def initialize(self, table: str, start: datetime) -> Watermark:
        """Give a table its first watermark (its start_date); a table already known is left as is."""
        start = _utc(start, "start")
        with self._connect() as conn, conn.transaction():
            conn.execute(
                f"""
                INSERT INTO {WATERMARKS_TABLE} (table_name, watermark_ts, sequence_number)
                VALUES (%s, %s, 0)
                ON CONFLICT (table_name) DO NOTHING
                """,
                (table, start),
            )
            watermark = self._get(conn, table)
        assert watermark is not None
        return watermark

    def get(self, table: str) -> Watermark | None:
        with self._connect() as conn:
            return self._get(conn, table)

    @staticmethod
    def _get(
        conn: psycopg.Connection[Any], table: str, *, for_update: bool = False
    ) -> Watermark | None:
        lock = " FOR UPDATE" if for_update else ""
        row = conn.execute(
            f"SELECT table_name, watermark_ts, sequence_number, updated_at "
            f"FROM {WATERMARKS_TABLE} WHERE table_name = %s{lock}",
            (table,),
        ).fetchone()
        if row is None:
            return None
        return Watermark(row[0], _utc(row[1]), int(row[2]), _utc(row[3]))

    def commit_interval(
        self,
        table: str,
        start: datetime,
        end: datetime,
        rows: int,
        checksum: int | Decimal,
        snapshot_id: int | None,
        run_id: str,
        expected_sequence: int | None = None,
        *,
        attempts: int = 5,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> CommitResult:
        """Ledger one offloaded interval and advance the watermark, in one transaction.

        With ``expected_sequence``: one compare-and-set, StaleWatermarkError when the
        watermark's sequence is no longer that. Without: read the current sequence and
        commit, re-reading and retrying on StaleWatermarkError (at most ``attempts`` times,
        with jittered exponential backoff). UnknownTableError before :meth:`initialize`.
        """
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        commit = _Commit(table, _utc(start, "interval start"), _utc(end, "interval end"), rows,
                         int(checksum), snapshot_id, run_id)
        commit.validate()
        for attempt in range(1, (1 if expected_sequence is not None else attempts) + 1):
            if expected_sequence is not None:
                expected = expected_sequence
            else:
                current = self.get(table)
                if current is None:
                    raise UnknownTableError(f"table {table!r} has no watermark; initialize it first")
                expected = current.sequence_number
            try:
                return self._commit_once(commit, expected)
            except StaleWatermarkError as exc:
                if expected_sequence is not None or attempt == attempts:
                    raise
                delay = backoff * (2 ** (attempt - 1)) * (1 + random.random())
                log.warning("%s (attempt %s/%s); retrying in %.2fs", exc, attempt, attempts, delay)
                sleep(delay)
        raise AssertionError("unreachable")

    def _commit_once(self, c: _Commit, expected: int) -> CommitResult:
        table, start, end = c.table, c.start, c.end
        with self._connect() as conn, conn.transaction():
            current = self._get(conn, table, for_update=True)
            if current is None:
                raise UnknownTableError(f"table {table!r} has no watermark; initialize it first")
            if current.sequence_number != expected:
                raise StaleWatermarkError(table, expected, current.sequence_number)

            conn.execute(
                _LEDGER_UPSERT,
                (table, start, end, c.rows, Decimal(c.checksum), c.snapshot_id, c.run_id, CHECKSUM_VERSION)
            )

            recommit = end <= current.watermark_ts
            new_watermark = current.watermark_ts
            if not recommit:
                # Intervals that may extend the run: everything ending after the watermark.
                pending = conn.execute(
                    f"""
                    SELECT interval_start, interval_end FROM {LEDGER_TABLE}
                    WHERE table_name = %s AND interval_end > %s
                    ORDER BY interval_start
                    """,
                    (table, current.watermark_ts),
                ).fetchall()
                new_watermark = _contiguous_end(
                    current.watermark_ts, [(_utc(s), _utc(e)) for s, e in pending]
                )

            sequence = current.sequence_number
            advanced = new_watermark > current.watermark_ts
            if advanced:
                updated = conn.execute(
                    f"""
                    UPDATE {WATERMARKS_TABLE}
                    SET watermark_ts = %s, sequence_number = sequence_number + 1, updated_at = now()
                    WHERE table_name = %s AND sequence_number = %s
                    RETURNING sequence_number
                    """,
                    (new_watermark, table, expected),
                ).fetchone()
                if updated is None:  # unreachable under the row lock; kept as the CAS guard
                    raise StaleWatermarkError(table, expected, -1)
                sequence = int(updated[0])

        result = CommitResult(
            table_name=table,
            interval_start=start,
            interval_end=end,
            watermark_ts=new_watermark,
            sequence_number=sequence,
            previous_watermark_ts=current.watermark_ts,
            advanced=advanced,
            recommit=recommit,
        )
        log.info(
            "committed %s [%s, %s): watermark %s -> %s (sequence %s)%s",
            table,
            start.isoformat(),
            end.isoformat(),
            current.watermark_ts.isoformat(),
            new_watermark.isoformat(),
            sequence,
            " (re-commit)" if recommit else "",
        )
        return result

    def apply_repair(self, plan: RepairPlan) -> None:
        """Apply a RepairPlan: delete, re-ledger and set the watermark under the table's row lock."""
        table = plan.table_name
        with self._connect() as conn, conn.transaction():
            conn.execute(
                f"""
                INSERT INTO {WATERMARKS_TABLE} (table_name, watermark_ts, sequence_number)
                VALUES (%s, %s, 0) ON CONFLICT (table_name) DO NOTHING
                """,
                (table, plan.watermark_after),
            )
            self._get(conn, table, for_update=True)
            for entry in plan.drop:
                conn.execute(
                    f"DELETE FROM {LEDGER_TABLE} WHERE table_name = %s AND interval_start = %s",
                    (table, entry.interval_start),
                )
            for o in plan.reledger:
                conn.execute(
                    _LEDGER_UPSERT,
                    (table, o.interval_start, o.interval_end, o.rows, Decimal(o.checksum), o.snapshot_id,
                     o.run_id, o.checksum_version),
                )
            # Bump the sequence so an in-flight compare-and-set commit re-reads the repaired state.
            conn.execute(
                f"""
                UPDATE {WATERMARKS_TABLE}
                SET watermark_ts = %s, sequence_number = sequence_number + 1, updated_at = now()
                WHERE table_name = %s
                """,
                (plan.watermark_after, table),
            )
        for line in plan.describe():
            log.info("repair: %s", line)


    # Reading the ledger

    def ledger_tail(self, table: str, n: int = 10) -> list[LedgerEntry]:
        """The last n ledgered intervals of a table, newest first."""
        with self._connect() as conn:
            rows = conn.execute(
                f"""
                SELECT {_LEDGER_COLUMNS}
                FROM {LEDGER_TABLE} WHERE table_name = %s
                ORDER BY interval_start DESC LIMIT %s
                """,
                (table, n),
            ).fetchall()
        return [_ledger_entry(r) for r in rows]

    def ledger_entry(self, table: str, start: datetime) -> LedgerEntry | None:
        start = _utc(start, "interval start")
        with self._connect() as conn:
            r = conn.execute(
                f"""
                SELECT {_LEDGER_COLUMNS}
                FROM {LEDGER_TABLE} WHERE table_name = %s AND interval_start = %s
                """,
                (table, start),
            ).fetchone()
        return None if r is None else _ledger_entry(r)

    def ledger_all(self, table: str) -> list[LedgerEntry]:
        """Every ledgered interval of a table, oldest first."""
        return self.ledger_range(
            table, datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(9999, 1, 1, tzinfo=timezone.utc)
        )

    def ledger_range(self, table: str, start: datetime, end: datetime) -> list[LedgerEntry]:
        """The ledgered intervals of a table that start in [start, end), oldest first."""
        start, end = _utc(start, "range start"), _utc(end, "range end")
        with self._connect() as conn:
            rows = conn.execute(
                f"""
                SELECT {_LEDGER_COLUMNS}
                FROM {LEDGER_TABLE}
                WHERE table_name = %s AND interval_start >= %s AND interval_start < %s
                ORDER BY interval_start
                """,
                (table, start, end),
            ).fetchall()
        return [_ledger_entry(r) for r in rows]

    def record_retention(self, table: str, partition_id: str, column: str, range_start: datetime,
                         range_end: datetime, intervals_end: datetime, rows: int, checksum: int) -> None:
        """Record a hot-tier partition dropped after its verification (figures as verified)."""
        with self._connect() as conn:
            conn.execute(
                f"""
                INSERT INTO {RETENTION_TABLE} (table_name, partition_id, partition_column, range_start,
                    range_end, intervals_end, rows, checksum) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (table_name, partition_id) DO UPDATE SET rows = {RETENTION_TABLE}.rows + EXCLUDED.rows,
                    checksum = mod({RETENTION_TABLE}.checksum + EXCLUDED.checksum, 18446744073709551616),
                    intervals_end = GREATEST({RETENTION_TABLE}.intervals_end, EXCLUDED.intervals_end),
                    dropped_at = now()
                """,
                (table, partition_id, column, _utc(range_start), _utc(range_end), _utc(intervals_end),
                 rows, Decimal(checksum % 2**64)),
            )

    def retention_boundary(self, table: str) -> RetentionBoundary | None:
        """None while retention has dropped nothing of the table (or never ran here)."""
        with self._connect() as conn:
            if conn.execute("SELECT to_regclass(%s)", (RETENTION_TABLE,)).fetchone()[0] is None:
                return None  # a store not migrated to version 3 yet: nothing was retired
            row = conn.execute(
                f"""
                SELECT partition_column, max(range_end), max(intervals_end) FROM {RETENTION_TABLE}
                WHERE table_name = %s GROUP BY partition_column
                """,
                (table,),
            ).fetchone()
        return None if row is None else RetentionBoundary(table, row[0], _utc(row[1]), _utc(row[2]))

    def note_late_rows(
        self, table: str, late: Mapping[tuple[datetime, datetime], int]
    ) -> dict[tuple[datetime, datetime], int]:
        """Record how many late rows each ledgered interval has now; return, per interval, how
        many of them were not reported before (0 for rows already counted by an earlier check,
        so a metric fed from this counts each late row once). Intervals not in the ledger are
        left out."""
        fresh: dict[tuple[datetime, datetime], int] = {}
        with self._connect() as conn, conn.transaction():
            for (start, end), count in sorted(late.items()):
                if count < 0:
                    raise ValueError(f"late rows of {table} [{start}, {end}) must be >= 0, got {count}")
                key = (table, _utc(start, "interval start"))
                row = conn.execute(
                    f"SELECT late_rows_reported FROM {LEDGER_TABLE} "
                    "WHERE table_name = %s AND interval_start = %s FOR UPDATE",
                    key,
                ).fetchone()
                if row is None:
                    continue
                reported = int(row[0])
                if count > reported:
                    conn.execute(
                        f"UPDATE {LEDGER_TABLE} SET late_rows_reported = %s "
                        "WHERE table_name = %s AND interval_start = %s",
                        (count, *key),
                    )
                fresh[(start, end)] = max(0, count - reported)
        return fresh

    def note_late_changes(self, table: str, changed: Mapping[tuple[datetime, datetime], int]
                          ) -> set[tuple[datetime, datetime]]:
        """Record, per ledgered interval whose rows changed since the offload, ClickHouse's
        checksum now; return the intervals whose change was not reported before (the same
        change found again by a later commit's check is not). Intervals not in the ledger
        are left out."""
        fresh: set[tuple[datetime, datetime]] = set()
        with self._connect() as conn, conn.transaction():
            for (start, end), checksum in sorted(changed.items()):
                updated = conn.execute(
                    f"UPDATE {LEDGER_TABLE} SET late_checksum_reported = %s "
                    "WHERE table_name = %s AND interval_start = %s "
                    "AND late_checksum_reported IS DISTINCT FROM %s",
                    (Decimal(checksum), table, _utc(start, "interval start"), Decimal(checksum)),
                )
                if updated.rowcount:
                    fresh.add((start, end))
        return fresh

    def status(self, tables: Sequence[str] | None = None) -> list[TableStatus]:
        """Watermark and ledger summary per table (all known tables when none are named)."""
        with self._connect() as conn:
            rows = conn.execute(
                f"""
                SELECT w.table_name, w.watermark_ts, w.sequence_number, w.updated_at,
                       count(l.interval_start),
                       coalesce(sum(l.rows), 0),
                       max(l.committed_at),
                       count(l.interval_start) FILTER (WHERE l.interval_start >= w.watermark_ts)
                FROM {WATERMARKS_TABLE} w
                LEFT JOIN {LEDGER_TABLE} l ON l.table_name = w.table_name
                WHERE %(all)s OR w.table_name = ANY(%(names)s)
                GROUP BY w.table_name, w.watermark_ts, w.sequence_number, w.updated_at
                ORDER BY w.table_name
                """,
                {"all": tables is None, "names": list(tables or [])},
            ).fetchall()
        return [
            TableStatus(
                table_name=r[0],
                watermark_ts=_utc(r[1]),
                sequence_number=int(r[2]),
                updated_at=_utc(r[3]),
                ledgered_intervals=int(r[4]),
                ledgered_rows=int(r[5]),
                last_committed_at=_utc(r[6]) if r[6] is not None else None,
                pending_intervals=int(r[7]),
            )
            for r in rows
        ]


def format_status(rows: Sequence[TableStatus], *, now: datetime | None = None) -> str:
    """A plain-text table for `k2 watermark show`: watermark, lag, sequence, ledger counts."""
    now = _utc(now) if now else datetime.now(timezone.utc)
    header = f"{'table':<24} {'watermark (UTC)':<20} {'lag':>10} {'seq':>6} {'intervals':>9} {'rows':>12} {'pending':>7}"
    lines = [header]
    for r in rows:
        lag = now - r.watermark_ts
        lag_text = f"{int(lag.total_seconds() // 60)}m" if lag.total_seconds() >= 0 else "-"
        lines.append(
            f"{r.table_name:<24} {r.watermark_ts.strftime('%Y-%m-%d %H:%M:%S'):<20} {lag_text:>10} "
            f"{r.sequence_number:>6} {r.ledgered_intervals:>9} {r.ledgered_rows:>12} {r.pending_intervals:>7}"
        )
    return "\n".join(lines)


# Repair: rebuild the ledger and the watermark from what the Iceberg table itself records.


@dataclass(frozen=True)
class TableOffload:
    """One interval as the Iceberg table records it (the newest offload snapshot's summary)."""

    interval_start: datetime
    interval_end: datetime
    rows: int
    checksum: int
    snapshot_id: int
    run_id: str
    committed_at: datetime
    checksum_version: int = CHECKSUM_VERSION  # the summary's k2.checksum-version (absent: 1)


@dataclass(frozen=True)
class RepairPlan:
    """What `k2 watermark repair` changes for one table."""

    table_name: str
    watermark_before: datetime | None
    watermark_after: datetime
    # Intervals Iceberg holds whose ledger row is missing or names another snapshot/figures.
    reledger: tuple[TableOffload, ...]
    # Ledger rows of intervals Iceberg's retained history does not hold.
    drop: tuple[LedgerEntry, ...]

    @property
    def changed(self) -> bool:
        return bool(self.reledger or self.drop) or self.watermark_before != self.watermark_after

    def describe(self) -> list[str]:
        def span(start: datetime, end: datetime) -> str:
            return f"[{start.isoformat()}, {end.isoformat()})"

        lines = []
        before = self.watermark_before.isoformat() if self.watermark_before else "none"
        if self.watermark_before != self.watermark_after:
            lines.append(f"{self.table_name}: watermark {before} -> {self.watermark_after.isoformat()}")
        for o in self.reledger:
            lines.append(
                f"{self.table_name}: ledger {span(o.interval_start, o.interval_end)} from snapshot "
                f"{o.snapshot_id} (rows={o.rows}, run={o.run_id})"
            )
        for e in self.drop:
            lines.append(
                f"{self.table_name}: drop ledger row {span(e.interval_start, e.interval_end)} "
                f"(not in the Iceberg table; was snapshot {e.snapshot_id}, run={e.run_id})"
            )
        if not lines:
            lines.append(f"{self.table_name}: consistent, watermark {before}; nothing to change")
        return lines


def plan_repair(
    table: str,
    start_date: datetime,
    watermark: Watermark | None,
    ledger: Sequence[LedgerEntry],
    offloads: Sequence[TableOffload],
    *,
    history_since: datetime | None,
) -> RepairPlan:
    """Make the ledger say what the Iceberg table says, and the watermark follow the ledger.

    ``offloads`` are the intervals of the offload snapshots still in the table's history
    (newest per interval). ``history_since`` is the commit time of the oldest snapshot
    still in that history: a ledger row committed before it cannot be contradicted (its
    snapshot may simply have been expired), so it is kept; a newer one that Iceberg does
    not hold is dropped. The watermark becomes the end of the contiguous run of ledgered
    intervals from ``start_date`` (never before ``start_date``).
    """
    start_date = _utc(start_date, "start_date")
    by_start = {e.interval_start: e for e in ledger}
    reledger = []
    for o in sorted(offloads, key=lambda o: o.interval_start):
        entry = by_start.get(o.interval_start)
        if entry is None or (entry.interval_end, entry.rows, entry.checksum, entry.snapshot_id) != (
            o.interval_end, o.rows, o.checksum, o.snapshot_id
        ):
            reledger.append(o)
    held = {o.interval_start for o in offloads}
    drop = [
        e
        for e in sorted(ledger, key=lambda e: e.interval_start)
        if e.interval_start not in held and (history_since is None or e.committed_at >= history_since)
    ]
    dropped = {e.interval_start for e in drop}
    kept: dict[datetime, datetime] = {
        e.interval_start: e.interval_end for e in ledger if e.interval_start not in dropped
    }
    kept.update({o.interval_start: o.interval_end for o in offloads})
    after = _contiguous_end(start_date, sorted(kept.items()))
    return RepairPlan(
        table_name=table,
        watermark_before=watermark.watermark_ts if watermark else None,
        watermark_after=after,
        reledger=tuple(reledger),
        drop=tuple(drop),
    )


def table_offloads(catalog: Any, spec: Any) -> tuple[list[TableOffload], datetime | None]:
    """The offload snapshots still in the main branch's history of ``spec``'s Iceberg table
    (newest per interval) and the commit time of the oldest snapshot in that history.
    ([], None) when the table does not exist or has no snapshot."""
    from pyiceberg.exceptions import NoSuchTableError
    from pyiceberg.table.snapshots import ancestors_of

    try:
        iceberg_table = catalog.load_table(spec.iceberg_table)
    except NoSuchTableError:
        return [], None
    current = iceberg_table.current_snapshot()
    if current is None:
        return [], None
    found: dict[datetime, TableOffload] = {}
    oldest_ms = current.timestamp_ms
    for snapshot in ancestors_of(current, iceberg_table.metadata):
        oldest_ms = min(oldest_ms, snapshot.timestamp_ms)
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        for offload in ib.offload_snapshots_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms,
                                                         summary):
            if offload.interval_start in found:  # newest first wins
                continue
            found[offload.interval_start] = TableOffload(
                interval_start=offload.interval_start,
                interval_end=offload.interval_end,
                rows=offload.rows,
                checksum=offload.checksum,
                snapshot_id=offload.snapshot_id,
                run_id=offload.run_id or "k2-watermark-repair",
                committed_at=offload.committed_at,
                checksum_version=offload.checksum_version,
            )
    return sorted(found.values(), key=lambda o: o.interval_start), datetime.fromtimestamp(
        oldest_ms / 1000, tz=timezone.utc
    )


def repair_table(
    store: WatermarkStore,
    catalog: Any,
    spec: Any,
    *,
    dry_run: bool = False,
) -> RepairPlan:
    """Plan (and unless ``dry_run`` apply, in one transaction) the repair of one table."""
    offloads, history_since = table_offloads(catalog, spec)
    store.migrate()
    ledger = store.ledger_all(spec.name)
    if history_since is None and ledger:
        # More likely a wrong catalog than a lost table: do not wipe the ledger on that evidence.
        raise WatermarkError(
            f"{spec.iceberg_table} is missing or has no snapshot, yet {spec.name} has {len(ledger)} "
            "ledger rows; check the Iceberg catalog settings before repairing"
        )

    plan = plan_repair(
        spec.name,
        first_interval_start(spec.start_date),
        store.get(spec.name),
        ledger,
        offloads,
        history_since=history_since,
    )
    if not dry_run and plan.changed:
        store.apply_repair(plan)
    return plan


# --------------------------------------------------------------------------------------
# The per-table offload lock


@contextmanager
def offload_lock(
    dsn: str,
    table: str,
    *,
    holder: str,
    log: Logger,
    poll_interval: float = 5.0,
    report_every: float = 60.0,
) -> Iterator[None]:
    """Hold the table's PostgreSQL advisory lock (a session lock) for the block.

    Offloads of one table never overlap: they would conflict in Iceberg's optimistic
    commits, and a catching-up batch must not be planned while another one runs. The lock
    lives as long as its connection, so a task that is killed - or whose host vanishes
    (server-side TCP keepalives below) - releases it. While another session holds it, this
    polls with pg_try_advisory_lock and logs who holds it; the wait is bounded by the task's
    execution_timeout like any other step.
    """
    import psycopg  # psycopg is imported on use throughout this module

    key = offload_lock_key(table)
    classid, objid = lock_key_parts(key)
    conn = psycopg.connect(dsn, autocommit=True, application_name=f"k2 offload {holder}"[:63])
    try:
        # A vanished worker's session (and lock) is dropped after ~2 min instead of ~2 h.
        conn.execute("SET tcp_keepalives_idle = 60")
        conn.execute("SET tcp_keepalives_interval = 10")
        conn.execute("SET tcp_keepalives_count = 6")
        waited_since = time.monotonic()
        reported = None
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            now = time.monotonic()
            if reported is None or now - reported >= report_every:
                reported = now
                row = conn.execute(
                    """
                    SELECT a.application_name, a.pid, a.backend_start, a.client_addr
                    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s
                      AND l.objid = %s AND l.objsubid = 1
                    """,
                    (classid, objid),
                ).fetchone()
                who = (
                    f"{row[0] or 'a session'} (PostgreSQL pid {row[1]}, connected {row[2]:%Y-%m-%d %H:%M:%S%z}"
                    f"{f' from {row[3]}' if row[3] else ''})"
                    if row
                    else "another session"
                )
                log.info(
                    "waiting for the offload lock of %s, held by %s: offloads of one table run "
                    "one at a time (waited %.0f s so far)",
                    table,
                    who,
                    now - waited_since,
                )
            time.sleep(poll_interval)
        if reported is not None:
            log.info(
                "got the offload lock of %s after %.0f s", table, time.monotonic() - waited_since
            )
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()
