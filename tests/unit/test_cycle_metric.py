"""The cycle metric of WatermarkCommitOperator: a run's wall time, labelled live or catch-up."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from k2 import metrics
from k2.intervals import INTERVAL as STEP
from k2_provider.operators import watermark_commit as wc

UTC = timezone.utc
END = datetime(2026, 3, 1, 12, 15, tzinfo=UTC)


def _context(run_started: datetime | None, start=END - STEP, end=END) -> dict:
    return {"dag_run": SimpleNamespace(start_date=run_started), "data_interval_start": start,
            "data_interval_end": end}


@pytest.mark.parametrize(
    ("started_after_end", "catchup"),
    [
        (timedelta(seconds=5), False),  # scheduled when the interval closed
        (timedelta(minutes=4), False),  # a slow start, still this interval's turn
        (STEP, False),  # exactly one interval: the next run is only due now
        (STEP + timedelta(seconds=1), True),  # the next interval had closed too: a backlog
        (timedelta(hours=6), True),  # back from an outage
    ],
)
def test_a_run_that_started_over_an_interval_late_is_a_catchup_run(started_after_end, catchup):
    started = END + started_after_end
    assert wc._started_in_a_backlog(started, _context(started)) is catchup


def test_a_naive_run_start_is_utc_and_a_run_without_interval_is_live():
    naive = (END + 2 * STEP).replace(tzinfo=None)
    assert wc._started_in_a_backlog(wc._aware(naive), _context(naive)) is True
    assert wc._started_in_a_backlog(END + 2 * STEP, _context(END, start=None, end=None)) is False


def test_the_commit_records_the_cycle_with_its_label(monkeypatch):
    sent: list[tuple[str, float, bool]] = []
    monkeypatch.setattr(metrics, "record_cycle",
                        lambda table, seconds, *, catchup=False: sent.append((table, seconds, catchup)))
    for name in ("set_watermark", "set_last_success"):
        monkeypatch.setattr(metrics, name, lambda *args, **kwargs: None)
    operator = wc.WatermarkCommitOperator(task_id="commit", table="silver_trades",
                                          initial_watermark=END - STEP)
    last = SimpleNamespace(watermark_ts=END)
    now = datetime.now(UTC)
    # live: this interval closed a minute before the run started, 40 s ago
    operator._emit_metrics(_context(now - timedelta(seconds=40), start=now - timedelta(minutes=16),
                                    end=now - timedelta(minutes=1, seconds=40)), last)
    # catch-up: the interval (March 2026) closed months before the run started
    operator._emit_metrics(_context(now - timedelta(seconds=40)), last)
    assert [(table, catchup) for table, _, catchup in sent] == [("silver_trades", False), ("silver_trades", True)]
    assert all(35 <= seconds < 120 for _, seconds, _ in sent), sent
