"""`make run` / `k2 run` and `k2 demo`: the whole pipeline on the local stack.

Order: local services → schema → feed history → live feed → Airflow with the
offload DAGs catching up from the start of the history. `run` keeps going until
Ctrl-C and then stops what it started; `demo --until-caught-up` stops once every
table's watermark has reached the last closed interval and `k2 verify` is clean.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Callable

import clickhouse_connect
import psycopg

from k2 import metrics
from k2.config import END_DATE_ENV, START_DATE_ENV, load_tables
from k2.feed import run_feed
from k2.iceberg import load_catalog
from k2.intervals import floor_interval
from k2.local import airflow
from k2.local import stack as local_stack
from k2.local.daemons import Daemon
from k2.local.monitoring import MonitoringStack, alertmanager_page, prometheus_alerts_page
from k2.local.processes import StackError
from k2.local.settings import LocalStack
from k2.local.stack import clickhouse_client
from k2.schema import apply_schema
from k2.verify import verify_table
from k2.watermarks import WatermarkStore


def live_feed(rate: float) -> Daemon:
    return Daemon(
        name="feed",
        argv=lambda s: [os.path.join(os.path.dirname(sys.executable), "k2"), "feed", "--rate", str(rate)],
        port=lambda s: None,
        healthy=lambda s: True,
        start_timeout=3.0,
    )


class Pipeline:
    """Starts the local pipeline and remembers what it started, to stop exactly that."""

    def __init__(self, stack: LocalStack, log: Callable[[str], None] = print) -> None:
        self.stack = stack
        self.log = log
        self._stoppers: list[Callable[[], None]] = []
        self.end_date: datetime | None = None

    def start(self, *, history: timedelta, rate: float, seed: int, bounded: bool = False) -> datetime:
        """Bring everything up; returns the start date the DAGs catch up from.

        bounded: the DAGs end at the last interval closed now (K2_END_DATE, set as
        `end_date`), so that a catch-up has a fixed goal however long the start takes."""
        started_services = [s.name for s in local_stack.status(self.stack) if s.pid is None]
        local_stack.up(self.stack, log=self.log)
        if started_services:
            self._stoppers.append(lambda: local_stack.down(self.stack, log=self.log))
        client = clickhouse_client(self.stack)
        apply_schema(client)
        now = datetime.now(timezone.utc)
        start_date = floor_interval(now - history)
        existing = client.query("SELECT count() FROM bronze_trades_binance").result_rows[0][0]
        if existing:
            self.log(f"feed: {existing} Binance trades already in ClickHouse, history not rewritten")
            first = client.query("SELECT min(event_time) FROM silver_trades").result_rows[0][0]
            start_date = floor_interval(first.replace(tzinfo=timezone.utc))
        else:
            self.log(f"feed: writing {history} of history")
            run_feed(client, history=history, rate=None, seed=seed, end=now, progress=self.log)
        client.close()

        feed = live_feed(rate)
        if feed.start(self.stack):
            self._stoppers.append(lambda: feed.stop(self.stack))
            self.log(f"feed: live at {rate} trades/s (log {feed.log_file(self.stack)})")

        os.environ[START_DATE_ENV] = start_date.isoformat()
        if bounded:
            self.end_date = floor_interval(now)
            os.environ[END_DATE_ENV] = self.end_date.isoformat()
        airflow.start(self.stack, log=self.log)
        self._stoppers.append(lambda: airflow.stop(self.stack, log=self.log))
        return start_date

    def stop(self) -> None:
        while self._stoppers:
            stopper = self._stoppers.pop()
            try:
                stopper()
            except StackError as exc:
                self.log(f"while stopping: {exc}")

    def banner(self, start_date: datetime) -> str:
        s = self.stack
        mon = MonitoringStack.for_local_stack(s)
        return "\n".join(
            [
                "",
                "K2 pipeline is running.",
                f"  Airflow UI     http://{s.host}:{s.airflow_port}   login: {airflow.ADMIN_USER} / "
                f"password in {s.airflow_home / 'passwords.json'}",
                f"  Prometheus     {mon.prometheus_url}   alerts: {prometheus_alerts_page(mon)}",
                f"  Alertmanager   {alertmanager_page(mon)}   emails land in {s.maildir}",
                f"  ClickHouse     http://{s.host}:{s.clickhouse_port}   user {s.credentials['clickhouse_user']}, "
                f"password in {s.credentials_file}",
                f"  PostgreSQL     {s.host}:{s.postgres_port}   user {s.credentials['postgres_user']} "
                f"(watermarks in database k2), password in {s.credentials_file}",
                "  Every service: `k2 local status`.",
                f"  DAGs catch up from {start_date.isoformat()}; watch them with `k2 watermark show`.",
                "  Ctrl-C stops everything this command started.",
                "",
            ]
        )


def wait_for_interrupt(ready: Callable[[], None] | None = None) -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM; `ready` is called once both are handled."""
    stop = {"now": False}

    def handler(_signum, _frame):
        stop["now"] = True

    # Both, explicitly: a shell script that starts `make run` in the background leaves
    # SIGINT ignored in it, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if ready is not None:
        ready()
    try:
        while not stop["now"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def _failed_runs(stack: LocalStack) -> list[tuple[str, str]]:
    """(dag_id, run_id) of failed offload runs, read from Airflow's metadata database."""
    with psycopg.connect(stack.postgres_dsn("airflow"), connect_timeout=5) as conn:
        return conn.execute(
            "SELECT dag_id, run_id FROM dag_run WHERE state = 'failed' AND dag_id LIKE 'k2_offload_%%'"
        ).fetchall()


def failed_tries(stack: LocalStack, limit: int = 10) -> list[str]:
    """One line per failed try of an offload task (retried or final): the task, the run,
    the try and the last error its log holds. Empty when none failed or Airflow's
    database cannot be read; it only explains a problem, it never adds one."""
    try:
        with psycopg.connect(stack.postgres_dsn("airflow"), connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT dag_id, run_id, task_id, try_number FROM task_instance_history "
                "WHERE state IN ('failed', 'up_for_retry') AND dag_id LIKE 'k2_offload_%%' "
                "UNION SELECT dag_id, run_id, task_id, try_number FROM task_instance "
                "WHERE state IN ('failed', 'up_for_retry') AND dag_id LIKE 'k2_offload_%%' "
                "ORDER BY 1, 2, 3, 4 LIMIT %s",
                (limit,),
            ).fetchall()
    except psycopg.Error:
        return []
    logs = stack.airflow_home / "logs"
    lines = []
    for dag_id, run_id, task_id, attempt in rows:
        path = logs / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"attempt={attempt}.log"
        lines.append(f"{dag_id} {run_id} {task_id} try {attempt}: {_last_error(path)} ({path})")
    return lines


def _last_error(path) -> str:
    """The last error-level event of an Airflow 3 task log (JSON lines)."""
    error = "no error line in the log"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "log not found"
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("level") in ("error", "critical"):
            error = str(event.get("event", ""))
            # The exception of "Task failed with exception", as structlog's dict traceback
            # (under error_detail once Airflow's supervisor has relayed it, else exception).
            details = event.get("error_detail") or event.get("exception")
            if isinstance(details, list) and details and isinstance(details[-1], dict):
                error += f": {details[-1].get('exc_type', '')}: {details[-1].get('exc_value', '')}"
            error = error[:500]
    return error


def wait_for_watermarks(stack: LocalStack, target: datetime, limit: timedelta,
                        log: Callable[[str], None] = print) -> str | None:
    """Poll until every table's watermark reaches `target`: None, or what went wrong (a
    failed run, `limit` passed)."""
    specs = load_tables().tables
    store = WatermarkStore(stack.postgres_dsn("k2"))
    deadline = time.monotonic() + limit.total_seconds()
    log(f"waiting for every table to reach {target.isoformat()} (at most {limit})")
    last_report = 0.0
    while True:
        store.migrate()
        marks = {row.table_name: row.watermark_ts for row in store.status()}
        behind = [s.name for s in specs if marks.get(s.name) is None or marks[s.name] < target]
        if not behind:
            return None
        failed = _failed_runs(stack)
        if failed:
            return (f"offload runs failed: {failed[:5]} (see the Airflow UI or {stack.airflow_home / 'logs'})\n  "
                    + "\n  ".join(failed_tries(stack)))
        if time.monotonic() > deadline:
            return f"not caught up after {limit}: behind {target.isoformat()}: {', '.join(behind)}"
        if time.monotonic() - last_report > 30:
            done = len(specs) - len(behind)
            lowest = min((marks.get(s.name) for s in specs if marks.get(s.name)), default=None)
            log(f"  {done}/{len(specs)} tables caught up; lowest watermark "
                f"{lowest.isoformat() if lowest else 'none yet'}; behind: {', '.join(behind)}")
            last_report = time.monotonic()
        time.sleep(5)


def wait_until_caught_up(pipeline: Pipeline, start_date: datetime, limit: timedelta) -> str | None:
    """Wait until every table's watermark reaches the pipeline's end date (else the last
    interval closed now), then verify.

    Returns None when caught up and verified, else what is wrong.
    """
    stack, log = pipeline.stack, pipeline.log
    specs = load_tables().tables
    target = pipeline.end_date or floor_interval(datetime.now(timezone.utc))
    problem = wait_for_watermarks(stack, target, limit, log)
    if problem:
        return problem
    log("all tables caught up; verifying ClickHouse against Iceberg")
    problems = verify_all(stack, specs, start_date, target, log)
    log("checking Prometheus: a watermark gauge for every table and no alert firing")
    problems += _monitoring_problems(stack, [s.name for s in specs], target, log)
    tries = failed_tries(stack)
    if problems and tries:
        problems.append("failed tries of offload tasks:\n  " + "\n  ".join(tries))
    return "\n".join(problems) or None


def verify_all(stack: LocalStack, specs, start_date: datetime, target: datetime, log) -> list[str]:
    client = clickhouse_connect.get_client(**airflow.clickhouse_settings(stack).client_kwargs())
    catalog = load_catalog(airflow.iceberg_settings(stack))
    problems = []
    for spec in specs:
        report = verify_table(spec, ch_client=client, catalog=catalog, start=start_date, end=target)
        log(f"  verify {spec.name}: {'ok' if report.ok else 'DIFFERENCES'} {report.totals()}")
        if not report.ok:
            problems.append(report.format())
    return problems


# Prometheus scrapes and evaluates every 15 s (monitoring/prometheus/prometheus.yml); give it
# a few rounds to see the last commits.
MONITORING_SETTLE = timedelta(minutes=2)


def _prometheus_query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def firing_alerts(stack: LocalStack) -> list[str]:
    """The alerts firing in the local stack's Prometheus, as `name{table=...}` (OSError when
    Prometheus cannot be reached)."""
    url = MonitoringStack.for_local_stack(stack).prometheus_url
    return sorted({f"{row['metric'].get('alertname')}{{table={row['metric'].get('table', '')}}}"
                   for row in _prometheus_query(url, 'ALERTS{alertstate="firing"}')})


def _monitoring_problems(stack: LocalStack, tables: list[str], target: datetime, log) -> list[str]:
    """What the operator would see: every table's watermark gauge in Prometheus at the
    target, and no alert firing - faults and speed alike (lag, slow cycles, deadlines,
    throughput, backlog): a caught-up pipeline on this machine keeps all of them quiet."""
    url = MonitoringStack.for_local_stack(stack).prometheus_url
    settle_until = time.monotonic() + MONITORING_SETTLE.total_seconds()
    while True:
        try:
            marks = {
                row["metric"].get("table"): float(row["value"][1])
                for row in _prometheus_query(url, metrics.WATERMARK.prometheus)
            }
            firing = firing_alerts(stack)
        except OSError as exc:
            return [f"Prometheus at {url} unreachable: {exc}"]
        behind = [t for t in tables if marks.get(t, 0.0) < target.timestamp()]
        if (not behind and not firing) or time.monotonic() > settle_until:
            break
        time.sleep(5)
    problems = []
    if behind:
        problems.append(f"Prometheus has no current watermark for: {', '.join(behind)}")
    if firing:
        problems.append(f"alerts firing after the catch-up: {', '.join(firing)} "
                        f"(see {prometheus_alerts_page(MonitoringStack.for_local_stack(stack))} "
                        "and docs/operations)")
    if not problems:
        log(f"  Prometheus: watermarks of all {len(tables)} tables at {target.isoformat()}; "
            "no alert firing")
    return problems
