"""The local monitoring stack: statsd_exporter -> Prometheus -> Alertmanager, on loopback.

Airflow (and the K2 emit helpers in `k2.metrics`) send StatsD over UDP to statsd_exporter,
which maps the dotted names to labelled metrics (`monitoring/statsd_exporter/mappings.yml`);
Prometheus scrapes it, evaluates `monitoring/prometheus/rules/*.yml` and sends alerts to
Alertmanager, which emails them through the local SMTP relay.

The checked-in configs under `monitoring/` are valid for the default ports. This module
renders the copies a stack runs with into `$K2_HOME/monitoring/` (ports, intervals, SMTP
relay, recipients) and defines the three processes as `Daemon`s with pid files beside the
other services'. Ports come from K2_STATSD_PORT (UDP, 9125), K2_STATSD_EXPORTER_PORT
(9102), K2_PROMETHEUS_PORT (9090) and K2_ALERTMANAGER_PORT (9093).
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from k2 import metrics
from k2.config import ALERT_TO_ENV, DEFAULT_ALERT_TO
from k2.local.daemons import Daemon, http_ok, start_all
from k2.local.processes import StackError
from k2.local.settings import LOOPBACK, REPO_ROOT, LocalStack, StackHome, _env_int, default_home

MONITORING_DIR = REPO_ROOT / "monitoring"
MAPPING_FILE = MONITORING_DIR / "statsd_exporter" / "mappings.yml"
PROMETHEUS_TEMPLATE = MONITORING_DIR / "prometheus" / "prometheus.yml"
RULES_DIR = MONITORING_DIR / "prometheus" / "rules"
RULE_TESTS_DIR = MONITORING_DIR / "prometheus" / "tests"
ALERTMANAGER_TEMPLATE = MONITORING_DIR / "alertmanager" / "alertmanager.yml"
DASHBOARD_FILE = MONITORING_DIR / "grafana" / "dashboards" / "k2-offload.json"
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"

STATSD_PORT_ENV = "K2_STATSD_PORT"
STATSD_EXPORTER_PORT_ENV = "K2_STATSD_EXPORTER_PORT"
PROMETHEUS_PORT_ENV = "K2_PROMETHEUS_PORT"
ALERTMANAGER_PORT_ENV = "K2_ALERTMANAGER_PORT"
SMTP_HOST_ENV = "K2_SMTP_HOST"
SMTP_PORT_ENV = "K2_SMTP_PORT"
ALERT_FROM_ENV = "K2_ALERT_EMAIL_FROM"
STATSD_PREFIX = "airflow"

# Binary names: upstream release names first, then the Debian package's.
_TOOL_NAMES = {
    "statsd_exporter": ("statsd_exporter",),
    "prometheus": ("prometheus",),
    "promtool": ("promtool",),
    "alertmanager": ("alertmanager", "prometheus-alertmanager"),
    "amtool": ("amtool",),
}


def tool(name: str) -> str:
    """Path of a monitoring binary: the project's .tools/bin first, then PATH."""
    for candidate in _TOOL_NAMES[name]:
        local = TOOLS_BIN / candidate
        if local.is_file() and os.access(local, os.X_OK):
            return str(local)
        found = shutil.which(candidate)
        if found:
            return found
    raise StackError(f"{name} is not installed (looked in {TOOLS_BIN} and PATH); run `make setup`")


