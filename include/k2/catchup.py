"""Catch-up planning: which intervals one offload job takes. Pure functions, no I/O.

After an outage, catchup=True creates one DAG run per missed 15-minute interval. Starting
one Spark JVM per run costs ~20 s each, so the first scheduled run of a backlog offloads
its own interval *and* the complete intervals after it in one job (up to a cap); the runs
of those intervals then find them offloaded and skip Spark.

Only a scheduled run on its first try may batch or skip. A retry, a clear, a manual
trigger or a backfill re-offloads exactly its own interval: its user asked for that
interval to be written again, and the offload's MERGE makes doing so idempotent.

"Offloaded" is the caller's union of the ledger (PostgreSQL, durable) and the Iceberg
table's own snapshot summaries: a batch's intervals are committed in Iceberg before the
batch run's commit task ledgers them, and the next run of the table may start in between.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from k2.intervals import parse_utc

Interval = tuple[datetime, datetime]

SCHEDULED = "scheduled"
# Namespace of the per-table advisory locks, so they cannot collide with other users' keys.
_LOCK_NAMESPACE = "k2.offload:"


def _utc(value: datetime, what: str) -> datetime:
    return parse_utc(value, what)


def _run_type(run_type: Any) -> str:
    """DagRunType (a str enum) or its value -> the value."""
    return str(getattr(run_type, "value", run_type))


def may_batch(run_type: Any, try_number: int) -> bool:
    """True for a scheduled run's first try: it may skip or take following intervals."""
    return _run_type(run_type) == SCHEDULED and try_number == 1


def following(interval: Interval, count: int) -> Iterator[Interval]:
    """`count` intervals of the same length, the first being `interval` itself."""
    start, end = interval
    step = end - start
    for k in range(count):
        yield start + k * step, start + (k + 1) * step


@dataclass(frozen=True)
class CatchupPlan:
    """What the offload task does: nothing (``intervals`` empty: the own interval is already
    offloaded), or one job over ``intervals`` (contiguous, the own interval first)."""

    intervals: tuple[Interval, ...]
    reason: str

    @property
    def skip(self) -> bool:
        return not self.intervals

    @property
    def range(self) -> Interval:
        """[first start, last end) of the job."""
        if not self.intervals:
            raise ValueError("a skipped plan has no range")
        return self.intervals[0][0], self.intervals[-1][1]


def plan_offload(
    own: Interval,
    *,
    offloaded: Collection[Interval],
    hot_watermark: datetime | None,
    now: datetime,
    max_intervals: int,
    run_type: Any,
    try_number: int,
) -> CatchupPlan:
    """The intervals one offload job takes.

    :param own: the run's data interval [start, end).
    :param offloaded: intervals already offloaded (ledger and Iceberg, see the module doc).
    :param hot_watermark: max(completeness column) - allowed lateness in ClickHouse; None
        when unknown (empty table or query failed): nothing beyond the own interval.
    :param now: the current time; an interval that has not ended is never taken.
    :param max_intervals: the most intervals one job takes (tables.yaml max_intervals_per_job).
    :param run_type: the DAG run's run_type ("scheduled", "manual", "backfill", ...).
    :param try_number: the task instance's try number (1 on the first try).
    """
    start, end = _utc(own[0], "interval start"), _utc(own[1], "interval end")
    if end <= start:
        raise ValueError(f"interval end {end.isoformat()} is not after its start {start.isoformat()}")
    if max_intervals < 1:
        raise ValueError(f"max_intervals must be >= 1, got {max_intervals}")
    now = _utc(now, "now")
    own = (start, end)
    if not may_batch(run_type, try_number):
        why = (
            f"try {try_number}" if _run_type(run_type) == SCHEDULED else f"a {_run_type(run_type)} run"
        )
        return CatchupPlan((own,), f"{why}: re-offloads its own interval only")

    done = {(_utc(s, "offloaded start"), _utc(e, "offloaded end")) for s, e in offloaded}
    if own in done:
        return CatchupPlan((), "already offloaded")

    hot = None if hot_watermark is None else _utc(hot_watermark, "hot watermark")
    taken = [own]
    stop = f"the cap of {max_intervals} intervals per job"
    for interval in following(own, max_intervals):
        if interval == own:
            continue
        if interval[1] > now:
            stop = f"[{interval[0].isoformat()}, ...) has not ended"
            break
        if hot is None or interval[1] > hot:
            stop = f"[{interval[0].isoformat()}, ...) is not complete in ClickHouse"
            break
        if interval in done:
            stop = f"[{interval[0].isoformat()}, ...) is already offloaded"
            break
        taken.append(interval)
    return CatchupPlan(tuple(taken), f"{len(taken)} interval(s); stopped because {stop}")


def backlog(
    watermark: datetime,
    step: timedelta,
    *,
    hot_watermark: datetime | None,
    now: datetime,
    offloaded: Collection[Interval],
) -> int:
    """Complete intervals from the contiguous watermark on that are not offloaded yet.

    Complete = ended by ``now`` and by the hot watermark. Intervals start at the watermark
    and are ``step`` long (the DAG's schedule).
    """
    if step <= timedelta(0):
        raise ValueError(f"step must be positive, got {step}")
    if hot_watermark is None:
        return 0
    limit = min(_utc(hot_watermark, "hot watermark"), _utc(now, "now"))
    start = _utc(watermark, "watermark")
    if limit < start + step:
        return 0
    done = {_utc(s, "offloaded start") for s, _ in offloaded}
    due = (limit - start) // step
    return sum(1 for k in range(due) if start + k * step not in done)


def offload_lock_key(table: str) -> int:
    """The PostgreSQL advisory-lock key (signed 64-bit) that serializes offloads of a table.

    Derived from a hash of the name, not PostgreSQL's hashtext() (whose values may change
    between server versions), so every worker computes the same key.
    """
    if not table:
        raise ValueError("table name is empty")
    digest = hashlib.sha256((_LOCK_NAMESPACE + table).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_key_parts(key: int) -> tuple[int, int]:
    """(classid, objid) under which pg_locks shows a bigint advisory lock (objsubid = 1)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF
