"""Every Grafana panel query returns data from a live Prometheus.

A real statsd_exporter and Prometheus (the project's mapping and rules, 1 s clock) are fed
a few rounds of every K2 metric and the Airflow metrics the dashboard reads, sent through
Airflow's own Stats client; then each panel target and the `table` variable are queried
with Grafana's variables filled in. The `fed_prometheus` fixture is the one place to
swap for a Prometheus that watched a real pipeline run; the helpers below (panel
targets, variable filling, "has data") are what tests/integration/test_failure_email.py
runs against the session's Prometheus after real runs.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from k2 import metrics
from k2.local import monitoring
from k2.local.monitoring import MonitoringStack
from k2.local.processes import wait_until

pytestmark = pytest.mark.integration

TABLES = ("bronze_trades_binance", "gold_ohlcv_1m")
ROUNDS = 4
QUERY_TIMEOUT = 30.0
# Grafana's variables, as the dashboard would fill them with "All" selected.
GRAFANA_VARIABLES = {"$table": ".*", "$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def query(prometheus_url: str, expr: str) -> list[dict]:
    """An instant query; the result vector."""
    body = _get_json(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def fill(expr: str) -> str:
    """A panel query with Grafana's variables filled in as the dashboard does ("All" tables)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in re.sub(r'"\$\d"', "", expr), f"unfilled variable in {expr}"
    return expr


@pytest.fixture(scope="module")
def fed_prometheus(tmp_path_factory: pytest.TempPathFactory):
    """A Prometheus that has scraped a few rounds of sample traffic; yields its URL."""
    mon = MonitoringStack(
        home=tmp_path_factory.mktemp("k2dash"),
        statsd_port=_free_port(socket.SOCK_DGRAM),
        statsd_exporter_port=_free_port(),
        prometheus_port=_free_port(),
        alertmanager_port=_free_port(),  # not started: alerts are not the point here
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    with pytest.MonkeyPatch.context() as env:
        for key, value in monitoring.airflow_metrics_env(mon).items():
            env.setenv(key, value)
        metrics.configure_stats(force=True)
        monitoring.write_configs(mon)
        started = []
        try:
            for daemon in (monitoring.STATSD_EXPORTER, monitoring.PROMETHEUS):
                daemon.start(mon)
                started.append(daemon)
            # Prometheus holds its first target update back a few seconds after start;
            # lines sent before the first scrape would all land in one sample.
            assert wait_until(lambda: query(mon.prometheus_url, 'up{job="statsd_exporter"} == 1'), 20), (
                "Prometheus did not scrape statsd_exporter"
            )
            now = datetime.now(timezone.utc)
            # Rounds a scrape apart, so that rate() and increase() see counters move.
            for round_ in range(ROUNDS):
                for table in TABLES:
                    monitoring.send_airflow_samples(f"k2_offload_{table}", "offload_to_iceberg",
                                                    states=("success", "up_for_retry"))
                    monitoring.send_k2_samples(table, now=now + timedelta(seconds=round_),
                                               cycle_seconds=40 + 200 * round_)
                time.sleep(1.2)
            yield mon.prometheus_url
        finally:
            for daemon in reversed(started):
                daemon.stop(mon)
    metrics.configure_stats(force=True)


def panel_targets() -> list[tuple[str, str]]:
    """("<panel title> [<refId>]", query) of every target of every dashboard panel."""
    dashboard = json.loads(monitoring.DASHBOARD_FILE.read_text())
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_has_panels() -> None:
    assert len({title.rsplit(" [", 1)[0] for title, _ in panel_targets()}) >= 9


def has_data(result: list[dict]) -> bool:
    """At least one series with a number a panel can draw (not NaN, e.g. a quantile of no events)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def panels_without_data(prometheus_url: str, timeout: float, poll: float = 1.0) -> dict[str, str]:
    """Query every panel target until each has returned data or `timeout` has passed;
    returns the targets that never did (title -> filled query)."""
    pending = {title: fill(expr) for title, expr in panel_targets()}
    deadline = time.monotonic() + timeout
    while pending:
        for title, expr in list(pending.items()):
            if has_data(query(prometheus_url, expr)):
                del pending[title]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return pending


def test_every_panel_query_returns_data(fed_prometheus: str) -> None:
    pending = panels_without_data(fed_prometheus, QUERY_TIMEOUT)
    assert pending == {}, f"panels without data after {QUERY_TIMEOUT:.0f} s"


def test_rates_and_quantiles_see_the_traffic(fed_prometheus: str) -> None:
    heartbeats = query(fed_prometheus, "sum(rate(airflow_scheduler_heartbeat_total[5m]))")
    assert float(heartbeats[0]["value"][1]) > 0
    p95 = query(fed_prometheus, 'histogram_quantile(0.95, sum by (le, table) '
                                 '(rate(k2_offload_duration_seconds_bucket[1h])))')
    assert {r["metric"]["table"] for r in p95} == set(TABLES)
    assert all(5.0 <= float(r["value"][1]) <= 10.0 for r in p95)  # 8 s jobs, bucket 5-10 s


def test_panels_see_every_table(fed_prometheus: str) -> None:
    lag = query(fed_prometheus, fill('k2:offload_lag_seconds{table=~"$table"}'))
    assert {r["metric"]["table"] for r in lag} == set(TABLES)
    for result in lag:
        assert 300 <= float(result["value"][1]) < 300 + 120  # send_k2_samples: watermark 5 min old


def test_table_variable_lists_the_tables(fed_prometheus: str) -> None:
    dashboard = json.loads(monitoring.DASHBOARD_FILE.read_text())
    (variable,) = dashboard["templating"]["list"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
    url = f"{fed_prometheus}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
    assert set(_get_json(url)["data"]) == set(TABLES)
