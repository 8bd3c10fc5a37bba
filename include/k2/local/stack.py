"""`k2 local up | down | status`: the services of the local stack, started in order.

Each service is idempotent to start (a running, healthy one is left alone) and the
stack is all-or-nothing: if a later service fails, the ones this call started are
stopped again, so nothing is left half-started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from typing import Callable

from k2.local import postgres
from k2.local.processes import (
    StackError,
    ensure_port_free,
    read_pid,
    tail,
    terminate,
    wait_until,
)
from k2.local.settings import LocalStack


@dataclass(frozen=True)
class Service:
    name: str
    port: Callable[[LocalStack], int]
    start: Callable[[LocalStack], bool]
    stop: Callable[[LocalStack], bool]
    pid: Callable[[LocalStack], int | None]
    healthy: Callable[[LocalStack], bool]


# ClickHouse endpoint (chDB behind the ClickHouse HTTP protocol)

def _clickhouse_pid_file(stack: LocalStack):
    return stack.run_dir / "clickhouse.pid"


def _clickhouse_log(stack: LocalStack):
    return stack.log_dir / "clickhouse.log"


def _clickhouse_pid(stack: LocalStack) -> int | None:
    return read_pid(_clickhouse_pid_file(stack))


def _clickhouse_healthy(stack: LocalStack) -> bool:
    url = f"http://{stack.host}:{stack.clickhouse_port}/ping"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().strip() == b"Ok."
    except OSError:
        return False


def _clickhouse_start(stack: LocalStack) -> bool:
    if _clickhouse_pid(stack) is not None:
        return False
    ensure_port_free("clickhouse", stack.host, stack.clickhouse_port, "K2_CLICKHOUSE_PORT")
    for folder in (stack.clickhouse_data, stack.run_dir, stack.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    log = _clickhouse_log(stack)
    env = {**os.environ, "K2_CLICKHOUSE_PASSWORD": stack.credentials["clickhouse_password"]}
    with open(log, "ab") as log_handle:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "k2.local.clickhouse_endpoint",
                "--host", stack.host,
                "--port", str(stack.clickhouse_port),
                "--data-path", str(stack.clickhouse_data),
                "--user", stack.credentials["clickhouse_user"],
                "--log-file", str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=log_handle,
            env=env,
            start_new_session=True,  # survives the CLI; stopped by `k2 local down`
        )
    _clickhouse_pid_file(stack).write_text(f"{process.pid}\n")
    ready = wait_until(lambda: process.poll() is not None or _clickhouse_healthy(stack), 60)
    if process.poll() is not None or not ready:
        terminate(process.pid, timeout=5)
        _clickhouse_pid_file(stack).unlink(missing_ok=True)
        raise StackError(f"clickhouse: endpoint did not start:\n{tail(log)}")
    return True


def _clickhouse_stop(stack: LocalStack) -> bool:
    pid = _clickhouse_pid(stack)
    if pid is None:
        return False
    terminate(pid)
    _clickhouse_pid_file(stack).unlink(missing_ok=True)
    return True


SERVICES: list[Service] = [
    Service(
        name="postgres",
        port=lambda s: s.postgres_port,
        start=postgres.start,
        stop=postgres.stop,
        pid=postgres.pid,
        healthy=postgres.healthy,
    ),
    Service(
        name="clickhouse",
        port=lambda s: s.clickhouse_port,
        start=_clickhouse_start,
        stop=_clickhouse_stop,
        pid=_clickhouse_pid,
        healthy=_clickhouse_healthy,
    ),
]


def up(stack: LocalStack, log: Callable[[str], None] = print) -> None:
    stack.home.mkdir(parents=True, exist_ok=True)
    stack.credentials  # made before any service needs them
    started: list[Service] = []
    try:
        for service in SERVICES:
            if service.start(stack):
                started.append(service)
                log(f"started {service.name} on {stack.host}:{service.port(stack)}")
            else:
                log(f"{service.name} already running on {stack.host}:{service.port(stack)}")
    except BaseException:
        for service in reversed(started):
            try:
                service.stop(stack)
            except StackError as exc:
                log(f"while rolling back: {exc}")
        raise


def down(stack: LocalStack, log: Callable[[str], None] = print) -> None:
    errors = []
    for service in reversed(SERVICES):
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
    port: int
    pid: int | None
    healthy: bool

    @property
    def state(self) -> str:
        if self.pid is None:
            return "stopped"
        return "healthy" if self.healthy else "unhealthy"


def status(stack: LocalStack) -> list[ServiceStatus]:
    rows = []
    for service in SERVICES:
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


def log_tail(stack: LocalStack, service: str) -> str:
    paths = {"clickhouse": _clickhouse_log(stack), "postgres": stack.log_dir / "postgres" / "postgres.log"}
    return tail(paths[service])
