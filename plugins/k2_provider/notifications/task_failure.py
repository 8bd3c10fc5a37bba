"""Task-failure email: the SMTP provider's notifier, with what on-call needs in the message.

Used as a task's ``on_failure_callback`` (the DAG factory sets it on every offload task).
Airflow 3 calls that callback once per task instance that has failed for good: in the
worker, by the task runner's ``finalize()`` after the last try (a try that will be retried
calls ``on_retry_callback`` instead), or in the dag-processor for a task whose worker was
lost. Both call the notifier with the task's template context; only the worker's holds the
exception.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from airflow.providers.smtp.notifications.smtp import SmtpNotifier

log = logging.getLogger(__name__)

# The exception text is cut here: a Spark stack trace can run to megabytes; the log has it all.
MAX_EXCEPTION_CHARS = 4000
NO_EXCEPTION = "(none recorded: the task did not fail in its own process, e.g. its worker was lost)"

FAILURE_SUBJECT = "[K2 task failed] {{ failure.dag_id }}.{{ failure.task_id }} run {{ failure.run_id }}"
FAILURE_HTML = """\
<p>Task <b>{{ failure.task_id }}</b> of DAG <b>{{ failure.dag_id }}</b> failed after its last try
({{ failure.try_number }} of {{ failure.tries }}); Airflow will not retry it.</p>
<table role="presentation">
<tr><td>DAG</td><td>{{ failure.dag_id }}</td></tr>
<tr><td>Task</td><td>{{ failure.task_id }}</td></tr>
<tr><td>Run</td><td>{{ failure.run_id }}</td></tr>
<tr><td>Data interval</td><td>{{ failure.data_interval_start }} &ndash; {{ failure.data_interval_end }}</td></tr>
<tr><td>Try</td><td>{{ failure.try_number }} of {{ failure.tries }}</td></tr>
<tr><td>Host</td><td>{{ failure.hostname }}</td></tr>
<tr><td>Exception</td><td><pre>{{ failure.exception_type | e }}: {{ failure.exception | e }}</pre></td></tr>
<tr><td>Log</td><td><a href="{{ failure.log_url }}">{{ failure.log_url }}</a></td></tr>
</table>
<p>Runbook: the DAG's documentation. Once the cause is fixed, clear the failed task (downstream
included); re-running an interval is safe, it never duplicates rows.</p>
"""


def failure_facts(context: Mapping[str, Any]) -> dict[str, Any]:
    """The facts of a failed task instance, from its template context, as plain strings and
    numbers (missing ones as "unknown"): what the subject and body templates read as ``failure``."""
    ti = context.get("ti")
    dag_run = context.get("dag_run")

    def attr(obj: Any, name: str) -> Any:
        value = getattr(obj, name, None)
        return "unknown" if value is None else value

    exc = context.get("exception")
    if exc is None:
        exception_type, exception = "unknown", NO_EXCEPTION
    else:
        exception_type = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        exception = str(exc)
        if len(exception) > MAX_EXCEPTION_CHARS:
            exception = exception[:MAX_EXCEPTION_CHARS] + " [... cut; the task log has it all]"
    try_number = getattr(ti, "try_number", None)
    max_tries = getattr(ti, "max_tries", None)
    try:
        log_url = ti.log_url if ti is not None else None
    except Exception as err:  # the URL is a convenience: never lose the email for it
        log.warning("no log URL for the failure email: %s", err)
        log_url = None
    return {
        "dag_id": attr(ti, "dag_id") if ti is not None else attr(context.get("dag"), "dag_id"),
        "task_id": attr(ti, "task_id"),
        "run_id": attr(ti, "run_id") if ti is not None else attr(dag_run, "run_id"),
        "data_interval_start": context.get("data_interval_start") or "unknown",
        "data_interval_end": context.get("data_interval_end") or "unknown",
        "try_number": "unknown" if try_number is None else try_number,
        "tries": "unknown" if max_tries is None else int(max_tries) + 1,
        "hostname": attr(ti, "hostname"),
        "exception_type": exception_type,
        "exception": exception,
        "log_url": log_url or "unknown",
    }


class TaskFailureNotifier(SmtpNotifier):
    """SmtpNotifier whose default subject and body name the DAG, task, run, data interval, try,
    exception and log URL of a task that failed for good (set it as ``on_failure_callback``).

    The templates see the task context plus ``failure`` (:func:`failure_facts`).

    :param to: recipients (templated).
    :param subject: subject template; default :data:`FAILURE_SUBJECT`.
    :param html_content: body template; default :data:`FAILURE_HTML`.
    :param kwargs: everything else SmtpNotifier takes (from_email, smtp_conn_id, cc, ...).
    """

    def __init__(
        self,
        *,
        to: str | list[str],
        subject: str = FAILURE_SUBJECT,
        html_content: str = FAILURE_HTML,
        **kwargs: Any,
    ) -> None:
        super().__init__(to=to, subject=subject, html_content=html_content, **kwargs)

    def __call__(self, *args: Any) -> None:
        if len(args) != 1:  # not a task callback
            return super().__call__(*args)
        # Rendering replaces the templates in place: a notifier shared by a DAG's tasks, or
        # called for several failures by one dag-processor, must render a fresh copy each time.
        notifier = copy.deepcopy(self)
        context = dict(args[0])
        context["failure"] = failure_facts(context)
        return super(TaskFailureNotifier, notifier).__call__(context)
