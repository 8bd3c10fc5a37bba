"""Airflow connections -> the watermark store's DSN and the Iceberg catalog's settings
(k2_provider.hooks.connections, the one mapping both operators use)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection
from psycopg.conninfo import conninfo_to_dict

from k2_provider.hooks.connections import (
    iceberg_settings_from_connection,
    postgres_dsn_from_connection,
)


def _conn(conn_id: str, extra: dict | None = None, **fields) -> Connection:
    return Connection(conn_id=conn_id, conn_type="postgres",
                      extra=json.dumps(extra) if extra else None, **fields)


def test_postgres_dsn_keeps_libpq_options_of_the_extra_and_nothing_else() -> None:
    dsn = postgres_dsn_from_connection(_conn(
        "k2_watermarks", {"sslmode": "require", "application_name": "k2", "warehouse": "x"},
        host="db", port=6543, login="k2", password="p w", schema="ledger"))
    assert conninfo_to_dict(dsn) == {"host": "db", "port": "6543", "dbname": "ledger", "user": "k2",
                                     "password": "p w", "sslmode": "require", "application_name": "k2"}


def test_iceberg_settings_from_a_postgres_connection() -> None:
    settings = iceberg_settings_from_connection(_conn(
        "iceberg_default", {"warehouse": "s3://bucket/wh"}, host="db", login="k2", password="pw-secret", schema="k2"))
    assert (settings.uri, settings.warehouse, settings.catalog_name) == (
        "postgresql://db:5432/k2", "s3://bucket/wh", "k2")
    assert settings.password == "pw-secret" and "pw-secret" not in repr(settings)


def test_iceberg_connection_without_a_warehouse_is_named() -> None:
    with pytest.raises(ValueError, match="connection 'iceberg_default' needs host, schema .* and extra.warehouse"):
        iceberg_settings_from_connection(_conn("iceberg_default", host="db", schema="k2"))
