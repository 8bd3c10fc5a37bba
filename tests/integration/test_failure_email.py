"""Task-failure emails on the real scheduler, the Grafana dashboard against the real runs, and
the operator's ways back from a failed run: the runbooks' commands and the Airflow UI.

The first two intervals of gold_ohlcv_1m fail for good through a real PostgreSQL fault: a
trigger refuses their ledger writes, so commit_watermark fails all its tries - in their two
scheduled runs and in two manual runs of the same intervals started beside them (four
failed runs). The task's on_failure_callback (the SMTP provider's notifier) must send
exactly one email per failed run to the stack's SMTP sink naming the DAG, task and run -
none for the retries - and the run that succeeds (a re-run of the second interval once the
fault is gone) none at all. That leaves the watermark at the first interval with the
second committed after the gap: every panel query of the dashboard must return data from
the session's own Prometheus; the runbooks' "First look", "Watermark recovery" and "Offload
failure" are then run as written on the first interval's failed scheduled run; and the two
failed manual runs are brought back in the Airflow UI, one by clearing its offload with its
downstream commit, one by retrying the failed commit alone. Each ends with the interval
verified clean.

Tables used here (and by no other Airflow test): gold_ohlcv_1m.

About 6 minutes in the suite: the module fixture (`real_runs`: four runs whose commit fails
all four tries, 10, 20, 40 s backoff, then a re-run), Prometheus scraping them, and the
recoveries (a re-offload and three cleared runs).
"""

from __future__ import annotations

import mailbox
import re
import time
from dataclasses import dataclass
from datetime import datetime
from email.message import Message

import psycopg
import pytest

