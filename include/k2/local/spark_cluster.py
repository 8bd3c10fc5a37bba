"""A Spark standalone cluster on loopback, from pyspark's own distribution: a master and
two workers (`spark-class org.apache.spark.deploy.master.Master` / `...worker.Worker`), for
`k2 local up --spark-cluster` and the tests. The offload job then runs with
`--master spark://127.0.0.1:<port>`: its driver on this machine, its executors (the
ClickHouse read slices, the Iceberg write) on the workers.

Ports: K2_SPARK_MASTER_PORT (7077), K2_SPARK_MASTER_UI_PORT (8081; its `/json/` lists the
workers and applications), K2_SPARK_WORKER_UI_PORTS (8082,8083; each worker's `/json/`
lists the executors it ran). Pid files and logs go with the stack's; each worker's scratch
space (application jars, executor logs) under `<home>/spark/worker-N`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2.local.daemons import Daemon, http_ok
from k2.local.processes import StackError
from k2.local.settings import LOOPBACK, REPO_ROOT, StackHome, _env_int, default_home

MASTER_PORT_ENV = "K2_SPARK_MASTER_PORT"
MASTER_UI_PORT_ENV = "K2_SPARK_MASTER_UI_PORT"
WORKER_UI_PORTS_ENV = "K2_SPARK_WORKER_UI_PORTS"
WORKERS = 2
# One core each: two workers on a 2-core machine, as two hosts of one core would be.
WORKER_CORES = 1
WORKER_MEMORY = "1g"


def spark_home() -> Path:
    """pyspark's distribution: bin/spark-class and the jars a master and worker run on
    (found without importing pyspark)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise StackError("pyspark is not installed in this environment: run `make setup`")
    return Path(spec.origin).resolve().parent


@dataclass(frozen=True)
class SparkCluster(StackHome):
    home: Path
    master_port: int = 7077
    master_ui_port: int = 8081
    worker_ui_ports: tuple[int, ...] = (8082, 8083)
    host: str = LOOPBACK

    @classmethod
    def from_env(cls, home: Path | None = None) -> SparkCluster:
        raw = os.environ.get(WORKER_UI_PORTS_ENV)
        ports = tuple(int(p) for p in raw.split(",")) if raw else (8082, 8083)
        if len(ports) != WORKERS:
            raise ValueError(f"{WORKER_UI_PORTS_ENV} needs {WORKERS} ports separated by a comma, got {raw!r}")
        return cls(
            home=default_home(home),
            master_port=_env_int(MASTER_PORT_ENV, 7077),
            master_ui_port=_env_int(MASTER_UI_PORT_ENV, 8081),
            worker_ui_ports=ports,
        )

    @property
    def master_url(self) -> str:
        """What spark-submit's --master (and the spark_default connection's host) takes."""
        return f"spark://{self.host}:{self.master_port}"

    @property
    def master_ui(self) -> str:
        return f"http://{self.host}:{self.master_ui_port}"

    def worker_dir(self, n: int) -> Path:
        return self.home / "spark" / f"worker-{n}"


def _environment(cluster: SparkCluster) -> dict[str, str]:
    home = spark_home()
    return {
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": cluster.host,
        "SPARK_LOG_DIR": str(cluster.log_dir),
        # no conf folder: the daemons' defaults, quiet Spark logging from the project's file
        "SPARK_CONF_DIR": str(cluster.home / "spark" / "conf"),
        "SPARK_DAEMON_JAVA_OPTS": f"-Dlog4j2.configurationFile={REPO_ROOT / 'spark_jobs' / 'conf' / 'log4j2.properties'}",
    }


def _json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def master_state(cluster: SparkCluster) -> dict[str, Any]:
    """The master's `/json/`: status, workers, active and completed applications."""
    return _json(f"{cluster.master_ui}/json/")


def worker_state(cluster: SparkCluster, n: int) -> dict[str, Any]:
    """Worker n's `/json/`: its executors, running and finished, with their application ids."""
    return _json(f"http://{cluster.host}:{cluster.worker_ui_ports[n]}/json/")


def _alive_workers(cluster: SparkCluster) -> int:
    try:
        return sum(1 for w in master_state(cluster).get("workers", []) if w.get("state") == "ALIVE")
    except OSError:
        return 0


MASTER = Daemon(
    name="spark-master",
    argv=lambda c: [str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master",
                    "--host", c.host, "--port", str(c.master_port), "--webui-port", str(c.master_ui_port)],
    port=lambda c: c.master_port,
    port_env_var=MASTER_PORT_ENV,
    healthy=lambda c: http_ok(f"{c.master_ui}/json/"),
    env=_environment,
    start_timeout=120.0,
)


def _worker(n: int) -> Daemon:
    def argv(c: SparkCluster) -> list[str]:
        c.worker_dir(n).mkdir(parents=True, exist_ok=True)
        return [str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker",
                "--host", c.host, "--webui-port", str(c.worker_ui_ports[n]), "--cores", str(WORKER_CORES),
                "--memory", WORKER_MEMORY, "--work-dir", str(c.worker_dir(n)), c.master_url]

    return Daemon(
        name=f"spark-worker-{n + 1}",
        argv=argv,
        port=lambda c: c.worker_ui_ports[n],
        port_env_var=WORKER_UI_PORTS_ENV,
        # registered with the master, not just listening
        healthy=lambda c: http_ok(f"http://{c.host}:{c.worker_ui_ports[n]}/json/") and _alive_workers(c) > n,
        env=_environment,
        start_timeout=120.0,
    )


WORKER_DAEMONS = tuple(_worker(n) for n in range(WORKERS))
DAEMONS = (MASTER, *WORKER_DAEMONS)


def executors_by_worker(cluster: SparkCluster, app_id: str) -> dict[str, list[str]]:
    """Worker name -> the executor ids it ran (or runs) for the application."""
    found: dict[str, list[str]] = {}
    for n, daemon in enumerate(WORKER_DAEMONS):
        state = worker_state(cluster, n)
        ids = [str(e["id"]) for key in ("executors", "finishedexecutors") for e in state.get(key, [])
               if e.get("appid") == app_id]
        found[daemon.name] = ids
    return found


def spark_master(home: Path) -> str:
    """The master the local stack's jobs use: $K2_SPARK_MASTER, else this home's standalone
    cluster when its master runs (`k2 local up --spark-cluster`), else local[2]."""
    if os.environ.get("K2_SPARK_MASTER"):
        return os.environ["K2_SPARK_MASTER"]
    cluster = SparkCluster.from_env(home)
    return cluster.master_url if MASTER.pid(cluster) is not None else "local[2]"
