"""Alerts fire and arrive by email: StatsD -> statsd_exporter -> Prometheus -> Alertmanager -> SMTP.

Everything is real: the project's mapping, rules and Alertmanager config (rendered for
free loopback ports and a 1 s clock), the three daemons as `k2 local` starts them, an
aiosmtpd SMTP sink, and metrics sent through Airflow's own Stats client by the k2.metrics
helpers. Three tables:

- bronze_trades_kraken: watermark 45 min old -> K2OffloadLag, critical (and the warning,
  which Alertmanager inhibits);
- bronze_trades_binance: newest hot-tier event 30 min old -> K2FeedStopped;
- silver_trades: healthy -> no alert, no email.

The rules' `for: 1m` is kept, so the alerts need about 65 s; every wait is bounded.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest

from k2 import metrics
from k2.local import monitoring
from k2.local.monitoring import MonitoringStack
from tests.integration.airflow_handle import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAGGING, FEED_STOPPED, HEALTHY = "bronze_trades_kraken", "bronze_trades_binance", "silver_trades"
ONCALL = "oncall@k2.test"
FIRE_TIMEOUT = 90.0  # `for: 1m` + scrape, evaluation and send delays
MAIL_TIMEOUT = 30.0


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class SmtpSink:
    """Collects every message delivered to it."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


@pytest.fixture(scope="module")
def smtp_sink():
    from aiosmtpd.controller import Controller

    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        yield sink, controller.port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def mon(tmp_path_factory: pytest.TempPathFactory, smtp_sink):
    _, smtp_port = smtp_sink
    mon = MonitoringStack(
        home=tmp_path_factory.mktemp("k2mon"),
        statsd_port=_free_port(socket.SOCK_DGRAM),
        statsd_exporter_port=_free_port(),
        prometheus_port=_free_port(),
        alertmanager_port=_free_port(),
        smtp_port=smtp_port,
        alert_email_to=ONCALL,
        scrape_interval="1s",
        evaluation_interval="1s",
        alert_group_wait="1s",
        alert_group_interval="5s",
    )
    with pytest.MonkeyPatch.context() as env:
        for key, value in monitoring.airflow_metrics_env(mon).items():
            env.setenv(key, value)
        metrics.configure_stats(force=True)
        monitoring.start(mon, log=lambda _msg: None)
        try:
            yield mon
        finally:
            monitoring.stop(mon, log=lambda _msg: None)
    metrics.configure_stats(force=True)


@pytest.fixture(scope="module")
def airflow_heartbeats(mon: MonitoringStack):
    """A live scheduler and triggerer, as far as metrics go, so that only the table alerts fire."""
    from airflow.sdk.observability.stats import Stats

    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            Stats.incr("scheduler_heartbeat", 1, 1)
            Stats.incr("triggerer_heartbeat", 1, 1)
            Stats.incr("dag_processor_heartbeat", 1, 1)
            Stats.gauge("dag_processing.import_errors", 0)
            stop.wait(1.0)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


@pytest.fixture(scope="module")
def fired(mon: MonitoringStack, airflow_heartbeats, smtp_sink):
    """Send the three tables' metrics; wait until both alerts fire in Prometheus."""
    now = datetime.now(timezone.utc)
    for table, watermark_age, hot_age in (
        (LAGGING, timedelta(minutes=45), timedelta(seconds=30)),
        (FEED_STOPPED, timedelta(minutes=5), timedelta(minutes=30)),
        (HEALTHY, timedelta(minutes=5), timedelta(seconds=30)),
    ):
        metrics.set_watermark(table, now - watermark_age)
        metrics.set_last_success(table, now - watermark_age)
        metrics.set_hot_max_event_time(table, now - hot_age)
        metrics.record_offload(table, rows=1000, bytes_written=64_000, seconds=5.0)

    def firing() -> list[dict] | None:
        alerts = _get_json(f"{mon.prometheus_url}/api/v1/alerts")["data"]["alerts"]
        wanted = {("K2OffloadLag", "critical", LAGGING), ("K2FeedStopped", "critical", FEED_STOPPED)}
        got = {(a["labels"]["alertname"], a["labels"]["severity"], a["labels"].get("table"))
               for a in alerts if a["state"] == "firing"}
        return alerts if wanted <= got else None

    started = time.monotonic()
    alerts = poll(firing, FIRE_TIMEOUT)
    assert alerts, (
        f"alerts did not fire within {FIRE_TIMEOUT:.0f} s; Prometheus has: "
        f"{_get_json(f'{mon.prometheus_url}/api/v1/alerts')['data']['alerts']}; "
        f"exporter log: {monitoring.STATSD_EXPORTER.log_file(mon).read_text()[-2000:]}"
    )
    return alerts, time.monotonic() - started


def _mails_about(sink: SmtpSink, alertname: str, table: str) -> list[EmailMessage]:
    return [m for m in sink.messages if alertname in m["Subject"] and f"table={table}" in m["Subject"]]


