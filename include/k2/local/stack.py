"""`k2 local up | down | status`: the services of the local stack, started in order.

Each service is idempotent to start (a running, healthy one is left alone) and the
stack is all-or-nothing: if a later service fails, the ones this call started are
stopped again, so nothing is left half-started.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Callable

from k2.local import celery, monitoring, object_store, postgres, spark_cluster
from k2.local.daemons import Daemon, http_ok, start_all
from k2.local.processes import StackError, tail
from k2.local.settings import CLICKHOUSE_DATABASE, LocalStack


@dataclass(frozen=True)
class Service:
    name: str
    port: Callable[[LocalStack], int | None]
    start: Callable[[LocalStack], bool]
    stop: Callable[[LocalStack], bool]
    pid: Callable[[LocalStack], int | None]
    healthy: Callable[[LocalStack], bool]


CLICKHOUSE = Daemon(
    name="clickhouse",
    argv=lambda s: [
        sys.executable, "-m", "k2.local.clickhouse_endpoint",
        "--host", s.host,
        "--port", str(s.clickhouse_port),
        "--data-path", str(s.clickhouse_data),
        "--user", s.credentials["clickhouse_user"],
    ],
    # The password reaches the endpoint through its environment, never argv.
    env=lambda s: {"K2_CLICKHOUSE_PASSWORD": s.credentials["clickhouse_password"]},
    port=lambda s: s.clickhouse_port,
    port_env_var="K2_CLICKHOUSE_PORT",
    healthy=lambda s: http_ok(f"http://{s.host}:{s.clickhouse_port}/ping", b"Ok."),
)


def _smtp_ready(stack: LocalStack) -> bool:
    try:
        with socket.create_connection((stack.host, stack.smtp_port), timeout=2) as sock:
            return sock.recv(64).startswith(b"220")
    except OSError:
        return False


# Deadline-miss and alert emails land here; read them with `k2 mail` or from the Maildir.
SMTP_SINK = Daemon(
    name="smtp",
    argv=lambda s: [
        sys.executable, "-m", "aiosmtpd", "-n",
        "-l", f"{s.host}:{s.smtp_port}",
        "-c", "aiosmtpd.handlers.Mailbox", str(s.maildir),
    ],
    port=lambda s: s.smtp_port,
    port_env_var="K2_SMTP_PORT",
    healthy=_smtp_ready,
)


def _service(daemon: Daemon) -> Service:
    return Service(
        name=daemon.name,
        port=daemon.port,
        start=daemon.start,
        stop=daemon.stop,
        pid=daemon.pid,
        healthy=daemon.healthy,
    )


def _monitoring_service(daemon: Daemon) -> Service:
    """statsd_exporter, Prometheus or Alertmanager, configured for this stack."""
    def start(stack: LocalStack) -> bool:
        mon = monitoring.MonitoringStack.for_local_stack(stack)
        monitoring.prepare(mon)
        return daemon.start(mon)

    def on(method):
        return lambda stack: method(monitoring.MonitoringStack.for_local_stack(stack))

    return Service(
        name=daemon.name,
        port=on(daemon.port),
        start=start,
        stop=on(daemon.stop),
        pid=on(daemon.pid),
        healthy=on(daemon.healthy),
    )


def _cluster_service(daemon: Daemon) -> Service:
    """The Spark master or a worker of this stack's standalone cluster."""
    def on(method):
        return lambda stack: method(spark_cluster.SparkCluster.from_env(stack.home))

    return Service(
        name=daemon.name,
        port=on(daemon.port),
        start=on(daemon.start),
        stop=on(daemon.stop),
        pid=on(daemon.pid),
        healthy=on(daemon.healthy),
    )


