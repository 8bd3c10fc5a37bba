"""The interval grid: every table is offloaded in 15-minute intervals [start, end) aligned
to the UNIX epoch (UTC), the DAGs' schedule. The one place for the grid's arithmetic."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

INTERVAL = timedelta(minutes=15)
# The DAGs' schedule: one run per interval.
SCHEDULE_CRON = "*/15 * * * *"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def floor_interval(moment: datetime) -> datetime:
    """The start of the interval holding `moment` (the last boundary at or before it)."""
    return EPOCH + ((moment.astimezone(timezone.utc) - EPOCH) // INTERVAL) * INTERVAL


def is_boundary(moment: datetime) -> bool:
    return (moment.astimezone(timezone.utc) - EPOCH) % INTERVAL == timedelta(0)


def first_interval_start(start_date: datetime) -> datetime:
    """The first boundary at or after start_date: where a table's first interval begins."""
    start = floor_interval(start_date)
    return start if start == start_date else start + INTERVAL


def last_interval_start(end_date: datetime | None) -> datetime | None:
    """The start of the last interval that ends at or before end_date (None: no end)."""
    if end_date is None:
        return None
    return floor_interval(end_date) - INTERVAL
