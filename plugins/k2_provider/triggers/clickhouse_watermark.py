"""Trigger that waits, in the triggerer, until a ClickHouse table's watermark reaches a target time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from k2 import metrics
from k2.intervals import parse_utc
from k2_provider.hooks.clickhouse import K2ClickHouseHook


def _aware(value: datetime | str, name: str) -> datetime:
    return parse_utc(value, name)


def is_unreachable(exc: BaseException) -> bool:
    """True when ClickHouse could not be reached (refused, reset, timed out): an outage that
    may pass. False for an error the server reported (unknown table, bad credentials)."""
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, socket errors
        return True
    try:
        from clickhouse_connect.driver.exceptions import OperationalError
    except ImportError:
        return False
    # clickhouse-connect raises OperationalError for network failures; server errors are
    # DatabaseError.
    return isinstance(exc, OperationalError)


class ClickHouseWatermarkTrigger(BaseTrigger):
    """
    Poll ``max(column) - lateness`` of a ClickHouse table until it reaches ``target``.

    clickhouse-connect is synchronous, so every query runs in a worker thread
    (``asyncio.to_thread``): the triggerer's event loop, shared by all triggers, never
    waits on ClickHouse. Only the connection id is serialized, never credentials. Every
    successful query sends the table's newest event time as
    ``k2_hot_max_event_timestamp_seconds`` (:mod:`k2.metrics`) from the triggerer.

    Events (one, then the trigger ends):

    - ``{"status": "complete", "watermark": iso, "target": iso}``
    - ``{"status": "timeout", "watermark": iso | None, "target": iso, "table": ...}`` at
      ``timeout_at``; while queries are failing it also holds ``error`` (the last one) and
      ``failing_since`` (iso)
    - ``{"status": "error", "message": ..., "target": iso, "table": ...}`` after
      ``max_consecutive_errors`` failed queries in a row

    A ClickHouse that cannot be reached (connection refused or reset, timeout) is an outage
    that may pass, like a stalled feed: with a ``timeout_at`` the trigger logs a warning per
    failed query and keeps polling until then, so a restart of ClickHouse does not fail the
    runs waiting on it. Errors the server reports (unknown table, bad credentials), and every
    error when there is no ``timeout_at``, end with an ``error`` event after
    ``max_consecutive_errors`` in a row.

    :param table: ClickHouse table whose max event time is the watermark (a plain identifier).
    :param column: its event-time column (a plain identifier).
    :param target: time the watermark must reach (aware datetime or ISO string).
    :param lateness_seconds: allowed lateness subtracted from max(column).
    :param clickhouse_conn_id: the ClickHouse connection id.
    :param poke_interval: seconds between queries.
    :param timeout_at: when to give up with a ``timeout`` event (None: never).
    :param max_consecutive_errors: failed queries in a row before an ``error`` event (see
        above for an unreachable ClickHouse).
    """

    def __init__(
        self,
        *,
        table: str,
        column: str,
        target: datetime | str,
        lateness_seconds: float = 0.0,
        clickhouse_conn_id: str = K2ClickHouseHook.default_conn_name,
        poke_interval: float = 30.0,
        timeout_at: datetime | str | None = None,
        max_consecutive_errors: int = 5,
    ) -> None:
        super().__init__()
        self.table = table
        self.column = column
        self.target = _aware(target, "target")
        self.lateness_seconds = float(lateness_seconds)
        self.clickhouse_conn_id = clickhouse_conn_id
        self.poke_interval = float(poke_interval)
        self.timeout_at = None if timeout_at is None else _aware(timeout_at, "timeout_at")
        self.max_consecutive_errors = int(max_consecutive_errors)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "table": self.table,
                "column": self.column,
                "target": self.target.isoformat(),
                "lateness_seconds": self.lateness_seconds,
                "clickhouse_conn_id": self.clickhouse_conn_id,
                "poke_interval": self.poke_interval,
                "timeout_at": None if self.timeout_at is None else self.timeout_at.isoformat(),
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "table": self.table,
                "column": self.column,
                "target": self.target.isoformat(),
                **fields,
            }
        )

    def _emit_hot_max_event_time(self, watermark: datetime | None, lateness: timedelta) -> None:
        """k2_hot_max_event_timestamp_seconds from the triggerer (a UDP send: does not block)."""
        if watermark is None:
            return

        metrics.emit_safely(
            metrics.set_hot_max_event_time, self.table, watermark + lateness, log=self.log
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = K2ClickHouseHook(clickhouse_conn_id=self.clickhouse_conn_id)
        lateness = timedelta(seconds=self.lateness_seconds)
        watermark: datetime | None = None
        errors = 0
        failing_since: datetime | None = None
        last_error: str | None = None
        try:
            while True:
                try:
                    watermark = await asyncio.to_thread(
                        hook.watermark, self.table, self.column, lateness
                    )
                except Exception as exc:
                    errors += 1
                    failing_since = failing_since or datetime.now(timezone.utc)
                    last_error = f"{type(exc).__name__}: {exc}"
                    # The next query builds a fresh client: a restarted server knows no old session.
                    await asyncio.to_thread(hook.close)
                    if self.timeout_at is not None and is_unreachable(exc):
                        self.log.warning(
                            "ClickHouse unreachable: watermark query on %s failed (%s in a row, "
                            "since %s): %s; polling again in %ss until %s",
                            self.table,
                            errors,
                            failing_since.isoformat(),
                            last_error,
                            self.poke_interval,
                            self.timeout_at.isoformat(),
                        )
                    else:
                        self.log.warning(
                            "watermark query on %s failed (%s/%s): %s",
                            self.table,
                            errors,
                            self.max_consecutive_errors,
                            last_error,
                        )
                        if errors >= self.max_consecutive_errors:
                            yield self._event("error", message=last_error)
                            return
                else:
                    if errors:
                        self.log.info(
                            "watermark query on %s works again after %s failed (since %s)",
                            self.table,
                            errors,
                            failing_since.isoformat() if failing_since else None,
                        )
                    errors, failing_since, last_error = 0, None, None
                    self._emit_hot_max_event_time(watermark, lateness)
                    if watermark is not None and watermark >= self.target:
                        self.log.info(
                            "%s watermark %s reached %s",
                            self.table,
                            watermark.isoformat(),
                            self.target.isoformat(),
                        )
                        yield self._event("complete", watermark=watermark.isoformat())
                        return
                    self.log.info(
                        "%s watermark %s is before %s; next check in %ss",
                        self.table,
                        watermark.isoformat() if watermark else None,
                        self.target.isoformat(),
                        self.poke_interval,
                    )
                if self.timeout_at is not None and datetime.now(timezone.utc) >= self.timeout_at:
                    failing = (
                        {"error": last_error, "failing_since": failing_since.isoformat()}
                        if last_error and failing_since
                        else {}
                    )
                    yield self._event(
                        "timeout", watermark=watermark.isoformat() if watermark else None, **failing
                    )
                    return
                await asyncio.sleep(self.poke_interval)
        finally:
            hook.close()
