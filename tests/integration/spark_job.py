"""What the job-level tests need to spark-submit the offload job against the session stack."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from k2.config import SPARK_JARS_DIR
from k2.intervals import split_range
from k2.local.settings import spark_environment
from k2.offload import DEFAULT_APPLICATION as JOB
from k2.offload import job_arguments, job_jars, spark_submit_command
from k2.runtime_env import ClickHouseSettings, IcebergSettings


def spark_jars() -> list[str]:
    """Every jar `make setup` copied (fails the test if Iceberg's is missing)."""
    jars = job_jars()
    if not any("iceberg-spark-runtime" in j for j in jars):
        pytest.fail(f"no iceberg-spark-runtime jar in {SPARK_JARS_DIR}: run `make setup`")
    return jars


def submit_argv(application: Path | str, *arguments: str, master: str = "local[2]") -> list[str]:
    """spark-submit of an application with the job's jars, as k2.offload builds it."""
    return spark_command(list(arguments), master=master, application=application)


def spark_command(arguments: list[str], *, master: str = "local[2]",
                  application: Path | str = JOB) -> list[str]:
    return spark_submit_command(arguments, master=master, jars=spark_jars(), application=application)


def job_argv(table: str, start, end, run_id: str, *extra: str, master: str = "local[2]") -> list[str]:
    """spark-submit of the offload job for [start, end) in 15-minute intervals (one interval
    when the range is not a whole number of them), the arguments as the operator's."""
    return spark_command([*job_arguments(table, split_range(start, end), run_id), *extra], master=master)


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
