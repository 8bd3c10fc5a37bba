"""What the benchmark scripts share: a throwaway local stack on free ports, and the
environment the Airflow operator gives spark-submit on it.

    with throwaway_stack("k2-bench-x-") as (stack, home, env):
        ...  # PostgreSQL and the ClickHouse endpoint are up, the schema applied

Everything it started is stopped, and its K2_HOME removed, when the block ends (also on
Ctrl-C or SIGTERM, which the scripts turn into SystemExit).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_throwaway_home(prefix: str) -> Path:
    """A new K2_HOME and free ports for every local service, in this process's environment
    (before k2.local reads them)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["K2_HOME"] = str(home)
    from k2.local.settings import PORT_ENV_VARS

    os.environ.update({name: str(free_port()) for name in PORT_ENV_VARS})
    return home


def spark_submit_env(stack: Any) -> dict[str, str]:
    """What the Airflow operator gives spark-submit (secrets only in the environment)."""
    from k2.local import airflow
    from k2.local.settings import spark_environment

    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_ICEBERG")}
    env.update(airflow.clickhouse_settings(stack).to_env())
    env.update(airflow.iceberg_settings(stack).to_env())
    env.update(spark_environment(stack.host))
    env["PYSPARK_PYTHON"] = sys.executable
    return env


@contextmanager
def throwaway_stack(prefix: str) -> Iterator[tuple[Any, Path, dict[str, str]]]:
    """PostgreSQL and the ClickHouse endpoint in a new K2_HOME, the hot tier's schema applied
    in the database the DAGs read; yields (stack, home, spark-submit environment)."""
    home = use_throwaway_home(prefix)
    from k2.local import airflow, postgres
    from k2.local import stack as local_stack
    from k2.local.settings import LocalStack
    from k2.schema import apply_schema

    stack = LocalStack.from_env()
    try:
        print(f"starting PostgreSQL and the ClickHouse endpoint in {home} ...", flush=True)
        postgres.start(stack)
        local_stack.CLICKHOUSE.start(stack)
        stack.clickhouse_client().command(f"CREATE DATABASE IF NOT EXISTS {airflow.CLICKHOUSE_DATABASE}")
        apply_schema(stack.clickhouse_client(database=airflow.CLICKHOUSE_DATABASE))
        yield stack, home, spark_submit_env(stack)
    finally:
        local_stack.CLICKHOUSE.stop(stack)
        postgres.stop(stack)
        shutil.rmtree(home, ignore_errors=True)