@dataclass(frozen=True)
class MonitoringStack(StackHome):
    """Ports, paths and settings of one monitoring stack. Build it with `from_env()`.

    `home` is the K2 home (pid files and logs go where the other services' go); the rendered
    configs and the Prometheus / Alertmanager data live under `home/monitoring`. The
    interval fields exist so that tests can run the same rules on a faster clock; None
    keeps the value of the checked-in config.
    """

    home: Path
    statsd_port: int = 9125
    statsd_exporter_port: int = 9102
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    smtp_host: str = LOOPBACK
    smtp_port: int = 2525
    alert_email_to: str = DEFAULT_ALERT_TO
    alert_email_from: str = "k2-alertmanager@localhost"
    scrape_interval: str | None = None
    evaluation_interval: str | None = None
    alert_group_wait: str | None = None
    alert_group_interval: str | None = None
    host: str = LOOPBACK

    @classmethod
    def from_env(cls, home: Path | None = None) -> MonitoringStack:
        return cls(
            home=default_home(home),
            statsd_port=_env_int(STATSD_PORT_ENV, 9125),
            statsd_exporter_port=_env_int(STATSD_EXPORTER_PORT_ENV, 9102),
            prometheus_port=_env_int(PROMETHEUS_PORT_ENV, 9090),
            alertmanager_port=_env_int(ALERTMANAGER_PORT_ENV, 9093),
            smtp_host=os.environ.get(SMTP_HOST_ENV) or LOOPBACK,
            smtp_port=_env_int(SMTP_PORT_ENV, 2525),
            alert_email_to=os.environ.get(ALERT_TO_ENV) or DEFAULT_ALERT_TO,
            alert_email_from=os.environ.get(ALERT_FROM_ENV) or "k2-alertmanager@localhost",
        )

    @classmethod
    def for_local_stack(cls, stack: LocalStack) -> MonitoringStack:
        """The monitoring of `stack`: same home and host, alerts mailed to its SMTP sink."""
        mon = replace(cls.from_env(stack.home), host=stack.host, smtp_host=stack.host)
        smtp_port = getattr(stack, "smtp_port", None)
        return replace(mon, smtp_port=smtp_port) if smtp_port else mon

    # Folders and files (run_dir and log_dir, what `Daemon` needs, come from StackHome)
    @property
    def config_dir(self) -> Path:
        return self.home / "monitoring"

    @property
    def prometheus_config(self) -> Path:
        return self.config_dir / "prometheus.yml"

    @property
    def alertmanager_config(self) -> Path:
        return self.config_dir / "alertmanager.yml"

    @property
    def prometheus_data(self) -> Path:
        return self.config_dir / "prometheus-data"

    @property
    def alertmanager_data(self) -> Path:
        return self.config_dir / "alertmanager-data"

    # Addresses
    @property
    def statsd_exporter_url(self) -> str:
        return f"http://{self.host}:{self.statsd_exporter_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.host}:{self.alertmanager_port}"


def prometheus_alerts_page(mon: MonitoringStack) -> str:
    """The alerts page this Prometheus answers on: its web UI's /alerts, or /classic/alerts
    (Debian's package ships only the classic UI); the API when neither answers."""
    for path in ("/alerts", "/classic/alerts"):
        if http_ok(f"{mon.prometheus_url}{path}"):
            return f"{mon.prometheus_url}{path}"
    return f"{mon.prometheus_url}/api/v1/alerts"


# What Debian's Alertmanager answers on / instead of its web UI
NO_ALERTMANAGER_UI = b"does not include a web"


def alertmanager_page(mon: MonitoringStack) -> str:
    """Alertmanager's web UI when it has one; else its alerts API (Debian's package is built
    without the UI and answers / with a page saying so: `amtool --alertmanager.url=<url>
    alert` reads the same as the API)."""
    try:
        with urllib.request.urlopen(f"{mon.alertmanager_url}/", timeout=2) as response:
            if NO_ALERTMANAGER_UI not in response.read():
                return mon.alertmanager_url
    except OSError:
        pass
    return f"{mon.alertmanager_url}/api/v2/alerts"


def airflow_metrics_env(mon: MonitoringStack) -> dict[str, str]:
    """`[metrics]` settings that point every Airflow process at this stack's exporter.

    Legacy names stay on (the default): they are the ones that carry dag_id, task_id and
    pool in the dotted name, which the mapping turns into labels.
    """
    return {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": mon.host,
        "AIRFLOW__METRICS__STATSD_PORT": str(mon.statsd_port),
        "AIRFLOW__METRICS__STATSD_PREFIX": STATSD_PREFIX,
        "AIRFLOW__METRICS__LEGACY_NAMES_ON": "True",
    }


# --- configs ---------------------------------------------------------------------------


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-trees (YAML anchors in the template) out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(config: dict[str, Any], source: Path) -> str:
    header = f"# Generated by k2.local.monitoring from {source.relative_to(REPO_ROOT)}; edit that file.\n"
    return header + yaml.dump(config, Dumper=_PlainDumper, sort_keys=False, width=120)


