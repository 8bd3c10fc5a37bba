"""One table's offload DAG on the scale-out engines, end to end on the session's Airflow.

The DAG is the factory's, placed (k2_dag_factory.Placement) as a table moved off one machine
would be: its tasks on Airflow's CeleryExecutor (two `airflow celery worker` processes in
folders of their own, Redis on loopback with a password as the broker; the session's
scheduler runs LocalExecutor by default and Celery for a DAG that asks for it), its Spark
job on the standalone cluster (a master and two workers), its Iceberg table on the S3
object store (versitygw) through a catalog and a watermark store of its own database, so it
never shares a ledger with the table's main DAG.

What is checked, from the systems' own records: every task instance ran on the
CeleryExecutor and both Celery workers ran tasks (their logs); the Spark job's executors ran
on both Spark workers and each ran read tasks (the master's and workers' `/json/`, the job's
event log); the intervals are ledgered in the deployment's store and `k2 verify` is clean
(count and checksum per interval, ClickHouse vs Iceberg on S3); the data files are objects
in the store. The worker-kill fault runs in test_spark_cluster.

Runs late in the Airflow lane: the DAG file it deploys must be gone before the UI drills
count the bundle's DAGs. About 2-3 minutes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from k2.config import load_tables
from k2.intervals import INTERVAL
from k2.local import airflow as local_airflow
from k2.local import celery
from k2.local import object_store as obj
from k2.local import spark_cluster as sc
from k2.local.daemons import start_all
from k2.watermarks import WatermarkStore
from k2.config import REPO_ROOT
from tests.integration.conftest import _free_port
from tests.integration.test_faults_airflow import _top_up
from tests.integration.test_spark_cluster import _tasks_by_executor

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.late]

SPEC = load_tables().get("bronze_trades_kraken")  # a live feed all session
DATABASE = "k2_scale_out"  # the placement's catalog and watermark store
SUFFIX = "__scale_out"
DAG_ID = SPEC.dag_id + SUFFIX
DAG_FILE = REPO_ROOT / "dags" / "k2_scale_out_drill.py"
INTERVALS = 3
CONNECTIONS = ("spark_cluster", "iceberg_scale_out", "k2_watermarks_scale_out")


def _floor(moment: datetime) -> datetime:
    step = INTERVAL.total_seconds()
    return datetime.fromtimestamp(moment.timestamp() // step * step, timezone.utc)


@pytest.fixture(scope="module")
def engines(stack, tmp_path_factory):
    """The cluster, the object store and Redis on free loopback ports; the database."""
    cluster = sc.SparkCluster(home=stack.home, master_port=_free_port(), master_ui_port=_free_port(),
                              worker_ui_ports=(_free_port(), _free_port()))
    store = obj.ObjectStore(home=stack.home / "object-store-scale-out", port=_free_port(), host=stack.host,
                            access_key_id="k2so" + secrets.token_hex(4), secret_access_key=secrets.token_urlsafe(24))
    with psycopg.connect(stack.postgres_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    started = time.monotonic()
    start_all(sc.DAEMONS, cluster, log=print)
    obj.start(store)
    celery.REDIS.start(stack)
    print(f"\n[scale out] Spark cluster {cluster.master_url}, object store {store.endpoint}, Redis "
          f"{stack.host}:{celery.redis_port()} up in {time.monotonic() - started:.0f} s")
    try:
        yield cluster, store, tmp_path_factory.mktemp("spark-events")
    finally:
        celery.REDIS.stop(stack)
        obj.GATEWAY.stop(store)
        for daemon in reversed(sc.DAEMONS):
            daemon.stop(cluster)


def _placement_env(stack, airflow_running, cluster, store, events: Path) -> dict[str, str]:
    """The Celery workers' environment: the session's Airflow environment, the placement's
    connections, and the Spark event log of its jobs (where each task ran)."""
    base = local_airflow.iceberg_settings(stack, database=DATABASE, catalog_name=DATABASE)
    s3 = store.iceberg_settings(base, f"s3://{obj.BUCKET}/scale-out")
    c = stack.credentials
    postgres = {"conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
                "login": c["postgres_user"], "password": c["postgres_password"], "schema": DATABASE}
    conns = {
        "spark_cluster": {"conn_type": "spark", "host": cluster.master_url, "extra": {"spark-binary": "spark-submit"}},
        "iceberg_scale_out": local_airflow.iceberg_connection(s3, postgres),
        "k2_watermarks_scale_out": postgres,
    }
    env = {k: v for k, v in airflow_running.env.items() if not k.startswith("PYTEST_")}
    env.update({f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn) for conn_id, conn in conns.items()})
    env["SPARK_SUBMIT_OPTS"] = (env.get("SPARK_SUBMIT_OPTS", "") + f" -Dspark.eventLog.enabled=true "
                                f"-Dspark.eventLog.dir={events.as_uri()} -Dspark.eventLog.compress=false")
    # OpenLineage on these workers: every task's run events into a file (the file transport)
    env["AIRFLOW__OPENLINEAGE__TRANSPORT"] = local_airflow.lineage_transport(events.parent / "lineage.jsonl")
    return env, s3


def _failed_logs(stack, workers) -> str:
    """The task logs of the DAG's failed tries and the Celery workers' log tails: what a
    failed run leaves to read."""
    logs = sorted((stack.airflow_home / "logs" / f"dag_id={DAG_ID}").rglob("*.log"))
    parts = [f"--- {path.relative_to(stack.airflow_home)}\n{path.read_text(errors='replace')[-4000:]}"
             for path in logs if '"level":"error"' in path.read_text(errors="replace")]
    parts += [f"--- {w.log_file(stack)}\n{w.log_file(stack).read_text(errors='replace')[-3000:]}" for w in workers]
    return "\n".join(parts)


def _deploy_dag(start: datetime) -> None:
    DAG_FILE.write_text(f'''"""An Airflow DAG: {SPEC.name}'s offload placed on the scale-out engines (test_scale_out)."""

