"""Deadline-miss (SLA) notification: the SMTP provider's email plus the K2 metric.

Airflow 3 runs a DeadlineAlert's callback in the triggerer by awaiting the notifier;
this one counts the miss in `k2_deadline_missed_total{table}` (so the dashboard and the
K2DeadlineMissed alert see it) and then sends the email as SmtpNotifier does.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.smtp.notifications.smtp import SmtpNotifier

from k2 import metrics

log = logging.getLogger(__name__)


class DeadlineMissNotifier(SmtpNotifier):
    """SmtpNotifier that also records the deadline miss of a K2 table.

    :param table: the offloaded table (the label of the metric).
    :param kwargs: everything SmtpNotifier takes (to, from_email, subject, html_content,
        smtp_conn_id, ...; subject and html_content are templated).
    """

    def __init__(self, *, table: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = table

    def _record(self) -> None:
        metrics.emit_safely(metrics.record_deadline_missed, self.table, log=log)

    async def async_notify(self, context: Any) -> None:
        self._record()
        await super().async_notify(context)

    def notify(self, context: Any) -> None:
        self._record()
        super().notify(context)
