"""The offload job on a Spark standalone cluster (k2.local.spark_cluster: a master and two
workers on loopback, from pyspark's own distribution), not `local[2]`: the same spark-submit
with `--master spark://...`. Spark's own records show where the work ran: each worker's
`/json/` lists the executor it ran for the job's application, and the job's event log which
executor ran each task, so both workers are seen reading. Then a worker is killed while a
job runs: the job either finishes on the worker left (its lost tasks retried there) or
fails and its next try replaces it; either way Iceberg ends with one copy of each row.

Isolation: this module's own ClickHouse database, catalog and warehouse (job_stack), and
the cluster on free loopback ports under the session stack's home. About 2 minutes: the
cluster starts, three Spark jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from k2.config import load_tables
from k2.feed import run_feed
from k2.intervals import INTERVAL
from k2.local import spark_cluster as sc
from k2.local.daemons import start_all
from k2.schema import apply_schema
from k2.verify import verify_table
from tests.integration.airflow_handle import wait_until
from tests.integration.conftest import _free_port
from tests.integration.spark_job import job_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATALOG = "k2_test_spark_cluster"
SPEC = load_tables().get("bronze_trades_kraken")
T0 = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
FIRST = (T0, T0 + 4 * INTERVAL)
SECOND = (T0 + 4 * INTERVAL, T0 + 8 * INTERVAL)


@pytest.fixture(scope="module")
def cluster(stack):
    cluster = sc.SparkCluster(home=stack.home, master_port=_free_port(), master_ui_port=_free_port(),
                              worker_ui_ports=(_free_port(), _free_port()))
    started = time.monotonic()
    start_all(sc.DAEMONS, cluster, log=print)
    print(f"\n[spark cluster] {cluster.master_url}: master and {sc.WORKERS} workers up in "
          f"{time.monotonic() - started:.0f} s")
    try:
        yield cluster
    finally:
        for daemon in reversed(sc.DAEMONS):
            daemon.stop(cluster)


@pytest.fixture(scope="module")
def hot(ch_client):
    apply_schema(ch_client)
    run_feed(ch_client, history=SECOND[1] + timedelta(minutes=5) - FIRST[0], rate=None, seed=21,
             end=SECOND[1] + timedelta(minutes=5), progress=None)
    return ch_client


def _submit(job_stack, cluster, interval, run_id: str, events: Path) -> tuple[list[str], dict[str, str]]:
    events.mkdir(parents=True, exist_ok=True)
    env = dict(job_stack.env)
    # the job's event log: which executor ran which task
    env["SPARK_SUBMIT_OPTS"] += (f" -Dspark.eventLog.enabled=true -Dspark.eventLog.dir={events.as_uri()}"
                                 " -Dspark.eventLog.compress=false")
    # Every interval's slices on the executors (a cluster reads intervals of up to 500k rows
    # in the driver; these are smaller), four slices each: tasks for both workers.
    return job_argv(SPEC.name, interval[0], interval[1], run_id, "--driver-max-rows", "0", "--slices", "4",
                    master=cluster.master_url), env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("K2_OFFLOAD_RESULT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def _tasks_by_executor(events: Path, app_id: str) -> dict[str, int]:
    """Executor id -> tasks it ran, from the application's event log (Spark 4 writes it as
    rolling files in `eventlog_v2_<app id>/`)."""
    logs = [p for p in events.rglob("events_*") if p.is_file() and app_id in str(p)]
    assert logs, f"no event log of {app_id} in {events}: {sorted(str(p) for p in events.rglob('*'))}"
    counts: dict[str, int] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event.get("Event") == "SparkListenerTaskEnd":
                executor = str(event["Task Info"]["Executor ID"])
                counts[executor] = counts.get(executor, 0) + 1
    return counts


def _newest_app(cluster) -> str:
    apps = sc.master_state(cluster).get("completedapps", [])
    assert apps, "the master lists no completed application"
    return max(apps, key=lambda app: app["starttime"])["id"]


def _verify(hot, job_stack, interval) -> None:
    report = verify_table(SPEC, ch_client=hot, catalog=job_stack.catalog, start=interval[0], end=interval[1])
    totals = report.totals()
    print(f"[spark cluster] verify [{interval[0]:%H:%M}, {interval[1]:%H:%M}): {totals['iceberg_rows']} rows, "
          f"lost {totals['missing']}, duplicated {totals['duplicated']}")
    assert report.ok and totals["missing"] == totals["duplicated"] == 0, report.format()


def test_the_offload_reads_on_both_workers(cluster, hot, job_stack, tmp_path):
    argv, env = _submit(job_stack, cluster, FIRST, "cluster__first", tmp_path / "events")
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = _result(proc.stdout)
    app_id = _newest_app(cluster)
    by_worker = sc.executors_by_worker(cluster, app_id)
    tasks = _tasks_by_executor(tmp_path / "events", app_id)
    print(f"[spark cluster] {app_id}: {result['rows']} rows in {time.monotonic() - started:.0f} s; executors by "
          f"worker {by_worker}; tasks by executor {tasks}")
    assert all(by_worker.values()), f"a worker ran no executor of {app_id}: {by_worker}"
    for worker, executors in by_worker.items():
        assert sum(tasks.get(e, 0) for e in executors) > 0, f"{worker}'s executors ran no task: {tasks}"
    _verify(hot, job_stack, FIRST)


def test_a_worker_killed_during_the_job_leaves_one_copy(cluster, hot, job_stack, tmp_path):
    argv, env = _submit(job_stack, cluster, SECOND, "cluster__second", tmp_path / "events")
    victim = sc.WORKER_DAEMONS[1]
    job = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Both workers have an executor of the running application: the job is reading.
        def running_on_both() -> bool:
            active = sc.master_state(cluster).get("activeapps", [])
            if not active:
                return False
            app_id = active[0]["id"]
            states = [sc.worker_state(cluster, n) for n in range(sc.WORKERS)]
            return all(any(e.get("appid") == app_id for e in s.get("executors", [])) for s in states)

        wait_until(lambda: running_on_both() or job.poll() is not None, 300, "executors on both workers")
        assert job.poll() is None, "the job ended before a worker could be killed"
        os.kill(victim.pid(cluster), signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    outcome = "finished on the worker left" if job.returncode == 0 else f"failed (exit {job.returncode})"
    print(f"[spark cluster] worker killed during the job: the job {outcome}, "
          f"{time.monotonic() - killed_at:.0f} s after the kill")
    if job.returncode != 0:  # the next try (the task's retry) replaces it
        victim.start(cluster)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        out = proc.stdout
    result = _result(out)
    assert result["rows"] > 0
    _verify(hot, job_stack, SECOND)
    if victim.pid(cluster) is None:
        victim.start(cluster)
