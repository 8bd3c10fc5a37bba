"""k2.watermarks.plan_repair: the ledger follows the Iceberg snapshot summaries, the
watermark follows the contiguous ledger from the table's start_date."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from k2.intervals import INTERVAL as STEP
from k2.watermarks import LedgerEntry, TableOffload, Watermark, plan_repair

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 2, tzinfo=UTC)


def iv(k: int) -> tuple[datetime, datetime]:
    return T0 + k * STEP, T0 + (k + 1) * STEP


def offload(k: int, snapshot: int | None = None, rows: int = 10) -> TableOffload:
    s, e = iv(k)
    return TableOffload(s, e, rows, 100 + k, snapshot or 1000 + k, f"run{k}", NOW)


def entry(k: int, snapshot: int | None = None, rows: int = 10, at: datetime = NOW) -> LedgerEntry:
    s, e = iv(k)
    return LedgerEntry("t", s, e, rows, 100 + k, snapshot or 1000 + k, f"run{k}", at)


def wm(k: int) -> Watermark:
    return Watermark("t", T0 + k * STEP, 3, NOW)


def test_consistent_table_changes_nothing():
    plan = plan_repair("t", T0, wm(2), [entry(0), entry(1)], [offload(0), offload(1)], history_since=NOW)
    assert not plan.changed
    assert plan.watermark_after == T0 + 2 * STEP
    assert "nothing to change" in plan.describe()[0]


def test_watermark_ahead_comes_back_and_a_rogue_ledger_row_goes():
    plan = plan_repair("t", T0, wm(5), [entry(0), entry(1), entry(4)], [offload(0), offload(1)],
                       history_since=NOW - timedelta(hours=1))
    assert plan.watermark_after == T0 + 2 * STEP
    assert [e.interval_start for e in plan.drop] == [iv(4)[0]]
    assert plan.reledger == ()


def test_watermark_behind_and_missing_ledger_rows_are_rebuilt():
    plan = plan_repair("t", T0, wm(0), [], [offload(0), offload(1), offload(2)], history_since=NOW)
    assert plan.watermark_after == T0 + 3 * STEP
    assert [o.interval_start for o in plan.reledger] == [iv(k)[0] for k in range(3)]


def test_a_gap_stops_the_watermark_but_later_intervals_are_ledgered():
    plan = plan_repair("t", T0, wm(4), [entry(0)], [offload(0), offload(2), offload(3)], history_since=NOW)
    assert plan.watermark_after == T0 + STEP
    assert [o.interval_start for o in plan.reledger] == [iv(2)[0], iv(3)[0]]


def test_a_row_naming_another_snapshot_is_reledgered():
    plan = plan_repair("t", T0, wm(1), [entry(0, snapshot=7, rows=9)], [offload(0, snapshot=8)], history_since=NOW)
    assert [o.snapshot_id for o in plan.reledger] == [8]
    assert plan.watermark_after == T0 + STEP


def test_ledger_rows_older_than_the_retained_history_are_kept():
    old = NOW - timedelta(days=3)
    plan = plan_repair("t", T0, wm(3), [entry(0, at=old), entry(1, at=old), entry(2)],
                       [offload(1), offload(2)], history_since=NOW - timedelta(days=1))
    assert plan.drop == ()  # interval 0's snapshot may have expired: Iceberg cannot contradict it
    assert plan.watermark_after == T0 + 3 * STEP


def test_no_watermark_yet_starts_from_start_date():
    plan = plan_repair("t", T0, None, [], [], history_since=None)
    assert plan.changed and plan.watermark_after == T0