from datetime import datetime

from k2.config import load_tables
from k2_dag_factory import Placement, build_dag

spec = load_tables().get("{SPEC.name}").model_copy(update={{"start_date": datetime.fromisoformat("{start.isoformat()}")}})
dag = build_dag(spec, Placement(dag_id_suffix="{SUFFIX}", executor="CeleryExecutor", spark_conn_id="spark_cluster",
                                iceberg_conn_id="iceberg_scale_out", watermarks_conn_id="k2_watermarks_scale_out",
                                driver_max_rows=0, slices=4, tags=("scale-out",), catalog_name="{DATABASE}"))
''')


def test_one_tables_dag_on_celery_the_spark_cluster_and_object_storage(stack, hot_data, airflow_running, engines):
    cluster, store, events = engines
    data_end = _top_up(hot_data)
    last_complete = _floor(data_end - SPEC.allowed_lateness)
    start = last_complete - INTERVALS * INTERVAL
    end = last_complete
    env, s3 = _placement_env(stack, airflow_running, cluster, store, events)
    workers = [local_airflow.celery_worker(n, env=lambda _s, env=env: env) for n in range(celery.WORKERS)]
    started = time.monotonic()
    start_all(workers, stack, log=print)
    print(f"[scale out] {len(workers)} Celery workers ready in {time.monotonic() - started:.0f} s")
    _deploy_dag(start)
    try:
        airflow_running.unpause(DAG_ID)
        runs = [start + k * INTERVAL for k in range(INTERVALS)]
        for interval_start in runs:
            state = airflow_running.wait_for_run(DAG_ID, interval_start, timeout=900)
            assert state == "success", f"{DAG_ID} run of {interval_start}: {state}\n" + _failed_logs(stack, workers)
        print(f"[scale out] {INTERVALS} runs [{start:%H:%M}, {end:%H:%M}) succeeded "
              f"{time.monotonic() - started:.0f} s after the workers started")
    finally:
        airflow_running.pause_quietly(DAG_ID)
        DAG_FILE.unlink(missing_ok=True)
        for worker in workers:
            worker.stop(stack)

    # Every task of those runs on the CeleryExecutor, tasks on both workers.
    tis = airflow_running.sql(
        "SELECT task_id, state, executor, hostname FROM task_instance WHERE dag_id = %s AND run_id IN "
        "(SELECT run_id FROM dag_run WHERE dag_id = %s AND data_interval_start >= %s AND data_interval_start < %s)",
        DAG_ID, DAG_ID, start, end)
    assert len(tis) == 3 * INTERVALS and {ti[2] for ti in tis} == {"CeleryExecutor"}, tis
    received = {w.name: w.log_file(stack).read_text(errors="replace").count("] received") for w in workers}
    print(f"[scale out] task instances {sorted((ti[0], ti[1]) for ti in tis)}; tasks received by worker {received}")
    assert all(received.values()), f"a Celery worker ran no task: {received}"

    # The Spark job: executors on both Spark workers, read tasks on each.
    apps = [a for a in sc.master_state(cluster).get("completedapps", []) if a["name"] == f"k2-offload-{SPEC.name}"]
    assert apps, sc.master_state(cluster)
    by_worker = {app["id"]: sc.executors_by_worker(cluster, app["id"]) for app in apps}
    tasks = {app_id: _tasks_by_executor(events, app_id) for app_id in by_worker}
    print(f"[scale out] Spark applications {sorted(by_worker)}: executors by worker {by_worker}; "
          f"tasks by executor {tasks}")
    assert any(all(sum(tasks[app].get(e, 0) for e in executors) > 0 for executors in workers_of.values())
               and all(workers_of.values())
               for app, workers_of in by_worker.items()), "no offload read on both Spark workers"

    # Ledgered in the placement's own store; the data on the object store; verify clean.
    store_ = WatermarkStore(stack.postgres_dsn(DATABASE))
    ledger = [e for e in store_.ledger_all(SPEC.name) if start <= e.interval_start < end]
    assert [e.interval_start for e in ledger] == runs, ledger
    assert list((store.data_dir / obj.BUCKET / "scale-out").rglob("*.parquet")), "no data file on the object store"
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")},
               **local_airflow.clickhouse_settings(stack).to_env(), **s3.to_env(),
               "K2_WATERMARK_DSN": stack.postgres_dsn(DATABASE)}
    verify = subprocess.run([str(Path(sys.executable).with_name("k2")), "verify", "--table", SPEC.name,
                             "--from", f"{start:%Y-%m-%dT%H:%M:%SZ}", "--to", f"{end:%Y-%m-%dT%H:%M:%SZ}"],
                            env=cli_env, capture_output=True, text=True, timeout=600)
    print(f"[scale out] k2 verify: {verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else verify.stderr[-500:]}")
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
    assert s3.s3_secret_access_key not in verify.stdout + verify.stderr

    # OpenLineage (file transport on the Celery workers): START and COMPLETE of each offload, its
    # input the ClickHouse table, its output the Iceberg table on the store (by location, the
    # catalog's name as a symlink), the rows its job wrote as the output's statistics.
    lineage = [json.loads(line) for line in (events.parent / "lineage.jsonl").read_text().splitlines()]
    job = f"{DAG_ID}.offload_to_iceberg"
    offloads = [e for e in lineage if e.get("job", {}).get("name") == job]
    kinds = sorted({e["eventType"] for e in offloads})
    assert {"START", "COMPLETE"} <= set(kinds), kinds
    completes = [e for e in offloads if e["eventType"] == "COMPLETE"]
    ch = local_airflow.clickhouse_settings(stack)
    for event in completes:
        (source,), (target,) = event["inputs"], event["outputs"]
        assert (source["namespace"], source["name"]) == (f"clickhouse://{ch.host}:{ch.port}", f"{ch.database}.{SPEC.source}")
        assert (target["namespace"], target["name"]) == (f"s3://{obj.BUCKET}", f"scale-out/{SPEC.iceberg_table.replace('.', '/')}")
        assert target["facets"]["symlinks"]["identifiers"][0] == {
            "namespace": f"iceberg://{DATABASE}", "name": SPEC.iceberg_table, "type": "TABLE"}
    written = sum(e["outputs"][0].get("outputFacets", {}).get("outputStatistics", {}).get("rowCount", 0)
                  for e in completes)
    assert written == sum(e.rows for e in ledger), (written, [e.rows for e in ledger])
    print(f"[scale out] OpenLineage: {len(offloads)} offload event(s) {kinds}; rows written per the "
          f"COMPLETE events {written} = the ledger's")