def test_lag_and_feed_stopped_alerts_fire_in_prometheus(fired) -> None:
    alerts, seconds = fired
    by_key = {(a["labels"]["alertname"], a["labels"]["severity"], a["labels"].get("table")): a for a in alerts}
    lag = by_key[("K2OffloadLag", "critical", LAGGING)]
    assert lag["annotations"]["runbook_url"] == "docs/operations/runbooks.md#high-lag"
    assert 2700 <= float(lag["value"]) < 2700 + FIRE_TIMEOUT + 30
    assert by_key[("K2FeedStopped", "critical", FEED_STOPPED)]["annotations"]["summary"].startswith(
        f"No new data for {FEED_STOPPED}"
    )
    assert seconds < FIRE_TIMEOUT


def test_healthy_table_does_not_alert(fired, mon: MonitoringStack) -> None:
    alerts = _get_json(f"{mon.prometheus_url}/api/v1/alerts")["data"]["alerts"]
    assert [a for a in alerts if a["labels"].get("table") == HEALTHY] == []
    # Nor do the Airflow alerts: heartbeats arrive, no import errors, the exporter is up.
    assert {a["labels"]["alertname"] for a in alerts} <= {"K2OffloadLag", "K2FeedStopped"}


def test_alert_emails_arrive_naming_alert_and_table(fired, smtp_sink) -> None:
    sink, _ = smtp_sink
    expected = ((LAGGING, "K2OffloadLag", "#high-lag"), (FEED_STOPPED, "K2FeedStopped", "#feed-stopped"))
    arrived = poll(
        lambda: all(_mails_about(sink, alert, table) for table, alert, _ in expected), MAIL_TIMEOUT
    )
    assert arrived, f"emails received: {[m['Subject'] for m in sink.messages]}"
    for table, alert, anchor in expected:
        mail = _mails_about(sink, alert, table)[0]
        assert mail["Subject"].startswith("[K2 CRITICAL]"), mail["Subject"]
        assert mail["To"] == ONCALL
        body = mail.get_body(("plain",)).get_content()
        assert f"{alert} severity=critical table={table}" in body
        assert f"Runbook: docs/operations/runbooks.md{anchor}" in body
    for mail in sink.messages:
        assert HEALTHY not in mail["Subject"] + mail.get_body(("plain",)).get_content()


def test_critical_inhibits_the_warning_of_the_same_alert_and_table(
    fired, mon: MonitoringStack, smtp_sink
) -> None:
    def lag_alerts_in_alertmanager() -> dict[str, dict] | None:
        alerts = _get_json(f"{mon.alertmanager_url}/api/v2/alerts")
        lag = {a["labels"]["severity"]: a for a in alerts
               if a["labels"]["alertname"] == "K2OffloadLag" and a["labels"].get("table") == LAGGING}
        return lag if {"warning", "critical"} <= set(lag) else None

    lag = poll(lag_alerts_in_alertmanager, MAIL_TIMEOUT)
    assert lag, "Alertmanager did not receive both K2OffloadLag alerts"
    assert lag["critical"]["status"]["state"] == "active"
    assert lag["warning"]["status"]["state"] == "suppressed"
    assert lag["warning"]["status"]["inhibitedBy"] == [lag["critical"]["fingerprint"]]
    sink, _ = smtp_sink
    assert not [m for m in _mails_about(sink, "K2OffloadLag", LAGGING) if "WARNING" in m["Subject"]]


def test_rendered_configs_are_the_ones_running(mon: MonitoringStack) -> None:
    config = _get_json(f"{mon.prometheus_url}/api/v1/status/config")["data"]["yaml"]
    assert f"127.0.0.1:{mon.statsd_exporter_port}" in config
    rules = _get_json(f"{mon.prometheus_url}/api/v1/rules")["data"]["groups"]
    assert {group["name"] for group in rules} == {"k2-recording", "k2-offload", "k2-airflow"}
    assert Path(mon.prometheus_config).is_file() and Path(mon.alertmanager_config).is_file()


def test_the_pages_make_run_prints_answer(mon: MonitoringStack) -> None:
    """The alerts page and the Alertmanager address `make run` prints are ones that answer on
    this machine's Prometheus and Alertmanager (Debian's: the classic UI, no Alertmanager UI)."""
    from k2.local.daemons import http_ok

    alerts = monitoring.prometheus_alerts_page(mon)
    assert alerts.startswith(mon.prometheus_url) and http_ok(alerts), alerts
    with urllib.request.urlopen(alerts, timeout=10) as response:
        page = response.read().decode()
    assert "/api/v1/alerts" in alerts or "alert" in page.lower(), page[:500]
    manager = monitoring.alertmanager_page(mon)
    assert manager.startswith(mon.alertmanager_url) and http_ok(manager), manager
    with urllib.request.urlopen(manager, timeout=10) as response:
        assert monitoring.NO_ALERTMANAGER_UI not in response.read()  # not Debian's "no UI" page
    print(f"\n[pages] Prometheus alerts: {alerts}; Alertmanager: {manager}")
