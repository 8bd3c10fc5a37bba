"""`k2 health`: the 30-second check an operator runs first.

Each check has a status ok / warning / critical; the command exits 0, 1 or 2 with the
worst of them. Thresholds are read from the Prometheus alert rules
(monitoring/prometheus/rules/alerts.yml), so the CLI and the alerts never disagree.
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from k2.config import REPO_ROOT

ALERT_RULES = REPO_ROOT / "monitoring" / "prometheus" / "rules" / "alerts.yml"
STATUS_CODE = {"ok": 0, "warning": 1, "critical": 2}
# A scheduler that has not heartbeat for this long is down (Airflow's own health endpoint
# applies [scheduler] scheduler_health_check_threshold; this is the fallback).
SCHEDULER_HEARTBEAT_SECONDS = 60


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warning | critical
    detail: str

    def __post_init__(self) -> None:
        if self.status not in STATUS_CODE:
            raise ValueError(f"unknown status {self.status!r}")


@dataclass(frozen=True)
class Thresholds:
    lag_warning_seconds: float
    lag_critical_seconds: float
    stale_seconds: float


def thresholds(rules_file: Path = ALERT_RULES) -> Thresholds:
    """The lag thresholds of K2OffloadLag (warning and critical) and of K2WatermarkStale."""
    document = yaml.safe_load(rules_file.read_text())
    lag: dict[str, float] = {}
    stale = None
    for group in document["groups"]:
        for rule in group["rules"]:
            expr = " ".join(str(rule.get("expr", "")).split())
            found = re.search(r"k2:offload_lag_seconds > ([0-9.]+)", expr)
            if rule.get("alert") == "K2OffloadLag" and found:
                lag[rule["labels"]["severity"]] = float(found.group(1))
            if rule.get("alert") == "K2WatermarkStale" and found:
                stale = float(found.group(1))
    missing = {"warning", "critical"} - set(lag)
    if missing or stale is None:
        raise ValueError(f"{rules_file}: cannot find the K2OffloadLag / K2WatermarkStale thresholds")
    return Thresholds(lag["warning"], lag["critical"], stale)


def worst(checks: list[Check]) -> str:
    return max((c.status for c in checks), key=STATUS_CODE.__getitem__, default="ok")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def table_checks(
    tables: list[str],
    watermarks: dict[str, Any],
    limits: Thresholds,
    now: datetime,
) -> list[Check]:
    """Lag and staleness per table from the watermark store's status rows."""
    checks = []
    for table in tables:
        row = watermarks.get(table)
        if row is None:
            checks.append(Check(f"lag {table}", "warning", "no watermark yet: nothing offloaded"))
            continue
        lag = (now - row.watermark_ts).total_seconds()
        idle = (now - row.updated_at).total_seconds()
        last = row.last_committed_at.isoformat(timespec="seconds") if row.last_committed_at else "never"
        status = "ok"
        if lag > limits.lag_critical_seconds:
            status = "critical"
        elif lag > limits.lag_warning_seconds:
            status = "warning"
        detail = f"lag {_minutes(lag)} (warning > {_minutes(limits.lag_warning_seconds)}, " \
                 f"critical > {_minutes(limits.lag_critical_seconds)}); last success {last}"
        if lag > limits.stale_seconds and idle > limits.stale_seconds:
            status = "critical"
            detail += f"; watermark stale: not advanced for {_minutes(idle)}"
        checks.append(Check(f"lag {table}", status, detail))
    return checks


def airflow_checks(api_url: str, fetch: Callable[[str], dict[str, Any]] | None = None) -> list[Check]:
    """Scheduler, triggerer and dag-processor heartbeats from Airflow's health endpoint."""
    fetch = fetch or _fetch_json
    try:
        health = fetch(f"{api_url}/api/v2/monitor/health")
    except OSError as exc:
        return [Check("airflow api-server", "critical", f"{api_url} unreachable: {exc}")]
    checks = [Check("airflow api-server", "ok", api_url)]
    for component in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        info = health.get(component) or {}
        state = info.get("status")
        beat = next((v for k, v in info.items() if k.startswith("latest_") and v), None)
        detail = f"status {state}" + (f", last heartbeat {beat}" if beat else "")
        checks.append(Check(f"airflow {component}", "ok" if state == "healthy" else "critical", detail))
    return checks


def import_error_check(count: int | None) -> Check:
    if count is None:
        return Check("dag import errors", "warning", "unknown: Airflow's metadata DB unreachable")
    if count:
        return Check("dag import errors", "critical", f"{count} DAG file(s) fail to import: see the Airflow UI")
    return Check("dag import errors", "ok", "none")


def _fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def format_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=10)
    lines = [f"{c.status.upper():<9} {c.name:<{width}}  {c.detail}" for c in checks]
    lines.append(f"overall: {worst(checks)}")
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    return json.dumps({"status": worst(checks), "checks": [asdict(c) for c in checks]}, indent=2)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
