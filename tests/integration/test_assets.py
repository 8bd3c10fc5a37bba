"""Downstream can follow the cold tier, on the session's real scheduler: Assets and the
example consumer.

1. (then) Every offload run of the session so far (every table, catch-up batches, skipped runs,
   retries, clears, manual runs and backfills of the other modules) whose offload and commit
   each ran once: one asset event per interval its offload result lists, with the extras
   {table, interval_start, interval_end, snapshot_id, rows} of that interval; none when the
   offload skipped (an earlier batch had the interval). A batch run is among them.
2. (first) The example consumer (k2_example_cold_consumer, on the Assets of silver_trades and
   gold_ohlcv_15m) is unpaused and both tables re-offload their newest interval by a manual
   run: every event since is consumed by exactly one consumer run, which read that interval
   of that snapshot from Iceberg with the announced row count.

OpenLineage is tested on the Celery workers of test_scale_out. Late in the Airflow lane, so
that part 1 sees the other modules' runs. About 1-2 minutes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from k2.config import load_tables
from k2.intervals import INTERVAL
from k2_dag_factory import EXAMPLE_CONSUMER_DAG_ID, EXAMPLE_CONSUMER_TABLES
from k2_provider.assets import iceberg_table_asset
from tests.integration.airflow_handle import wait_until
from tests.integration.test_faults_airflow import _top_up

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.late]

TABLES = load_tables()
SPECS = [TABLES.get(name) for name in EXAMPLE_CONSUMER_TABLES]


def _json(value):
    """A JSON column as the driver returns it: decoded already, or text."""
    return value if isinstance(value, (dict, list)) else json.loads(value)


def _events(airflow_running, uri: str, since: datetime) -> list[dict]:
    rows = airflow_running.sql(
        "SELECT e.id, e.source_dag_id, e.source_run_id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
        "WHERE a.uri = %s AND e.timestamp >= %s ORDER BY e.id", uri, since)
    return [{"id": i, "dag_id": d, "run_id": r, "extra": _json(x)} for i, d, r, x in rows]


def _offload_result(airflow_running, dag_id: str, run_id: str) -> dict | None:
    rows = airflow_running.sql(
        "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = 'offload_to_iceberg' "
        "AND key = 'return_value' AND map_index = -1", dag_id, run_id)
    return _json(rows[0][0]) if rows else None


def _announced_per_run(airflow_running) -> dict[tuple[str, str], list[dict]]:
    rows = airflow_running.sql(
        "SELECT e.source_dag_id, e.source_run_id, e.extra, a.uri FROM asset_event e JOIN asset a ON a.id = e.asset_id "
        "WHERE a.uri LIKE 'iceberg://%%'")
    found: dict[tuple[str, str], list[dict]] = {}
    for dag_id, run_id, extra, uri in rows:
        found.setdefault((dag_id, run_id), []).append({**_json(extra), "uri": uri})
    return found


def _utc_iso(value: str) -> str:
    return datetime.fromisoformat(value).astimezone(timezone.utc).isoformat()


def test_the_example_consumer_reads_every_announced_interval_once(stack, hot_data, airflow_running):
    since = datetime.now(timezone.utc)
    airflow_running.unpause(EXAMPLE_CONSUMER_DAG_ID)
    try:
        data_end = _top_up(hot_data)
        for spec in SPECS:  # a manual (re-)offload of each table's newest complete interval
            airflow_running.unpause(spec.dag_id)
            step = INTERVAL.total_seconds()
            newest = datetime.fromtimestamp((data_end - spec.allowed_lateness).timestamp() // step * step,
                                            timezone.utc) - INTERVAL
            run = airflow_running.trigger(spec.dag_id, "manual__consumer_drill", newest, newest + INTERVAL, nth=7)
            assert airflow_running.run_state_by_id(spec.dag_id, run) == "success"
        events = {spec.name: _events(airflow_running, iceberg_table_asset(spec).uri, since) for spec in SPECS}
        assert all(any(e["run_id"] == "manual__consumer_drill" for e in es) for es in events.values()), events
        all_ids = {e["id"] for es in events.values() for e in es}

        def consumed() -> dict[int, list[str]]:
            rows = airflow_running.sql(
                "SELECT x.event_id, r.run_id FROM dagrun_asset_event x JOIN dag_run r ON r.id = x.dag_run_id "
                "WHERE r.dag_id = %s", EXAMPLE_CONSUMER_DAG_ID)
            found: dict[int, list[str]] = {}
            for event_id, run_id in rows:
                found.setdefault(event_id, []).append(run_id)
            return found

        wait_until(lambda: all_ids <= set(consumed()), 300, "every asset event consumed by the example consumer", 3)
        wait_until(lambda: not airflow_running.sql(
            "SELECT 1 FROM dag_run WHERE dag_id = %s AND state IN ('queued', 'running')", EXAMPLE_CONSUMER_DAG_ID),
            300, "the consumer's runs finished", 3)
        once = consumed()
        assert all(len(once[i]) == 1 for i in all_ids), {i: once[i] for i in all_ids if len(once[i]) != 1}
        consumer_runs = sorted({once[i][0] for i in all_ids})
        states = dict(airflow_running.sql(
            "SELECT run_id, state FROM dag_run WHERE dag_id = %s", EXAMPLE_CONSUMER_DAG_ID))
        assert {states[r] for r in consumer_runs} == {"success"}, {r: states[r] for r in consumer_runs}
        read = []
        for run_id in consumer_runs:
            rows = airflow_running.sql(
                "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = 'read_new_intervals' "
                "AND key = 'return_value'", EXAMPLE_CONSUMER_DAG_ID, run_id)
            read += _json(rows[0][0])
        # The consumer's runs also took events from before the unpause (a first asset-triggered
        # run consumes what was queued): what they read is every event they consumed.
        consumed_ids = [i for i, runs in once.items() if runs[0] in consumer_runs]
        extras = {i: _json(x) for i, x in airflow_running.sql(
            "SELECT id, extra FROM asset_event WHERE id = ANY(%s)", consumed_ids)}
        announced = sorted((x["interval_start"], x["snapshot_id"], x["rows"]) for x in extras.values())
        got = sorted((r["interval_start"], r["snapshot_id"], r["rows"]) for r in read)
        assert got == announced, (got, announced)
        print(f"[assets] the consumer read {len(read)} interval(s) in {len(consumer_runs)} run(s), each event once")
    finally:
        airflow_running.pause_quietly(EXAMPLE_CONSUMER_DAG_ID)
        for spec in SPECS:
            airflow_running.pause_quietly(spec.dag_id)


def test_one_asset_event_per_committed_interval_over_the_sessions_runs(airflow_running):
    announced = _announced_per_run(airflow_running)
    once = airflow_running.sql(
        "SELECT r.dag_id, r.run_id FROM dag_run r WHERE r.dag_id LIKE 'k2_offload_%%' AND r.state = 'success' "
        "AND (SELECT max(try_number) FROM task_instance t WHERE t.dag_id = r.dag_id AND t.run_id = r.run_id "
        "     AND t.task_id IN ('offload_to_iceberg', 'commit_watermark')) = 1")
    wrote = skipped = batches = events = 0
    specs = {spec.dag_id: spec for spec in TABLES.tables}  # the bundle's DAGs (not a placed copy)
    for dag_id, run_id in once:
        spec = specs.get(dag_id)
        if spec is None:
            continue
        result = _offload_result(airflow_running, dag_id, run_id)
        got = announced.get((dag_id, run_id), [])
        if result is None or result.get("skipped"):
            assert got == [], f"{dag_id} {run_id} skipped its offload but announced {got}"
            skipped += 1
            continue
        expected = sorted((_utc_iso(i["interval_start"]), i["rows"], i["snapshot_id"]) for i in result["intervals"])
        assert sorted((e["interval_start"], e["rows"], e["snapshot_id"]) for e in got) == expected, (dag_id, run_id)
        assert {(e["table"], e["uri"]) for e in got} == {(spec.name, iceberg_table_asset(spec).uri)}
        wrote += 1
        batches += len(expected) > 1
        events += len(got)
    print(f"\n[assets] {len(once)} offload runs of the session: {wrote} wrote ({batches} batches of several "
          f"intervals) and announced {events} interval(s); {skipped} skipped and announced none")
    assert wrote and skipped and batches, (wrote, skipped, batches)
