"""What a downstream reader of the cold tier does with an interval an asset event announces:
read it from Iceberg - the snapshot the event names, the interval's rows only - streaming
Arrow batches, and summarise it (rows, symbols, first and last event time). The example
consumer DAG (k2_dag_factory.build_example_consumer_dag) logs this per event."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from k2.config import TableSpec
from k2.intervals import parse_utc


@dataclass(frozen=True)
class IntervalSummary:
    table: str
    interval_start: datetime
    interval_end: datetime
    snapshot_id: int
    rows: int
    keys: int  # distinct values of the table's first non-time key column (symbols, pairs)
    first: datetime | None
    last: datetime | None

    def line(self) -> str:
        span = f"{self.first:%H:%M:%S}-{self.last:%H:%M:%S}" if self.first and self.last else "-"
        return (f"{self.table} [{self.interval_start.isoformat()}, {self.interval_end.isoformat()}) "
                f"snapshot {self.snapshot_id}: {self.rows} rows, {self.keys} keys, event times {span}")


def summarize_interval(catalog: Any, spec: TableSpec, start: datetime, end: datetime,
                       snapshot_id: int) -> IntervalSummary:
    """The interval [start, end) of the table as snapshot `snapshot_id` holds it."""
    import pyarrow.compute as pc
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    start, end = parse_utc(start, naive_is_utc=True), parse_utc(end, naive_is_utc=True)
    time_column = spec.event_time_column
    key = next((c for c in spec.unique_key if c != time_column), time_column)
    table = catalog.load_table(spec.iceberg_table)
    scan = table.scan(
        row_filter=And(GreaterThanOrEqual(time_column, start.isoformat()), LessThan(time_column, end.isoformat())),
        selected_fields=tuple(dict.fromkeys((time_column, key))),
        snapshot_id=snapshot_id,
    )
    rows, keys, first, last = 0, set(), None, None
    for batch in scan.to_arrow_batch_reader():
        if not batch.num_rows:
            continue
        rows += batch.num_rows
        keys.update(pc.unique(batch.column(key)).to_pylist())
        low, high = pc.min_max(batch.column(time_column)).values()
        first = low.as_py() if first is None else min(first, low.as_py())
        last = high.as_py() if last is None else max(last, high.as_py())
    return IntervalSummary(spec.name, start, end, snapshot_id, rows, len(keys), first, last)