def render_prometheus_config(mon: MonitoringStack, rules_dir: Path = RULES_DIR) -> dict[str, Any]:
    """monitoring/prometheus/prometheus.yml with this stack's ports and absolute rule paths."""
    config = yaml.safe_load(PROMETHEUS_TEMPLATE.read_text())
    if mon.scrape_interval:
        config["global"]["scrape_interval"] = mon.scrape_interval
    if mon.evaluation_interval:
        config["global"]["evaluation_interval"] = mon.evaluation_interval
    config["rule_files"] = [str(rules_dir.resolve() / "*.yml")]
    config["alerting"]["alertmanagers"] = [
        {"static_configs": [{"targets": [f"{mon.host}:{mon.alertmanager_port}"]}]}
    ]
    targets = {
        "statsd_exporter": mon.statsd_exporter_port,
        "prometheus": mon.prometheus_port,
        "alertmanager": mon.alertmanager_port,
    }
    for job in config["scrape_configs"]:
        port = targets.pop(job["job_name"], None)
        if port is not None:
            job["static_configs"] = [{"targets": [f"{mon.host}:{port}"]}]
    if targets:
        raise StackError(f"{PROMETHEUS_TEMPLATE}: no scrape job named {sorted(targets)}")
    return config


def render_alertmanager_config(mon: MonitoringStack) -> dict[str, Any]:
    """monitoring/alertmanager/alertmanager.yml with this stack's SMTP relay and recipients."""
    config = yaml.safe_load(ALERTMANAGER_TEMPLATE.read_text())
    config["global"]["smtp_smarthost"] = f"{mon.smtp_host}:{mon.smtp_port}"
    config["global"]["smtp_from"] = mon.alert_email_from
    for receiver in config["receivers"]:
        for email in receiver.get("email_configs", []):
            email["to"] = mon.alert_email_to

    def routes(route: dict[str, Any]):
        yield route
        for child in route.get("routes", []):
            yield from routes(child)

    for route in routes(config["route"]):
        if mon.alert_group_wait and "group_wait" in route:
            route["group_wait"] = mon.alert_group_wait
        if mon.alert_group_interval and "group_interval" in route:
            route["group_interval"] = mon.alert_group_interval
    return config


def write_configs(mon: MonitoringStack) -> tuple[Path, Path]:
    """Render both configs into `home/monitoring` (replaced atomically); return their paths."""
    mon.config_dir.mkdir(parents=True, exist_ok=True)
    for path, config, source in (
        (mon.prometheus_config, render_prometheus_config(mon), PROMETHEUS_TEMPLATE),
        (mon.alertmanager_config, render_alertmanager_config(mon), ALERTMANAGER_TEMPLATE),
    ):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(_dump(config, source))
        tmp.replace(path)
    return mon.prometheus_config, mon.alertmanager_config


# --- processes -------------------------------------------------------------------------

STATSD_EXPORTER = Daemon(
    name="statsd-exporter",
    argv=lambda m: [
        tool("statsd_exporter"),
        f"--statsd.mapping-config={MAPPING_FILE}",
        f"--statsd.listen-udp={m.host}:{m.statsd_port}",
        "--statsd.listen-tcp=",  # Airflow sends UDP only
        f"--web.listen-address={m.host}:{m.statsd_exporter_port}",
        "--log.level=warn",
    ],
    port=lambda m: m.statsd_exporter_port,
    port_env_var=STATSD_EXPORTER_PORT_ENV,
    healthy=lambda m: http_ok(f"{m.statsd_exporter_url}/metrics"),
    start_timeout=30.0,
)
PROMETHEUS = Daemon(
    name="prometheus",
    argv=lambda m: [
        tool("prometheus"),
        f"--config.file={m.prometheus_config}",
        f"--storage.tsdb.path={m.prometheus_data}",
        "--storage.tsdb.retention.time=15d",
        f"--web.listen-address={m.host}:{m.prometheus_port}",
        f"--web.external-url={m.prometheus_url}/",
        # Lets `curl -X POST .../-/reload` pick up re-rendered configs; loopback only.
        "--web.enable-lifecycle",
    ],
    port=lambda m: m.prometheus_port,
    port_env_var=PROMETHEUS_PORT_ENV,
    healthy=lambda m: http_ok(f"{m.prometheus_url}/-/ready"),
)
ALERTMANAGER = Daemon(
    name="alertmanager",
    argv=lambda m: [
        tool("alertmanager"),
        f"--config.file={m.alertmanager_config}",
        f"--storage.path={m.alertmanager_data}",
        f"--web.listen-address={m.host}:{m.alertmanager_port}",
        f"--web.external-url={m.alertmanager_url}/",
        "--cluster.listen-address=",  # a single instance: no gossip port
    ],
    port=lambda m: m.alertmanager_port,
    port_env_var=ALERTMANAGER_PORT_ENV,
    healthy=lambda m: http_ok(f"{m.alertmanager_url}/-/ready"),
)
# Start order: receivers before senders (Alertmanager, then the exporter, then Prometheus).
# `Daemon` only needs host, home, run_dir and log_dir of its stack: a MonitoringStack has them.
DAEMONS: tuple[Daemon, ...] = (ALERTMANAGER, STATSD_EXPORTER, PROMETHEUS)


