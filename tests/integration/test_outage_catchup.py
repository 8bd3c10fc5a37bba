"""Fault matrix item 7, outage catch-up: the scheduler was off for 6 hours. On the session's
stack and Airflow: OUTAGE_TABLE's feed history and start date lie 6 h back (conftest), its
DAG has stayed paused, so unpausing it now is what a scheduler back from a 6-hour outage
sees. Its watermark must reach the last closed interval with at most 3 Spark jobs for the
24-interval backlog, and verify clean. Prints jobs and wall time.

The recovery is the runbooks' "High lag" and "Catch-up backlog", run as written
(tests/runbooks.py): the look, the unpause that starts the catch-up, the backlog while it
runs, and the watermark at the end.
The time from the unpause to the watermark at the last closed interval is the time to
recover "High lag" quotes.

About 4 minutes in the suite: 24 DAG runs of three tasks each go through the
scheduler, two of them with a Spark job.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from k2 import iceberg as ib
from k2.config import load_tables
from k2.local import airflow
from k2.verify import verify_table
from k2.watermarks import WatermarkStore
from tests.integration.airflow_handle import wait_until
from tests.integration.conftest import INTERVAL, OUTAGE, OUTAGE_TABLE, floor_interval
from tests.runbooks import Drill

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_six_hour_outage_catches_up_in_few_spark_jobs(stack, hot_data, airflow_running, outage_start):
    spec = load_tables().get(OUTAGE_TABLE)  # read now: with the session's start-date override
    assert spec.start_date == outage_start
    start = outage_start
    # The last interval closed (plus lateness) by now; the backlog from start to it.
    target = floor_interval(datetime.now(timezone.utc) - spec.allowed_lateness)
    backlog = int((target - start) / INTERVAL)
    assert backlog >= OUTAGE / INTERVAL, backlog
    where = dict(home=stack.home, table=spec.name, env_file=stack.home / "airflow.env")
    lag = Drill("High lag", **where)
    backlog_drill = Drill("Catch-up backlog", **where)
    airflow_running.wait_registered(spec.dag_id)
    assert "k2_spark" in lag.run("pools get").stdout
    lag.run("k2 watermark show")
    lag.run("airflow dags unpause")
    unpaused = time.monotonic()
    assert airflow_running.is_paused(spec.dag_id) is False
    # The backlog while it is one: the runs waiting, and the pool.
    wait_until(lambda: airflow_running.sql("SELECT count(*) FROM dag_run WHERE dag_id = %s", spec.dag_id)[0][0],
               120, f"catch-up runs of {spec.dag_id}")
    queued_seen = "scheduled__" in backlog_drill.run("--state queued").stdout
    backlog_drill.run("pools get")
    store = WatermarkStore(stack.postgres_dsn("k2"))
    deadline = unpaused + 900
    while True:
        watermark = store.get(spec.name) if store.schema_version() else None
        if watermark is not None and watermark.watermark_ts >= target:
            break
        assert time.monotonic() < deadline, f"watermark {watermark} never reached {target}"
        time.sleep(5)
    wall = time.monotonic() - unpaused
    shown = backlog_drill.run("k2 watermark show").stdout
    assert target.strftime("%Y-%m-%d %H:%M:%S") in shown or watermark.watermark_ts > target, shown
    backlog_drill.finish()
    lag.run("k2 watermark show")
    lag.finish()
    lag.recovered(wall)
    print(f"\n[outage catch-up] runs seen queued while catching up: {queued_seen}")
    airflow_running.cli("dags", "pause", spec.dag_id)  # its later runs would only wait for data

    catalog = ib.load_catalog(airflow.iceberg_settings(stack))
    table = catalog.load_table(spec.iceberg_table)
    snapshots = []
    for snapshot in table.snapshots():
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        for offload in ib.offload_snapshots_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms,
                                                         summary):
            if offload.interval_end <= target:
                snapshots.append(offload)
    jobs = len({s.run_id for s in snapshots})  # one Spark job per submitting run
    covered = {s.interval_start for s in snapshots}
    report = verify_table(spec, ch_client=hot_data, catalog=catalog, start=start, end=target)
    totals = report.totals()
    print(f"\n[outage catch-up] {spec.name}: {backlog} intervals, {jobs} Spark jobs, {len(snapshots)} "
          f"offloaded intervals, wall {wall:.0f} s from unpause to caught up; rows lost={totals['missing']} "
          f"duplicated={totals['duplicated']}")
    assert len(covered) == backlog
    assert jobs <= 3, sorted({s.run_id for s in snapshots})
    assert report.ok and totals["missing"] == 0 and totals["duplicated"] == 0, report.format()
