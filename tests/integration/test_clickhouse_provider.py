"""The official ClickHouse provider against the stack's ClickHouse endpoint.

`clickhouse_default` as the local stack defines it (k2.local.airflow.connections) is resolved
by Airflow's providers manager to the official `apache-airflow-providers-clickhousedb` hook;
`SQLExecuteQueryOperator` runs DDL, an insert and a parametrised query through it, and the
project's hook (its subclass) reads the same table's watermark through the same connection.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from airflow.providers.clickhousedb.hooks.clickhouse import ClickHouseHook
from airflow.providers.common.sql.hooks.handlers import fetch_all_handler
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator

from k2.local.airflow import connections
from k2_provider.hooks.clickhouse import K2ClickHouseHook

pytestmark = pytest.mark.integration

CONN_ID = "clickhouse_default"


@pytest.fixture
def clickhouse_default(stack, ch_client, monkeypatch):
    """The stack's clickhouse_default, as the Airflow connection every task sees (env var)."""
    conn = dict(connections(stack)[CONN_ID])
    conn["schema"] = ch_client.database  # this module's own database
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return ch_client.database


def _run(sql, **kwargs):
    op = SQLExecuteQueryOperator(
        task_id="clickhouse_sql", conn_id=CONN_ID, sql=sql, handler=fetch_all_handler, **kwargs
    )
    hook = op.get_db_hook()
    assert type(hook) is ClickHouseHook  # resolved by connection type: the official hook
    return op.execute(context={})


def test_sql_execute_query_operator_runs_against_clickhouse_default(clickhouse_default):
    base = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    rows = ", ".join(
        f"({i}, 'BTCUSDT', {10 * i}, toDateTime64('{(base + timedelta(seconds=i)):%Y-%m-%d %H:%M:%S}', 3, 'UTC'))"
        for i in range(1, 6)
    )
    result = _run(
        [
            "CREATE TABLE provider_trades (id UInt64, symbol LowCardinality(String), "
            "qty UInt32, event_time DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY id",
            f"INSERT INTO provider_trades VALUES {rows}",
            "SELECT count(), sum(qty), max(id) FROM provider_trades",
        ],
    )
    assert len(result) == 3  # one result per statement of a list
    assert [tuple(r) for r in result[-1]] == [(5, 150, 5)]

    # DB-API parameters through clickhouse-connect's cursor (pyformat)
    found = _run("SELECT id FROM provider_trades WHERE qty > %(qty)s ORDER BY id",
                 parameters={"qty": 25})
    assert [r[0] for r in found] == [3, 4, 5]

    # The project's hook: the official mapping plus its own queries, on the same connection.
    hook = K2ClickHouseHook(CONN_ID)
    try:
        assert hook.watermark("provider_trades", "event_time", timedelta(seconds=2)) == (
            base + timedelta(seconds=3)
        )
        assert hook.settings_for_spark().database == clickhouse_default
    finally:
        hook.close()


def test_a_failing_statement_fails_the_task_with_clickhouse_s_message(clickhouse_default):
    with pytest.raises(Exception, match="UNKNOWN_TABLE|doesn't exist|does not exist"):
        _run("SELECT count() FROM no_such_table")