def _ensure_udp_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise StackError(
                f"statsd-exporter: UDP port {host}:{port} is already in use; "
                f"choose another with {STATSD_PORT_ENV}=<port>"
            ) from None


def prepare(mon: MonitoringStack) -> None:
    """Render the configs and make the data folders; check the exporter's UDP port."""
    write_configs(mon)
    mon.prometheus_data.mkdir(parents=True, exist_ok=True)
    mon.alertmanager_data.mkdir(parents=True, exist_ok=True)
    if STATSD_EXPORTER.pid(mon) is None:
        _ensure_udp_port_free(mon.host, mon.statsd_port)


def start(mon: MonitoringStack, log: Callable[[str], None] = print) -> list[Daemon]:
    """Render the configs and start the daemons not yet running; all or nothing."""
    prepare(mon)
    return start_all(DAEMONS, mon, log, running=lambda daemon: _reload(mon, daemon))


def _reload(mon: MonitoringStack, daemon: Daemon) -> str:
    """Make a running Prometheus / Alertmanager read the configs just rendered."""
    url = {PROMETHEUS.name: mon.prometheus_url, ALERTMANAGER.name: mon.alertmanager_url}.get(daemon.name)
    if url is None:
        return ""
    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}/-/reload", method="POST"), timeout=10)
    except OSError as exc:
        return f" (config reload failed: {exc})"
    return " (config reloaded)"


def stop(mon: MonitoringStack, log: Callable[[str], None] = print) -> None:
    for daemon in reversed(DAEMONS):
        stopped = daemon.stop(mon)
        log(f"{'stopped' if stopped else 'not running:'} {daemon.name}")


def status(mon: MonitoringStack) -> list[tuple[str, int, int | None, bool]]:
    """(name, port, pid, healthy) per daemon."""
    rows = []
    for daemon in DAEMONS:
        pid = daemon.pid(mon)
        healthy = pid is not None and daemon.healthy(mon)
        rows.append((daemon.name, daemon.port(mon), pid, healthy))
    return rows


# --- sample traffic --------------------------------------------------------------------
# Real StatsD lines through Airflow's own Stats client, named exactly as Airflow 3.3 names
# them (legacy and new names come from Airflow's metric registry). Used by the tests and to
# check a freshly started stack end to end before a pipeline has run.


