"""The feed stops, the feed-stopped alert fires and an email arrives — on the session's real
pipeline, not on made-up gauges.

The clock is arranged, not waited for: Binance's feed stops when the session's hot data is
written (`hot_data`; later top-ups feed Kraken only, conftest.LIVE_EXCHANGES). The runs of
bronze_trades_binance after that wait in wait_for_hot_data, and every check of their sensor
sends the table's newest event time (`k2_hot_max_event_timestamp_seconds`), which no longer
moves. Twenty minutes after the last Binance trade `k2:hot_data_age_seconds` crosses the
K2FeedStopped threshold (the rule exactly as shipped), Prometheus fires it after its `for:`
minute and Alertmanager mails the session's SMTP sink.

This test runs last in the Airflow lane (`late` marker), by when the session is usually
older than the threshold and the alert has long fired; on a fast machine, or alone, it
waits for the state with a deadline."""

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
from tests.integration.airflow_handle import wait_until
from tests.integration.conftest import STOPPED_FEED_TABLE

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.late]

ALERT = "K2FeedStopped"
SPEC = load_tables().get(STOPPED_FEED_TABLE)
# After the threshold: the `for:` minute, a rule evaluation, Alertmanager's group wait.
FIRE_MARGIN = 180.0
MAIL_TIMEOUT = 180.0
REPORT_TIMEOUT = 600.0


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


def _newest_event_seen(prometheus_url: str) -> float | None:
    """The newest event time (unix s) a sensor reported for the stopped table, as scraped."""
    rows = _query(prometheus_url, f'{metrics.HOT_MAX_EVENT_TIME.prometheus}{{table="{SPEC.name}"}}')
    return max((float(row["value"][1]) for row in rows), default=None)


def _feed_stopped_mails(stack) -> list[str]:
    if not stack.maildir.exists():
        return []
    subjects = [re.sub(r"\r?\n(?=[ \t])", "", m["Subject"] or "") for m in mailbox.Maildir(stack.maildir, create=False)]
    return [s for s in subjects if ALERT in s]


def test_stopped_feed_fires_the_alert_and_mails_the_sink(stack, hot_data, airflow_running):
    prometheus = MonitoringStack.for_local_stack(stack).prometheus_url
    threshold = _threshold_seconds()
    # In the whole suite the Airflow tests have run this DAG and its newest runs wait for
    # Binance data; alone, unpausing it makes a sensor report.
    airflow_running.unpause(SPEC.dag_id, timeout=600)
    seen = wait_until(lambda: _newest_event_seen(prometheus), REPORT_TIMEOUT,
                 f"no sensor of {SPEC.dag_id} reported its newest event time")
    # What the alert watches is the table's real newest trade, which stopped moving.
    newest = hot_data.query(f"SELECT max({SPEC.completeness.column}) FROM {SPEC.completeness.table}").first_row[0]
    newest = newest if newest.tzinfo else newest.replace(tzinfo=timezone.utc)
    assert abs(seen - newest.timestamp()) < 1.0, (seen, newest)

    fire_by = seen + threshold + FIRE_MARGIN
    age = time.time() - seen
    print(f"\n[feed stopped] last {SPEC.name} trade {datetime.fromtimestamp(seen, timezone.utc).isoformat()}, "
          f"{age:.0f} s ago; threshold {threshold:.0f} s; "
          f"{'already past' if age > threshold else f'{threshold - age:.0f} s to go'}")

    def firing() -> list[dict]:
        rows = _query(prometheus, f'ALERTS{{alertname="{ALERT}", alertstate="firing", table="{SPEC.name}"}}')
        assert rows or time.time() < fire_by, (
            f"{ALERT} not firing for {SPEC.name} {time.time() - seen:.0f} s after its last trade; "
            f"hot data age: {_query(prometheus, 'k2:hot_data_age_seconds')}"
        )
        return rows

    wait_until(firing, fire_by - time.time() + 60, f"{ALERT} firing for {SPEC.name}")
    print(f"[feed stopped] {ALERT} firing for {SPEC.name}, {time.time() - seen:.0f} s after its last trade")

    mails = wait_until(lambda: [m for m in _feed_stopped_mails(stack) if f"table={SPEC.name}" in m], MAIL_TIMEOUT,
                  f"no {ALERT} email naming {SPEC.name} in {stack.maildir}")
    print(f"[feed stopped] emails: {mails}")
    assert all(subject.startswith("[K2 CRITICAL]") for subject in _feed_stopped_mails(stack)), mails
    _feed_stopped_drill(stack, airflow_running, seen)


def _feed_stopped_drill(stack, airflow_running, last_trade: float) -> None:
    """The runbook's "Feed stopped", as written (tests/runbooks.py), in the state it
    describes: the look, the feed restarted live (in the background, as in a second
    terminal), the clear of runs whose sensor gave up (none here: the sensor waits an hour),
    and the check - the intervals the runs were waiting for are committed."""
    from k2.watermarks import WatermarkStore
    from tests.integration.conftest import floor_interval
    from tests.runbooks import Drill

    store = WatermarkStore(stack.postgres_dsn("k2"))
    held = store.get(SPEC.name).watermark_ts
    first_held = datetime.fromtimestamp(last_trade, timezone.utc)
    values = {"<first failed start>": floor_interval(first_held).isoformat(),
              "<last failed start>": floor_interval(datetime.now(timezone.utc)).isoformat()}
    with Drill("Feed stopped", home=stack.home, table=SPEC.name, env_file=stack.home / "airflow.env",
               values=values) as drill:
        assert SPEC.name in drill.run("k2 health", expect=(1, 2)).stdout
        restarted = time.monotonic()
        feed = drill.start("k2 feed")
        try:
            # Runs ending before the restart were waiting for data that never comes: their
            # intervals are offloaded with the rows ClickHouse has, once newer trades arrive
            # (the last one closed before the restart, once the feed is past its lateness).
            due = floor_interval(datetime.now(timezone.utc))
            drill.run("airflow tasks clear")
            wait_until(lambda: store.get(SPEC.name).watermark_ts >= due, 600,
                       f"{SPEC.name}'s watermark from {held} to {due} after the feed restarted")
            assert feed.poll() is None, f"the feed stopped: {feed.stderr.read() if feed.stderr else ''}"
        finally:
            feed.terminate()
            feed.wait(30)
    print(f"[feed stopped] feed restarted: watermark {held} -> {store.get(SPEC.name).watermark_ts} "
          f"in {time.monotonic() - restarted:.0f} s")
