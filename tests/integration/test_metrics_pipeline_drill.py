"""The runbook's "Metrics pipeline down" (docs/operations/runbooks.md), as written
(tests/runbooks.py), on this lane's session stack: statsd_exporter dies (SIGKILL), Prometheus
sees its target down, the runbook's look finds it stopped and its mapping file sound, and its
fix (`k2 local up`) brings it back until Prometheus scrapes it again. Nothing else is
restarted.

About 1 minute: two Prometheus scrapes (15 s) either way."""

from __future__ import annotations

import json
import os
import signal
import urllib.parse
import urllib.request

import pytest

from k2.local.monitoring import PROMETHEUS, STATSD_EXPORTER, MonitoringStack
from tests.integration.airflow_handle import wait_until
from tests.runbooks import Drill

pytestmark = [pytest.mark.integration]


def _exporter_up(prometheus_url: str) -> float | None:
    query = urllib.parse.urlencode({"query": 'up{job="statsd_exporter"}'})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{query}", timeout=10) as response:
        result = json.loads(response.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_metrics_pipeline_runbook_restarts_the_exporter(stack):
    monitoring = MonitoringStack.for_local_stack(stack)
    prometheus = monitoring.prometheus_url
    assert PROMETHEUS.pid(monitoring) is not None, "the session's Prometheus is not running"
    wait_until(lambda: _exporter_up(prometheus) == 1.0, 120, "statsd_exporter scraped up")
    prometheus_pid = PROMETHEUS.pid(monitoring)
    pid = STATSD_EXPORTER.pid(monitoring)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: STATSD_EXPORTER.pid(monitoring) is None, 30, "statsd_exporter gone")
    wait_until(lambda: _exporter_up(prometheus) == 0.0, 120, "Prometheus seeing statsd_exporter down")

    with Drill("Metrics pipeline down", home=stack.home) as drill:
        status = drill.run("k2 local status", expect=(0, 1)).stdout
        line = next(line for line in status.splitlines() if "statsd-exporter" in line)
        assert "stopped" in line, status
        assert drill.run("/metrics | head", expect=(7, 56)).returncode != 0  # connection refused
        drill.run("tail -n 50")
        assert "successful" in drill.run("--check-config").stderr
        drill.run("k2 local up")
        assert STATSD_EXPORTER.pid(monitoring) not in (None, pid)
        wait_until(lambda: _exporter_up(prometheus) == 1.0, 120, "Prometheus scraping statsd_exporter again")
        answer = json.loads(drill.run("query=up").stdout)
        assert answer["data"]["result"][0]["value"][1] == "1", answer
    assert PROMETHEUS.pid(monitoring) == prometheus_pid, "`k2 local up` restarted Prometheus too"
