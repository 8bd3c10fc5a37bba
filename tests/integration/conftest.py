"""Session fixtures for integration tests: one real local stack per test session.

The stack lives in a temporary K2_HOME on free loopback ports, so it never touches
a developer's `make run` stack. Services start once and stop at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from k2.feed import EXCHANGE_TABLES
from k2.intervals import INTERVAL
from k2.local import stack as local_stack
from k2.local.settings import LocalStack
from k2.runtime_env import ClickHouseSettings, IcebergSettings
from tests.integration.airflow_handle import AirflowHandle


@pytest.fixture(scope="module", autouse=True)
def _overrides_only_on_the_session_airflow(request: pytest.FixtureRequest):
    """The session's table overrides (K2_START_DATE per table, K2_DEADLINE) are set for its
    Airflow while it runs (`airflow_running`); a module outside the Airflow lane sees
    tables.yaml as written, also when it runs in the same worker after the Airflow tests.
    Module-scoped and autouse, so it comes before the module's own module-scoped fixtures."""
    from k2.config import OVERRIDE_ENV
    from tests.conftest import AIRFLOW_LANE_MODULES

    if request.node.nodeid in AIRFLOW_LANE_MODULES:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        for variable in OVERRIDE_ENV.values():
            patch.delenv(variable, raising=False)
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def environ_set(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block; restore the previous values afterwards,
    so a session fixture's settings never leak into later test modules."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port_env() -> dict[str, str]:
    """A free loopback port for every service of the local stack."""
    from k2.local.settings import PORT_ENV_VARS

    return {name: str(_free_port()) for name in PORT_ENV_VARS}


def stack_home() -> Path:
    """A fresh K2_HOME outside pytest's temp root: pytest resets that root to mode 0700
    when another session starts, which would lock PostgreSQL (not root) out of its data."""
    return Path(tempfile.mkdtemp(prefix="k2-test-home-"))


@pytest.fixture(scope="session")
def stack():
    """A LocalStack with PostgreSQL and the ClickHouse endpoint up."""
    home = stack_home()
    # Child processes (k2 CLI, spark-submit) see the same stack through the environment.
    with environ_set({"K2_HOME": str(home), **free_port_env()}):
        local = LocalStack.from_env()
        local_stack.up(local, log=lambda _msg: None)
        try:
            yield local
        finally:
            local_stack.down(local, log=lambda _msg: None)
            shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class JobStack:
    """What a job-level test module submits the offload job against: its own ClickHouse
    database (`ch_client`'s), its own Iceberg catalog (the module's CATALOG) and warehouse on
    the session's PostgreSQL, the job's environment, and a pyiceberg catalog on it."""

    clickhouse: ClickHouseSettings
    iceberg: IcebergSettings
    env: dict[str, str]
    catalog: Any


@pytest.fixture(scope="module")
def job_stack(stack: LocalStack, ch_client, request: pytest.FixtureRequest) -> JobStack:
    from k2.iceberg import load_catalog
    from tests.integration.spark_job import clickhouse_settings, iceberg_settings, job_env

    catalog_name = getattr(request.module, "CATALOG", None)
    assert catalog_name, f"{request.module.__name__} needs a CATALOG name of its own"
    ch = clickhouse_settings(stack, ch_client.database)
    # Under the stack's home, where the ClickHouse endpoint may read files (its working
    # directory, as a ClickHouse server's user_files_path): the hot + cold views read there.
    warehouse = stack.home / "warehouses" / catalog_name
    shutil.rmtree(warehouse, ignore_errors=True)
    warehouse.mkdir(parents=True)
    ice = iceberg_settings(stack, catalog_name, warehouse)
    return JobStack(ch, ice, job_env(ch, ice), load_catalog(ice))


@pytest.fixture(scope="module")
def ledger_dsn(stack: LocalStack, request: pytest.FixtureRequest) -> str:
    """A fresh watermark/ledger database of the test module (its LEDGER_DB) on the session's
    PostgreSQL."""
    import psycopg

    name = getattr(request.module, "LEDGER_DB", None)
    assert name, f"{request.module.__name__} needs a LEDGER_DB name of its own"
    with psycopg.connect(stack.postgres_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return stack.postgres_dsn(name)


@pytest.fixture(scope="module")
def store(ledger_dsn: str):
    """The watermark store on the module's ledger database, migrated."""
    from k2.watermarks import WatermarkStore

    store = WatermarkStore(ledger_dsn)
    store.migrate()
    return store


@pytest.fixture(scope="module")
def job_env(job_stack: JobStack) -> dict[str, str]:
    return job_stack.env


@pytest.fixture(scope="module")
def catalog(job_stack: JobStack):
    return job_stack.catalog


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


DEADLINE = "3m"


def floor_interval(moment: datetime) -> datetime:
    seconds = int(moment.timestamp())
    return datetime.fromtimestamp(seconds - seconds % 900, tz=timezone.utc)


@pytest.fixture(scope="session")
def start_date() -> datetime:
    """The DAGs' start date in tests: two intervals back from the last complete one."""
    now = datetime.now(timezone.utc)
    return floor_interval(now - timedelta(minutes=2)) - 2 * INTERVAL


# The outage scenario (test_outage_catchup.py): one table whose history and start date
# lie 6 hours back, as if the scheduler had been off that long. Its DAG stays paused until
# that test; before it, test_offload_dag's health check finds its watermark hours behind.
OUTAGE_TABLE = "gold_ohlcv_1d"
OUTAGE = timedelta(hours=6)


@pytest.fixture(scope="session")
def outage_start() -> datetime:
    return floor_interval(datetime.now(timezone.utc) - timedelta(minutes=5)) - OUTAGE


# The session's feed: both exchanges until `hot_data` runs; after that tests top the hot
# tier up with Kraken's trades only. Binance's feed handler is down for the rest of the
# session, so bronze_trades_binance's newest event ages with the session and
# test_fault_stopped_feed finds K2FeedStopped firing for it once 20 minutes have passed.
STOPPED_FEED_TABLE = "bronze_trades_binance"
LIVE_EXCHANGES = tuple(exchange for exchange, table in EXCHANGE_TABLES.items() if table != STOPPED_FEED_TABLE)


@pytest.fixture(scope="session")
def hot_data(stack: LocalStack, start_date: datetime, outage_start: datetime):
    """Trades from a little before start_date until now in the `k2` database (the one the
    Airflow connection clickhouse_default names); returns a client on it. Later trades come
    from LIVE_EXCHANGES only (see STOPPED_FEED_TABLE)."""
    from k2.feed import run_feed
    from k2.schema import apply_schema

    admin = stack.clickhouse_client()
    admin.command("CREATE DATABASE IF NOT EXISTS k2")
    client = stack.clickhouse_client(database="k2")
    apply_schema(client)
    now = datetime.now(timezone.utc)
    history_start = min(start_date, outage_start) - timedelta(minutes=5)
    run_feed(client, history=now - history_start, rate=None, seed=7, end=now, progress=None)
    return client


@pytest.fixture(scope="session")
def airflow_running(stack: LocalStack, hot_data, start_date: datetime, outage_start: datetime):
    """Airflow (api-server, scheduler, dag-processor, triggerer) on the test stack.

    DAGs are created paused; a test unpauses the ones it needs, whose catch-up then
    starts at start_date (OUTAGE_TABLE's at outage_start)."""
    from k2.local import airflow

    settings = {
        "K2_START_DATE": f"{start_date.isoformat()},{OUTAGE_TABLE}={outage_start.isoformat()}",
        "K2_DAGS_PAUSED": "True",
        # Short enough for a test to see a run miss it, long enough for a fast run to make it.
        "K2_DEADLINE": DEADLINE,
        # Fault tests wait for retries: 10 s, 20 s, 40 s instead of 1, 2, 4 min.
        "K2_RETRY_DELAY": "10",
    }
    # LocalExecutor runs every task; CeleryExecutor is there for a DAG that asks for it
    # (test_scale_out), its broker the stack's Redis when that test starts it.
    with environ_set({**settings, "K2_AIRFLOW_EXECUTOR": "LocalExecutor,CeleryExecutor"}):
        airflow.start(stack, log=lambda _msg: None)
        handle = AirflowHandle(stack, {**os.environ, **airflow.environment(stack)})
        try:
            yield handle
        finally:
            airflow.stop(stack, log=lambda _msg: None)
