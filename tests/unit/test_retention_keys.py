"""k2.retention: the partition keys retention understands, and what it refuses."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from k2.retention import PartitionKey, RetentionError, partition_key

UTC = timezone.utc


class _Client:
    def __init__(self, key: str | None) -> None:
        self.key = key

    def query(self, sql, parameters):
        assert "system.tables" in sql and parameters == {"t": "t"}
        return SimpleNamespace(result_rows=[] if self.key is None else [(self.key,)])


@pytest.mark.parametrize(
    ("key", "function", "column"),
    [("toYYYYMMDD(event_time)", "toYYYYMMDD", "event_time"), ("toYYYYMM(window_start)", "toYYYYMM", "window_start"),
     ("toYear(`window_start`)", "toYear", "window_start")],
)
def test_partition_keys_by_calendar_period_are_read(key: str, function: str, column: str) -> None:
    assert partition_key(_Client(key), "t") == PartitionKey(function, column)


@pytest.mark.parametrize("key", ["", "tuple()", "toYYYYMMDD(event_time), symbol", "intDiv(id, 1000)"])
def test_other_partition_keys_are_refused_naming_the_table_and_the_key(key: str) -> None:
    with pytest.raises(RetentionError, match=r"table 't' is partitioned by .*day, month or year"):
        partition_key(_Client(key), "t")


def test_a_missing_table_is_named() -> None:
    with pytest.raises(RetentionError, match="no table 't'"):
        partition_key(_Client(None), "t")


@pytest.mark.parametrize(
    ("function", "partition_id", "start", "end"),
    [("toYYYYMMDD", "20261231", datetime(2026, 12, 31, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
     ("toYYYYMM", "202612", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
     ("toYYYYMM", "202602", datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
     ("toYear", "2026", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))],
)
def test_partition_bounds(function: str, partition_id: str, start: datetime, end: datetime) -> None:
    assert PartitionKey(function, "c").bounds(partition_id) == (start, end)


def test_an_id_that_does_not_fit_the_key_is_refused() -> None:
    with pytest.raises(RetentionError, match="'2026-12' does not match the partition key toYYYYMM"):
        PartitionKey("toYYYYMM", "c").bounds("2026-12")
