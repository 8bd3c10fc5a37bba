"""docker-compose.yaml: parses, exposes nothing beyond loopback, mounts files that exist,
and its Prometheus/Alertmanager configs pass the tools' own checks. (No Docker engine
runs in CI; this is what can be proven without one.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_published_ports_bind_loopback_only(name):
    for port in COMPOSE["services"][name].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_mounted_files_exist(name):
    for volume in COMPOSE["services"][name].get("volumes", []):
        source = str(volume).split(":")[0]
        if source.startswith("./"):
            assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_compose_prometheus_config_is_valid():
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "config", "prometheus.compose.yml"],
        cwd=REPO / "monitoring" / "prometheus", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_alertmanager_config_is_valid():
    result = subprocess.run(
        [shutil.which("amtool") or "amtool", "check-config", "alertmanager.compose.yml"],
        cwd=REPO / "monitoring" / "alertmanager", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_is_pinned():
    for name, service in COMPOSE["services"].items():
        image = service.get("image")
        if image is None:
            assert "build" in service or "<<" in service or service.get("command"), name  # built here
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: image {image!r} is not pinned"


def _compose_connections() -> dict[str, str]:
    """conn_id -> the AIRFLOW_CONN_* JSON of the Airflow services, ${...} filled in."""
    import re

    env = COMPOSE["x-airflow"]["environment"]
    return {key[len("AIRFLOW_CONN_"):].lower(): re.sub(r"\$\{[^}]+\}", "secret-from-env", value)
            for key, value in env.items() if key.startswith("AIRFLOW_CONN_")}


def test_the_connection_ids_are_the_local_stacks():
    from k2.local.airflow import connections
    from k2.local.settings import LocalStack

    local = connections(LocalStack.from_env())
    assert set(_compose_connections()) == set(local)


def test_every_connection_is_parsed_by_the_provider():
    """Each connection as the provider reads it: ClickHouse's client settings, the watermark
    store's DSN, the Iceberg catalog's settings, Spark's master."""
    from airflow.models.connection import Connection

    from k2_provider.hooks.clickhouse import client_kwargs_from_connection
    from k2_provider.hooks.connections import iceberg_settings_from_connection, postgres_dsn_from_connection

    conns = {conn_id: Connection.from_json(value, conn_id=conn_id) for conn_id, value in _compose_connections().items()}
    kwargs = client_kwargs_from_connection(conns["clickhouse_default"])
    assert (kwargs["host"], kwargs["port"], kwargs["database"]) == ("clickhouse", 8123, "k2")
    assert "host=postgres" in postgres_dsn_from_connection(conns["k2_watermarks"])
    iceberg = iceberg_settings_from_connection(conns["iceberg_default"])
    assert iceberg.uri == "postgresql://postgres:5432/k2" and iceberg.warehouse
    spark = conns["spark_default"]
    assert f"{spark.host}:{spark.port}".startswith("spark://spark-master:7077")
    assert conns["smtp_default"].conn_type == "smtp"


def test_a_spark_master_and_two_workers():
    services = COMPOSE["services"]
    assert "deploy.master.Master" in services["spark-master"]["command"]
    workers = [name for name, s in services.items() if "deploy.worker.Worker" in str(s.get("command", ""))]
    assert len(workers) == 2, workers
