"""ClickHouseWatermarkTrigger (serialization, polling without blocking the loop) and the sensor's events."""

from __future__ import annotations

import asyncio
import importlib
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout, TaskDeferred

from k2_provider.sensors.clickhouse_watermark import ClickHouseWatermarkSensor
from k2_provider.triggers.clickhouse_watermark import ClickHouseWatermarkTrigger, is_unreachable

TARGET = datetime(2026, 1, 1, 0, 15, tzinfo=timezone.utc)
# The path the trigger and the sensor use (they import the hook into their modules).
TRIGGER_QUERY = "k2_provider.triggers.clickhouse_watermark.K2ClickHouseHook.watermark"
SENSOR_QUERY = "k2_provider.sensors.clickhouse_watermark.K2ClickHouseHook.watermark"


def _trigger(**overrides: Any) -> ClickHouseWatermarkTrigger:
    kwargs: dict[str, Any] = {
        "table": "silver_trades",
        "column": "event_time",
        "target": TARGET,
        "lateness_seconds": 120,
        "clickhouse_conn_id": "clickhouse_default",
        "poke_interval": 0.01,
    }
    kwargs.update(overrides)
    return ClickHouseWatermarkTrigger(**kwargs)


async def _events(trigger: ClickHouseWatermarkTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


def test_serialize_round_trip_has_no_secrets() -> None:
    trigger = _trigger(timeout_at=TARGET + timedelta(hours=1))
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    assert getattr(importlib.import_module(module), name) is ClickHouseWatermarkTrigger
    rebuilt = ClickHouseWatermarkTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert (rebuilt.target, rebuilt.timeout_at) == (TARGET, TARGET + timedelta(hours=1))
    assert set(kwargs) == {
        "table",
        "column",
        "target",
        "lateness_seconds",
        "clickhouse_conn_id",
        "poke_interval",
        "timeout_at",
        "max_consecutive_errors",
    }
    assert not any("password" in key or "secret" in key for key in kwargs)
    assert all(isinstance(v, (str, int, float, type(None))) for v in kwargs.values())  # JSON-safe


def test_naive_target_is_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        _trigger(target=datetime(2026, 1, 1))


def test_run_keeps_polling_until_the_watermark_passes_the_target() -> None:
    readings = [None, TARGET - timedelta(minutes=1), TARGET + timedelta(seconds=1)]
    with mock.patch(TRIGGER_QUERY, side_effect=readings) as query:
        events = asyncio.run(_events(_trigger()))
    assert query.call_count == 3
    query.assert_called_with("silver_trades", "event_time", timedelta(minutes=2))
    assert events == [
        {
            "status": "complete",
            "table": "silver_trades",
            "column": "event_time",
            "target": TARGET.isoformat(),
            "watermark": (TARGET + timedelta(seconds=1)).isoformat(),
        }
    ]


def test_watermark_equal_to_target_completes() -> None:
    with mock.patch(TRIGGER_QUERY, return_value=TARGET):
        [event] = asyncio.run(_events(_trigger()))
    assert event["status"] == "complete"


def test_queries_do_not_block_the_event_loop() -> None:
    """The sync query sleeps 0.2 s per call; a ticker on the same loop must keep running meanwhile."""
    readings = iter([None, None, TARGET])

    def slow_query(*_args: Any) -> datetime | None:
        time.sleep(0.2)  # a blocking clickhouse-connect call
        return next(readings)

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        events = await _events(_trigger())
        stop.set()
        await ticking
        return events, ticks

    with mock.patch(TRIGGER_QUERY, side_effect=slow_query):
        started = time.monotonic()
        events, ticks = asyncio.run(scenario())
        elapsed = time.monotonic() - started
    assert events[0]["status"] == "complete"
    assert elapsed >= 0.6
    # ~120 ticks in 0.6 s if the loop is free; at most a handful if the queries blocked it.
    assert ticks >= 40, f"event loop was blocked: only {ticks} ticks in {elapsed:.2f}s"


def test_timeout_reports_the_last_watermark() -> None:
    seen = TARGET - timedelta(minutes=20)
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    with mock.patch(TRIGGER_QUERY, return_value=seen):
        [event] = asyncio.run(_events(_trigger(timeout_at=past)))
    assert event["status"] == "timeout"
    assert event["watermark"] == seen.isoformat()
    assert event["target"] == TARGET.isoformat()


def test_errors_are_retried_then_reported() -> None:
    failures = [ConnectionError("refused")] * 2 + [None] + [ConnectionError("refused")] * 3
    with mock.patch(TRIGGER_QUERY, side_effect=failures) as query:
        [event] = asyncio.run(_events(_trigger(max_consecutive_errors=3)))
    assert query.call_count == 6  # the success in the middle reset the count
    assert event["status"] == "error"
    assert "ConnectionError: refused" in event["message"]


def test_transient_error_then_success() -> None:
    with mock.patch(TRIGGER_QUERY, side_effect=[ConnectionError("blip"), TARGET]):
        [event] = asyncio.run(_events(_trigger()))
    assert event["status"] == "complete"


def test_unreachable_is_waited_out_until_the_timeout_server_errors_are_not() -> None:
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    assert is_unreachable(ConnectionRefusedError("refused"))
    assert is_unreachable(OperationalError("connection reset"))
    assert not is_unreachable(DatabaseError("Code: 60. Unknown table"))
    # With a timeout, an outage longer than max_consecutive_errors does not end the wait.
    outage = [ConnectionRefusedError("refused")] * 5
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    with mock.patch(TRIGGER_QUERY, side_effect=[*outage, TARGET]) as query:
        [event] = asyncio.run(_events(_trigger(max_consecutive_errors=2, timeout_at=future)))
    assert query.call_count == 6
    assert event["status"] == "complete"


def test_outage_until_the_timeout_names_the_error() -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    with mock.patch(TRIGGER_QUERY, side_effect=ConnectionRefusedError("refused")):
        [event] = asyncio.run(_events(_trigger(timeout_at=past)))
    assert event["status"] == "timeout"
    assert "refused" in (event.get("error") or ""), event


def test_sensor_poke_treats_an_unreachable_clickhouse_as_not_yet() -> None:
    with mock.patch(SENSOR_QUERY, side_effect=ConnectionRefusedError("refused")):
        sensor = _sensor()
        assert sensor.poke({}) is False
    assert "refused" in (sensor._last_error or "")
    with mock.patch(SENSOR_QUERY, side_effect=ValueError("bad column")):
        with pytest.raises(ValueError):
            _sensor().poke({})


# The sensor: deferral and the events it handles


def _sensor(**overrides: Any) -> ClickHouseWatermarkSensor:
    kwargs: dict[str, Any] = {
        "task_id": "wait_for_hot_data",
        "table": "silver_trades",
        "column": "event_time",
        "lateness": timedelta(minutes=2),
        "target": TARGET.isoformat(),
        "timeout": timedelta(minutes=30),
    }
    kwargs.update(overrides)
    return ClickHouseWatermarkSensor(**kwargs)


def test_sensor_returns_at_once_when_data_is_there() -> None:
    with mock.patch(SENSOR_QUERY, return_value=TARGET + timedelta(minutes=5)):
        assert _sensor().execute({}) == (TARGET + timedelta(minutes=5)).isoformat()


def test_sensor_defers_to_the_trigger_when_data_is_not_there() -> None:
    with mock.patch(SENSOR_QUERY, return_value=TARGET - timedelta(minutes=5)):
        with pytest.raises(TaskDeferred) as deferred:
            _sensor().execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, ClickHouseWatermarkTrigger)
    assert (trigger.table, trigger.target, trigger.lateness_seconds) == (
        "silver_trades",
        TARGET,
        120.0,
    )
    assert trigger.timeout_at is not None
    assert deferred.value.method_name == "execute_complete"


