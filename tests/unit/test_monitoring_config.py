"""The monitoring configuration, checked with the real tools (promtool, amtool, statsd_exporter).

- Prometheus config (checked-in and rendered) and rules pass `promtool check`, and the rule
  tests (`promtool test rules`) pass and show every alert firing and staying quiet.
- The statsd_exporter mapping holds every metric of k2.metrics, and the real exporter maps
  lines sent through Airflow's own Stats client to the expected names and labels.
- Every metric a rule or a dashboard panel reads is defined somewhere: a K2 metric, a
  recording rule or an Airflow metric of the mapping.
- Alertmanager's config passes `amtool check-config` and routes by severity.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from k2 import metrics
from k2.local import monitoring
from k2.local.monitoring import MonitoringStack
from k2.local.processes import wait_until
from k2.local.settings import LocalStack

REPO_ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted(monitoring.RULES_DIR.glob("*.yml"))
RULE_TEST_FILES = sorted(monitoring.RULE_TESTS_DIR.glob("*.yml"))
RUNBOOKS = REPO_ROOT / "docs" / "operations" / "runbooks.md"
GRAFANA = REPO_ROOT / "monitoring" / "grafana"
SEVERITIES = {"critical", "warning", "info"}
# Names PromQL provides itself.
PROMQL_BUILTINS = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"}


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alert_rules() -> list[dict]:
    rules = []
    for group in yaml.safe_load((monitoring.RULES_DIR / "alerts.yml").read_text())["groups"]:
        rules += [dict(rule, group=group["name"]) for rule in group["rules"]]
    return rules


def _recording_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += [rule for rule in group["rules"] if "record" in rule]
    return rules


def _dashboard() -> dict:
    return json.loads(monitoring.DASHBOARD_FILE.read_text())


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in _dashboard()["templating"]["list"]]
    return exprs


# --- Prometheus -------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = _run(monitoring.tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_checked_in_prometheus_config_passes_promtool_check() -> None:
    result = _run(monitoring.tool("promtool"), "check", "config", str(monitoring.PROMETHEUS_TEMPLATE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_rendered_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    mon = MonitoringStack(
        home=tmp_path, statsd_exporter_port=19102, prometheus_port=19090, alertmanager_port=19093,
        scrape_interval="1s", evaluation_interval="1s",
    )
    prometheus_yml, _ = monitoring.write_configs(mon)
    result = _run(monitoring.tool("promtool"), "check", "config", str(prometheus_yml))
    assert result.returncode == 0, result.stdout + result.stderr

    config = yaml.safe_load(prometheus_yml.read_text())
    assert config["global"]["scrape_interval"] == "1s"
    assert config["global"]["evaluation_interval"] == "1s"
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {
        "statsd_exporter": ["127.0.0.1:19102"],
        "prometheus": ["127.0.0.1:19090"],
        "alertmanager": ["127.0.0.1:19093"],
    }
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:19093"]
    assert config["rule_files"] == [str(monitoring.RULES_DIR / "*.yml")]


def test_ports_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, port in (("K2_STATSD_PORT", 1), ("K2_STATSD_EXPORTER_PORT", 2),
                      ("K2_PROMETHEUS_PORT", 3), ("K2_ALERTMANAGER_PORT", 4), ("K2_SMTP_PORT", 5)):
        monkeypatch.setenv(var, str(20000 + port))
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    mon = MonitoringStack.from_env()
    assert (mon.statsd_port, mon.statsd_exporter_port, mon.prometheus_port,
            mon.alertmanager_port, mon.smtp_port) == (20001, 20002, 20003, 20004, 20005)
    assert mon.home == tmp_path.resolve()
    assert monitoring.airflow_metrics_env(mon)["AIRFLOW__METRICS__STATSD_PORT"] == "20001"
    assert MonitoringStack.for_local_stack(LocalStack.from_env()) == mon
    argv = monitoring.ALERTMANAGER.argv(mon)
    assert "--cluster.listen-address=" in argv
    assert "--web.listen-address=127.0.0.1:20004" in argv
    assert "--web.listen-address=127.0.0.1:20003" in monitoring.PROMETHEUS.argv(mon)
    assert "--statsd.listen-udp=127.0.0.1:20001" in monitoring.STATSD_EXPORTER.argv(mon)


def test_rule_unit_tests_pass() -> None:
    result = _run(monitoring.tool("promtool"), "test", "rules", *map(str, RULE_TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TEST_FILES)


def test_rule_tests_show_every_alert_firing_and_quiet() -> None:
    firing: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    for path in RULE_TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    firing |= {(check["alertname"], a["exp_labels"]["severity"]) for a in check["exp_alerts"]}
                else:
                    quiet.add(check["alertname"])
    rules = {(rule["alert"], rule["labels"]["severity"]) for rule in _alert_rules()}
    assert rules - firing == set(), "alert rules never shown firing"
    assert {name for name, _ in rules} - quiet == set(), "alert rules never shown staying quiet"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_alerts_have_severity_annotations_and_a_runbook() -> None:
    anchors = _anchors(RUNBOOKS.read_text())
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/operations/runbooks.md", name
        assert anchor in anchors, f"{name}: runbook anchor #{anchor} not in {RUNBOOKS.name}"
        if rule["group"] == "k2-offload":  # per-table alerts name their table
            assert "$labels.table" in annotations["summary"], name


def test_required_alerts_exist() -> None:
    rules = {(rule["alert"], rule["labels"]["severity"]) for rule in _alert_rules()}
    assert {
        ("K2OffloadFailing", "critical"),
        ("K2OffloadLag", "critical"),
        ("K2OffloadLag", "warning"),
        ("K2CycleDuration", "critical"),
        ("K2CycleDuration", "warning"),
        ("K2WatermarkStale", "critical"),
        ("K2SchedulerDown", "critical"),
        ("K2OffloadSuccessRateLow", "warning"),
        ("K2OffloadThroughputLow", "warning"),
        ("K2DagImportErrors", "warning"),
        ("K2DeadlineMissed", "warning"),
        ("K2FeedStopped", "critical"),
    } <= rules


# --- metric names -----------------------------------------------------------------------


def _mapping() -> list[dict]:
    return yaml.safe_load(monitoring.MAPPING_FILE.read_text())["mappings"]


def test_mapping_file_has_every_project_metric_as_in_code() -> None:
    in_file = {entry["name"]: entry for entry in _mapping() if entry["name"].startswith("k2_")}
    in_code = {entry["name"]: entry for entry in metrics.mapping_entries()}
    assert set(in_file) == set(in_code)
    for name, entry in in_code.items():
        assert in_file[name] == entry, f"{name}: mappings.yml differs from k2.metrics.mapping_entries()"


def test_mapping_file_passes_statsd_exporter_check() -> None:
    result = _run(
        monitoring.tool("statsd_exporter"),
        f"--statsd.mapping-config={monitoring.MAPPING_FILE}",
        "--check-config",
    )
    assert result.returncode == 0, result.stderr
    assert "backtracking" not in result.stderr  # a slow glob set (see the comments in the file)


def _airflow_metric_names() -> set[str]:
    """Prometheus names the mapping gives Airflow metrics (histograms with their series)."""
    names = set()
    defaults = yaml.safe_load(monitoring.MAPPING_FILE.read_text())["defaults"]
    for entry in _mapping():
        if entry.get("action") == "drop" or entry["name"].startswith("k2_"):
            continue
        names.add(entry["name"])
        if entry["name"].endswith("_seconds") and defaults["observer_type"] == "histogram":
            names |= {f"{entry['name']}_{s}" for s in ("bucket", "sum", "count")}
    return names


_LABEL_BLOCK = re.compile(r"\{[^{}]*\}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression reads; a rough PromQL scan."""
    text = _STRING.sub('""', expr)
    text = _LABEL_BLOCK.sub("", text)
    text = _GROUPING.sub("", text)
    text = _RANGE.sub("", text)
    text = re.sub(r"\blabel_values\(\s*([\w:]+)\s*,\s*\w+\s*\)", r" \1 ", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in _KEYWORDS}


