"""The commit task's asset events (k2_provider.operators.watermark_commit._announce): one per
interval the run's offload wrote, through the DAG's alias, with the interval's extras; none
when the offload skipped (an earlier batch had the interval). Airflow's own outlet-event
accessor records them, as in a task."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from airflow.sdk.execution_time.context import OutletEventAccessors

from k2.config import load_tables
from k2_provider.assets import committed_alias, iceberg_table_asset
from k2_provider.operators.watermark_commit import WatermarkCommitOperator

SPEC = load_tables().get("silver_trades")
ALIAS = committed_alias(SPEC.dag_id)
ASSET = iceberg_table_asset(SPEC)


def _interval(minute: int, snapshot: int) -> dict:
    start = datetime(2026, 12, 7, 10, minute, tzinfo=timezone.utc)
    return {"table": SPEC.name, "interval_start": start.isoformat(),
            "interval_end": start.replace(minute=minute + 15).isoformat(), "rows": 100 + minute,
            "checksum": 7 * minute, "snapshot_id": snapshot, "run_id": "scheduled__x"}


class _TI:
    def __init__(self, result: dict) -> None:
        self.result = result

    def xcom_pull(self, task_ids: str) -> dict:
        return self.result


def _operator() -> WatermarkCommitOperator:
    return WatermarkCommitOperator(task_id="commit_watermark", table=SPEC.name,
                                   initial_watermark=datetime(2026, 1, 1, tzinfo=timezone.utc),
                                   outlets=[ALIAS], asset=ASSET, asset_alias=ALIAS)


def test_a_batch_of_three_intervals_is_three_events_with_their_extras() -> None:
    intervals = [_interval(0, 11), _interval(15, 12), _interval(30, 12)]
    events = OutletEventAccessors()
    context = {"ti": _TI({**intervals[0], "intervals": intervals, "skipped": False}), "outlet_events": events}
    assert _operator()._announce(context, intervals) == 3
    added = events[ALIAS].asset_alias_events
    assert [e.dest_asset_key.uri for e in added] == [ASSET.uri] * 3
    assert [e.extra["interval_start"] for e in added] == [i["interval_start"] for i in intervals]
    assert added[1].extra == {"table": "silver_trades", "iceberg_table": SPEC.iceberg_table,
                              "interval_start": intervals[1]["interval_start"],
                              "interval_end": intervals[1]["interval_end"], "snapshot_id": 12, "rows": 115,
                              "checksum": "105"}


def test_a_skipped_offload_announces_nothing() -> None:
    own = _interval(0, 11)
    events = OutletEventAccessors()
    context = {"ti": _TI({**own, "intervals": [own], "skipped": True}), "outlet_events": events}
    assert _operator()._announce(context, [own]) == 0
    assert events[ALIAS].asset_alias_events == []


def test_the_alias_must_be_an_outlet_and_comes_with_the_asset() -> None:
    with pytest.raises(ValueError, match="must be one of the task's outlets"):
        WatermarkCommitOperator(task_id="c", table=SPEC.name, initial_watermark=datetime(2026, 1, 1, tzinfo=timezone.utc),
                                asset=ASSET, asset_alias=ALIAS)
    with pytest.raises(ValueError, match="go together"):
        WatermarkCommitOperator(task_id="c", table=SPEC.name, initial_watermark=datetime(2026, 1, 1, tzinfo=timezone.utc),
                                asset=ASSET)


def test_an_offload_into_another_catalog_is_neither_ledgered_nor_announced(monkeypatch) -> None:
    """The placement's catalog_name (parsing) and the Iceberg connection's (run time) must
    agree: otherwise the commit fails before it touches the ledger, naming both."""
    own = _interval(0, 11)
    operator = _operator()
    touched = []
    monkeypatch.setattr(WatermarkCommitOperator, "_store", lambda self: touched.append("ledger"))
    context = {"ti": _TI({**own, "intervals": [own], "skipped": False, "catalog_name": "research"}),
               "outlet_events": OutletEventAccessors(), "data_interval_start": None, "data_interval_end": None}
    with pytest.raises(Exception, match=r"catalog 'research' but this DAG announces the Asset 'iceberg://k2/"):
        operator._execute(context)
    assert touched == []
    # the same result from the catalog the Asset names passes the check
    same = {**own, "intervals": [own], "skipped": False, "catalog_name": "k2"}
    assert operator._offload_result({"ti": _TI(same)})[0]["interval_start"] == own["interval_start"]


def test_the_example_consumer_refuses_an_event_that_is_not_an_offloads(monkeypatch) -> None:
    """An event made by hand (no interval extras) fails the reader naming what it lacks,
    before any catalog is opened."""
    from types import SimpleNamespace

    from k2_provider.operators import cold_reader

    opened = []
    monkeypatch.setattr(cold_reader, "load_catalog", lambda settings: opened.append(settings))
    reader = cold_reader.ColdTierReaderOperator(task_id="read", assets=[ASSET])
    event = SimpleNamespace(extra={"table": SPEC.name, "rows": 3}, source_dag_id="manual", source_run_id="r1")
    with pytest.raises(Exception, match=r"lacks \['interval_start', 'interval_end', 'snapshot_id'\]"):
        reader.execute({"triggering_asset_events": {ASSET: [event]}})
    assert opened == []
