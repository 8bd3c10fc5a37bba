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

SECRET_VARIABLES = frozenset({CLICKHOUSE_PASSWORD, ICEBERG_CATALOG_PASSWORD})


class MissingSetting(RuntimeError):
    """A required environment variable is not set."""


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
            secure=(env.get(CLICKHOUSE_SECURE) or "").lower() in {"1", "true", "yes"},
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
    """An Iceberg JDBC catalog in PostgreSQL, readable by Spark and by pyiceberg's SqlCatalog."""

    catalog_name: str
    uri: str  # postgresql://host:port/db
    user: str
    password: str
    warehouse: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IcebergSettings:
        env = os.environ if env is None else env
        return cls(
            catalog_name=env.get(ICEBERG_CATALOG_NAME) or "k2",
            uri=_required(env, ICEBERG_CATALOG_URI),
            user=_required(env, ICEBERG_CATALOG_USER),
            password=env.get(ICEBERG_CATALOG_PASSWORD) or "",
            warehouse=_required(env, ICEBERG_WAREHOUSE),
        )

    def to_env(self) -> dict[str, str]:
        return {
            ICEBERG_CATALOG_NAME: self.catalog_name,
            ICEBERG_CATALOG_URI: self.uri,
            ICEBERG_CATALOG_USER: self.user,
            ICEBERG_CATALOG_PASSWORD: self.password,
            ICEBERG_WAREHOUSE: self.warehouse,
        }

    @property
    def jdbc_uri(self) -> str:
        return "jdbc:" + self.uri

    def __repr__(self) -> str:
        return f"IcebergSettings({self.catalog_name}: {self.uri}, warehouse={self.warehouse})"


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
