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


S3_EXTRA = {"warehouse": "s3://k2-warehouse/warehouse", "s3_endpoint": "http://store:7070",
            "s3_region": "eu-west-1", "s3_path_style_access": "true",
            "s3_access_key_id": "AKIDK2", "s3_secret_access_key": "s3-secret-value"}


def test_a_warehouse_on_an_s3_compatible_store_from_the_connection_extra() -> None:
    settings = iceberg_settings_from_connection(_conn("iceberg_default", S3_EXTRA, host="db", schema="k2"))
    assert settings.on_object_store
    assert (settings.s3_endpoint, settings.s3_region, settings.s3_path_style_access) == (
        "http://store:7070", "eu-west-1", True)
    assert (settings.s3_access_key_id, settings.s3_secret_access_key) == ("AKIDK2", "s3-secret-value")
    assert "s3-secret-value" not in repr(settings) and "http://store:7070" in repr(settings)


def test_an_s3_key_without_its_secret_and_an_unknown_s3_key_are_named() -> None:
    half = {k: v for k, v in S3_EXTRA.items() if k != "s3_secret_access_key"}
    with pytest.raises(ValueError, match="s3_access_key_id and s3_secret_access_key go together"):
        iceberg_settings_from_connection(_conn("iceberg_default", half, host="db", schema="k2"))
    with pytest.raises(ValueError, match=r"unknown extra key\(s\) s3_endpoint_url"):
        iceberg_settings_from_connection(_conn(
            "iceberg_default", {**S3_EXTRA, "s3_endpoint_url": "x"}, host="db", schema="k2"))
