"""What the job-level tests need to spark-submit the offload job against the session stack."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from k2.local.settings import spark_environment
from k2.runtime_env import ClickHouseSettings, IcebergSettings

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "spark_jobs" / "offload_to_iceberg.py"
JARS_DIR = REPO / "spark_jobs" / "jars"


def spark_jars() -> str:
    """The `--jars` value: every jar `make setup` copied (fails the test if Iceberg's is missing)."""
    jars = sorted(str(p) for p in JARS_DIR.glob("*.jar"))
    if not any("iceberg-spark-runtime" in j for j in jars):
        pytest.fail(f"no iceberg-spark-runtime jar in {JARS_DIR}: run `make setup`")
    return ",".join(jars)


def clickhouse_settings(stack, database: str) -> ClickHouseSettings:
    c = stack.credentials
    return ClickHouseSettings(host=stack.host, port=stack.clickhouse_port, user=c["clickhouse_user"],
                              password=c["clickhouse_password"], database=database)


def iceberg_settings(stack, catalog_name: str, warehouse: Path) -> IcebergSettings:
    """A JDBC catalog of its own name on the session's PostgreSQL, with its own warehouse."""
    c = stack.credentials
    return IcebergSettings(
        catalog_name=catalog_name, uri=f"postgresql://{stack.host}:{stack.postgres_port}/k2",
        user=c["postgres_user"], password=c["postgres_password"], warehouse=warehouse.as_uri(),
    )


def job_env(ch: ClickHouseSettings, ice: IcebergSettings) -> dict[str, str]:
    """The job's environment: where ClickHouse and the catalog are, this venv's Python and
    spark-submit, the local stack's Spark settings, and no K2_* overrides of the session's
    Airflow fixtures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    env.update(ch.to_env())
    env.update(ice.to_env())
    env.update({"PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
                "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
    env.update(spark_environment(ch.host))  # as the local stack's Airflow runs it
    return env
