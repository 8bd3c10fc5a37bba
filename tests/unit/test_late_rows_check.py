"""The late-row check of WatermarkCommitOperator: its window, its warning and its command."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from k2.intervals import INTERVAL as STEP
from k2.watermarks import CommitResult, LedgerEntry, reoffload_command
from k2_provider.operators import watermark_commit as wc

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_reoffload_command_is_k2_reoffload_of_that_interval():
    assert reoffload_command("silver_trades", T0) == (
        "k2 reoffload --table silver_trades --interval-start 2026-03-01T12:00:00Z"
    )
    later = T0.astimezone(timezone(timedelta(hours=2)))  # the same instant in another zone
    assert reoffload_command("silver_trades", later) == reoffload_command("silver_trades", T0)


def test_reoffload_is_a_cli_command_that_needs_an_interval_start():
    from typer.testing import CliRunner

    from k2.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["reoffload", "--help"])
    assert helped.exit_code == 0 and "--interval-start" in helped.output
    off_grid = runner.invoke(app, ["reoffload", "--table", "silver_trades", "--interval-start", "2026-03-01T12:05:00Z"])
    assert off_grid.exit_code == 2 and "15-minute" in off_grid.output


def test_the_window_is_the_intervals_just_before_the_commit():
    assert wc.late_check_window(T0, STEP, 4) == (T0 - 4 * STEP, T0)


def test_late_rows_and_changes_are_warned_with_the_command_and_counted_once(monkeypatch, capsys):
    from k2.checksum import IntervalChecksum
    from k2.verify import LateChange

    entries = [LedgerEntry("silver_trades", T0 - k * STEP, T0 - (k - 1) * STEP, 100, 1, 1, "r", T0)
               for k in (3, 2, 1)]
    noted, noted_changes = [], []

    def note_late_rows(table, late):
        noted.append(dict(late))
        return {key: n - 1 for key, n in late.items()}  # one of them reported by an earlier commit

    def note_late_changes(table, changed):
        noted_changes.append(dict(changed))
        return set(changed)

    store = SimpleNamespace(ledger_range=lambda table, s, e: entries, note_late_rows=note_late_rows,
                            note_late_changes=note_late_changes)
    seen = {}

    def fake_late_changes(client, spec, given):
        seen["entries"] = list(given)
        return {(T0 - STEP, T0): LateChange(IntervalChecksum(100, 1), IntervalChecksum(103, 9)),
                (T0 - 3 * STEP, T0 - 2 * STEP): LateChange(IntervalChecksum(100, 1), IntervalChecksum(100, 7))}

    class FakeHook:
        def __init__(self, conn_id):
            pass

        client = object()

        def close(self):
            pass

    recorded = []
    monkeypatch.setattr(wc, "late_changes", fake_late_changes)
    monkeypatch.setattr(wc, "K2ClickHouseHook", FakeHook)
    monkeypatch.setattr("k2.metrics.record_late_rows", lambda table, n: recorded.append(("rows", table, n)))
    monkeypatch.setattr("k2.metrics.record_late_changes",
                        lambda table, n: recorded.append(("changes", table, n)))
    op = wc.WatermarkCommitOperator(task_id="commit_watermark", table="silver_trades", initial_watermark=T0)
    first = CommitResult("silver_trades", T0, T0 + STEP, T0 + STEP, 2, T0, True, False)
    op._check_late_rows({"dag": SimpleNamespace(dag_id="k2_offload_silver_trades")}, store, first)
    assert seen["entries"] == entries
    assert noted == [{(T0 - STEP, T0): 3}]
    assert noted_changes == [{(T0 - 3 * STEP, T0 - 2 * STEP): 7}]  # ClickHouse's checksum now
    # only the rows not reported before; the changed interval once
    assert recorded == [("rows", "silver_trades", 2), ("changes", "silver_trades", 1)]
    captured = capsys.readouterr()
    text = captured.out + captured.err  # the task logger writes through Airflow's structlog
    assert "3 late rows" in text
    assert "k2 reoffload --table silver_trades --interval-start 2026-03-01T11:45:00Z" in text
    assert "rows changed since the offload" in text
    assert "k2 reoffload --table silver_trades --interval-start 2026-03-01T11:15:00Z" in text


def test_a_failed_commit_is_counted_as_an_offload_error_and_still_fails(monkeypatch):
    import psycopg
    import pytest

    recorded = []
    monkeypatch.setattr("k2.metrics.record_error", lambda table, kind: recorded.append((table, kind)))
    op = wc.WatermarkCommitOperator(task_id="commit_watermark", table="silver_trades", initial_watermark=T0)

    def refused(context):
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(op, "_execute", refused)
    with pytest.raises(psycopg.OperationalError):
        op.execute({})
    assert recorded == [("silver_trades", "watermark")]


def test_commit_error_types_keep_what_the_exception_names():
    assert wc.commit_error_type(TimeoutError("took too long")) == "timeout"
    assert wc.commit_error_type(ValueError("no such interval")) == "watermark"