def test_metric_name_scan() -> None:
    expr = 'sum by (table) (rate(k2_offload_rows_total{table=~"$table"}[1h])) / on (table) k2:x unless up offset 5m'
    assert metric_names(expr) == {"k2_offload_rows_total", "k2:x", "up"}


def test_rules_and_dashboard_only_read_known_metrics() -> None:
    project = {name for metric in metrics.METRICS for name in metric.series_names}
    recorded = {rule["record"] for rule in _recording_rules()}
    known = project | recorded | _airflow_metric_names() | PROMQL_BUILTINS
    sources = {f"rule {r.get('alert') or r.get('record')}": r["expr"] for r in _alert_rules() + _recording_rules()}
    sources |= {f"dashboard: {expr}": expr for expr in _dashboard_exprs()}
    unknown = {
        where: sorted(metric_names(expr) - known)
        for where, expr in sources.items()
        if metric_names(expr) - known
    }
    assert unknown == {}


def test_every_project_metric_is_used_by_a_rule_or_the_dashboard() -> None:
    read = set()
    for expr in [r["expr"] for r in _alert_rules() + _recording_rules()] + _dashboard_exprs():
        read |= metric_names(expr)
    unused = [m.prometheus for m in metrics.METRICS if not set(m.series_names) & read]
    assert unused == []


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Parse Prometheus text exposition: (name, labels) -> value."""
    samples = {}
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([\w:]+)(?:\{(.*)\})?\s+(\S+)$", line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        samples[(match[1], labels)] = float(match[3])
    return samples


@pytest.fixture
def exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real statsd_exporter with the project's mapping, and Airflow's Stats pointed at it."""
    mon = MonitoringStack(
        home=tmp_path, statsd_port=_free_port(socket.SOCK_DGRAM), statsd_exporter_port=_free_port()
    )
    for key, value in monitoring.airflow_metrics_env(mon).items():
        monkeypatch.setenv(key, value)
    metrics.configure_stats(force=True)
    monkeypatch.setattr(metrics, "_seeded_tables", set())
    monitoring.STATSD_EXPORTER.start(mon)
    try:
        yield mon
    finally:
        monitoring.STATSD_EXPORTER.stop(mon)
        monkeypatch.undo()
        metrics.configure_stats(force=True)