def test_sensor_not_deferrable_reschedules() -> None:
    sensor = _sensor(deferrable=False)
    assert sensor.mode == "reschedule"


def test_sensor_timeout_says_the_feed_looks_stopped() -> None:
    event = {
        "status": "timeout",
        "table": "silver_trades",
        "target": TARGET.isoformat(),
        "watermark": "2026-01-01T00:01:00+00:00",
    }
    with pytest.raises(AirflowSensorTimeout) as err:
        _sensor().execute_complete({}, event)
    message = str(err.value)
    assert "looks stopped" in message
    assert "'silver_trades'" in message and "2026-01-01T00:01:00+00:00" in message
    assert TARGET.isoformat() in message


def test_sensor_event_statuses() -> None:
    sensor = _sensor()
    done = {"status": "complete", "watermark": TARGET.isoformat(), "target": TARGET.isoformat()}
    assert sensor.execute_complete({}, done) == TARGET.isoformat()
    with pytest.raises(AirflowException, match="refused"):
        sensor.execute_complete({}, {"status": "error", "message": "ConnectionError: refused"})
    with pytest.raises(AirflowException, match="unexpected event"):
        sensor.execute_complete({}, {"status": "??"})


def test_sensor_defers_when_the_first_check_fails() -> None:
    with mock.patch(SENSOR_QUERY, side_effect=ConnectionError("refused")):
        with pytest.raises(TaskDeferred):
            _sensor().execute({})


# k2_hot_max_event_timestamp_seconds: sent on every check, never failing the task

EMIT = "k2.metrics.set_hot_max_event_time"


def test_trigger_sends_the_newest_event_time_on_every_successful_check() -> None:
    readings = [None, ConnectionError("blip"), TARGET - timedelta(minutes=1), TARGET]
    with mock.patch(TRIGGER_QUERY, side_effect=readings), mock.patch(EMIT) as emit:
        [event] = asyncio.run(_events(_trigger()))
    assert event["status"] == "complete"
    # max(event time) = watermark + lateness; no reading, no gauge
    assert emit.call_args_list == [
        mock.call("silver_trades", TARGET + timedelta(minutes=1)),
        mock.call("silver_trades", TARGET + timedelta(minutes=2)),
    ]


def test_trigger_survives_a_failing_metric() -> None:
    with mock.patch(TRIGGER_QUERY, return_value=TARGET), mock.patch(EMIT, side_effect=OSError("udp")):
        [event] = asyncio.run(_events(_trigger()))
    assert event["status"] == "complete"


def test_sensor_sends_the_newest_event_time_on_its_check_and_its_event() -> None:
    with mock.patch(SENSOR_QUERY, return_value=TARGET), mock.patch(EMIT) as emit:
        _sensor().execute({})
    emit.assert_called_once_with("silver_trades", TARGET + timedelta(minutes=2))
    with mock.patch(EMIT) as emit:
        _sensor().execute_complete(
            {}, {"status": "complete", "watermark": TARGET.isoformat(), "target": TARGET.isoformat()}
        )
    emit.assert_called_once_with("silver_trades", TARGET + timedelta(minutes=2))
    with mock.patch(EMIT) as emit, pytest.raises(AirflowSensorTimeout):
        _sensor().execute_complete({}, {"status": "timeout", "watermark": None, "target": TARGET.isoformat()})
    emit.assert_not_called()


def test_sensor_survives_a_failing_metric() -> None:
    with mock.patch(SENSOR_QUERY, return_value=TARGET), mock.patch(EMIT, side_effect=OSError("udp")):
        assert _sensor().execute({}) == TARGET.isoformat()
