"""k2.verify.late_rows and late_changes: extra rows, and rows changed, per already-offloaded
interval, from one GROUP BY."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from k2.config import load_tables
from k2.intervals import INTERVAL as Q
from k2.verify import late_changes, late_rows
from k2.watermarks import LedgerEntry

UTC = timezone.utc
SPEC = load_tables().get("bronze_trades_binance")
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


class FakeClickHouse:
    """Answers DESCRIBE and the count query; records the queries."""

    def __init__(self, counts: dict[int, int | tuple[int, int]]) -> None:
        self.counts = counts
        self.queries: list[tuple[str, dict]] = []

    def query(self, sql: str, parameters: dict | None = None):
        self.queries.append((sql, parameters or {}))
        if sql.startswith("DESCRIBE"):
            return SimpleNamespace(column_names=["name", "type", "default_type"],
                                   result_rows=[("event_time", "DateTime64(3, 'UTC')", ""),
                                                ("symbol", "String", ""), ("trade_id", "UInt64", ""),
                                                *[(c, "Decimal(38, 18)", "") for c in
                                                  ("price", "quantity", "quote_quantity")],
                                                ("ingested_at", "DateTime64(3, 'UTC')", "")])
        wanted = parameters["k2_buckets"]
        figures = {b: v if isinstance(v, tuple) else (v, 0) for b, v in self.counts.items()}
        return SimpleNamespace(result_rows=[(b, *f) for b, f in sorted(figures.items()) if b in wanted])


def test_extra_rows_per_interval_from_one_query():
    # offloaded: T0 (100 rows), T0+15m (50), T0+45m (10); T0+30m not offloaded
    offloaded = {(T0, T0 + Q): 100, (T0 + Q, T0 + 2 * Q): 50, (T0 + 3 * Q, T0 + 4 * Q): 10}
    ch = FakeClickHouse({0: 103, 1: 50, 3: 7})  # 3 late rows in T0; T0+45m lost 3 to TTL
    assert late_rows(ch, SPEC, offloaded) == {(T0, T0 + Q): 3}
    counting = [q for q in ch.queries if not q[0].startswith("DESCRIBE")]
    assert len(counting) == 1
    sql, params = counting[0]
    assert "GROUP BY bucket" in sql and "`bronze_trades_binance`" in sql
    assert params["k2_buckets"] == [0, 1, 3]
    assert params["k2_step_ms"] == 900_000
    assert params["k2_end_ms"] - params["k2_start_ms"] == 4 * 900_000


def test_interval_with_no_rows_left_is_not_late():
    assert late_rows(FakeClickHouse({}), SPEC, {(T0, T0 + Q): 5}) == {}


def test_nothing_offloaded_queries_nothing():
    ch = FakeClickHouse({})
    assert late_rows(ch, SPEC, {}) == {}
    assert ch.queries == []


@pytest.mark.parametrize("intervals", [
    {(T0, T0 + Q): 1, (T0 + Q, T0 + 3 * Q): 1},                                  # two lengths
    {(T0, T0 + Q): 1, (T0 + timedelta(minutes=20), T0 + timedelta(minutes=35)): 1},  # off the grid
])
def test_intervals_must_share_one_grid(intervals):
    with pytest.raises(ValueError, match="one grid"):
        late_rows(FakeClickHouse({}), SPEC, intervals)


def _entry(k: int, rows: int, checksum: int, version: int = 2) -> LedgerEntry:
    return LedgerEntry(SPEC.name, T0 + k * Q, T0 + (k + 1) * Q, rows, checksum, 1, "r", T0, version)


def test_changed_rows_are_found_by_their_checksum():
    entries = [_entry(0, 100, 11), _entry(1, 50, 22), _entry(2, 10, 33), _entry(3, 5, 44, version=1)]
    # T0: 2 late rows; T0+15m: same count, other values (a candle moved); T0+30m unchanged;
    # T0+45m: other checksum, but the ledger's was made with the key-only definition
    ch = FakeClickHouse({0: (102, 99), 1: (50, 23), 2: (10, 33), 3: (5, 45)})
    changes = late_changes(ch, SPEC, entries)
    assert sorted(changes) == [(T0, T0 + Q), (T0 + Q, T0 + 2 * Q)]
    late, moved = changes[(T0, T0 + Q)], changes[(T0 + Q, T0 + 2 * Q)]
    assert (late.extra_rows, late.values_changed) == (2, False)
    assert (moved.extra_rows, moved.values_changed, moved.now.checksum) == (0, True, 23)
    sql = next(q for q, _ in ch.queries if not q.startswith("DESCRIBE"))
    assert "sumWithOverflow" in sql and "toDecimalString(`price`, 18)" in sql  # values, not only keys
