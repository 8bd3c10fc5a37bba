"""docker-compose.yaml: parses, exposes nothing beyond loopback, mounts files that exist,
and its Prometheus/Alertmanager configs pass the tools' own checks; it has the production
scale-out shape (Iceberg warehouse on an S3-compatible object store, the CeleryExecutor with
a password-protected Redis broker and two workers, a Spark master and two workers) and holds
no literal secret. (No Docker engine runs in CI; this is what can be proven without one.)"""

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
    assert iceberg.uri == "postgresql://postgres:5432/k2" and iceberg.warehouse.startswith("s3://")
    spark = conns["spark_default"]
    assert f"{spark.host}:{spark.port}".startswith("spark://spark-master:7077")
    assert conns["smtp_default"].conn_type == "smtp"


def test_a_spark_master_and_two_workers():
    services = COMPOSE["services"]
    assert "deploy.master.Master" in services["spark-master"]["command"]
    workers = [name for name, s in services.items() if "deploy.worker.Worker" in str(s.get("command", ""))]
    assert len(workers) == 2, workers


# --- the production scale-out shape: object store, CeleryExecutor on Redis, no literal secrets

SECRET_NAME_PARTS = ("PASSWORD", "SECRET", "KEY")
# the whole value is one ${VAR}, ${VAR:?message} or ${VAR:-default} reference
INTERPOLATION = r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:]?[-?+][^}]*)?\}"


def _variable(value: str) -> str:
    """The variable a whole-value ${...} reference names."""
    import re

    assert re.fullmatch(INTERPOLATION, value), f"{value!r} is not a ${{...}} reference"
    return re.match(r"\$\{([A-Za-z0-9_]+)", value).group(1)


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: value for key, value in env.items() if value is not None}


def _command(service: dict) -> str:
    command = service.get("command") or ""
    return " ".join(command) if isinstance(command, list) else str(command)


def _airflow_env() -> dict[str, str]:
    return _environment(COMPOSE["x-airflow"])


def _iceberg_extra() -> dict:
    import json

    return json.loads(_airflow_env()["AIRFLOW_CONN_ICEBERG_DEFAULT"])["extra"]


def test_an_object_store_for_the_warehouse():
    store = COMPOSE["services"]["object-store"]
    assert store["image"].startswith("versity/versitygw:"), store["image"]
    assert "posix" in _command(store) and "--health /health" in _command(store)
    assert "/health" in " ".join(store["healthcheck"]["test"])
    env = _environment(store)
    assert {"ROOT_ACCESS_KEY_ID", "ROOT_SECRET_ACCESS_KEY"} <= set(env)
    # its data on a named volume, not a host path
    sources = [str(v).split(":")[0] for v in store.get("volumes", [])]
    assert sources and all(source in COMPOSE["volumes"] for source in sources), sources


def test_the_warehouse_bucket_is_created_before_airflow_starts():
    init = COMPOSE["services"]["object-store-init"]
    command = _command(init)
    assert "s3 mb s3://k2-warehouse" in command and "--endpoint-url http://object-store:" in command
    assert init["depends_on"]["object-store"]["condition"] == "service_healthy"
    airflow_waits_for = COMPOSE["x-airflow"]["depends_on"]["object-store-init"]["condition"]
    assert airflow_waits_for == "service_completed_successfully"


def test_the_iceberg_warehouse_is_on_the_object_store():
    """Asserted on the raw extra: the keys the provider reads for an S3 warehouse."""
    extra = _iceberg_extra()
    assert extra["warehouse"].startswith("s3://k2-warehouse/")
    assert extra["s3_endpoint"] == "http://object-store:7070"
    assert extra["s3_region"] == "us-east-1"
    assert extra["s3_path_style_access"] is True
    # the gateway's root credentials, from the same .env variables
    store = _environment(COMPOSE["services"]["object-store"])
    assert _variable(extra["s3_access_key_id"]) == _variable(store["ROOT_ACCESS_KEY_ID"])
    assert _variable(extra["s3_secret_access_key"]) == _variable(store["ROOT_SECRET_ACCESS_KEY"])


