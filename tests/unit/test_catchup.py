"""k2.catchup: which intervals one offload job takes, the backlog count, the offload lock key."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from k2.catchup import (
    CatchupPlan,
    backlog,
    following,
    lock_key_parts,
    may_batch,
    offload_lock_key,
    plan_offload,
)
from k2.config import load_tables
from k2.intervals import INTERVAL as STEP

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


def iv(k: int) -> tuple[datetime, datetime]:
    """The k-th interval after T0."""
    return T0 + k * STEP, T0 + (k + 1) * STEP


def plan(
    own: int = 0,
    *,
    offloaded: tuple[int, ...] = (),
    hot: datetime | None = T0 + 100 * STEP,
    now: datetime = T0 + 100 * STEP,
    cap: int = 16,
    run_type: Any = "scheduled",
    try_number: int = 1,
) -> CatchupPlan:
    return plan_offload(
        iv(own),
        offloaded=[iv(k) for k in offloaded],
        hot_watermark=hot,
        now=now,
        max_intervals=cap,
        run_type=run_type,
        try_number=try_number,
    )


def ks(p: CatchupPlan) -> list[int]:
    """The plan's intervals as indexes after T0."""
    return [int((start - T0) / STEP) for start, _ in p.intervals]


# Who may batch


@pytest.mark.parametrize(
    "run_type, try_number, expected",
    [
        ("scheduled", 1, True),
        ("scheduled", 2, False),  # a retry
        ("scheduled", 3, False),  # a clear after a success
        ("manual", 1, False),
        ("backfill", 1, False),
        ("asset_triggered", 1, False),
        ("operator_triggered", 1, False),
        (None, 1, False),
    ],
)
def test_only_a_scheduled_first_try_may_batch(run_type: Any, try_number: int, expected: bool) -> None:
    assert may_batch(run_type, try_number) is expected


def test_dag_run_type_enum_is_understood() -> None:
    from airflow.utils.types import DagRunType

    assert may_batch(DagRunType.SCHEDULED, 1)
    assert not may_batch(DagRunType.MANUAL, 1)
    assert not may_batch(DagRunType.BACKFILL_JOB, 1)
    assert ks(plan(run_type=DagRunType.SCHEDULED, cap=3)) == [0, 1, 2]


# A backlog


def test_a_backlog_is_taken_up_to_the_cap() -> None:
    p = plan(cap=16)
    assert ks(p) == list(range(16))
    assert p.range == (T0, T0 + 16 * STEP)
    assert not p.skip
    assert "cap of 16" in p.reason


def test_cap_of_one_is_one_interval_per_job() -> None:
    assert ks(plan(cap=1)) == [0]


def test_a_24_interval_backlog_needs_two_jobs_with_cap_16() -> None:
    """The runs in order, each seeing what the jobs before it offloaded: 2 Spark jobs."""
    now = T0 + 24 * STEP + timedelta(minutes=3)
    hot = now - timedelta(minutes=2)
    offloaded: set[int] = set()
    jobs = []
    for run in range(24):
        p = plan(run, offloaded=tuple(offloaded), hot=hot, now=now, cap=16)
        if not p.skip:
            jobs.append(ks(p))
            offloaded.update(ks(p))
    assert jobs == [list(range(16)), list(range(16, 24))]
    assert offloaded == set(range(24))