SERVICES: list[Service] = [
    Service(
        name="postgres",
        port=lambda s: s.postgres_port,
        start=postgres.start,
        stop=postgres.stop,
        pid=postgres.pid,
        healthy=postgres.healthy,
    ),
    _service(CLICKHOUSE),
    _service(SMTP_SINK),
    *(_monitoring_service(d) for d in monitoring.DAEMONS),
]
# `k2 local up --spark-cluster`: a Spark standalone master and two workers (k2.local.spark_cluster).
SPARK_CLUSTER: list[Service] = [_cluster_service(d) for d in spark_cluster.DAEMONS]
# `k2 local up --object-store`: the S3 gateway for the warehouse (k2.local.object_store).
def _object_store_service() -> Service:
    """The S3 gateway of this stack's warehouse."""
    def on(method):
        return lambda stack: method(object_store.ObjectStore.for_local_stack(stack))

    gateway = object_store.GATEWAY
    return Service(name=gateway.name, port=on(gateway.port), start=on(object_store.start), stop=on(gateway.stop),
                   pid=on(gateway.pid), healthy=on(gateway.healthy))


OBJECT_STORE = _object_store_service()

# `k2 local up --celery`: Redis, the broker of Airflow's CeleryExecutor (k2.local.celery).
REDIS = _service(celery.REDIS)
OPTIONAL = [*SPARK_CLUSTER, OBJECT_STORE, REDIS]


def _running(services: list[Service], stack: LocalStack) -> list[Service]:
    """The optional services (Spark cluster, object store, Redis) that were started: the only
    ones to stop or list."""
    return [service for service in services if service.pid(stack) is not None]


def up(stack: LocalStack, log: Callable[[str], None] = print, *, with_spark_cluster: bool = False,
       with_object_store: bool = False, with_celery: bool = False) -> None:
    stack.home.mkdir(parents=True, exist_ok=True)
    stack.credentials  # made before any service needs them
    start_all([*SERVICES, *(SPARK_CLUSTER if with_spark_cluster else []),
               *([OBJECT_STORE] if with_object_store else []), *([REDIS] if with_celery else [])], stack, log)


def down(stack: LocalStack, log: Callable[[str], None] = print) -> None:
    errors = []
    for service in reversed([*SERVICES, *_running(OPTIONAL, stack)]):
        try:
            stopped = service.stop(stack)
        except StackError as exc:
            errors.append(str(exc))
            continue
        log(f"{'stopped' if stopped else 'not running:'} {service.name}")
    if errors:
        raise StackError("\n".join(errors))


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    host: str
    port: int | None  # None: a process without a port of its own (scheduler, feed)
    pid: int | None
    healthy: bool

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else "-"

    @property
    def state(self) -> str:
        if self.pid is None:
            return "stopped"
        return "healthy" if self.healthy else "unhealthy"


def status(stack: LocalStack, extra: list[Daemon] | tuple[Daemon, ...] = ()) -> list[ServiceStatus]:
    """Every service of the stack, then the `extra` processes (Airflow's, the feed: what
    `k2 run` starts), each with its address, pid and health."""
    rows = []
    for service in [*SERVICES, *_running(OPTIONAL, stack), *(_service(d) for d in extra)]:
        pid = service.pid(stack)
        rows.append(
            ServiceStatus(
                name=service.name,
                host=stack.host,
                port=service.port(stack),
                pid=pid,
                healthy=pid is not None and service.healthy(stack),
            )
        )
    return rows


def require_up(stack: LocalStack, names: tuple[str, ...] = ("postgres", "clickhouse")) -> None:
    down_services = [s.name for s in status(stack) if s.name in names and s.state != "healthy"]
    if down_services:
        raise StackError(
            f"local services not running: {', '.join(down_services)}; start them with `k2 local up`"
        )


def clickhouse_client(stack: LocalStack):
    """A client for the k2 database of the local endpoint (created on first use)."""
    require_up(stack, ("clickhouse",))
    bootstrap = stack.clickhouse_client()
    bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {CLICKHOUSE_DATABASE}")
    bootstrap.close()
    return stack.clickhouse_client(database=CLICKHOUSE_DATABASE)


def log_tail(stack: LocalStack, service: str) -> str:
    paths = {"clickhouse": CLICKHOUSE.log_file(stack), "postgres": stack.log_dir / "postgres" / "postgres.log"}
    return tail(paths[service])
