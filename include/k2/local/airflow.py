"""Airflow 3 on the local stack: configuration, connections and the four components.

Everything is configured through the environment (no airflow.cfg to keep in sync):
metadata in the local PostgreSQL, LocalExecutor, the DAGs folder and plugins of
this repository, the simple auth manager with one admin user, and the Airflow
connections the DAGs use (`clickhouse_default`, `spark_default`, `k2_watermarks`,
`iceberg_default`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from k2.config import ALERT_TO_ENV, DEFAULT_ALERT_TO, OVERRIDE_ENV, SPARK_POOL
from k2.local import celery, monitoring, object_store
from k2.local.daemons import Daemon, http_ok
from k2.local.processes import StackError
from k2.local.settings import CLICKHOUSE_DATABASE, REPO_ROOT, LocalStack, spark_environment
from k2.local.spark_cluster import spark_master
from k2.runtime_env import ClickHouseSettings, IcebergSettings

ADMIN_USER = "admin"
# Where deadline-miss emails go on the local stack (the SMTP sink keeps them in .k2/mail).
ALERT_FROM = "k2-airflow@localhost"
SPARK_POOL_SLOTS = 2
LINEAGE_NAMESPACE = "k2"  # the OpenLineage namespace of the local stack's Airflow jobs


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def clickhouse_settings(stack: LocalStack) -> ClickHouseSettings:
    c = stack.credentials
    return ClickHouseSettings(
        host=stack.host,
        port=stack.clickhouse_port,
        user=c["clickhouse_user"],
        password=c["clickhouse_password"],
        database=CLICKHOUSE_DATABASE,
    )


def iceberg_settings(stack: LocalStack, database: str = "k2", catalog_name: str = "k2") -> IcebergSettings:
    """The Iceberg JDBC catalog in the stack's PostgreSQL (database k2), the warehouse on disk,
    or on the stack's object store while it runs (`k2 local up --object-store`)."""
    c = stack.credentials
    settings = IcebergSettings(
        catalog_name=catalog_name,
        uri=f"postgresql://{stack.host}:{stack.postgres_port}/{database}",
        user=c["postgres_user"],
        password=c["postgres_password"],
        warehouse=stack.warehouse.as_uri(),
    )
    store = object_store.running(stack)
    return store.iceberg_settings(settings) if store is not None else settings


def iceberg_connection(settings: IcebergSettings, postgres: dict[str, object]) -> dict[str, object]:
    """The postgres-style Airflow connection of an Iceberg catalog (k2_provider.hooks.connections)."""
    extra: dict[str, object] = {"warehouse": settings.warehouse, "catalog_name": settings.catalog_name}
    if settings.on_object_store:
        extra.update(s3_endpoint=settings.s3_endpoint, s3_region=settings.s3_region,
                     s3_path_style_access=settings.s3_path_style_access,
                     s3_access_key_id=settings.s3_access_key_id, s3_secret_access_key=settings.s3_secret_access_key)
    return {**postgres, "schema": settings.uri.rsplit("/", 1)[-1], "extra": extra}


def connections(stack: LocalStack) -> dict[str, dict[str, object]]:
    """The Airflow connections of the local stack, as Airflow's JSON connection form."""
    c = stack.credentials
    # The watermark store and the Iceberg JDBC catalog share the stack's database k2.
    postgres = {"conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
                "login": c["postgres_user"], "password": c["postgres_password"], "schema": "k2"}
    return {
        "clickhouse_default": {
            "conn_type": "clickhouse",
            "host": stack.host,
            "port": stack.clickhouse_port,
            "login": c["clickhouse_user"],
            "password": c["clickhouse_password"],
            "schema": CLICKHOUSE_DATABASE,
        },
        "spark_default": {
            "conn_type": "spark",
            "host": spark_master(stack.home),
            "extra": {"spark-binary": "spark-submit"},
        },
        "k2_watermarks": postgres,
        "iceberg_default": iceberg_connection(iceberg_settings(stack), postgres),
        "smtp_default": {
            "conn_type": "smtp",
            "host": stack.host,
            "port": stack.smtp_port,
            "extra": {"disable_tls": True, "disable_ssl": True, "from_email": ALERT_FROM},
        },
    }


