"""The offload job on a Spark standalone cluster (k2.local.spark_cluster: a master and two
workers on loopback, from pyspark's own distribution), not `local[2]`: the same spark-submit
with `--master spark://...`. Spark's own records show where the work ran: each worker's
`/json/` lists the executor it ran for the job's application, and the job's event log which
executor ran each task, so both workers are seen reading. Then a worker is killed while a
job runs: the job either finishes on the worker left (its lost tasks retried there) or
fails and its next try replaces it; either way Iceberg ends with one copy of each row.

Last, the warehouse moves to object storage (k2.local.object_store: the Versity S3 gateway
on loopback): the job on the cluster writes Iceberg through S3FileIO and its executors'
pyarrow S3 client, `k2 verify` and `k2 watermark repair` read it with pyiceberg, and the
maintenance job compacts, expires and removes an orphan object there.

Isolation: this module's own ClickHouse database, catalogs, warehouses and ledger database
(job_stack, ledger_dsn), the cluster and the object store on free loopback ports under the
session stack's home. About 3 minutes: the cluster starts, five Spark jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from dataclasses import replace
from pathlib import Path

import psycopg
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
S3_CATALOG = "k2_test_spark_cluster_s3"
LEDGER_DB = "k2_test_spark_cluster"
SPEC = load_tables().get("bronze_trades_kraken")
T0 = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
FIRST = (T0, T0 + 4 * INTERVAL)
SECOND = (T0 + 4 * INTERVAL, T0 + 8 * INTERVAL)
THIRD = (T0 + 8 * INTERVAL, T0 + 12 * INTERVAL)


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
    run_feed(ch_client, history=THIRD[1] + timedelta(minutes=5) - FIRST[0], rate=None, seed=21,
             end=THIRD[1] + timedelta(minutes=5), progress=None)
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


@pytest.fixture(scope="module")
def object_store(stack):
    """The S3 gateway on a free loopback port, its data under the session stack's home."""
    import secrets

    from k2.local import object_store as obj

    home = stack.home / "object-store-test"
    store = obj.ObjectStore(home=home, port=_free_port(), host=stack.host,
                            access_key_id="k2test" + secrets.token_hex(4), secret_access_key=secrets.token_urlsafe(24))
    started = time.monotonic()
    obj.start(store)
    print(f"\n[object store] {store.endpoint} up in {time.monotonic() - started:.1f} s")
    try:
        yield store
    finally:
        obj.GATEWAY.stop(store)


