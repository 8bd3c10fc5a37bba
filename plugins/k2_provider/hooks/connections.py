"""Airflow connections -> the settings the project's library takes: the one mapping of the
watermark store's and the Iceberg catalog's connections (ClickHouse's is
k2_provider.hooks.clickhouse.K2ClickHouseHook's). Secrets stay in the values returned;
callers hand them to processes through the environment, never a command line or a log."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook, Connection

from k2.runtime_env import IcebergSettings

WATERMARKS_CONN_ID = "k2_watermarks"
ICEBERG_CONN_ID = "iceberg_default"
# libpq options a postgres connection may carry in its extra
LIBPQ_EXTRA = frozenset({"sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "connect_timeout"})


def postgres_dsn_from_connection(conn: Connection) -> str:
    """libpq DSN from a postgres-style Airflow connection (schema = database; extra = libpq options)."""
    from psycopg.conninfo import make_conninfo  # psycopg loads in the task that connects

    options: dict[str, Any] = {
        "host": conn.host or "localhost",
        "port": conn.port or 5432,
        "dbname": conn.schema or "k2",
        "user": conn.login or None,
        "password": conn.password or None,
    }
    # libpq options such as sslmode or application_name may sit in extra.
    options.update({k: v for k, v in (conn.extra_dejson or {}).items() if k in LIBPQ_EXTRA})
    return make_conninfo("", **{k: v for k, v in options.items() if v is not None})


def iceberg_settings_from_connection(conn: Connection) -> IcebergSettings:
    """A postgres-style Airflow connection -> the Iceberg JDBC catalog settings.

    host, port, login, password, schema = the catalog database; extra ``warehouse``
    (``file:///...`` or ``s3://...``) and ``catalog_name`` (default ``k2``).
    """
    extra = conn.extra_dejson or {}
    warehouse = extra.get("warehouse")
    if not conn.host or not conn.schema or not warehouse:
        raise ValueError(
            f"connection {conn.conn_id!r} needs host, schema (the catalog database) and extra.warehouse"
        )
    return IcebergSettings(
        catalog_name=extra.get("catalog_name") or "k2",
        uri=f"postgresql://{conn.host}:{conn.port or 5432}/{conn.schema}",
        user=conn.login or "",
        password=conn.password or "",
        warehouse=warehouse,
    )


def watermark_store_dsn(conn_id: str = WATERMARKS_CONN_ID) -> str:
    """The watermark store's (and offload lock's) libpq DSN from its Airflow connection."""
    return postgres_dsn_from_connection(BaseHook.get_connection(conn_id))


def iceberg_settings(conn_id: str = ICEBERG_CONN_ID) -> IcebergSettings:
    """The Iceberg JDBC catalog's settings from its Airflow connection."""
    return iceberg_settings_from_connection(BaseHook.get_connection(conn_id))