from k2.config import load_tables
from k2.local.monitoring import MonitoringStack
from k2.watermarks import WatermarkStore
from k2_dag_factory import TASK_COMMIT
from tests.integration.airflow_handle import airflow_sql, poll, wait_until
from tests.integration.conftest import INTERVAL
from tests.integration.test_dashboard_queries import (
    fill,
    has_data,
    panel_targets,
    panels_without_data,
    query,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = load_tables().get("gold_ohlcv_1m")
SUBJECT_PREFIX = "[K2 task failed]"
REFUSE_FUNCTION = "k2_test_refuse_ledger_interval"
# statsd_exporter is scraped and the recording rules evaluated every 15 s on the stack.
SCRAPE_WAIT = 75.0
MAIL_WAIT = 30.0


# --- the fault -------------------------------------------------------------------------


def _refuse_ledger_write(stack, table: str, *interval_starts: datetime) -> None:
    """A real PostgreSQL fault: every ledger write of those intervals of `table` fails."""
    starts = ", ".join(f"'{start.isoformat()}'::timestamptz" for start in interval_starts)
    with psycopg.connect(stack.postgres_dsn("k2")) as conn:
        conn.execute(
            f"""
            CREATE OR REPLACE FUNCTION {REFUSE_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'fault injection: ledger write of % [%] refused',
                NEW.table_name, NEW.interval_start; END $$
            """
        )
        conn.execute(f"DROP TRIGGER IF EXISTS {REFUSE_FUNCTION} ON k2_offload_ledger")
        conn.execute(
            f"CREATE TRIGGER {REFUSE_FUNCTION} BEFORE INSERT OR UPDATE ON k2_offload_ledger "
            f"FOR EACH ROW WHEN (NEW.table_name = '{table}' "
            f"AND NEW.interval_start IN ({starts})) "
            f"EXECUTE FUNCTION {REFUSE_FUNCTION}()"
        )


def _allow_ledger_writes(stack) -> None:
    with psycopg.connect(stack.postgres_dsn("k2")) as conn:
        conn.execute(f"DROP TRIGGER IF EXISTS {REFUSE_FUNCTION} ON k2_offload_ledger")


# --- Airflow and mail helpers ------------------------------------------------------------


def _scheduled_runs(stack, dag_id: str) -> list[tuple[str, str, datetime, datetime | None]]:
    """(run_id, state, data_interval_start, start_date) of the DAG's scheduled runs."""
    return airflow_sql(
        stack,
        "SELECT run_id, state, data_interval_start, start_date FROM dag_run "
        "WHERE dag_id = %s AND run_type = 'scheduled' ORDER BY data_interval_start",
        dag_id,
    )


def _scheduled_run_id(stack, dag_id: str, start: datetime, timeout: float = 120) -> str:
    return wait_until(
        lambda: next((run_id for run_id, _, interval_start, _ in _scheduled_runs(stack, dag_id)
                      if interval_start == start), None),
        timeout, f"a scheduled run of {dag_id} for {start}",
    )


def _set_paused(airflow_running, dag_id: str, paused: bool) -> None:
    airflow_running.api("PATCH", f"/dags/{dag_id}", {"is_paused": paused})


def _unpause_first_run_alone(airflow_running, prometheus_url: str, dag_id: str) -> bool:
    """Unpause; as soon as the first catch-up run has started, pause until Prometheus has
    scraped that run's schedule delay, then unpause for good. The scheduler starts the other
    catch-up runs a second later otherwise - within one scrape, where the schedule-delay
    histogram never moves between two samples and its p95 panel has no rate to show.
    Returns whether the first run did start alone."""
    stack = airflow_running.stack
    deadline = time.monotonic() + 300  # the dag-processor registers the DAG first
    while not airflow_sql(stack, "SELECT 1 FROM dag WHERE dag_id = %s", dag_id):
        assert time.monotonic() < deadline, f"{dag_id} never registered"
        time.sleep(1)
    _set_paused(airflow_running, dag_id, False)
    deadline = time.monotonic() + 120
    checked = time.monotonic()
    while not any(state == "running" for _, state, _, _ in _scheduled_runs(stack, dag_id)):
        assert time.monotonic() < deadline, f"no scheduled run of {dag_id} started"
        if time.monotonic() - checked > 5:  # an unpause racing the DAG's registration may not stick
            checked = time.monotonic()
            if airflow_sql(stack, "SELECT 1 FROM dag WHERE dag_id = %s AND is_paused", dag_id):
                _set_paused(airflow_running, dag_id, False)
        time.sleep(0.05)
    _set_paused(airflow_running, dag_id, True)
    started = [run for run in _scheduled_runs(stack, dag_id) if run[3] is not None]
    alone = len(started) == 1
    if alone:
        series = f'airflow_dagrun_schedule_delay_seconds_count{{dag_id="{dag_id}"}}'
        deadline = time.monotonic() + 60
        while not query(prometheus_url, series) and time.monotonic() < deadline:
            time.sleep(1)
    _set_paused(airflow_running, dag_id, False)
    return alone


def _emails(stack) -> list[Message]:
    if not stack.maildir.exists():
        return []
    return list(mailbox.Maildir(stack.maildir, create=False))


def _subject(mail: Message) -> str:
    """The subject unfolded (long headers arrive split over lines)."""
    return re.sub(r"\r?\n(?=[ \t])", "", mail["Subject"] or "")


def _failure_emails(stack, dag_id: str) -> list[Message]:
    return [
        m for m in _emails(stack)
        if _subject(m).startswith(SUBJECT_PREFIX) and dag_id in _subject(m)
    ]


def _about(messages: list[Message], run_id: str) -> list[Message]:
    return [m for m in messages if _subject(m).endswith(f" run {run_id}")]


def _body(mail: Message) -> str:
    return "".join(
        part.get_payload(decode=True).decode(errors="replace")
        for part in mail.walk()
        if not part.is_multipart()
    )


# --- the runs ----------------------------------------------------------------------------


@dataclass
class RealRuns:
    failed_run: str  # the first interval's scheduled run
    failed_runs: list[str]  # all four: [scheduled first, scheduled second, manual first, manual second]
    succeeded_runs: list[str]
    first_run_started_alone: bool
    seconds: float

    @property
    def manual_failed(self) -> tuple[str, str]:
        return self.failed_runs[2], self.failed_runs[3]


@pytest.fixture(scope="module")
def real_runs(stack, hot_data, airflow_running, start_date: datetime):
    """Scheduled catch-up of gold_ohlcv_1m with the ledger writes of its first two intervals
    refused: their scheduled runs and a manual run of each fail; then, the fault gone, a
    manual re-run of the second interval succeeds. The DAG is paused again afterwards."""
    began = time.monotonic()
    dag_id = SPEC.dag_id
    first, second = start_date, start_date + INTERVAL
    prometheus_url = MonitoringStack.for_local_stack(stack).prometheus_url
    WatermarkStore(stack.postgres_dsn("k2")).migrate()  # the ledger table the fault sits on
    _refuse_ledger_write(stack, SPEC.name, first, second)
    stamp = int(first.timestamp())
    try:
        try:
            alone = _unpause_first_run_alone(airflow_running, prometheus_url, dag_id)
            manual = [airflow_running.trigger(dag_id, f"manual__failure_email_{n}_{stamp}", s, s + INTERVAL)
                      for n, s in ((1, first), (2, second))]
            failed = [_scheduled_run_id(stack, dag_id, first), _scheduled_run_id(stack, dag_id, second), *manual]
            for run_id in failed:
                assert airflow_running.run_state_by_id(dag_id, run_id, timeout=600) == "failed", run_id
        finally:
            _allow_ledger_writes(stack)
        rerun = airflow_running.trigger(dag_id, f"manual__failure_email_rerun_{stamp}", second,
                                        second + INTERVAL, nth=2)
        assert airflow_running.run_state_by_id(dag_id, rerun, timeout=300) == "success"
    finally:
        airflow_running.cli("dags", "pause", dag_id)
    seconds = time.monotonic() - began
    print(f"\n[failure email] runs took {seconds:.0f} s; first scheduled run started alone: "
          f"{alone}")
    return RealRuns(failed[0], failed, [rerun], alone, seconds)


def test_a_task_that_fails_for_good_emails_once_naming_dag_task_and_run(stack, real_runs: RealRuns):
    # the worker sends it after reporting the failure
    poll(lambda: all(_about(_failure_emails(stack, SPEC.dag_id), run_id) for run_id in real_runs.failed_runs),
         MAIL_WAIT)
    mails = _failure_emails(stack, SPEC.dag_id)
    print(f"\n[failure email] failure emails for {SPEC.dag_id}: {len(mails)}: "
          f"{[_subject(m) for m in mails]}")
    about_failed = _about(mails, real_runs.failed_run)
    assert len(about_failed) == 1, f"expected one failure email for {real_runs.failed_run}: {mails}"
    [mail] = about_failed
    expected = f"{SUBJECT_PREFIX} {SPEC.dag_id}.{TASK_COMMIT} run {real_runs.failed_run}"
    assert _subject(mail) == expected
    body = _body(mail)
    facts = (SPEC.dag_id, TASK_COMMIT, real_runs.failed_run, "4 of 4",
             "ledger write of gold_ohlcv_1m", f"/dags/{SPEC.dag_id}/runs/")
    for fact in facts:
        assert fact in body, f"{fact!r} not in the email:\n{body}"
    # commit_watermark failed four times in each run; only the last one is a failure for good.
    for run_id in real_runs.failed_runs:
        assert len(_about(mails, run_id)) == 1, (run_id, [_subject(m) for m in mails])
    assert len(mails) == len(real_runs.failed_runs), [_subject(m) for m in mails]


def test_failed_tries_name_their_error_for_the_demo_report(stack, real_runs: RealRuns):
    """`k2 demo` explains a failure with each failed try's last error, read from Airflow's
    database and the try's log (k2.local.pipeline.failed_tries)."""
    from k2.local.pipeline import failed_tries

    ours = [line for line in failed_tries(stack, limit=1000)
            if line.startswith(f"{SPEC.dag_id} {real_runs.failed_run} {TASK_COMMIT} try ")]
    print("\n[failed tries] " + "\n  ".join(ours))
    assert [line.split(" try ", 1)[1].split(":", 1)[0] for line in ours] == ["1", "2", "3", "4"], ours
    assert all("ledger write of gold_ohlcv_1m" in line for line in ours), ours


def test_runs_that_succeed_send_no_failure_email(stack, real_runs: RealRuns):
    mails = _failure_emails(stack, SPEC.dag_id)
    for run_id in real_runs.succeeded_runs:
        assert _about(mails, run_id) == [], run_id


def test_every_panel_query_returns_data_from_the_real_runs(stack, real_runs: RealRuns):
    prometheus_url = MonitoringStack.for_local_stack(stack).prometheus_url
    pending = panels_without_data(prometheus_url, SCRAPE_WAIT, poll=3.0)
    for title, expr in panel_targets():
        values = sorted({round(float(r["value"][1]), 1) for r in query(prometheus_url, fill(expr))})
        status = "no data" if title in pending else "data   "
        print(f"[dashboard, real runs] {status}  {title}: {values[:4]}")
    # A p95 of the schedule delay needs two scheduled starts a scrape apart; the scheduler
    # starts all due catch-up runs within a second unless the first one started alone.
    expected_empty = (
        set() if real_runs.first_run_started_alone
        else {title for title in pending if title.startswith("Run schedule delay p95")}
    )
    # The retention and maintenance panels are fed by the daily k2_hot_retention and
    # k2_iceberg_maintenance DAGs, not by offload runs (test_dashboard_queries shows them
    # with data from the same metric helpers).
    expected_empty |= {title for title, expr in panel_targets()
                       if any(name in expr for name in ("k2_retention_", "k2_maintenance_", "k2_iceberg_snapshots"))}
    assert set(pending) <= expected_empty, (
        f"panels without data after the real runs and {SCRAPE_WAIT:.0f} s: {sorted(pending)}"
        + (f" (expected empty: {sorted(expected_empty)})" if expected_empty else "")
    )
    # The failure itself reached the dashboard: the failed run is counted by state.
    runs = query(prometheus_url, f'airflow_dagrun_duration_seconds_count{{dag_id="{SPEC.dag_id}"}}')
    assert {r["metric"].get("state") for r in runs} >= {"failed", "success"}, runs
    assert has_data(query(prometheus_url, f'k2:offload_lag_seconds{{table="{SPEC.name}"}}'))


def _watermark(stack) -> datetime:
    return WatermarkStore(stack.postgres_dsn("k2")).get(SPEC.name).watermark_ts


def test_runbooks_bring_back_the_interval_at_the_watermark(stack, airflow_running, real_runs: RealRuns,
                                                          start_date: datetime):
    """The runbooks' "First look", "Watermark recovery" and "Offload failure", run as written
    (tests/runbooks.py) in the state they describe: the watermark stuck at the first
    interval, whose scheduled run failed, with the second interval committed after the gap.
    The fix is the Offload failure clear of the failed run; it measures the time to recover
    that both sections quote."""
    from tests.runbooks import FIRST_LOOK, Drill

    dag_id, run_id, first = SPEC.dag_id, real_runs.failed_run, start_date
    assert _watermark(stack) == first, "the failed first interval holds the watermark"
    where = dict(home=stack.home, table=SPEC.name, env_file=stack.home / "airflow.env")
    window = {"<start>": first.isoformat(), "<end>": (first + INTERVAL).isoformat(),
              "<first failed start>": first.isoformat(), "<last failed start>": first.isoformat(),
              "<run_id>": run_id, "<watermark>": first.isoformat()}
    try:
        with Drill(FIRST_LOOK, **where) as look:
            assert SPEC.name in look.run("k2 health", expect=(0, 1, 2)).stdout
            assert first.strftime("%Y-%m-%d %H:%M:%S") in look.run("k2 watermark show").stdout
            failed = look.run("--state failed").stdout
            assert all(f" {r} " in failed for r in real_runs.failed_runs), failed
            look.run("amtool")
        with Drill("Watermark recovery", **where, values=window) as recovery:
            shown = recovery.run("k2 watermark show").stdout
            row = next(line for line in shown.splitlines() if line.startswith(SPEC.name + " "))
            assert int(row.split()[-1]) >= 1, f"no pending interval after the gap: {row}"
            assert run_id in recovery.run("--state failed").stdout
            recovery.run("--state running")
            recovery.run("airflow dags unpause")  # cleared tasks run only while the DAG is unpaused
            with Drill("Offload failure", **where, values=window) as offload:
                offload.run("k2 health", expect=(0, 1, 2))
                offload.run("k2 local status")
                states = offload.run("states-for-dag-run").stdout
                assert "commit_watermark" in states and "failed" in states, states
                offload.run("k2 verify --table T --from <start>", expect=(0, 1))
                began = time.monotonic()
                offload.run("airflow tasks clear")
                wait_until(lambda: _watermark(stack) > first, 600, "the watermark past the cleared interval")
                recovered = time.monotonic() - began
                assert airflow_running.run_state_by_id(dag_id, run_id) == "success"
                # The second interval's scheduled run, failed too: re-run by a backfill of the failed.
                second = first + INTERVAL
                offload.run("airflow backfill create", **{"<first failed start>": second.isoformat(),
                                                          "<last failed start>": second.isoformat()})
                second_run = real_runs.failed_runs[1]
                wait_until(lambda: airflow_sql(stack, "SELECT backfill_id FROM dag_run WHERE dag_id = %s AND run_id = %s",
                                               dag_id, second_run)[0][0], 60, f"{second_run} taken by the backfill")
                assert airflow_running.run_state_by_id(dag_id, second_run) == "success"
                offload.run("k2 watermark show")
                offload.run("k2 verify --table T --from <first failed start>", expect=0,
                            **{"<end>": (second + INTERVAL).isoformat()})
                offload.recovered(recovered)
            recovery.run("k2 verify", **{"<new watermark>": _watermark(stack).isoformat()})
            recovery.recovered(recovered)
    finally:
        airflow_running.pause_quietly(dag_id)


def _ui_recovery(stack, hot_data, airflow_running, run_id: str, task: str, affected: int, label: str) -> None:
    """Open the task instance of the failed run in the Airflow UI, clear it in the Clear
    dialog (its downstream tasks with it, as the dialog proposes), and wait for the run to
    succeed; the interval then verifies clean (one copy of each row)."""
    from tests.integration.browser import browser_page, log_in
    from tests.integration.test_faults_airflow import _verify_clean

    dag_id = SPEC.dag_id
    base = f"http://{stack.host}:{stack.airflow_port}"
    airflow_running.set_paused(dag_id, False)  # cleared tasks run only while the DAG is unpaused
    try:
        with browser_page(label) as page:
            log_in(page, base, "admin", stack.credentials["airflow_admin_password"])
            page.goto(f"{base}/dags/{dag_id}/runs/{run_id}/tasks/{task}")
            page.get_by_role("button", name="Press shift+c to clear").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text(f"Affected Tasks: {affected}").wait_for()
            dialog.get_by_role("button", name="Confirm").click()
            dialog.wait_for(state="hidden")
        left = poll(lambda: airflow_sql(stack, "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                                        dag_id, run_id)[0][0] != "failed", 120, 1)
        assert left, f"{run_id} is still failed after the UI's clear"
        assert airflow_running.run_state_by_id(dag_id, run_id, timeout=600) == "success"
        tries = airflow_sql(stack, "SELECT task_id, try_number FROM task_instance WHERE dag_id = %s "
                                   "AND run_id = %s", dag_id, run_id)
        print(f"\n[{label}] {run_id}: success; tries {dict(tries)}")
    finally:
        airflow_running.pause_quietly(dag_id)
    _verify_clean(stack, hot_data, SPEC, *_interval_of(stack, dag_id, run_id), label)


def test_clearing_the_failed_run_in_the_ui_re_runs_it_to_success(stack, hot_data, airflow_running,
                                                                  real_runs: RealRuns):
    """A browser drill: the operator opens a failed run's offload task in the Airflow UI,
    clears it with its downstream task (the commit) in the Clear dialog, and the run
    succeeds: the interval re-offloaded and committed."""
    from k2_dag_factory import TASK_OFFLOAD

    _ui_recovery(stack, hot_data, airflow_running, real_runs.manual_failed[1], TASK_OFFLOAD, 2, "ui_clear_failed_run")


def test_retrying_the_failed_task_in_the_ui_commits_the_interval(stack, hot_data, airflow_running,
                                                                  real_runs: RealRuns):
    """A browser drill: the operator retries only the task that failed (commit_watermark, no
    downstream) from its page in the UI; the offload's result of the first try is committed."""
    _ui_recovery(stack, hot_data, airflow_running, real_runs.manual_failed[0], TASK_COMMIT, 1, "ui_retry_failed_task")


def _interval_of(stack, dag_id: str, run_id: str):
    (start, end), = airflow_sql(stack, "SELECT data_interval_start, data_interval_end FROM dag_run "
                                       "WHERE dag_id = %s AND run_id = %s", dag_id, run_id)
    return start, end
