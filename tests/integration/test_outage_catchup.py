"""Fault matrix item 7, outage catch-up: the scheduler was off for 6 hours. In a stack of
its own (like test_demo.py): 6 h of feed history, K2_START_DATE 6 h back, Airflow started,
ONE table unpaused. Its watermark must reach the last closed interval with at most 3
Spark jobs for the 24-interval backlog, and verify clean. Prints jobs and wall time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.integration.conftest import (
    INTERVAL,
    AirflowHandle,
    environ_set,
    floor_interval,
    free_port_env,
    stack_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TABLE = "gold_ohlcv_1m"
OUTAGE = timedelta(hours=6)


def test_six_hour_outage_catches_up_in_few_spark_jobs():
    from k2 import iceberg as ib
    from k2.config import load_tables
    from k2.feed import run_feed
    from k2.local import airflow
    from k2.local import stack as local_stack
    from k2.local.settings import LocalStack
    from k2.schema import apply_schema
    from k2.verify import verify_table
    from k2.watermarks import WatermarkStore

    home = stack_home()
    now = datetime.now(timezone.utc)
    start = floor_interval(now - timedelta(minutes=5)) - OUTAGE
    env = {"K2_HOME": str(home), **free_port_env(), "K2_START_DATE": start.isoformat(), "K2_DAGS_PAUSED": "True"}
    with environ_set(env):
        local = LocalStack.from_env()
        try:
            local_stack.up(local, log=lambda _msg: None)
            admin = local.clickhouse_client()
            admin.command("CREATE DATABASE IF NOT EXISTS k2")
            client = local.clickhouse_client(database="k2")
            apply_schema(client)
            run_feed(client, history=now - start + timedelta(minutes=5), rate=None, seed=11, end=now, progress=None)

            airflow.start(local, log=lambda _msg: None)
            air_env = {**os.environ, **airflow.environment(local)}
            spec = load_tables().get(TABLE)
            # The last interval closed (plus lateness) by now; the backlog from start to it.
            target = floor_interval(datetime.now(timezone.utc) - spec.allowed_lateness)
            backlog = int((target - start) / INTERVAL)
            assert backlog >= 24, backlog
            # `airflow dags unpause` exits 0 without effect until the dag-processor has registered
            # the DAG: unpause through the same handle the session tests use, which checks.
            AirflowHandle(local, air_env).unpause(spec.dag_id, timeout=600)
            unpaused = time.monotonic()
            store = WatermarkStore(local.postgres_dsn("k2"))
            deadline = unpaused + 900
            while True:
                watermark = store.get(spec.name) if store.schema_version() else None
                if watermark is not None and watermark.watermark_ts >= target:
                    break
                assert time.monotonic() < deadline, f"watermark {watermark} never reached {target}"
                time.sleep(5)
            wall = time.monotonic() - unpaused

            table = ib.load_catalog(airflow.iceberg_settings(local)).load_table(spec.iceberg_table)
            snapshots = []
            for snapshot in table.snapshots():
                summary = snapshot.summary.additional_properties if snapshot.summary else {}
                offload = ib.offload_snapshot_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms, summary)
                if offload is not None and offload.interval_end <= target:
                    snapshots.append(offload)
            jobs = len({s.run_id for s in snapshots})  # one Spark job per submitting run
            covered = {s.interval_start for s in snapshots}
            report = verify_table(spec, ch_client=client, catalog=ib.load_catalog(airflow.iceberg_settings(local)),
                                  start=start, end=target)
            totals = report.totals()
            print(f"\n[outage catch-up] {TABLE}: {backlog} intervals, {jobs} Spark jobs, {len(snapshots)} "
                  f"offload snapshots, wall {wall:.0f} s from unpause to caught up; rows lost={totals['missing']} "
                  f"duplicated={totals['duplicated']}")
            assert len(covered) == backlog
            assert jobs <= 3, sorted({s.run_id for s in snapshots})
            assert report.ok and totals["missing"] == 0 and totals["duplicated"] == 0, report.format()
        finally:
            try:
                airflow.stop(local, log=lambda _msg: None)
            finally:
                local_stack.down(local, log=lambda _msg: None)
                shutil.rmtree(home, ignore_errors=True)
