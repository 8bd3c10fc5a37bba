"""The feed stops, the feed-stopped alert fires and an email arrives — on the session's real
pipeline, not on made-up gauges.

The session's hot data is written once, when the `hot_data` fixture runs; after that no
trade arrives: for the pipeline the feed has stopped. Every watermark check of a sensor
sends the newest event time it saw (`k2_hot_max_event_timestamp_seconds`), so 20 minutes
after the last trade `k2:hot_data_age_seconds` crosses the K2FeedStopped threshold,
Prometheus fires it after its `for:` minute and Alertmanager mails the session's SMTP sink.
The module name sorts it after the deadline and failure-email tests (whose sensors report
the old data) and before test_faults_airflow.py, which tops the hot tier up to now: by then
the 20 minutes have usually passed; alone, or in a fast session, it waits for them."""

from __future__ import annotations

import json
import mailbox
import re
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone

import pytest
import yaml

from k2 import metrics
from k2.config import load_tables
from k2.health import ALERT_RULES
from k2.local.monitoring import MonitoringStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALERT = "K2FeedStopped"
# Run alone, this module unpauses one DAG until a sensor has reported (its catch-up from
# the session's start date is short); in the whole suite other modules' runs have.
PROBE = load_tables().get("gold_ohlcv_15m")
# After the threshold: the `for:` minute, a rule evaluation, Alertmanager's group wait.
FIRE_MARGIN = 180.0
MAIL_TIMEOUT = 180.0


def _threshold_seconds() -> float:
    """The K2FeedStopped threshold, read from the rule itself."""
    for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                found = re.search(r"k2:hot_data_age_seconds > ([0-9.]+)", rule["expr"])
                assert found, rule["expr"]
                return float(found.group(1))
    raise AssertionError(f"no {ALERT} rule in {ALERT_RULES}")


def _query(prometheus_url: str, expr: str) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _newest_event_seen(prometheus_url: str) -> dict[str, float]:
    """table -> the newest event time (unix s) a sensor reported, as Prometheus scraped it."""
    return {
        row["metric"]["table"]: float(row["value"][1])
        for row in _query(prometheus_url, metrics.HOT_MAX_EVENT_TIME.prometheus)
    }


def _feed_stopped_mails(stack) -> list[str]:
    if not stack.maildir.exists():
        return []
    subjects = [re.sub(r"\r?\n(?=[ \t])", "", m["Subject"] or "") for m in mailbox.Maildir(stack.maildir, create=False)]
    return [s for s in subjects if ALERT in s]


def test_stopped_feed_fires_the_alert_and_mails_the_sink(stack, hot_data, airflow_running):
    prometheus = MonitoringStack.for_local_stack(stack).prometheus_url
    threshold = _threshold_seconds()
    seen = _newest_event_seen(prometheus)
    if not seen:  # this module alone: its DAG's sensor checks make the gauge exist
        airflow_running.unpause(PROBE.dag_id, timeout=600)
        try:
            deadline = time.monotonic() + 600
            while not seen:
                assert time.monotonic() < deadline, "no sensor reported the newest event time within 600 s"
                time.sleep(10)
                seen = _newest_event_seen(prometheus)
        finally:
            airflow_running.cli("dags", "pause", PROBE.dag_id)

    last_trade = max(seen.values())
    fire_by = last_trade + threshold + FIRE_MARGIN
    print(f"\n[feed stopped] last trade {datetime.fromtimestamp(last_trade, timezone.utc).isoformat()}, "
          f"{time.time() - last_trade:.0f} s ago; threshold {threshold:.0f} s; tables seen: {sorted(seen)}")
    firing: list[dict] = []
    while not firing:
        firing = _query(prometheus, f'ALERTS{{alertname="{ALERT}", alertstate="firing"}}')
        if not firing:
            assert time.time() < fire_by, (
                f"{ALERT} not firing {time.time() - last_trade:.0f} s after the last trade; "
                f"hot data age: {_query(prometheus, 'k2:hot_data_age_seconds')}"
            )
            time.sleep(10)
    fired_tables = {row["metric"]["table"] for row in firing}
    assert fired_tables <= set(seen), (fired_tables, seen)
    print(f"[feed stopped] {ALERT} firing for {sorted(fired_tables)}, {time.time() - last_trade:.0f} s after the last trade")

    deadline = time.monotonic() + MAIL_TIMEOUT
    while not (mails := _feed_stopped_mails(stack)):
        assert time.monotonic() < deadline, f"no {ALERT} email in {stack.maildir} within {MAIL_TIMEOUT:.0f} s"
        time.sleep(5)
    print(f"[feed stopped] emails: {mails}")
    assert any(f"table={table}" in subject for subject in mails for table in fired_tables), mails
    assert all(subject.startswith("[K2 CRITICAL]") for subject in mails), mails
