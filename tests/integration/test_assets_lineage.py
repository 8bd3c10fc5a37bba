"""Downstream can follow the cold tier, on the session's real scheduler: Assets, the example
consumer and OpenLineage.

The example consumer (k2_example_cold_consumer, scheduled on the Iceberg Assets of
silver_trades and gold_ohlcv_15m) is unpaused, then both tables' offload DAGs catch up (batch
jobs: several intervals per run) and one silver interval is re-offloaded by a manual run.
Then, from Airflow's own tables:
- every run that wrote intervals has one asset event per interval it committed, with the
  extras {table, interval_start, interval_end, snapshot_id, rows} equal to the ledger's row;
  a run whose interval an earlier batch had offloaded has none;
- every such event was consumed by exactly one run of the consumer, whose task read that
  interval of that snapshot from Iceberg with the announced row count;
- the OpenLineage file transport holds START and COMPLETE of the manual run's offload, its
  input the ClickHouse table, its output the Iceberg table by location with the catalog's
  name as a symlink and the run's row count as output statistics.

Late in the Airflow lane: both tables' DAGs are used by earlier modules, whose state this
test only adds to. About 2-3 minutes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from k2.config import load_tables
from k2.intervals import INTERVAL
from k2.local import airflow as local_airflow
from k2.watermarks import WatermarkStore
from k2_dag_factory import EXAMPLE_CONSUMER_DAG_ID, EXAMPLE_CONSUMER_TABLES
from k2_provider.assets import iceberg_table_asset
from tests.integration.airflow_handle import wait_until
from tests.integration.test_faults_airflow import _caught_up, _top_up

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.late]

TABLES = load_tables()
SPECS = [TABLES.get(name) for name in EXAMPLE_CONSUMER_TABLES]
SILVER = TABLES.get("silver_trades")


def _events(airflow_running, uri: str, since: datetime) -> list[dict]:
    rows = airflow_running.sql(
        "SELECT e.id, e.source_dag_id, e.source_run_id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
        "WHERE a.uri = %s AND e.timestamp >= %s ORDER BY e.id", uri, since)
    return [{"id": i, "dag_id": d, "run_id": r, "extra": x if isinstance(x, dict) else json.loads(x)}
            for i, d, r, x in rows]


def _offload_result(airflow_running, dag_id: str, run_id: str) -> dict | None:
    rows = airflow_running.sql(
        "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = 'offload_to_iceberg' "
        "AND key = 'return_value' AND map_index = -1", dag_id, run_id)
    if not rows:
        return None
    value = rows[0][0]
    return value if isinstance(value, dict) else json.loads(value)


def test_asset_events_per_committed_interval_the_consumer_and_lineage(stack, hot_data, airflow_running):
    since = datetime.now(timezone.utc)
    airflow_running.unpause(EXAMPLE_CONSUMER_DAG_ID)
    try:
        data_end = _top_up(hot_data)
        for spec in SPECS:
            airflow_running.unpause(spec.dag_id)
        for spec in SPECS:
            _caught_up(stack, spec, data_end)
        # A manual re-offload of silver's newest complete interval: a new snapshot, one event.
        store = WatermarkStore(stack.postgres_dsn("k2"))
        newest = max(e.interval_start for e in store.ledger_all(SILVER.name))
        manual = airflow_running.trigger(SILVER.dag_id, "manual__assets_reoffload", newest, newest + INTERVAL, nth=7)
        assert airflow_running.run_state_by_id(SILVER.dag_id, manual) == "success"

        # Every event of both Assets since the unpause: one per committed interval of a run that
        # wrote; none from a run that found its interval offloaded.
        events = {spec.name: _events(airflow_running, iceberg_table_asset(spec).uri, since) for spec in SPECS}
        assert all(events.values()), events
        for spec in SPECS:
            runs = {run_id for (run_id,) in airflow_running.sql(
                "SELECT run_id FROM dag_run WHERE dag_id = %s AND end_date >= %s AND state = 'success'",
                spec.dag_id, since)}
            by_run: dict[str, list[dict]] = {}
            for event in events[spec.name]:
                assert event["dag_id"] == spec.dag_id, event
                by_run.setdefault(event["run_id"], []).append(event)
            skipped = written = 0
            for run_id in runs:
                result = _offload_result(airflow_running, spec.dag_id, run_id)
                announced = sorted(e["extra"]["interval_start"] for e in by_run.get(run_id, []))
                if result is None or result.get("skipped"):
                    assert announced == [], f"{spec.dag_id} {run_id} skipped its offload but announced {announced}"
                    skipped += 1
                    continue
                written += 1
                expected = sorted(datetime.fromisoformat(i["interval_start"]).astimezone(timezone.utc).isoformat()
                                  for i in result["intervals"])
                assert announced == expected, (spec.dag_id, run_id, announced, expected)
                for event in by_run[run_id]:
                    extra = event["extra"]
                    item = next(i for i in result["intervals"]
                                if datetime.fromisoformat(i["interval_start"]) == datetime.fromisoformat(extra["interval_start"]))
                    assert (extra["table"], extra["rows"], extra["snapshot_id"]) == (
                        spec.name, item["rows"], item["snapshot_id"]), (extra, item)
            print(f"\n[assets] {spec.name}: {len(events[spec.name])} event(s) from {written} run(s) that wrote, "
                  f"none from {skipped} run(s) that found their interval offloaded")
            assert written >= 1
        newest_events = [e for e in events[SILVER.name] if e["run_id"] == manual]
        ledger = store.ledger_entry(SILVER.name, newest)
        assert [e["extra"]["snapshot_id"] for e in newest_events] == [ledger.snapshot_id], (newest_events, ledger)

        # The consumer: each event consumed by exactly one of its runs, which read that interval.
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
            read += rows[0][0] if isinstance(rows[0][0], list) else json.loads(rows[0][0])
        announced = sorted((e["extra"]["interval_start"], e["extra"]["snapshot_id"], e["extra"]["rows"])
                           for es in events.values() for e in es)
        got = sorted((r["interval_start"], r["snapshot_id"], r["rows"]) for r in read)
        assert got == announced, (got, announced)
        print(f"[assets] the consumer read {len(read)} interval(s) in {len(consumer_runs)} run(s), each event once")
    finally:
        airflow_running.pause_quietly(EXAMPLE_CONSUMER_DAG_ID)
        for spec in SPECS:
            airflow_running.pause_quietly(spec.dag_id)

    # OpenLineage: the manual run's offload, START and COMPLETE, datasets and row count.
    lines = local_airflow.lineage_file(stack).read_text().splitlines()
    job = f"{SILVER.dag_id}.offload_to_iceberg"
    mine = [json.loads(line) for line in lines if job in line and manual in line]
    mine = [e for e in mine if e.get("job", {}).get("name") == job]
    kinds = [e["eventType"] for e in mine]
    assert "START" in kinds and "COMPLETE" in kinds, kinds
    complete = next(e for e in mine if e["eventType"] == "COMPLETE")
    (source,) = complete["inputs"]
    assert (source["namespace"], source["name"]) == (f"clickhouse://{stack.host}:{stack.clickhouse_port}",
                                                     f"k2.{SILVER.source}"), source
    (target,) = complete["outputs"]
    assert target["namespace"] == "file" and target["name"] == str(stack.warehouse / "cold" / "silver_trades"), target
    assert target["facets"]["symlinks"]["identifiers"][0]["name"] == SILVER.iceberg_table
    rows = target["outputFacets"]["outputStatistics"]["rowCount"]
    assert rows == store.ledger_entry(SILVER.name, newest).rows, (rows, complete)
    print(f"[lineage] {job} {manual}: {kinds}; {source['namespace']}/{source['name']} -> "
          f"{target['namespace']}:{target['name']}, {rows} rows")
