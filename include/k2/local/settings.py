"""Where the local stack lives and how to reach it: one place for ports, paths and credentials.

Every value can be overridden through the environment so that tests (and a second
checkout) can run a stack of their own beside `make run`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import clickhouse_connect

from k2.config import REPO_ROOT, SPARK_JARS_DIR
from k2.offload import job_jars

# Spark's settings for every job on the local stack (loopback, no UI, quiet logs, a JVM for
# short jobs): spark-defaults.conf and log4j2.properties of this folder (see the files).
SPARK_CONF_DIR = REPO_ROOT / "spark_jobs" / "conf"
# The driver JVM's class-data archive (AppCDS), made by `make setup` (k2.local.spark_archive):
# the classes an offload job loads, mapped instead of loaded and verified again per job.
SPARK_CLASS_ARCHIVE = REPO_ROOT / "spark_jobs" / "cds" / "driver.jsa"
# Where a dump writes it first: it replaces SPARK_CLASS_ARCHIVE only once complete.
SPARK_CLASS_ARCHIVE_PARTIAL = SPARK_CLASS_ARCHIVE.with_suffix(".jsa.tmp")
# spark-submit's launcher puts SPARK_CONF_DIR on the JVM's class path, and the JVM shares
# classes only if that path holds jars and absent or empty folders. So the local stack points
# SPARK_CONF_DIR at a folder that does not exist and hands the settings of SPARK_CONF_DIR's
# files to the JVM as options (SPARK_SUBMIT_OPTS), which SparkConf reads as spark.* properties.
SPARK_NO_CONF_DIR = SPARK_CLASS_ARCHIVE.parent / "no-conf"
# The ClickHouse database of the local stack's tables.
CLICKHOUSE_DATABASE = "k2"


def spark_java_options(*, archive: str = "use") -> str:
    """The driver JVM's options for a local job: spark-defaults.conf as -D options, its
    spark.driver.extraJavaOptions as they are, the log4j2 file, and the class-data archive
    ("use": when `make setup` made it; "dump": write it at exit; "none")."""
    options: list[str] = []
    defaults = SPARK_CONF_DIR / "spark-defaults.conf"
    for number, raw in enumerate(defaults.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if key == "spark.driver.extraJavaOptions":
            options.extend(value.split())
        elif not value or any(c.isspace() or c in "\"'" for c in value):
            raise ValueError(f"{defaults}:{number}: {key} needs one value without spaces or quotes")
        else:
            options.append(f"-D{key}={value}")
    options.append(f"-Dlog4j2.configurationFile={SPARK_CONF_DIR / 'log4j2.properties'}")
    if archive == "dump":
        options.append(f"-XX:ArchiveClassesAtExit={SPARK_CLASS_ARCHIVE_PARTIAL}")
    elif archive == "use" and SPARK_CLASS_ARCHIVE.is_file():
        options.append(f"-XX:SharedArchiveFile={SPARK_CLASS_ARCHIVE}")
    return " ".join(options)


def spark_environment(host: str, *, archive: str = "use") -> dict[str, str]:
    """What spark-submit needs to run a job on the local stack bound to `host`.

    The job's jars (SPARK_JARS_DIR) also go on the JVM's own class path (the launcher adds
    SPARK_DIST_CLASSPATH to it): classes of --jars come through Spark's own class loader,
    which the class-data archive cannot hold; found on the class path, Iceberg's and the
    JDBC driver's classes are mapped from the archive like Spark's.

    The Python of the job's executors (their read and write slices import k2, pyarrow and
    clickhouse-connect) is this virtualenv's, also on a local standalone cluster's workers;
    a cluster elsewhere needs those in its executors' Python (docs/scaling.md)."""
    return {
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": host,
        "SPARK_CONF_DIR": str(SPARK_NO_CONF_DIR),
        "SPARK_SUBMIT_OPTS": spark_java_options(archive=archive),
        "SPARK_DIST_CLASSPATH": os.pathsep.join(job_jars(SPARK_JARS_DIR)),
    }


LOOPBACK = "127.0.0.1"
# Every port of the local stack can be moved with one of these (tests use free ones).
PORT_ENV_VARS = (
    "K2_CLICKHOUSE_PORT",
    "K2_POSTGRES_PORT",
    "K2_AIRFLOW_PORT",
    "K2_SMTP_PORT",
    "K2_STATSD_PORT",
    "K2_STATSD_EXPORTER_PORT",
    "K2_PROMETHEUS_PORT",
    "K2_ALERTMANAGER_PORT",
    "K2_OBJECT_STORE_PORT",  # k2 local up --object-store
    "K2_REDIS_PORT",  # k2 local up --celery
)


