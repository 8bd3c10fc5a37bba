"""How the offload job learns where ClickHouse and the Iceberg catalog are.

The Airflow task turns its connections into these environment variables for the
spark-submit process (never command-line arguments, so no secret shows in `ps` or
in the task log); the Spark job and the `k2` CLI read them back. One place for
the names, used by both sides.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Mapping

CLICKHOUSE_HOST = "K2_CLICKHOUSE_HOST"
CLICKHOUSE_PORT = "K2_CLICKHOUSE_PORT"
CLICKHOUSE_USER = "K2_CLICKHOUSE_USER"
CLICKHOUSE_PASSWORD = "K2_CLICKHOUSE_PASSWORD"
CLICKHOUSE_DATABASE = "K2_CLICKHOUSE_DATABASE"
CLICKHOUSE_SECURE = "K2_CLICKHOUSE_SECURE"

ICEBERG_CATALOG_NAME = "K2_ICEBERG_CATALOG_NAME"
ICEBERG_CATALOG_URI = "K2_ICEBERG_CATALOG_URI"  # postgresql://host:port/db, no credentials
ICEBERG_CATALOG_USER = "K2_ICEBERG_CATALOG_USER"
ICEBERG_CATALOG_PASSWORD = "K2_ICEBERG_CATALOG_PASSWORD"
ICEBERG_WAREHOUSE = "K2_ICEBERG_WAREHOUSE"  # file:///... or s3://...
# A warehouse on S3 or an S3-compatible store. Without keys, Iceberg's S3FileIO and pyarrow
# take the AWS default chain (instance profile, web identity, AWS_* variables).
S3_ENDPOINT = "K2_S3_ENDPOINT"  # http(s)://host:port of an S3-compatible store; empty: AWS
S3_REGION = "K2_S3_REGION"
S3_ACCESS_KEY_ID = "K2_S3_ACCESS_KEY_ID"
S3_SECRET_ACCESS_KEY = "K2_S3_SECRET_ACCESS_KEY"
S3_PATH_STYLE_ACCESS = "K2_S3_PATH_STYLE_ACCESS"  # true for most S3-compatible stores

SECRET_VARIABLES = frozenset({CLICKHOUSE_PASSWORD, ICEBERG_CATALOG_PASSWORD, S3_SECRET_ACCESS_KEY})
OBJECT_STORE_SCHEMES = ("s3://", "s3a://")


class MissingSetting(RuntimeError):
    """A required environment variable is not set."""


def _flag(value: str | None) -> bool:
    return (value or "").lower() in {"1", "true", "yes"}


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise MissingSetting(f"environment variable {name} is not set")
    return value


@dataclass(frozen=True)
class ClickHouseSettings:
    host: str
    port: int
    user: str
    password: str
    database: str
    secure: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClickHouseSettings:
        env = os.environ if env is None else env
        return cls(
            host=_required(env, CLICKHOUSE_HOST),
            port=int(env.get(CLICKHOUSE_PORT) or 8123),
            user=env.get(CLICKHOUSE_USER) or "default",
            password=env.get(CLICKHOUSE_PASSWORD) or "",
            database=env.get(CLICKHOUSE_DATABASE) or "default",
            secure=_flag(env.get(CLICKHOUSE_SECURE)),
        )

    def to_env(self) -> dict[str, str]:
        return {
            CLICKHOUSE_HOST: self.host,
            CLICKHOUSE_PORT: str(self.port),
            CLICKHOUSE_USER: self.user,
            CLICKHOUSE_PASSWORD: self.password,
            CLICKHOUSE_DATABASE: self.database,
            CLICKHOUSE_SECURE: "true" if self.secure else "false",
        }

    def client_kwargs(self) -> dict[str, object]:
        """Keyword arguments for clickhouse_connect.get_client."""
        return {
            "host": self.host,
            "port": self.port,
            "username": self.user,
            "password": self.password,
            "database": self.database,
            "secure": self.secure,
        }

    def __repr__(self) -> str:  # never print the password
        return f"ClickHouseSettings({self.user}@{self.host}:{self.port}/{self.database})"


@dataclass(frozen=True)
class IcebergSettings:
    """An Iceberg JDBC catalog in PostgreSQL, readable by Spark and by pyiceberg's SqlCatalog;
    its warehouse on a path (file:///...) or on S3 or an S3-compatible store (s3://bucket/...)."""

    catalog_name: str
    uri: str  # postgresql://host:port/db
    user: str
    password: str
    warehouse: str
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_path_style_access: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IcebergSettings:
        env = os.environ if env is None else env
        return cls(
            catalog_name=env.get(ICEBERG_CATALOG_NAME) or "k2",
            uri=_required(env, ICEBERG_CATALOG_URI),
            user=_required(env, ICEBERG_CATALOG_USER),
            password=env.get(ICEBERG_CATALOG_PASSWORD) or "",
            warehouse=_required(env, ICEBERG_WAREHOUSE),
            s3_endpoint=env.get(S3_ENDPOINT) or "",
            s3_region=env.get(S3_REGION) or "",
            s3_access_key_id=env.get(S3_ACCESS_KEY_ID) or "",
            s3_secret_access_key=env.get(S3_SECRET_ACCESS_KEY) or "",
            s3_path_style_access=_flag(env.get(S3_PATH_STYLE_ACCESS)),
        )

    def to_env(self) -> dict[str, str]:
        env = {
            ICEBERG_CATALOG_NAME: self.catalog_name,
            ICEBERG_CATALOG_URI: self.uri,
            ICEBERG_CATALOG_USER: self.user,
            ICEBERG_CATALOG_PASSWORD: self.password,
            ICEBERG_WAREHOUSE: self.warehouse,
        }
        if self.on_object_store:
            env.update({
                S3_ENDPOINT: self.s3_endpoint,
                S3_REGION: self.s3_region,
                S3_ACCESS_KEY_ID: self.s3_access_key_id,
                S3_SECRET_ACCESS_KEY: self.s3_secret_access_key,
                S3_PATH_STYLE_ACCESS: "true" if self.s3_path_style_access else "false",
            })
        return env

    @property
    def jdbc_uri(self) -> str:
        return "jdbc:" + self.uri

    @property
    def on_object_store(self) -> bool:
        """The warehouse is on S3 or an S3-compatible store (else a path every process sees)."""
        return self.warehouse.startswith(OBJECT_STORE_SCHEMES)

    def __repr__(self) -> str:  # never print the password or the secret key
        where = f", s3 endpoint={self.s3_endpoint or 'AWS'}" if self.on_object_store else ""
        return f"IcebergSettings({self.catalog_name}: {self.uri}, warehouse={self.warehouse}{where})"


def configure_job_logging() -> None:
    """A Spark job's logging: the k2 loggers to stderr at INFO (stdout carries only the job's
    result lines), py4j's chatter at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    k2_log = logging.getLogger("k2")
    k2_log.addHandler(handler)
    k2_log.setLevel(logging.INFO)
    k2_log.propagate = False
    logging.getLogger("py4j").setLevel(logging.WARNING)