def test_a_password_protected_redis_broker():
    import re

    redis = COMPOSE["services"]["redis"]
    repository, _, _ = redis["image"].rpartition(":")
    assert repository == "redis"
    command = _command(redis)
    # requirepass from the environment, as config on redis-server's stdin: in no process's argv
    assert re.search(r"requirepass %s.*\$\$REDIS_PASSWORD.*\| exec redis-server -", command), command
    assert "--requirepass" not in command, f"the password would be in redis-server's arguments: {command}"
    assert "REDIS_PASSWORD" in _environment(redis)


def test_the_celery_executor_with_the_redis_broker():
    import re

    env = _airflow_env()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    broker = env["AIRFLOW__CELERY__BROKER_URL"]
    assert re.fullmatch(rf"redis://:{INTERPOLATION}@redis:6379/\d+", broker), broker
    assert re.fullmatch(rf"db\+postgresql://k2:{INTERPOLATION}@postgres:5432/airflow",
                        env["AIRFLOW__CELERY__RESULT_BACKEND"])


def test_two_celery_workers_built_like_airflow():
    workers = {name: s for name, s in COMPOSE["services"].items() if "celery worker" in _command(s)}
    assert len(workers) >= 2, sorted(workers)
    for name, worker in workers.items():
        assert worker["build"] == COMPOSE["x-airflow"]["build"], name
        assert _environment(worker).items() >= _airflow_env().items(), name


def _literal_secrets(env: dict[str, str]) -> list[str]:
    """Where env holds a secret literally: a secret-looking variable (PASSWORD, SECRET, KEY in
    its name) that is not a ${...} reference, a URL's user:password@, a connection's password
    or secret-looking extra key."""
    import json
    import re

    def literal(value) -> bool:
        return not re.fullmatch(INTERPOLATION, str(value))

    def secret_looking(name: str) -> bool:
        return any(part in name.upper() for part in SECRET_NAME_PARTS)

    found = []
    for key, value in env.items():
        value = str(value)
        if secret_looking(key) and literal(value):
            found.append(key)
        if any(literal(password) for password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", value)):
            found.append(f"{key} (password in a URL)")
        if key.startswith("AIRFLOW_CONN_"):
            conn = json.loads(value)
            fields = {"password": conn.get("password"), **(conn.get("extra") or {})}
            found += [f"{key} ({field})" for field, secret in fields.items()
                      if secret and secret_looking(field) and literal(secret)]
    return found


def test_the_secret_check_finds_literals():
    env = {
        "REDIS_PASSWORD": "hunter2",
        "AIRFLOW__CORE__FERNET_KEY": "${AIRFLOW_FERNET_KEY:?set in .env}",
        "BROKER": "redis://:hunter2@redis:6379/0",
        "DSN": "postgresql://k2:${POSTGRES_PASSWORD}@postgres/k2",
        "AIRFLOW_CONN_X": '{"password": "hunter2", "extra": {"s3_secret_access_key": "abc", "s3_region": "x"}}',
    }
    assert _literal_secrets(env) == ["REDIS_PASSWORD", "BROKER (password in a URL)",
                                     "AIRFLOW_CONN_X (password)", "AIRFLOW_CONN_X (s3_secret_access_key)"]


def _environments() -> list[tuple[str, dict[str, str]]]:
    services = [(name, _environment(service)) for name, service in COMPOSE["services"].items()]
    return [("x-airflow", _airflow_env()), *services]


@pytest.mark.parametrize("where, env", _environments(), ids=[where for where, _ in _environments()])
def test_no_literal_secrets(where, env):
    assert not _literal_secrets(env), f"{where} holds literal secrets in {_literal_secrets(env)}"