@pytest.mark.parametrize("cap", [1, 2, 3, 5, 8, 12, 16, 24, 96])
def test_a_backlog_takes_ceil_n_over_cap_jobs_and_covers_every_interval_once(cap: int) -> None:
    n = 24
    now = T0 + n * STEP
    done: list[int] = []
    jobs = 0
    for run in range(n):
        p = plan(run, offloaded=tuple(done), hot=now, now=now, cap=cap)
        if not p.skip:
            jobs += 1
            done.extend(ks(p))
    assert sorted(done) == list(range(n))  # each interval offloaded exactly once
    assert jobs == -(-n // cap)


# Where a batch stops


def test_stops_at_the_first_incomplete_interval() -> None:
    hot = T0 + 3 * STEP + timedelta(minutes=14)  # interval 3 is one minute short
    p = plan(hot=hot)
    assert ks(p) == [0, 1, 2]
    assert "not complete in ClickHouse" in p.reason


def test_interval_ending_exactly_at_the_hot_watermark_is_complete() -> None:
    assert ks(plan(hot=T0 + 3 * STEP)) == [0, 1, 2]


def test_stops_at_an_interval_that_has_not_ended() -> None:
    p = plan(hot=T0 + 50 * STEP, now=T0 + 2 * STEP + timedelta(seconds=1))
    assert ks(p) == [0, 1]
    assert "has not ended" in p.reason


def test_interval_ending_exactly_now_has_ended() -> None:
    assert ks(plan(now=T0 + 2 * STEP)) == [0, 1]


def test_stops_at_an_interval_already_offloaded() -> None:
    p = plan(offloaded=(4, 5, 9))
    assert ks(p) == [0, 1, 2, 3]
    assert "already offloaded" in p.reason


def test_offloaded_intervals_before_the_own_one_do_not_matter() -> None:
    assert ks(plan(5, offloaded=(0, 1, 2, 3, 4), cap=3)) == [5, 6, 7]


def test_without_a_hot_watermark_only_the_own_interval() -> None:
    """Empty table or failed query: the sensor vouched for the own interval, nothing else is known."""
    p = plan(hot=None)
    assert ks(p) == [0]
    assert "not complete" in p.reason


def test_own_interval_is_taken_even_if_clickhouse_says_it_is_incomplete() -> None:
    """The sensor decided the own interval is complete (or a user asked for it)."""
    assert ks(plan(hot=T0)) == [0]
    assert ks(plan(hot=T0, run_type="manual")) == [0]


def test_a_run_in_steady_state_takes_only_its_own_interval() -> None:
    # The run of [10:00, 10:15) starts at 10:15 and its sensor passes at ~10:17.
    now = T0 + STEP + timedelta(minutes=2, seconds=5)
    assert ks(plan(now=now, hot=now - timedelta(minutes=2))) == [0]


def test_batch_is_contiguous_in_the_own_interval_length() -> None:
    own = (T0, T0 + timedelta(hours=1))
    p = plan_offload(own, offloaded=[], hot_watermark=T0 + timedelta(hours=10),
                     now=T0 + timedelta(hours=10), max_intervals=3, run_type="scheduled", try_number=1)
    assert p.intervals == (
        (T0, T0 + timedelta(hours=1)),
        (T0 + timedelta(hours=1), T0 + timedelta(hours=2)),
        (T0 + timedelta(hours=2), T0 + timedelta(hours=3)),
    )


# Skipping


def test_scheduled_first_try_skips_an_interval_already_offloaded() -> None:
    p = plan(3, offloaded=(0, 1, 2, 3, 4))
    assert p.skip and p.intervals == ()
    assert p.reason == "already offloaded"
    with pytest.raises(ValueError, match="no range"):
        p.range


@pytest.mark.parametrize(
    "run_type, try_number",
    [("scheduled", 2), ("scheduled", 5), ("manual", 1), ("backfill", 1), ("manual", 3)],
)
def test_retries_clears_manual_runs_and_backfills_reoffload_their_own_interval(
    run_type: str, try_number: int
) -> None:
    p = plan(3, offloaded=(0, 1, 2, 3, 4), run_type=run_type, try_number=try_number)
    assert ks(p) == [3]
    assert "own interval only" in p.reason


@pytest.mark.parametrize(
    "run_type, try_number", [("scheduled", 2), ("manual", 1), ("backfill", 1)]
)
def test_they_never_batch_either(run_type: str, try_number: int) -> None:
    assert ks(plan(run_type=run_type, try_number=try_number)) == [0]


def test_offloaded_intervals_of_another_shape_do_not_count() -> None:
    """A ledger row [00:00, 01:00) is not the interval [00:00, 00:15)."""
    p = plan_offload(iv(0), offloaded=[(T0, T0 + timedelta(hours=1))], hot_watermark=T0 + STEP,
                     now=T0 + STEP, max_intervals=4, run_type="scheduled", try_number=1)
    assert ks(p) == [0]


def test_time_zones_are_normalized() -> None:
    cet = timezone(timedelta(hours=1))
    own = (T0.astimezone(cet), (T0 + STEP).astimezone(cet))
    p = plan_offload(own, offloaded=[(iv(1)[0].astimezone(cet), iv(1)[1].astimezone(cet))],
                     hot_watermark=T0 + 10 * STEP, now=T0 + 10 * STEP, max_intervals=4,
                     run_type="scheduled", try_number=1)
    assert p.intervals == (iv(0),)
    assert all(s.tzinfo == UTC for s, _ in p.intervals)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"own": (T0 + STEP, T0)}, "not after its start"),
        ({"own": (T0.replace(tzinfo=None), T0 + STEP)}, "no timezone"),
        ({"now": datetime(2026, 3, 1)}, "no timezone"),
        ({"max_intervals": 0}, "max_intervals must be >= 1"),
    ],
)
def test_bad_inputs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "own": iv(0), "offloaded": [], "hot_watermark": T0 + 10 * STEP, "now": T0 + 10 * STEP,
        "max_intervals": 4, "run_type": "scheduled", "try_number": 1,
    }
    args.update(kwargs)
    own = args.pop("own")
    with pytest.raises(ValueError, match=message):
        plan_offload(own, **args)


