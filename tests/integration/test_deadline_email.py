"""SLA-miss emails through Airflow 3 Deadline Alerts, on the real scheduler and triggerer,
delivered by the SMTP provider to the stack's SMTP sink: a run that is still waiting when
its deadline passes sends exactly one email naming the DAG, the run and the deadline; a
run that finishes in time sends none.

Over 4 minutes (about 4.5 in the suite): the deadline is 3 minutes and the slow run must
miss it; the catch-up runs before it take a Spark job.
"""

from __future__ import annotations

import mailbox
import time
from datetime import datetime, timezone

import pytest

from k2.config import load_tables
from tests.integration.airflow_handle import airflow_sql
from tests.integration.conftest import DEADLINE, INTERVAL, floor_interval

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = load_tables().get("gold_ohlcv_5m")
DEADLINE_SECONDS = int(DEADLINE.rstrip("m")) * 60


def _emails(stack) -> list:
    if not stack.maildir.exists():
        return []
    return list(mailbox.Maildir(stack.maildir, create=False))


def _about(messages, run_id: str) -> list:
    return [m for m in messages if run_id in (m["Subject"] or "")]


def _deadlines(stack, *run_ids: str) -> dict[str, list[tuple[bool, str | None]]]:
    """run_id -> (missed, callback state) of each deadline Airflow still holds for the run."""
    rows = airflow_sql(
        stack,
        "SELECT r.run_id, d.missed, c.state FROM deadline d JOIN dag_run r ON r.id = d.dagrun_id "
        "LEFT JOIN callback c ON c.id = d.callback_id WHERE r.run_id = ANY(%s) ORDER BY d.deadline_time",
        list(run_ids),
    )
    found: dict[str, list[tuple[bool, str | None]]] = {}
    for run_id, missed, state in rows:
        found.setdefault(run_id, []).append((bool(missed), state))
    return found


def _trigger(airflow_running, start: datetime) -> str:
    run_id = f"manual__deadline_test_{int(start.timestamp())}"
    return airflow_running.trigger(SPEC.dag_id, run_id, start, start + INTERVAL)


def test_slow_run_emails_once_fast_run_does_not(stack, airflow_running, start_date):
    airflow_running.unpause(SPEC.dag_id)
    # Let the catch-up of the scheduled runs finish first: the fast run then has the
    # table's offload slot to itself.
    for interval_start in (start_date, start_date + INTERVAL):
        assert airflow_running.wait_for_run(SPEC.dag_id, interval_start) == "success"
    # Fast: an interval whose data is complete; it re-offloads well within the deadline.
    fast_run = _trigger(airflow_running, start_date)
    # Slow: an interval the feed has not reached, so wait_for_hot_data keeps waiting.
    future = floor_interval(datetime.now(timezone.utc)) + INTERVAL
    slow_run = _trigger(airflow_running, future)
    triggered = time.monotonic()

    deadline = triggered + DEADLINE_SECONDS + 150
    while time.monotonic() < deadline and not _about(_emails(stack), slow_run):
        time.sleep(5)
    slow_mails = _about(_emails(stack), slow_run)
    assert len(slow_mails) == 1, f"expected one SLA-miss email for {slow_run}, got {len(slow_mails)}"
    mail = slow_mails[0]
    body = mail.get_payload(decode=False)
    text = body if isinstance(body, str) else "".join(
        part.get_payload(decode=True).decode(errors="replace") for part in mail.walk() if not part.is_multipart()
    )
    assert SPEC.dag_id in mail["Subject"]
    assert "deadline" in text.lower() and SPEC.name in text

    fast_state = airflow_running.run_state_by_id(SPEC.dag_id, fast_run)
    assert fast_state == "success", f"the fast run ended {fast_state}"
    # No email can come any more: the scheduler pruned the fast run's deadline (it finished
    # before it), and the slow run's one deadline callback has finished.
    until = time.monotonic() + DEADLINE_SECONDS + 150
    while (left := _deadlines(stack, fast_run, slow_run)) != {slow_run: [(True, "success")]}:
        assert time.monotonic() < until, f"deadlines still pending: {left}"
        time.sleep(2)
    messages = _emails(stack)
    assert _about(messages, fast_run) == []
    assert len(_about(messages, slow_run)) == 1
    _deadline_missed_drill(stack, slow_run)


def _deadline_missed_drill(stack, run_id: str) -> None:
    """The runbook's "Deadline missed", as written (tests/runbooks.py), on the run that just
    missed it: the run is listed, and its tasks show where it is held (the sensor waiting for
    hot data, which sends the reader on to "Feed stopped")."""
    from tests.runbooks import Drill

    with Drill("Deadline missed", home=stack.home, table=SPEC.name, env_file=stack.home / "airflow.env",
               values={"<run_id>": run_id}) as drill:
        assert run_id in drill.run("list-runs").stdout
        states = drill.run("states-for-dag-run").stdout
        held = [line for line in states.splitlines() if "wait_for_hot_data" in line]
        assert held and not any(state in held[0] for state in ("success", "failed")), states
