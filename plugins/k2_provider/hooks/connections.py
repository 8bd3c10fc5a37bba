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
S3_EXTRA = frozenset({"s3_endpoint", "s3_region", "s3_path_style_access", "s3_access_key_id",
                      "s3_secret_access_key"})
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
    (``file:///...`` or ``s3://bucket/path``) and ``catalog_name`` (default ``k2``). A
    warehouse on S3 or an S3-compatible store takes ``s3_endpoint`` (empty: AWS),
    ``s3_region``, ``s3_path_style_access`` and, unless the AWS default chain provides them
    (instance profile, web identity), ``s3_access_key_id`` and ``s3_secret_access_key``.
    """
    extra = conn.extra_dejson or {}
    warehouse = extra.get("warehouse")
    if not conn.host or not conn.schema or not warehouse:
        raise ValueError(
            f"connection {conn.conn_id!r} needs host, schema (the catalog database) and extra.warehouse"
        )
    unknown = sorted(k for k in extra if k.startswith("s3_") and k not in S3_EXTRA)
    if unknown:
        raise ValueError(f"connection {conn.conn_id!r}: unknown extra key(s) {', '.join(unknown)}; "
                         f"the S3 keys are {', '.join(sorted(S3_EXTRA))}")
    if bool(extra.get("s3_access_key_id")) != bool(extra.get("s3_secret_access_key")):
        raise ValueError(f"connection {conn.conn_id!r}: extra s3_access_key_id and s3_secret_access_key "
                         "go together (or neither, for the AWS default credentials)")
    path_style = extra.get("s3_path_style_access", False)
    return IcebergSettings(
        catalog_name=extra.get("catalog_name") or "k2",
        uri=f"postgresql://{conn.host}:{conn.port or 5432}/{conn.schema}",
        user=conn.login or "",
        password=conn.password or "",
        warehouse=warehouse,
        s3_endpoint=extra.get("s3_endpoint") or "",
        s3_region=extra.get("s3_region") or "",
        s3_access_key_id=extra.get("s3_access_key_id") or "",
        s3_secret_access_key=extra.get("s3_secret_access_key") or "",
        s3_path_style_access=path_style if isinstance(path_style, bool)
        else str(path_style).lower() in {"1", "true", "yes"},
    )


def watermark_store_dsn(conn_id: str = WATERMARKS_CONN_ID) -> str:
    """The watermark store's (and offload lock's) libpq DSN from its Airflow connection."""
    return postgres_dsn_from_connection(BaseHook.get_connection(conn_id))


def iceberg_settings(conn_id: str = ICEBERG_CONN_ID) -> IcebergSettings:
    """The Iceberg JDBC catalog's settings from its Airflow connection."""
    return iceberg_settings_from_connection(BaseHook.get_connection(conn_id))