def _run(argv: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_the_warehouse_on_object_storage_offload_verify_repair_maintain(
        cluster, hot, job_stack, object_store, ledger_dsn, tmp_path):
    import sys

    import pyarrow.fs as pafs

    from k2.iceberg import load_catalog
    from k2.local import object_store as obj
    from k2.maintenance import RESULT_MARKER
    from k2.watermarks import WatermarkStore
    from tests.integration.spark_job import job_env, submit_argv

    warehouse = f"s3://{obj.BUCKET}/test-spark-cluster"
    ice = object_store.iceberg_settings(replace(job_stack.iceberg, catalog_name=S3_CATALOG), warehouse)
    env = job_env(job_stack.clickhouse, ice)
    assert "S3" not in " ".join(submit_argv("x.py")), "no S3 setting on spark-submit's command line"
    # Every slice on the executors, four each: both workers write data files to the store.
    argv = job_argv(SPEC.name, THIRD[0], THIRD[1], "cluster__s3", "--driver-max-rows", "0", "--slices", "4",
                    master=cluster.master_url)
    assert not [a for a in argv if ice.s3_secret_access_key in a or ice.s3_access_key_id in a]
    started = time.monotonic()
    out = _run(argv, env, "the offload onto the object store")
    results = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("K2_OFFLOAD_RESULT ")]
    assert len(results) == 4 and all(r["rows"] > 0 for r in results), out[-2000:]
    by_worker = sc.executors_by_worker(cluster, _newest_app(cluster))
    print(f"[object store] {sum(r['rows'] for r in results)} rows in 4 intervals onto {warehouse} in "
          f"{time.monotonic() - started:.0f} s; executors by worker {by_worker}")
    assert all(by_worker.values()), by_worker

    # The data is in the store's objects, not on a local warehouse path.
    table = load_catalog(ice).load_table(SPEC.iceberg_table)
    assert table.location().startswith(warehouse), table.location()
    objects = list((object_store.data_dir / obj.BUCKET / "test-spark-cluster").rglob("*.parquet"))
    assert objects, "no data file in the object store"

    store = WatermarkStore(ledger_dsn)
    store.migrate()
    store.initialize(SPEC.name, THIRD[0])
    for r in results:
        store.commit_interval(SPEC.name, datetime.fromisoformat(r["interval_start"]),
                              datetime.fromisoformat(r["interval_end"]), int(r["rows"]), int(r["checksum"]),
                              int(r["snapshot_id"]), "cluster__s3")
    ledger = store.ledger_all(SPEC.name)
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")},
               **job_stack.clickhouse.to_env(), **ice.to_env(), "K2_WATERMARK_DSN": ledger_dsn,
               "K2_START_DATE": f"{SPEC.name}={THIRD[0]:%Y-%m-%dT%H:%M:%SZ}"}
    k2 = str(Path(sys.executable).with_name("k2"))
    window = ["--from", f"{THIRD[0]:%Y-%m-%dT%H:%M:%SZ}", "--to", f"{THIRD[1]:%Y-%m-%dT%H:%M:%SZ}"]
    verified = _run([k2, "verify", "--table", SPEC.name, *window], cli_env, "k2 verify")
    print(f"[object store] k2 verify: {verified.strip().splitlines()[-1]}")
    assert ice.s3_secret_access_key not in verified

    # A lost ledger: `k2 watermark repair` rebuilds it from the snapshots on the store.
    with psycopg.connect(ledger_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM k2_offload_ledger WHERE table_name = %s", (SPEC.name,))
    assert store.ledger_all(SPEC.name) == []
    _run([k2, "watermark", "repair", "--table", SPEC.name], cli_env, "k2 watermark repair")
    assert [(e.interval_start, e.rows, e.snapshot_id) for e in store.ledger_all(SPEC.name)] == [
        (e.interval_start, e.rows, e.snapshot_id) for e in ledger]
    assert store.get(SPEC.name).watermark_ts == THIRD[1]

    # Maintenance on the store: the day compacted, old snapshots expired, an orphan removed.
    fs = object_store.filesystem()
    data_prefix = table.location().removeprefix("s3://") + "/data"
    orphan = f"{data_prefix}/orphan-object.parquet"
    with fs.open_output_stream(orphan) as sink:
        sink.write(b"referenced by no snapshot")
    # Four days old (Iceberg refuses a margin under a day): the gateway reports its file's mtime.
    four_days_ago = time.time() - 4 * 86_400
    os.utime(object_store.data_dir / orphan, (four_days_ago, four_days_ago))
    maintain = submit_argv(Path(__file__).resolve().parents[2] / "spark_jobs" / "maintain_iceberg.py",
                           "--table", SPEC.name, "--compact-before", f"{THIRD[1]:%Y-%m-%dT%H:%M:%SZ}",
                           "--expire-before", f"{datetime.now(timezone.utc) + timedelta(minutes=1):%Y-%m-%dT%H:%M:%SZ}",
                           "--orphans-before", f"{datetime.now(timezone.utc) - timedelta(days=3):%Y-%m-%dT%H:%M:%SZ}",
                           master=cluster.master_url)
    out = _run(maintain, env, "the maintenance job on the object store")
    done = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith(RESULT_MARKER + " ")]
    main = next(d for d in done if d["iceberg_table"] == SPEC.iceberg_table)
    print(f"[object store] maintenance: rewritten {main['rewritten_data_files']} files, "
          f"{main['snapshots']} snapshot(s) left, orphans {main['orphan_files']}")
    assert main["rewritten_data_files"] > 0 and main["snapshots"] == 1
    assert [o.rsplit("/", 1)[-1] for o in main["orphan_files"]] == ["orphan-object.parquet"]
    assert fs.get_file_info(orphan).type == pafs.FileType.NotFound
    _run([k2, "verify", "--table", SPEC.name, *window], cli_env, "k2 verify after maintenance")