def default_home(home: Path | None = None) -> Path:
    """The K2 home every part of the local stack lives under: `home`, else $K2_HOME, else
    .k2 in the checkout."""
    return (home or Path(os.environ.get("K2_HOME") or REPO_ROOT / ".k2")).resolve()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{name}={raw!r} is outside 1-65535")
    return port


class StackHome:
    """Where every daemon of a stack below ``home`` keeps its pid file and its log."""

    home: Path

    @property
    def run_dir(self) -> Path:
        """pid files of the processes `k2 local up` started."""
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


@dataclass(frozen=True)
class LocalStack(StackHome):
    """The local stack's layout. Build it with `LocalStack.from_env()`."""

    home: Path
    clickhouse_port: int
    postgres_port: int
    airflow_port: int
    smtp_port: int
    host: str = LOOPBACK

    @classmethod
    def from_env(cls) -> LocalStack:
        return cls(
            home=default_home(),
            clickhouse_port=_env_int("K2_CLICKHOUSE_PORT", 8123),
            postgres_port=_env_int("K2_POSTGRES_PORT", 55432),
            airflow_port=_env_int("K2_AIRFLOW_PORT", 8080),
            smtp_port=_env_int("K2_SMTP_PORT", 2525),
        )

    # Folders under home
    @property
    def clickhouse_data(self) -> Path:
        return self.home / "clickhouse"

    @property
    def postgres_data(self) -> Path:
        return self.home / "postgres"

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def maildir(self) -> Path:
        """Where the local SMTP sink keeps every email it receives (a Maildir)."""
        return self.home / "mail"

    @property
    def credentials_file(self) -> Path:
        return self.home / "credentials.json"

    @cached_property
    def credentials(self) -> dict[str, str]:
        """Passwords of the local services, made once and kept in home (mode 0600).

        Environment variables win, so a developer can pin them; nothing is ever printed.
        """
        stored: dict[str, str] = {}
        if self.credentials_file.exists():
            stored = json.loads(self.credentials_file.read_text())
        wanted = {
            "clickhouse_user": os.environ.get("K2_CLICKHOUSE_USER") or stored.get("clickhouse_user") or "k2",
            "clickhouse_password": os.environ.get("K2_CLICKHOUSE_PASSWORD")
            or stored.get("clickhouse_password")
            or secrets.token_urlsafe(18),
            "postgres_user": stored.get("postgres_user") or "k2",
            "postgres_password": os.environ.get("K2_POSTGRES_PASSWORD")
            or stored.get("postgres_password")
            or secrets.token_urlsafe(18),
            "airflow_admin_password": os.environ.get("K2_AIRFLOW_ADMIN_PASSWORD")
            or stored.get("airflow_admin_password")
            or secrets.token_urlsafe(12),
            "airflow_jwt_secret": stored.get("airflow_jwt_secret") or secrets.token_urlsafe(32),
            "airflow_api_secret_key": stored.get("airflow_api_secret_key") or secrets.token_urlsafe(32),
            # The object store's root user (k2 local up --object-store).
            "s3_access_key_id": stored.get("s3_access_key_id") or "k2" + secrets.token_hex(8),
            "s3_secret_access_key": stored.get("s3_secret_access_key") or secrets.token_urlsafe(30),
            # Redis, the Celery broker (k2 local up --celery).
            "redis_password": stored.get("redis_password") or secrets.token_urlsafe(18),
            # A Fernet key is 32 url-safe base64-encoded bytes.
            "airflow_fernet_key": stored.get("airflow_fernet_key")
            or base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        }
        if wanted != stored:
            self.home.mkdir(parents=True, exist_ok=True)
            tmp = self.credentials_file.with_suffix(".tmp")
            tmp.touch(mode=0o600)
            tmp.write_text(json.dumps(wanted, indent=2))
            tmp.replace(self.credentials_file)
        return wanted

    # How clients reach the services
    def clickhouse_kwargs(self) -> dict[str, object]:
        """Keyword arguments for `clickhouse_connect.get_client`."""
        return {
            "host": self.host,
            "port": self.clickhouse_port,
            "username": self.credentials["clickhouse_user"],
            "password": self.credentials["clickhouse_password"],
        }

    def clickhouse_client(self, **overrides: object):
        return clickhouse_connect.get_client(**{**self.clickhouse_kwargs(), **overrides})

    def postgres_dsn(self, database: str = "k2") -> str:
        """libpq key/value DSN (the password is read from the credentials, not logged)."""
        c = self.credentials
        return (
            f"host={self.host} port={self.postgres_port} dbname={database} "
            f"user={c['postgres_user']} password={c['postgres_password']}"
        )

    def postgres_url(self, database: str = "k2", driver: str = "postgresql+psycopg") -> str:
        c = self.credentials
        return (
            f"{driver}://{c['postgres_user']}:{c['postgres_password']}"
            f"@{self.host}:{self.postgres_port}/{database}"
        )
