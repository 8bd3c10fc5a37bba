"""Task-failure emails: the factory puts the SMTP notifier on every offload task as its
on_failure_callback (never on retries), and the email names what on-call needs."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from k2.config import ALERT_TO_ENV, load_tables
from k2_dag_factory import ALERT_FROM_ENV, SMTP_CONN_ID, build_dag
from k2_provider.notifications.task_failure import (
    FAILURE_SUBJECT,
    NO_EXCEPTION,
    TaskFailureNotifier,
)

START = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
END = datetime(2026, 3, 1, 10, 15, tzinfo=timezone.utc)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """What the notifier would hand to SMTP, instead of sending it."""
    mails: list[dict[str, str]] = []

    def capture(self: TaskFailureNotifier, context: object) -> None:
        mails.append({"to": self.to, "subject": self.subject, "html": self.html_content})

    monkeypatch.setattr(TaskFailureNotifier, "notify", capture)
    return mails


RUN_ID = "scheduled__2026-03-01T10:00:00+00:00"


def _context(run_id: str = RUN_ID, exception: BaseException | None = None) -> dict:
    ti = SimpleNamespace(
        dag_id="k2_offload_gold_ohlcv_1m", task_id="commit_watermark", run_id=run_id,
        try_number=4, max_tries=3, hostname="worker-1",
        log_url=f"http://airflow:8080/dags/k2_offload_gold_ohlcv_1m/runs/{run_id}"
        "/tasks/commit_watermark?try_number=4",
    )
    return {
        "ti": ti, "data_interval_start": START, "data_interval_end": END, "exception": exception,
    }


def test_every_task_emails_the_alert_recipients_on_its_final_failure_only(monkeypatch):
    monkeypatch.setenv(ALERT_TO_ENV, "oncall@example.com")
    monkeypatch.setenv(ALERT_FROM_ENV, "k2@example.com")
    dag = build_dag(load_tables().get("gold_ohlcv_1m"))
    for task in dag.tasks:
        notifiers = [cb for cb in task.on_failure_callback if isinstance(cb, TaskFailureNotifier)]
        assert len(notifiers) == 1, task.task_id
        (notifier,) = notifiers
        assert (notifier.to, notifier.from_email, notifier.smtp_conn_id) == (
            "oncall@example.com", "k2@example.com", SMTP_CONN_ID,
        )
        # a retry is not a failure: nothing on retries, and no second (legacy) email on failure
        assert not any(isinstance(cb, TaskFailureNotifier) for cb in task.on_retry_callback or [])
        assert not task.email


def test_the_email_names_dag_task_run_interval_try_exception_and_log(sent):
    error = RuntimeError("fault injection: ledger write of <gold_ohlcv_1m> refused")
    context = _context(exception=error)
    TaskFailureNotifier(to="oncall@example.com")(context)
    [mail] = sent
    subject = f"[K2 task failed] k2_offload_gold_ohlcv_1m.commit_watermark run {RUN_ID}"
    assert mail["subject"] == subject
    html = mail["html"]
    for fact in ("k2_offload_gold_ohlcv_1m", "commit_watermark", RUN_ID,
                 "2026-03-01 10:00:00+00:00", "2026-03-01 10:15:00+00:00", "4 of 4", "worker-1",
                 context["ti"].log_url):
        assert fact in html, fact
    # the exception's text is escaped, not injected into the HTML
    assert "RuntimeError: fault injection: ledger write of &lt;gold_ohlcv_1m&gt; refused" in html


def test_a_shared_notifier_renders_each_failure_afresh(sent):
    notifier = TaskFailureNotifier(to="oncall@example.com")
    notifier(_context(run_id="run_a", exception=ValueError("a")))
    notifier(_context(run_id="run_b", exception=ValueError("b")))
    assert [m["subject"].rsplit(" ", 1)[-1] for m in sent] == ["run_a", "run_b"]
    assert notifier.subject == FAILURE_SUBJECT


def test_a_failure_without_an_exception_says_so(sent):
    # The dag-processor runs the callback of a task whose worker was lost, without an exception.
    TaskFailureNotifier(to="oncall@example.com")(_context(exception=None))
    assert NO_EXCEPTION in sent[0]["html"]


def test_a_huge_exception_is_cut(sent):
    TaskFailureNotifier(to="oncall@example.com")(_context(exception=RuntimeError("x" * 100_000)))
    assert len(sent[0]["html"]) < 10_000
    assert "the task log has it all" in sent[0]["html"]
