"""Sensor: wait until ClickHouse holds every row of the run's interval (its watermark passed the target)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

from k2 import metrics
from k2.intervals import parse_utc
from k2_provider.hooks.clickhouse import K2ClickHouseHook
from k2_provider.triggers.clickhouse_watermark import ClickHouseWatermarkTrigger, is_unreachable

if TYPE_CHECKING:
    from airflow.sdk import Context


def _parse_target(value: datetime | str) -> datetime:
    return parse_utc(value, "target")


class ClickHouseWatermarkSensor(BaseSensorOperator):
    """
    Wait until ``max(column) - lateness`` of a ClickHouse table reaches ``target``.

    With ``deferrable=True`` (the default) the sensor checks once on the worker (a
    catching-up run whose data is already there finishes at once) and then defers to
    :class:`~k2_provider.triggers.clickhouse_watermark.ClickHouseWatermarkTrigger`,
    holding no worker slot. Otherwise it pokes in ``reschedule`` mode. Either way,
    after ``timeout`` it fails (no retry) with a message naming the table, the last
    watermark and the target, because a watermark that does not move means the feed
    has stopped. A ClickHouse that cannot be reached (refused, reset, timed out) is waited
    for the same way: each failed check logs a warning and the sensor keeps checking until
    ``timeout``, whose message then names the last error. Returns the watermark that passed
    (ISO string, to XCom). Every check sends the table's newest event time as ``k2_hot_max_event_timestamp_seconds``
    (:mod:`k2.metrics`; a failed send is logged, never fails the task).

    :param table: table whose max event time is the watermark (templated; a plain identifier).
    :param column: its event-time column (templated; a plain identifier).
    :param lateness: allowed lateness subtracted from max(column) (timedelta or seconds).
    :param target: time the watermark must reach (templated); default the run's
        ``data_interval_end``.
    :param clickhouse_conn_id: the ClickHouse connection id.
    :param deferrable: defer to the triggerer instead of rescheduling pokes.
    :param poke_interval: seconds between checks.
    :param timeout: seconds after which the sensor fails with "feed looks stopped".
    """

    template_fields: Sequence[str] = ("table", "column", "target")
    ui_color = "#fff4b3"

    def __init__(
        self,
        *,
        table: str,
        column: str,
        lateness: timedelta | float = timedelta(0),
        target: datetime | str = "{{ data_interval_end | ts }}",
        clickhouse_conn_id: str = K2ClickHouseHook.default_conn_name,
        deferrable: bool = True,
        poke_interval: timedelta | float = 30,
        timeout: timedelta | float = timedelta(hours=1),
        **kwargs: Any,
    ) -> None:
        if not deferrable:
            kwargs.setdefault("mode", "reschedule")
        super().__init__(poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.table = table
        self.column = column
        self.lateness = lateness if isinstance(lateness, timedelta) else timedelta(seconds=lateness)
        self.target = target
        self.clickhouse_conn_id = clickhouse_conn_id
        self.deferrable = deferrable
        self._last_watermark: datetime | None = None
        self._last_error: str | None = None

    def _hook(self) -> K2ClickHouseHook:
        return K2ClickHouseHook(clickhouse_conn_id=self.clickhouse_conn_id)

    def _stopped_message(
        self,
        target: datetime,
        watermark: datetime | str | None,
        error: str | None = None,
        failing_since: str | None = None,
    ) -> str:
        if isinstance(watermark, datetime):
            watermark = watermark.isoformat()
        if error:
            return (
                f"ClickHouse could not be queried for {self.table!r} "
                f"{f'since {failing_since} ' if failing_since else ''}until the sensor's timeout "
                f"of {timedelta(seconds=self.timeout)}: {error}. The last watermark seen was "
                f"{watermark or 'none'}, target {target.isoformat()}. Check that ClickHouse is up "
                "and reachable from the triggerer and workers (the clickhouse_default connection)."
            )
        return (
            f"ClickHouse feed for {self.table!r} looks stopped: its watermark "
            f"(max({self.column}) - {self.lateness}) is {watermark or 'empty (no rows)'}, "
            f"still before the target {target.isoformat()} after {timedelta(seconds=self.timeout)}. "
            "Check the feed handlers and ClickHouse inserts; see the runbook in the DAG docs."
        )

    def _emit_hot_max_event_time(self, watermark: datetime | str | None) -> None:
        """k2_hot_max_event_timestamp_seconds of the watched table (watermark + lateness)."""
        if watermark is None:
            return

        if isinstance(watermark, str):
            watermark = _parse_target(watermark)
        metrics.emit_safely(
            metrics.set_hot_max_event_time, self.table, watermark + self.lateness, log=self.log
        )

    def poke(self, context: Context) -> bool | PokeReturnValue:
        target = _parse_target(self.target)
        hook = self._hook()
        try:
            watermark = hook.watermark(self.table, self.column, self.lateness)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            # An outage that may pass: keep checking until the timeout, as for a stalled feed.
            self._last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning(
                "ClickHouse unreachable, watermark check on %s failed: %s; checking again "
                "until the sensor's timeout",
                self.table,
                self._last_error,
            )
            return False
        finally:
            hook.close()
        self._last_watermark = watermark
        self._last_error = None
        self._emit_hot_max_event_time(watermark)
        self.log.info(
            "%s watermark %s, target %s",
            self.table,
            watermark.isoformat() if watermark else None,
            target.isoformat(),
        )
        if watermark is not None and watermark >= target:
            return PokeReturnValue(is_done=True, xcom_value=watermark.isoformat())
        return False

    def execute(self, context: Context) -> Any:
        target = _parse_target(self.target)
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as exc:
                message = self._stopped_message(target, self._last_watermark, self._last_error)
                self.log.error(message)
                raise AirflowSensorTimeout(message) from exc

        # One check on the worker first: a catching-up run whose data is there needs no trigger.
        try:
            done = self.poke(context)
        except Exception as exc:  # the trigger retries failed queries and reports the lasting ones
            self.log.warning("watermark check on %s failed, deferring: %s", self.table, exc)
            done = False
        if done:
            return done.xcom_value if isinstance(done, PokeReturnValue) else None
        timeout_at = datetime.now(timezone.utc) + timedelta(seconds=self.timeout)
        self.defer(
            trigger=ClickHouseWatermarkTrigger(
                table=self.table,
                column=self.column,
                target=target,
                lateness_seconds=self.lateness.total_seconds(),
                clickhouse_conn_id=self.clickhouse_conn_id,
                poke_interval=self.poke_interval,
                timeout_at=timeout_at,
            ),
            method_name="execute_complete",
            # Backstop only: the trigger reports its own timeout with the watermark it saw.
            timeout=timedelta(seconds=self.timeout + 2 * self.poke_interval + 60),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> str | None:
        if not event:
            raise AirflowException(f"watermark trigger for {self.table!r} ended without an event")
        status = event.get("status")
        try:
            self._emit_hot_max_event_time(event.get("watermark"))
        except ValueError as exc:  # a malformed watermark in the event is reported below
            self.log.warning("watermark in the trigger event is unreadable: %s", exc)
        if status == "complete":
            self.log.info(
                "%s watermark %s passed %s", self.table, event.get("watermark"), event.get("target")
            )
            return event.get("watermark")
        if status == "timeout":
            message = self._stopped_message(
                _parse_target(event["target"]),
                event.get("watermark"),
                event.get("error"),
                event.get("failing_since"),
            )
            self.log.error(message)
            raise AirflowSensorTimeout(message)
        if status == "error":
            raise AirflowException(
                f"watermark check on {self.table!r} failed: {event.get('message')}"
            )
        raise AirflowException(f"unexpected event from the watermark trigger: {event!r}")