def send_airflow_samples(
    dag_id: str,
    task_id: str,
    *,
    pool: str = "k2_spark",
    states: tuple[str, ...] = ("success",),
    hostname: str = "localhost",
    dag_file: str = "k2_offload.py",
    bundle: str = "dags-folder",
) -> None:
    """One round of the Airflow metrics the mapping, rules and dashboard use."""
    from airflow.sdk.observability.stats import Stats

    dag = {"dag_id": dag_id}
    ti = {"dag_id": dag_id, "task_id": task_id}
    Stats.incr("scheduler_heartbeat", 1, 1)
    Stats.incr("triggerer_heartbeat", 1, 1)
    Stats.incr("dag_processor_heartbeat", 1, 1)
    Stats.gauge("dag_processing.import_errors", 0)
    Stats.gauge("dag_processing.total_parse_time", 0.8)
    Stats.gauge("dagbag_size", 9)
    Stats.timing("dag_processing.last_duration", 150.0, tags={"bundle_name": bundle, "file_name": dag_file})
    Stats.gauge("dag_processing.last_run.seconds_ago", 4.0, tags={"file_name": dag_file, "bundle_name": bundle})
    Stats.timing("dagrun.duration.success", timedelta(seconds=45), tags=dag)
    Stats.timing("dagrun.duration.failed", timedelta(seconds=700), tags=dag)
    Stats.timing("dagrun.schedule_delay", timedelta(seconds=1.5), tags=dag)
    Stats.timing("dagrun.first_task_scheduling_delay", timedelta(seconds=2), tags=dag)
    Stats.timing("dagrun.dependency-check", timedelta(milliseconds=30), tags=dag)
    Stats.timing("task.duration", 12_000.0, tags=ti)
    Stats.timing("task.queued_duration", 800.0, tags=ti)
    Stats.timing("task.scheduled_duration", 300.0, tags=ti)
    Stats.incr("ti.start", tags=ti)
    for state in states:
        Stats.incr("ti.finish", tags={**ti, "state": state})
    Stats.incr("ti_successes", tags=ti)
    Stats.incr("ti_failures", tags=ti)
    Stats.incr("operator_successes", tags={**ti, "operator_name": "OffloadToIcebergOperator"})
    Stats.incr("operator_failures", tags={**ti, "operator_name": "OffloadToIcebergOperator"})
    for state in ("scheduled", "queued", "running", "deferred"):
        Stats.gauge(f"ti.{state}", 1.0, tags={"queue": "default", **ti})
    pool_tags = {"pool_name": pool}
    Stats.gauge("pool.open_slots", 1, tags=pool_tags)
    Stats.gauge("pool.queued_slots", 2, tags=pool_tags)
    Stats.gauge("pool.running_slots", 1, tags=pool_tags)
    Stats.gauge("pool.deferred_slots", 0, tags=pool_tags)
    Stats.gauge("pool.scheduled_slots", 0, tags=pool_tags)
    Stats.gauge("pool.starving_tasks", 3, tags=pool_tags)
    executor = {"executor_class_name": "LocalExecutor"}
    Stats.gauge("executor.open_slots", 6, tags={"status": "open", **executor})
    Stats.gauge("executor.queued_tasks", 0, tags={"status": "queued", **executor})
    Stats.gauge("executor.running_tasks", 2, tags={"status": "running", **executor})
    Stats.gauge("scheduler.tasks.starving", 0)
    Stats.gauge("scheduler.tasks.executable", 1)
    Stats.gauge("scheduler.dagruns.running", 2)
    Stats.timing("scheduler.scheduler_loop_duration", 25.0)
    Stats.timing("scheduler.critical_section_duration", 4.0)
    Stats.gauge("triggers.running", 3, tags={"hostname": hostname})
    Stats.gauge("triggerer.capacity_left", 997, tags={"hostname": hostname})
    Stats.incr("triggers.succeeded")
    Stats.incr("triggers.failed")
    Stats.incr("triggers.blocked_main_thread")
    Stats.incr("deadline_alerts.deadline_created", tags={"dag_id": dag_id, "dagrun_id": "r1"})
    Stats.incr("deadline_alerts.deadline_not_missed", tags={"dag_id": dag_id, "dagrun_id": "r1"})
    Stats.incr("deadline_alerts.deadline_missed", tags={"dag_id": dag_id, "dagrun_id": "r2"})


def send_k2_samples(
    table: str,
    *,
    now: datetime | None = None,
    lag: timedelta = timedelta(minutes=5),
    hot_age: timedelta = timedelta(seconds=30),
    rows: int = 12_000,
    offload_seconds: float = 8.0,
    cycle_seconds: float = 40.0,
    catchup_cycle_seconds: float | None = None,
) -> None:
    """One round of every K2 metric of `table` through the `k2.metrics` helpers (a live
    run's cycle, and a catch-up run's when `catchup_cycle_seconds` is given)."""
    now = now or datetime.now(timezone.utc)
    metrics.record_offload(table, rows=rows, bytes_written=rows * 60, seconds=offload_seconds)
    metrics.record_cycle(table, cycle_seconds)
    if catchup_cycle_seconds is not None:
        metrics.record_cycle(table, catchup_cycle_seconds, catchup=True)
    metrics.set_watermark(table, now - lag)
    metrics.set_last_success(table, now - timedelta(seconds=10))
    metrics.record_error(table, "spark")
    metrics.record_late_rows(table, 3)
    metrics.record_late_changes(table, 1)
    metrics.record_quarantined_rows(table, 1)
    metrics.set_catchup_backlog(table, 2)
    metrics.set_iceberg_data_files(table, 42)
    metrics.set_hot_max_event_time(table, now - hot_age)
    metrics.record_deadline_missed(table)
    metrics.record_retention(table, kept=0, dropped=1)
    metrics.record_maintenance(table, data_files=12, snapshots=3, rewritten_files=96, orphan_files=1, finished=now)
