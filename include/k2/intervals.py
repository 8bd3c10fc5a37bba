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


def split_range(start: datetime, end: datetime, step: timedelta | None = None, *,
                step_name: str = "step") -> list[tuple[datetime, datetime]]:
    """[start, end) as consecutive intervals of ``step``. None: 15 minutes, or the whole range
    as one interval when it is not a whole number of 15 minutes. ValueError when the range is
    not a whole number of steps."""
    if step is None:
        step = INTERVAL if (end - start) % INTERVAL == timedelta(0) else end - start
    if step <= timedelta(0):
        raise ValueError(f"{step_name} {step} must be positive")
    steps, remainder = divmod(end - start, step)
    if remainder:
        raise ValueError(f"[{start.isoformat()}, {end.isoformat()}) is {end - start}, not a whole "
                         f"number of {step_name} {step} steps")
    return [(start + i * step, start + (i + 1) * step) for i in range(steps)]


def parse_utc(value: datetime | str, what: str = "time", *, naive_is_utc: bool = False) -> datetime:
    """A time as an aware UTC datetime, from a datetime or ISO-8601 text (``Z`` allowed).

    The one parser of times the project reads (config, CLI options, task arguments, XCom,
    the Spark job's arguments, snapshot summaries). A time without a timezone is refused,
    naming ``what``, unless ``naive_is_utc`` (what ClickHouse and Airflow hand over naive
    is UTC).
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            raise ValueError(f"{what} {text!r} is not an ISO-8601 time like 2026-11-26T10:00:00Z") from None
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime or ISO-8601 text, got {type(value).__name__}")
    if value.tzinfo is None:
        if not naive_is_utc:
            raise ValueError(f"{what} {value.isoformat()} has no timezone (write it with Z for UTC)")
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)