def environment(stack: LocalStack) -> dict[str, str]:
    """Environment for every Airflow process (and so for the tasks and spark-submit)."""
    c = stack.credentials
    home = stack.airflow_home
    executors = celery.executor(stack)
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": executors,
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": os.environ.get("K2_DAGS_PAUSED", "False"),
        "AIRFLOW__CORE__FERNET_KEY": c["airflow_fernet_key"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{stack.host}:{stack.airflow_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": stack.postgres_url("airflow", "postgresql+psycopg2"),
        "AIRFLOW__API__HOST": stack.host,
        "AIRFLOW__API__PORT": str(stack.airflow_port),
        "AIRFLOW__API__BASE_URL": f"http://{stack.host}:{stack.airflow_port}",
        "AIRFLOW__API__SECRET_KEY": c["airflow_api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": c["airflow_jwt_secret"],
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        # spark-submit and the k2 CLI come from the project's virtualenv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # Spark on the local stack: loopback only, no UI, quiet logs (spark_jobs/conf).
        **spark_environment(stack.host),
        "K2_HOME": str(stack.home),
        ALERT_TO_ENV: os.environ.get(ALERT_TO_ENV, DEFAULT_ALERT_TO),
        "K2_ALERT_EMAIL_FROM": os.environ.get("K2_ALERT_EMAIL_FROM", ALERT_FROM),
        "K2_STRICT_DAGS": os.environ.get("K2_STRICT_DAGS", "0"),
    }
    env.update(celery.airflow_environment(stack, executors))
    # OpenLineage is on when a transport is configured (AIRFLOW__OPENLINEAGE__TRANSPORT in the
    # environment, e.g. lineage_transport(stack): a file of the stack home); every task then
    # loads the listener and reports START/COMPLETE/FAIL - the offload's with its ClickHouse
    # input, Iceberg output and row counts (k2_provider.lineage).
    env["AIRFLOW__OPENLINEAGE__NAMESPACE"] = LINEAGE_NAMESPACE
    # emitted from a thread of the task process, not a fork of it (the fork shares the task's
    # connection to its supervisor)
    env["AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD"] = "True"
    env.update(monitoring.airflow_metrics_env(monitoring.MonitoringStack.for_local_stack(stack)))
    for conn_id, conn in connections(stack).items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    for override in OVERRIDE_ENV.values():  # the local stack's start date, a demo's end date
        if os.environ.get(override):
            env[override] = os.environ[override]
    return env


def lineage_file(stack: LocalStack) -> Path:
    """Where the local stack's OpenLineage events go with lineage_transport (JSON lines)."""
    return stack.home / "lineage" / "events.jsonl"


def lineage_transport(path: Path) -> str:
    """AIRFLOW__OPENLINEAGE__TRANSPORT for OpenLineage's file transport into `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return json.dumps({"type": "file", "log_file_path": str(path), "append": True})


def write_env_file(stack: LocalStack) -> Path:
    """`.k2/airflow.env`: the same settings for a shell (`set -a; . .k2/airflow.env`). Mode 0600."""
    path = stack.home / "airflow.env"
    path.touch(mode=0o600)
    lines = [f"{key}={_shell_quote(value)}" for key, value in sorted(environment(stack).items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def run_cli(stack: LocalStack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `airflow <args>` with the stack's environment; raise StackError on failure."""
    result = subprocess.run(
        [airflow_bin(), *args],
        env={**os.environ, **environment(stack)},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=stack.home,
    )
    if result.returncode != 0:
        raise StackError(f"airflow {' '.join(args)} failed:\n{result.stderr.strip()[-3000:]}")
    return result


def prepare(stack: LocalStack, log=print) -> None:
    """Migrate the metadata DB, write the admin password, create the Spark pool."""
    stack.airflow_home.mkdir(parents=True, exist_ok=True)
    write_env_file(stack)
    passwords = stack.airflow_home / "passwords.json"
    passwords.touch(mode=0o600)
    passwords.write_text(json.dumps({ADMIN_USER: stack.credentials["airflow_admin_password"]}))
    log("airflow: migrating the metadata database")
    run_cli(stack, "db", "migrate")
    run_cli(stack, "pools", "set", SPARK_POOL, str(SPARK_POOL_SLOTS), "Bounds concurrent Spark offload jobs")


def _component(name: str, args: list[str], healthy) -> Daemon:
    return Daemon(
        name=f"airflow-{name}",
        argv=lambda s: [airflow_bin(), *args],
        env=environment,
        port=lambda s: s.airflow_port if name == "api-server" else None,
        port_env_var="K2_AIRFLOW_PORT",
        healthy=healthy,
        start_timeout=120.0,
    )


def _process_alive(name: str):
    return lambda s: COMPONENT_BY_NAME[name].pid(s) is not None


API_SERVER = _component(
    "api-server", ["api-server"], lambda s: http_ok(f"http://{s.host}:{s.airflow_port}/api/v2/monitor/health")
)
COMPONENTS = [
    API_SERVER,
    # Logs are read from the local disk; Airflow's log servers would listen on every interface.
    _component("scheduler", ["scheduler", "--skip-serve-logs"], _process_alive("airflow-scheduler")),
    _component("dag-processor", ["dag-processor"], _process_alive("airflow-dag-processor")),
    _component("triggerer", ["triggerer", "--skip-serve-logs"], _process_alive("airflow-triggerer")),
]
COMPONENT_BY_NAME = {c.name: c for c in COMPONENTS}


def celery_worker(n: int, env=None) -> Daemon:
    """`airflow celery worker` n of the stack's CeleryExecutor (k2.local.celery), in a folder
    of its own; it serves no logs (the API server reads them from the shared log folder).
    `env(stack)`: its environment (default: the stack's Airflow environment)."""
    name = f"airflow-celery-worker-{n + 1}"

    def argv(stack: LocalStack) -> list[str]:
        celery.worker_dir(stack, n).mkdir(parents=True, exist_ok=True)
        return [airflow_bin(), "celery", "worker", "--celery-hostname", celery.worker_hostname(n),
                "--concurrency", str(celery.WORKER_CONCURRENCY), "--skip-serve-logs",
                "--without-gossip", "--without-mingle"]

    def healthy(stack: LocalStack) -> bool:
        return worker.pid(stack) is not None and celery.worker_ready(worker.log_file(stack), n)

    worker = Daemon(name=name, argv=argv, env=env or environment, port=lambda s: None, healthy=healthy,
                    cwd=lambda s: celery.worker_dir(s, n), start_timeout=120.0)
    return worker


CELERY_WORKERS = tuple(celery_worker(n) for n in range(celery.WORKERS))


def components(stack: LocalStack) -> list[Daemon]:
    """Airflow's processes on this stack: the four, and the Celery workers when Celery is the
    default executor (with Celery only a second executor, whoever needs workers starts them)."""
    if celery.executor(stack).split(",")[0].strip() == "CeleryExecutor":
        return [*COMPONENTS, *CELERY_WORKERS]
    return list(COMPONENTS)


def start(stack: LocalStack, log=print) -> None:
    if shutil.which("java") is None:
        raise StackError("java is not on PATH: Spark needs Java 17")
    prepare(stack, log)
    started = []
    try:
        for component in components(stack):
            if component.start(stack):
                started.append(component)
                log(f"started {component.name}")
    except BaseException:
        for component in reversed(started):
            component.stop(stack)
        raise


def stop(stack: LocalStack, log=print) -> None:
    for component in reversed([*COMPONENTS, *CELERY_WORKERS]):
        if component.stop(stack):
            log(f"stopped {component.name}")
