"""`k2 health`: thresholds come from the alert rules; statuses and exit codes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from k2 import health as hc

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
LIMITS = hc.Thresholds(lag_warning_seconds=1200, lag_critical_seconds=1800, stale_seconds=3600)


@dataclass
class Row:
    watermark_ts: datetime
    updated_at: datetime
    last_committed_at: datetime | None


def test_thresholds_come_from_the_alert_rules():
    limits = hc.thresholds()
    assert limits.lag_warning_seconds < limits.lag_critical_seconds
    assert (limits.lag_warning_seconds, limits.lag_critical_seconds) == (1200, 1800)


def test_thresholds_missing_from_rules_is_an_error(tmp_path):
    rules = tmp_path / "alerts.yml"
    rules.write_text("groups: [{name: g, rules: [{alert: Other, expr: up == 0}]}]\n")
    with pytest.raises(ValueError, match="K2OffloadLag"):
        hc.thresholds(rules)


@pytest.mark.parametrize(
    ("lag_minutes", "idle_minutes", "expected"),
    [(10, 10, "ok"), (25, 5, "warning"), (35, 5, "critical"), (90, 90, "critical"), (19, 200, "ok")],
)
def test_table_lag_status(lag_minutes, idle_minutes, expected):
    row = Row(NOW - timedelta(minutes=lag_minutes), NOW - timedelta(minutes=idle_minutes), NOW)
    [check] = hc.table_checks(["t"], {"t": row}, LIMITS, NOW)
    assert check.status == expected, check.detail


def test_stale_watermark_is_named():
    row = Row(NOW - timedelta(hours=3), NOW - timedelta(hours=2), None)
    [check] = hc.table_checks(["t"], {"t": row}, LIMITS, NOW)
    assert check.status == "critical" and "stale" in check.detail and "never" in check.detail


def test_table_without_watermark_is_a_warning():
    [check] = hc.table_checks(["t"], {}, LIMITS, NOW)
    assert check.status == "warning"


def test_airflow_components_from_the_health_endpoint():
    payload = {
        "metadatabase": {"status": "healthy"},
        "scheduler": {"status": "healthy", "latest_scheduler_heartbeat": "2026-11-26T12:00:00Z"},
        "triggerer": {"status": "unhealthy", "latest_triggerer_heartbeat": None},
        "dag_processor": {"status": "healthy"},
    }
    checks = {c.name: c for c in hc.airflow_checks("http://x", fetch=lambda _url: payload)}
    assert checks["airflow scheduler"].status == "ok"
    assert "2026-11-26T12:00:00Z" in checks["airflow scheduler"].detail
    assert checks["airflow triggerer"].status == "critical"
    assert hc.worst(list(checks.values())) == "critical"


def test_unreachable_api_server_is_critical():
    def refuse(_url):
        raise OSError("connection refused")

    [check] = hc.airflow_checks("http://x", fetch=refuse)
    assert check.status == "critical" and "connection refused" in check.detail


@pytest.mark.parametrize(("statuses", "code"), [(["ok"], 0), (["ok", "warning"], 1), (["warning", "critical"], 2)])
def test_exit_code_is_the_worst_status(statuses, code):
    checks = [hc.Check(str(i), s, "") for i, s in enumerate(statuses)]
    assert hc.STATUS_CODE[hc.worst(checks)] == code


def test_import_errors():
    assert hc.import_error_check(0).status == "ok"
    assert hc.import_error_check(2).status == "critical"
    assert hc.import_error_check(None).status == "warning"