def test_exhaustively_small_worlds() -> None:
    """Every ledger subset of 6 intervals x hot watermark x now x cap x who runs."""
    n = 6
    for bits, hot_k, now_k, cap, (run_type, try_number) in itertools.product(
        range(2**n), range(n + 2), range(1, n + 2), (1, 2, 3, 6),
        (("scheduled", 1), ("scheduled", 2), ("manual", 1), ("backfill", 1)),
    ):
        done = {k for k in range(n) if bits >> k & 1}
        p = plan(0, offloaded=tuple(done), hot=T0 + hot_k * STEP, now=T0 + now_k * STEP, cap=cap,
                 run_type=run_type, try_number=try_number)
        got = ks(p)
        if run_type != "scheduled" or try_number != 1:
            assert got == [0]
            continue
        if 0 in done:
            assert p.skip
            continue
        # the own interval, then the longest run of complete, ended, not offloaded ones, capped
        expected = [0]
        for k in range(1, cap):
            if k + 1 > hot_k or k + 1 > now_k or k in done:
                break
            expected.append(k)
        assert got == expected, (bits, hot_k, now_k, cap)
        assert len(got) <= cap


def test_following() -> None:
    assert list(following(iv(2), 3)) == [iv(2), iv(3), iv(4)]
    assert list(following(iv(2), 0)) == []


# Backlog


def test_backlog_counts_complete_intervals_not_offloaded() -> None:
    now = T0 + 24 * STEP + timedelta(minutes=5)
    hot = now - timedelta(minutes=2)  # intervals 0..23 are complete
    assert backlog(T0, STEP, hot_watermark=hot, now=now, offloaded=[]) == 24
    assert backlog(T0, STEP, hot_watermark=hot, now=now, offloaded=[iv(k) for k in range(16)]) == 8
    assert backlog(T0, STEP, hot_watermark=hot, now=now, offloaded=[iv(k) for k in range(24)]) == 0
    # out of order: 0 and 2 missing
    assert backlog(T0, STEP, hot_watermark=hot, now=now,
                   offloaded=[iv(1)] + [iv(k) for k in range(3, 24)]) == 2


def test_backlog_is_bounded_by_now_and_the_hot_watermark() -> None:
    assert backlog(T0, STEP, hot_watermark=T0 + 5 * STEP, now=T0 + 3 * STEP, offloaded=[]) == 3
    assert backlog(T0, STEP, hot_watermark=T0 + 2 * STEP + timedelta(minutes=14),
                   now=T0 + 30 * STEP, offloaded=[]) == 2
    assert backlog(T0, STEP, hot_watermark=None, now=T0 + 30 * STEP, offloaded=[]) == 0
    assert backlog(T0, STEP, hot_watermark=T0 - STEP, now=T0 + 30 * STEP, offloaded=[]) == 0
    assert backlog(T0, STEP, hot_watermark=T0 + timedelta(minutes=14), now=T0 + STEP, offloaded=[]) == 0


def test_backlog_needs_a_positive_step() -> None:
    with pytest.raises(ValueError, match="step must be positive"):
        backlog(T0, timedelta(0), hot_watermark=T0, now=T0, offloaded=[])


# The offload lock key


def test_lock_key_is_stable_signed_64_bit() -> None:
    # Fixed forever: workers of different versions must agree on it.
    assert offload_lock_key("bronze_trades_binance") == offload_lock_key("bronze_trades_binance")
    import hashlib

    digest = hashlib.sha256(b"k2.offload:silver_trades").digest()
    assert offload_lock_key("silver_trades") == int.from_bytes(digest[:8], "big", signed=True)
    for name in ("a", "bronze_trades_binance", "x" * 200):
        assert -(2**63) <= offload_lock_key(name) < 2**63


def test_lock_keys_of_the_configured_tables_are_distinct() -> None:
    from k2.watermarks import _MIGRATION_LOCK_KEY

    names = [spec.name for spec in load_tables().tables]
    keys = {offload_lock_key(name) for name in names}
    assert len(keys) == len(names) == 9
    assert _MIGRATION_LOCK_KEY not in keys


def test_lock_key_needs_a_name() -> None:
    with pytest.raises(ValueError, match="empty"):
        offload_lock_key("")


@pytest.mark.parametrize("key", [0, 1, -1, 2**63 - 1, -(2**63), 0x1234_5678_9ABC_DEF0])
def test_lock_key_parts_are_what_pg_locks_shows(key: int) -> None:
    """pg_locks shows a bigint advisory lock as classid = high 32 bits, objid = low 32 bits."""
    classid, objid = lock_key_parts(key)
    assert 0 <= classid < 2**32 and 0 <= objid < 2**32
    assert ((classid << 32) | objid) == key & (2**64 - 1)