def test_statsd_exporter_maps_airflow_and_k2_metrics(exporter: MonitoringStack) -> None:
    dag_id, task_id = "k2_offload_silver_trades", "offload_to_iceberg"
    monitoring.send_airflow_samples(dag_id, task_id, states=("success", "up_for_retry"))
    monitoring.send_k2_samples("silver_trades", rows=500, offload_seconds=2.5, cycle_seconds=400,
                              catchup_cycle_seconds=1500)
    url = f"{exporter.statsd_exporter_url}/metrics"

    # Every K2 metric, with its table label; timers in seconds.
    table = {"table": "silver_trades"}
    expected: list[tuple[str, dict[str, str]]] = []
    for metric in metrics.METRICS:
        labels = dict(table, error_type="spark") if "error_type" in metric.labels else table
        labels = dict(labels, run="live") if "run" in metric.labels else labels
        for series in metric.series_names:
            expected.append((series, dict(labels, le="+Inf") if series.endswith("_bucket") else labels))
    ti = {"dag_id": dag_id, "task_id": task_id}
    expected += [("airflow_ti_finish_total", dict(ti, state=s)) for s in ("success", "up_for_retry")]
    expected += [("airflow_dag_processing_last_duration_seconds_count",
                  {"bundle": "dags-folder", "file": "k2_offload__py"})]

    # One line having arrived says nothing about the others (UDP datagrams, the exporter's
    # event queue flushed on a timer): wait for the whole set, not for one line.
    def missing() -> list[str]:
        scraped = _scrape(url)
        return [f"{name}{labels}" for name, labels in expected if (name, frozenset(labels.items())) not in scraped]

    assert wait_until(lambda: not missing(), 20), f"not exported within 20 s: {missing()}"
    samples = _scrape(url)

    def value(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        similar = sorted({k for k, _ in samples if k.startswith(name[:12])})
        assert key in samples, f"{name}{labels} not exported; similar names: {similar}"
        return samples[key]

    assert value("k2_offload_rows_total", **table) == 500
    assert value("k2_offload_duration_seconds_sum", **table) == pytest.approx(2.5)
    live, catchup = dict(table, run="live"), dict(table, run="catchup")
    assert value("k2_cycle_duration_seconds_bucket", **live, le="300") == 0
    assert value("k2_cycle_duration_seconds_bucket", **live, le="450") == 1
    assert value("k2_cycle_duration_seconds_count", **catchup) == 1  # a run of a backlog
    assert value("k2_cycle_duration_seconds_bucket", **catchup, le="1200") == 0
    assert value("k2_offload_errors_total", **table, error_type="timeout") == 0  # seeded
    assert abs(value("k2_offload_watermark_timestamp_seconds", **table) - (time.time() - 300)) < 30

    # Airflow's metrics, named as Airflow 3.3.2 sends them, with their labels.
    assert value("airflow_ti_finish_total", **ti, state="success") == 1
    assert value("airflow_ti_finish_total", **ti, state="up_for_retry") == 1
    value("airflow_ti_start_total", **ti)
    assert value("airflow_task_duration_seconds_sum", **ti) == pytest.approx(12.0)
    value("airflow_task_queued_duration_seconds_count", **ti)
    value("airflow_task_scheduled_duration_seconds_count", **ti)
    value("airflow_task_instances", **ti, state="running", queue="default")
    value("airflow_dagrun_duration_seconds_count", dag_id=dag_id, state="success")
    value("airflow_dagrun_duration_seconds_count", dag_id=dag_id, state="failed")
    value("airflow_dagrun_schedule_delay_seconds_count", dag_id=dag_id)
    value("airflow_dagrun_first_task_scheduling_delay_seconds_count", dag_id=dag_id)
    value("airflow_dagrun_dependency_check_seconds_count", dag_id=dag_id)
    for name in ("open_slots", "queued_slots", "running_slots", "deferred_slots", "scheduled_slots",
                 "starving_tasks"):
        value(f"airflow_pool_{name}", pool="k2_spark")
    for name in ("open_slots", "queued_tasks", "running_tasks"):
        value(f"airflow_executor_{name}", executor="LocalExecutor")
    for name in ("scheduler_heartbeat_total", "triggerer_heartbeat_total", "dag_processor_heartbeat_total",
                 "ti_failures_total", "ti_successes_total", "dag_processing_import_errors", "dagbag_size",
                 "dag_processing_total_parse_time_seconds", "scheduler_tasks_starving",
                 "scheduler_dagruns_running", "scheduler_loop_duration_seconds_count",
                 "deadline_alerts_missed_total", "triggers_succeeded_total"):
        value(f"airflow_{name}")
    value("airflow_operator_successes_total", operator="OffloadToIcebergOperator")
    value("airflow_triggers_running", hostname="localhost")
    value("airflow_dag_processing_last_duration_seconds_count", bundle="dags-folder", file="k2_offload__py")

    # Nothing fell through to statsd_exporter's automatic names, and the label-less
    # twins of the legacy names were dropped.
    assert value("statsd_exporter_events_unmapped_total") == 0
    assert value("statsd_exporter_events_actions_total", action="drop") > 0
    assert ("airflow_pool_open_slots", frozenset()) not in samples
    assert not any(name == "airflow_ti_finish" for name, _ in samples)


# --- k2.metrics -------------------------------------------------------------------------


def test_metric_definitions() -> None:
    assert len({m.prometheus for m in metrics.METRICS}) == len(metrics.METRICS)
    assert len({m.glob() for m in metrics.METRICS}) == len(metrics.METRICS)
    for metric in metrics.METRICS:
        assert metric.statsd.startswith("k2."), metric
        assert "table" in metric.labels, metric
        assert metric.prometheus.endswith("_total") == (metric.kind == "counter"), metric
        assert bool(metric.buckets) == (metric.kind == "timer"), metric
    stat = metrics.ERRORS.stat(table="gold_ohlcv_1m", error_type="spark")
    assert stat == "k2.offload.errors.gold_ohlcv_1m.spark"
    assert metrics.ERRORS.glob() == "airflow.k2.offload.errors.*.*"
    with pytest.raises(ValueError, match="one component"):
        metrics.OFFLOAD_ROWS.stat(table="a.b")
    with pytest.raises(ValueError, match="missing"):
        metrics.ERRORS.stat(table="t")


def test_every_offloaded_table_fits_a_statsd_name() -> None:
    from k2.config import load_tables

    for spec in load_tables().tables:
        assert metrics.WATERMARK.stat(table=spec.name).endswith(spec.name)


def test_classify_error() -> None:
    class ClickHouseError(Exception):
        __module__ = "clickhouse_connect.driver.exceptions"

    assert metrics.classify_error(ClickHouseError()) == "clickhouse"
    assert metrics.classify_error(TimeoutError()) == "timeout"
    assert metrics.classify_error(KeyError("x")) == "other"
    assert set(map(metrics.classify_error, [ValueError()])) <= set(metrics.ERROR_TYPES)


# --- Alertmanager -----------------------------------------------------------------------


def _duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", text))


@pytest.fixture
def rendered_alertmanager(tmp_path: Path) -> Path:
    mon = MonitoringStack(home=tmp_path, smtp_host="127.0.0.1", smtp_port=2525,
                          alert_email_to="oncall@example.com", alert_email_from="am@example.com",
                          alert_group_wait="1s")
    _, path = monitoring.write_configs(mon)
    return path


@pytest.mark.parametrize("which", ["checked-in", "rendered"])
def test_alertmanager_config_passes_amtool(which: str, rendered_alertmanager: Path) -> None:
    path = monitoring.ALERTMANAGER_TEMPLATE if which == "checked-in" else rendered_alertmanager
    result = _run(monitoring.tool("amtool"), "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "labels, receiver",
    [
        (["severity=critical", "alertname=K2OffloadLag", "table=silver_trades"], "k2-critical-email"),
        (["severity=warning", "alertname=K2OffloadLag", "table=silver_trades"], "k2-warning-email"),
        (["severity=info", "alertname=K2CatchupBacklog"], "k2-ui-only"),
        (["alertname=SomethingElse"], "k2-warning-email"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str, rendered_alertmanager: Path) -> None:
    result = _run(monitoring.tool("amtool"), "config", "routes", "test",
                  f"--config.file={rendered_alertmanager}", *labels)
    assert result.stdout.strip() == receiver, result.stdout + result.stderr


def test_alertmanager_settings(rendered_alertmanager: Path) -> None:
    config = yaml.safe_load(rendered_alertmanager.read_text())
    assert config["global"]["smtp_smarthost"] == "127.0.0.1:2525"
    assert config["global"]["smtp_from"] == "am@example.com"
    emails = [e for r in config["receivers"] for e in r.get("email_configs", [])]
    assert emails and all(e["to"] == "oncall@example.com" for e in emails)
    assert config["route"]["group_by"] == ["alertname", "table"]
    routes = {r["matchers"][0]: r for r in config["route"]["routes"]}
    critical, warning = routes['severity="critical"'], routes['severity="warning"']
    assert _duration_seconds(critical["repeat_interval"]) < _duration_seconds(warning["repeat_interval"])
    assert critical["group_wait"] == config["route"]["group_wait"] == "1s"
    inhibit = config["inhibit_rules"][0]
    assert inhibit["source_matchers"] == ['severity="critical"']
    assert inhibit["target_matchers"] == ['severity="warning"']
    assert inhibit["equal"] == ["alertname", "table"]


# --- Grafana ----------------------------------------------------------------------------


def test_grafana_provisioning_and_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "k2.yml").read_text())
    assert providers["providers"][0]["type"] == "file"

    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel.get("description"), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
    reads = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
    for needed in (
        "k2:offload_lag_seconds",  # lag per table
        "k2:offload_success_ratio:6h",  # success rate
        "k2:offload_rows:rate15m",  # rows per second
        "k2_offload_duration_seconds_bucket",  # duration quantiles
        "k2:offload_errors:increase1h",  # errors by type
        "k2_offload_bytes_total",  # throughput
        "k2_offload_last_success_timestamp_seconds",  # cycle status
        "k2_catchup_backlog_intervals",
        "k2:deadline_missed:increase1h",
    ):
        assert needed in reads, needed
    quantile = re.compile(r"histogram_quantile\((0\.\d+), sum by \(le, table\) \(rate\(k2_offload_duration")
    quantiles = {q for p in panels for t in p["targets"] for q in quantile.findall(t["expr"])}
    assert quantiles == {"0.5", "0.95", "0.99"}
