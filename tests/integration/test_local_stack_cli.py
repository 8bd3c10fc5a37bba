"""`k2 local up | down | status`, `k2 schema apply` and `k2 feed` as a user runs them.

Each test gets its own K2_HOME and ports, so it never disturbs the session stack.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_port_env, stack_home

pytestmark = pytest.mark.integration

K2 = str(Path(sys.executable).with_name("k2"))
TABLES = (
    "bronze_trades_binance",
    "bronze_trades_kraken",
    "silver_trades",
    "gold_ohlcv_1m",
    "gold_ohlcv_5m",
    "gold_ohlcv_15m",
    "gold_ohlcv_30m",
    "gold_ohlcv_1h",
    "gold_ohlcv_1d",
)


@pytest.fixture
def own_stack_env():
    home = stack_home()
    env = {**os.environ, "K2_HOME": str(home), **free_port_env()}
    yield env
    subprocess.run([K2, "local", "down"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(home, ignore_errors=True)


def k2(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([K2, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _counts(env: dict[str, str]) -> dict[str, int]:
    from k2.local.settings import LocalStack

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        client = LocalStack.from_env().clickhouse_client(database="k2")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {t: client.query(f"SELECT count() FROM {t}").result_rows[0][0] for t in TABLES}


@pytest.mark.slow
def test_up_schema_feed_down_up_keeps_rows(own_stack_env):
    env = own_stack_env
    assert k2(env, "local", "up").returncode == 0
    again = k2(env, "local", "up")
    assert again.returncode == 0 and "already running" in again.stdout

    status = k2(env, "local", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    states = {row["name"]: row for row in json.loads(status.stdout)}
    assert states["postgres"]["state"] == "healthy" and states["clickhouse"]["state"] == "healthy"
    assert states["clickhouse"]["port"] == int(env["K2_CLICKHOUSE_PORT"])

    for _ in range(2):  # idempotent
        applied = k2(env, "schema", "apply")
        assert applied.returncode == 0, applied.stderr
    fed = k2(env, "feed", "--history", "20m", "--seed", "1")
    assert fed.returncode == 0, fed.stderr
    before = _counts(env)
    assert all(count > 0 for count in before.values()), before

    assert k2(env, "local", "down").returncode == 0
    stopped = k2(env, "local", "status")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout  # stopped is a state, not an error
    lines = stopped.stdout.splitlines()
    assert {line.split()[0] for line in lines[1:]} >= {"postgres", "clickhouse", "airflow-scheduler", "feed"}
    assert len({line.index("stopped") for line in lines[1:]}) == 1, stopped.stdout  # one column
    assert k2(env, "local", "up").returncode == 0
    assert _counts(env) == before


def test_unknown_command_and_option_are_refused(own_stack_env):
    result = k2(own_stack_env, "bogus")
    assert result.returncode == 2 and "No such command" in result.stderr
    result = k2(own_stack_env, "local", "up", "--frobnicate")
    assert result.returncode == 2 and "--frobnicate" in result.stderr


@pytest.mark.parametrize("value", ["6x", "-1h", "0h", "h"])
def test_invalid_history_is_refused_before_anything_runs(own_stack_env, value):
    result = k2(own_stack_env, "feed", f"--history={value}")
    assert result.returncode == 2
    assert value in result.stderr or "not a positive duration" in result.stderr
    assert not Path(own_stack_env["K2_HOME"], "run").exists()


def test_port_taken_fails_clearly_and_leaves_nothing_started(own_stack_env):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(own_stack_env["K2_CLICKHOUSE_PORT"])))
        squatter.listen()
        result = k2(own_stack_env, "local", "up")
    assert result.returncode == 1
    assert f"127.0.0.1:{own_stack_env['K2_CLICKHOUSE_PORT']} is already in use" in result.stderr
    status = k2(own_stack_env, "local", "status", "--json")
    assert all(row["state"] == "stopped" for row in json.loads(status.stdout)), status.stdout
