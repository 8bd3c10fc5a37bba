"""Unit tests see tables.yaml as written: the integration fixtures set the override
variables (start date, deadline) for the whole session, which must not leak in here.
The checks that must agree between engines share one local SparkSession."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from k2.config import OVERRIDE_ENV


@pytest.fixture(autouse=True)
def _no_config_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in OVERRIDE_ENV.values():
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """A one-core local SparkSession in UTC (its JVM starts once for every unit module)."""
    from pyspark.sql import SparkSession

    # py4j logs at INFO from __del__ at interpreter exit, after pytest closed its streams
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from k2.local.settings import LOOPBACK, spark_environment

    # The local stack's Spark settings (loopback, a JVM for short jobs), as the jobs get them.
    for key, value in spark_environment(LOOPBACK).items():
        os.environ.setdefault(key, value)
    session = (
        SparkSession.builder.master("local[1]")
        .appName("k2-unit-tests")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    yield session
    session.stop()
