"""Session fixtures for integration tests: one real local stack per test session.

The stack lives in a temporary K2_HOME on free loopback ports, so it never touches
a developer's `make run` stack. Services start once and stop at the end.
"""

from __future__ import annotations

import os
import re
import socket

import pytest

from k2.local import stack as local_stack
from k2.local.settings import LocalStack


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """A LocalStack with PostgreSQL and the ClickHouse endpoint up."""
    home = tmp_path_factory.mktemp("k2home")
    env = {
        "K2_HOME": str(home),
        "K2_CLICKHOUSE_PORT": str(_free_port()),
        "K2_POSTGRES_PORT": str(_free_port()),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # child processes (k2 CLI, spark-submit) see the same stack
    local = LocalStack.from_env()
    local_stack.up(local, log=lambda _msg: None)
    try:
        yield local
    finally:
        local_stack.down(local, log=lambda _msg: None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ch_client(stack: LocalStack, request: pytest.FixtureRequest):
    """A clickhouse-connect client on a fresh database named after the test module."""
    database = "t_" + re.sub(r"[^A-Za-z0-9_]", "_", request.module.__name__.rsplit(".", 1)[-1])
    admin = stack.clickhouse_client()
    admin.command(f"DROP DATABASE IF EXISTS {database}")
    admin.command(f"CREATE DATABASE {database}")
    client = stack.clickhouse_client(database=database)
    yield client
    client.close()
    admin.close()
