"""Airflow's CeleryExecutor on the local stack: Redis as the broker (Debian's redis-server on
loopback, a password set) and two Celery workers (`airflow celery worker`), for
`k2 local up --celery` / `k2 run` and the tests.

Which executor Airflow runs: $K2_AIRFLOW_EXECUTOR, else CeleryExecutor when this stack's Redis
runs, else LocalExecutor. A list such as "LocalExecutor,CeleryExecutor" keeps the first as
the default and lets a DAG or task choose the other (``executor=``). Each worker runs in a
folder of its own under the stack home: a task finds its job file and settings through the
deployed DAG bundle and its environment, not the scheduler's working directory.

Port: K2_REDIS_PORT (6379). The password is the stack's (credentials.json): in Redis's
config file (mode 0600) and the Airflow environment, never on a command line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from k2.local.daemons import Daemon
from k2.local.processes import StackError
from k2.local.settings import LocalStack, _env_int

REDIS_PORT_ENV = "K2_REDIS_PORT"
EXECUTOR_ENV = "K2_AIRFLOW_EXECUTOR"
WORKERS = 2
WORKER_CONCURRENCY = 2  # task slots per worker: a sensor and an offload, say


def redis_port() -> int:
    return _env_int(REDIS_PORT_ENV, 6379)


def redis_dir(stack: LocalStack) -> Path:
    return stack.home / "redis"


def broker_url(stack: LocalStack) -> str:
    return f"redis://:{stack.credentials['redis_password']}@{stack.host}:{redis_port()}/0"


def _redis_argv(stack: LocalStack) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not installed: run `make setup` (Debian package redis-server)")
    folder = redis_dir(stack)
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text("\n".join([
        f"bind {stack.host}",
        f"port {redis_port()}",
        f"requirepass {stack.credentials['redis_password']}",
        f"dir {folder}",
        'save ""',  # a broker of task messages: nothing to keep across restarts
        "appendonly no",
        "protected-mode yes",
        "daemonize no",
    ]) + "\n")
    return [binary, str(conf)]


def redis_ping(stack: LocalStack) -> bool:
    import redis

    try:
        client = redis.Redis(host=stack.host, port=redis_port(), password=stack.credentials["redis_password"],
                             socket_timeout=2, socket_connect_timeout=2)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


REDIS = Daemon(
    name="redis",
    argv=_redis_argv,
    port=lambda s: redis_port(),
    port_env_var=REDIS_PORT_ENV,
    healthy=redis_ping,
)


def executor(stack: LocalStack) -> str:
    """[core] executor of the stack's Airflow (see the module's docstring)."""
    chosen = os.environ.get(EXECUTOR_ENV)
    if chosen:
        return chosen
    return "CeleryExecutor" if REDIS.pid(stack) is not None else "LocalExecutor"


def airflow_environment(stack: LocalStack, executors: str) -> dict[str, str]:
    """The Celery settings of the Airflow environment when `executors` includes Celery."""
    if "CeleryExecutor" not in executors:
        return {}
    return {
        "AIRFLOW__CELERY__BROKER_URL": broker_url(stack),
        # task states in the metadata database, as the official chart does
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + stack.postgres_url("airflow", "postgresql"),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
    }


def worker_dir(stack: LocalStack, n: int) -> Path:
    """Worker n's working directory (its own, not the scheduler's)."""
    return stack.home / "celery" / f"worker-{n + 1}"


def worker_hostname(n: int) -> str:
    return f"k2-worker-{n + 1}@%h"


def worker_ready(log_file: Path, n: int) -> bool:
    """Celery logged worker n ready: connected to the broker, consuming its queue."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return False
    return f"k2-worker-{n + 1}@" in text and " ready." in text
