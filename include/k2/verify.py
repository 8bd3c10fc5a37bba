"""Reconciliation of the hot and cold tier: `k2 verify`.

Per interval (15 minutes by default) of [start, end), ClickHouse's row count and
order-independent row checksum (k2.checksum, computed inside ClickHouse in one
GROUP BY query) are compared with the same figures over the Iceberg table (read with
pyiceberg, filtered on the event-time column, streamed batch by batch). For the
intervals that differ, the rows are compared key by key:

    missing      keys in ClickHouse that Iceberg does not have
    unexpected   keys in Iceberg that ClickHouse does not have (e.g. deleted hot rows)
    duplicated   keys with more than one copy in Iceberg
    mismatched   keys in both whose other column values differ

The checksum covers every offloaded column, keys and values (k2.checksum), so a row
missing, a row twice and a value changed after the offload (a gold candle that a later
trade moved, a corrected trade) all show as a differing interval, which the row-level
detail then names; `k2 reoffload` repairs it.
Iceberg is read at one snapshot for the whole report.

Bad rows (k2.quality): the ClickHouse side is split by the table's quality checks,
rendered in ClickHouse SQL. The rows that pass are compared with the table as above;
the rows that fail are compared (count and checksum per interval) with the
table's quarantine table, which must hold exactly them. The row-level detail splits
the ClickHouse rows with the same checks rendered in pyarrow.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from k2 import checksum as ck
from k2 import iceberg as ib
from k2 import quality
from k2.intervals import INTERVAL

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.catalog import Catalog

    from k2.config import TableSpec
    from k2.watermarks import LedgerEntry

DEFAULT_INTERVAL = INTERVAL


@dataclass
class IntervalResult:
    start: datetime
    end: datetime
    clickhouse: ck.IntervalChecksum  # the rows that pass the quality checks
    iceberg: ck.IntervalChecksum
    # the rows that fail them, and what the quarantine table holds for the interval
    clickhouse_quarantined: ck.IntervalChecksum = ck.IntervalChecksum(0, 0)
    iceberg_quarantined: ck.IntervalChecksum = ck.IntervalChecksum(0, 0)
    snapshot_id: int | None = None  # the offload commit recorded for exactly this interval
    run_id: str | None = None
    detail: bool = False  # whether the row-level comparison below was done
    missing: int = 0
    unexpected: int = 0
    duplicated: int = 0
    mismatched: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        if self.clickhouse != self.iceberg or self.clickhouse_quarantined != self.iceberg_quarantined:
            return False
        return not (self.missing or self.unexpected or self.duplicated or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": ib.iso_utc(self.start),
            "end": ib.iso_utc(self.end),
            "ok": self.ok,
            "clickhouse": self.clickhouse.to_dict(),
            "iceberg": self.iceberg.to_dict(),
            "clickhouse_quarantined": self.clickhouse_quarantined.to_dict(),
            "iceberg_quarantined": self.iceberg_quarantined.to_dict(),
            "snapshot_id": self.snapshot_id,
            "run_id": self.run_id,
        }
        if self.detail:
            out.update(missing=self.missing, unexpected=self.unexpected, duplicated=self.duplicated,
                       mismatched=self.mismatched, samples=self.samples)
        return out


@dataclass
class VerifyReport:
    table: str
    source: str
    iceberg_table: str
    start: datetime
    end: datetime
    interval: timedelta
    intervals: list[IntervalResult]
    iceberg_snapshot_id: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.intervals)

    @property
    def failed(self) -> list[IntervalResult]:
        return [i for i in self.intervals if not i.ok]

    def totals(self) -> dict[str, int]:
        return {
            "clickhouse_rows": sum(i.clickhouse.rows for i in self.intervals),
            "iceberg_rows": sum(i.iceberg.rows for i in self.intervals),
            "clickhouse_quarantined_rows": sum(i.clickhouse_quarantined.rows for i in self.intervals),
            "iceberg_quarantined_rows": sum(i.iceberg_quarantined.rows for i in self.intervals),
            "missing": sum(i.missing for i in self.intervals),
            "unexpected": sum(i.unexpected for i in self.intervals),
            "duplicated": sum(i.duplicated for i in self.intervals),
            "mismatched": sum(i.mismatched for i in self.intervals),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "source": self.source,
            "iceberg_table": self.iceberg_table,
            "start": ib.iso_utc(self.start),
            "end": ib.iso_utc(self.end),
            "interval_seconds": int(self.interval.total_seconds()),
            "iceberg_snapshot_id": self.iceberg_snapshot_id,
            "ok": self.ok,
            "totals": self.totals(),
            "notes": self.notes,
            "intervals": [i.to_dict() for i in self.intervals],
        }

    def format(self) -> str:
        totals = self.totals()
        head = (
            f"{self.table}: {'OK' if self.ok else 'MISMATCH'} - {len(self.intervals)} intervals "
            f"[{ib.iso_utc(self.start)}, {ib.iso_utc(self.end)}), "
            f"ClickHouse {totals['clickhouse_rows']:,} rows, Iceberg {totals['iceberg_rows']:,} rows"
        )
        if totals["clickhouse_quarantined_rows"] or totals["iceberg_quarantined_rows"]:
            head += (f"; bad rows: ClickHouse {totals['clickhouse_quarantined_rows']:,}, "
                     f"quarantine table {totals['iceberg_quarantined_rows']:,}")
        lines = [head]
        lines += [f"  note: {n}" for n in self.notes]
        failed = self.failed
        if failed:
            lines.append(f"  {len(failed)} interval(s) differ:")
            lines.append(f"    {'interval start':<26} {'clickhouse':>12} {'iceberg':>12}  detail")
            for r in failed:
                if r.detail:
                    detail = (f"missing {r.missing}, unexpected {r.unexpected}, "
                              f"duplicated {r.duplicated}, mismatched {r.mismatched}")
                elif r.clickhouse.rows == r.iceberg.rows:
                    detail = "same count, different checksum (no row detail computed)"
                else:
                    detail = "(no row detail computed)"
                if r.clickhouse_quarantined != r.iceberg_quarantined:
                    detail += (f"; quarantine: ClickHouse has {r.clickhouse_quarantined}, "
                               f"the quarantine table {r.iceberg_quarantined}")
                lines.append(
                    f"    {ib.iso_utc(r.start):<26} {r.clickhouse.rows:>12,} {r.iceberg.rows:>12,}  {detail}"
                )
                for kind, keys in r.samples.items():
                    if keys:
                        lines.append(f"      {kind} e.g.: {'; '.join(keys)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ColumnRange:
    """Rows whose ``column`` lies in [start, end) (end None: no upper bound): what a comparison
    is restricted to on both sides - one hot-tier partition being retired, or the rows the hot
    tier still holds after retention."""

    column: str
    start: datetime
    end: datetime | None = None

    def clickhouse_sql(self, types: Mapping[str, str]) -> tuple[str, dict[str, int]]:
        ms = ck.clickhouse_time_ms_sql(self.column, types[self.column])
        sql = f" AND {ms} >= {{k2_range_start_ms:Int64}}"
        params = {"k2_range_start_ms": ck.to_epoch_ms(self.start)}
        if self.end is not None:
            sql += f" AND {ms} < {{k2_range_end_ms:Int64}}"
            params["k2_range_end_ms"] = ck.to_epoch_ms(self.end)
        return sql, params

    def iceberg(self, expression: Any) -> Any:
        from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

        expression = And(expression, GreaterThanOrEqual(self.column, ib.iso_utc(self.start)))
        return expression if self.end is None else And(expression, LessThan(self.column, ib.iso_utc(self.end)))


def _restrict_sql(restrict: ColumnRange | None, types: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    return restrict.clickhouse_sql(types) if restrict is not None else ("", {})


def _buckets(start: datetime, end: datetime, interval: timedelta) -> list[tuple[datetime, datetime]]:
    if interval <= timedelta(0):
        raise ValueError("interval must be positive")
    if end <= start:
        raise ValueError("end must be after start")
    out = []
    cursor = start
    while cursor < end:
        out.append((cursor, min(cursor + interval, end)))
        cursor += interval
    return out


def verify_table(
    spec: TableSpec,
    *,
    ch_client: Any,
    catalog: Catalog,
    start: datetime,
    end: datetime,
    interval: timedelta = DEFAULT_INTERVAL,
    detail: bool = True,
    compare_values: bool = False,
    max_detail_intervals: int = 10,
    samples: int = 5,
    restrict: ColumnRange | None = None,
) -> VerifyReport:
    """Compare ClickHouse and Iceberg per interval of [start, end) (see the module doc).

    detail          row-level comparison of the intervals whose count or checksum differ
                    (at most `max_detail_intervals`; it reads them in full from both sides)
    compare_values  row-level comparison of every interval, also of those whose figures
                    agree (the checksum covers every column but floating-point ones)
    restrict        compare only the rows whose column lies in a range, on both sides
    """
    from pyiceberg.exceptions import NoSuchTableError

    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    buckets = _buckets(start, end, interval)
    columns = ib.describe_source(ch_client, spec)
    types = {c.name: c.clickhouse_type for c in columns}
    if spec.event_time_column not in types:
        raise ValueError(f"{spec.source} has no event-time column {spec.event_time_column!r}")

    rules = quality.rules(spec, types)
    if restrict is not None and restrict.column not in types:
        raise ValueError(f"{spec.source} has no column {restrict.column!r} to restrict the comparison to")
    ch_sums, ch_bad = _clickhouse_buckets(ch_client, spec, types, rules, start, end, interval, len(buckets),
                                          restrict)
    notes: list[str] = []
    try:
        table = catalog.load_table(spec.iceberg_table)
    except NoSuchTableError:
        table = None
        notes.append(f"Iceberg table {spec.iceberg_table} does not exist")
    snapshot = table.current_snapshot() if table is not None else None
    if table is not None and snapshot is None:
        notes.append(f"Iceberg table {spec.iceberg_table} has no snapshot yet")
    snapshot_id = snapshot.snapshot_id if snapshot is not None else None
    ice_sums = (
        _iceberg_buckets(table, snapshot_id, spec, list(types), start, end, interval, len(buckets), restrict)
        if snapshot_id is not None
        else [ck.IntervalChecksum(0, 0)] * len(buckets)
    )
    commits = _offload_commits(table, spec) if snapshot_id is not None else {}
    ice_bad = _quarantine_buckets(catalog, spec, list(types), rules, start, end, interval, len(buckets),
                                  notes, restrict)

    results = []
    for (b_start, b_end), ch_sum, ice_sum, ch_q, ice_q in zip(buckets, ch_sums, ice_sums, ch_bad, ice_bad):
        commit = commits.get((b_start, b_end))
        results.append(IntervalResult(
            start=b_start, end=b_end, clickhouse=ch_sum, iceberg=ice_sum,
            clickhouse_quarantined=ch_q, iceberg_quarantined=ice_q,
            snapshot_id=commit.snapshot_id if commit else None,
            run_id=commit.run_id if commit else None,
        ))

    if compare_values:
        for r in results:
            _row_detail(r, spec, ch_client, columns, table, snapshot_id, samples, rules, restrict)
    elif detail:
        differing = [r for r in results if not r.ok]
        for r in differing[:max_detail_intervals]:
            _row_detail(r, spec, ch_client, columns, table, snapshot_id, samples, rules, restrict)
        if len(differing) > max_detail_intervals:
            notes.append(
                f"row-level detail computed for the first {max_detail_intervals} of "
                f"{len(differing)} differing intervals"
            )
    return VerifyReport(
        table=spec.name, source=spec.source, iceberg_table=spec.iceberg_table, start=start, end=end,
        interval=interval, intervals=results, iceberg_snapshot_id=snapshot_id, notes=notes,
    )


# --------------------------------------------------------------------------------------
# Counts and checksums per interval


def _clickhouse_buckets(client: Any, spec: TableSpec, types: dict[str, str], rules: quality.Rules,
                        start: datetime, end: datetime, interval: timedelta, n: int,
                        restrict: ColumnRange | None = None,
                        ) -> tuple[list[ck.IntervalChecksum], list[ck.IntervalChecksum]]:
    """Per bucket: (rows passing the quality checks, rows failing them)."""
    ms = ck.clickhouse_time_ms_sql(spec.event_time_column, types[spec.event_time_column])
    row_hash = ck.clickhouse_row_hash_sql(ck.clickhouse_row_columns(spec, types))
    bad = quality.clickhouse_bad_sql(rules, types)
    extra, extra_params = _restrict_sql(restrict, types)
    sql = (
        f"SELECT intDiv({ms} - {{k2_start_ms:Int64}}, {{k2_step_ms:Int64}}) AS bucket, "
        f"countIf(NOT {bad}) AS rows, sumWithOverflowIf({row_hash}, NOT {bad}) AS checksum, "
        f"countIf({bad}) AS bad_rows, sumWithOverflowIf({row_hash}, {bad}) AS bad_checksum "
        f"FROM `{spec.source}` WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)}{extra} "
        f"GROUP BY bucket ORDER BY bucket"
    )
    params = {**ck.interval_parameters(start, end), "k2_step_ms": int(interval.total_seconds() * 1000),
              **extra_params}
    good = [ck.IntervalChecksum(0, 0)] * n
    failed = [ck.IntervalChecksum(0, 0)] * n
    for bucket, rows, checksum, bad_rows, bad_checksum in client.query(sql, parameters=params).result_rows:
        good[int(bucket)] = ck.IntervalChecksum(int(rows), int(checksum or 0))
        failed[int(bucket)] = ck.IntervalChecksum(int(bad_rows), int(bad_checksum or 0))
    return good, failed


def _quarantine_buckets(catalog: Catalog, spec: TableSpec, names: list[str], rules: quality.Rules,
                        start: datetime, end: datetime, interval: timedelta, n: int, notes: list[str],
                        restrict: ColumnRange | None = None) -> list[ck.IntervalChecksum]:
    """Per bucket (of the rows' event time), what the quarantine table holds."""
    from pyiceberg.exceptions import NoSuchTableError

    zeros = [ck.IntervalChecksum(0, 0)] * n
    if not rules:
        return zeros
    try:
        table = catalog.load_table(quality.quarantine_table_name(spec))
    except NoSuchTableError:
        return zeros  # nothing quarantined yet; ClickHouse's bad rows, if any, show as a difference
    snapshot = table.current_snapshot()
    if snapshot is None:
        return zeros
    return _iceberg_buckets(table, snapshot.snapshot_id, spec, names, start, end, interval, n, restrict)


def _iceberg_filter(spec: TableSpec, start: datetime, end: datetime,
                    restrict: ColumnRange | None = None) -> Any:
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    expression = And(
        GreaterThanOrEqual(spec.event_time_column, ib.iso_utc(start)),
        LessThan(spec.event_time_column, ib.iso_utc(end)),
    )
    return expression if restrict is None else restrict.iceberg(expression)


def _batches(table: Any, snapshot_id: int, spec: TableSpec, start: datetime, end: datetime,
             fields: tuple[str, ...] = ("*",), restrict: ColumnRange | None = None) -> Any:
    scan = table.scan(row_filter=_iceberg_filter(spec, start, end, restrict), selected_fields=fields,
                      snapshot_id=snapshot_id)
    if hasattr(scan, "to_arrow_batch_reader"):
        yield from scan.to_arrow_batch_reader()
    else:  # older pyiceberg
        yield from scan.to_arrow().to_batches()


def _iceberg_buckets(table: Any, snapshot_id: int, spec: TableSpec, names: list[str], start: datetime,
                     end: datetime, interval: timedelta, n: int, restrict: ColumnRange | None = None
                     ) -> list[ck.IntervalChecksum]:
    """Per bucket, the figures of the table's rows over the source's columns `names` (those
    the Iceberg table lacks count as NULL's absence: the figures then differ)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    present = {field.name for field in table.schema().fields}
    fields = tuple(dict.fromkeys([*(c for c in names if c in present), spec.event_time_column,
                                  *([restrict.column] if restrict is not None else [])]))
    counts = np.zeros(n, dtype=np.int64)
    sums = np.zeros(n, dtype=np.uint64)  # numpy uint64 addition wraps: sum mod 2**64
    start_us = ck.to_epoch_ms(start) * 1000
    step_us = int(interval.total_seconds() * 1_000_000)
    keys = None
    for batch in _batches(table, snapshot_id, spec, start, end, fields, restrict):
        if batch.num_rows == 0:
            continue
        keys = keys or ck.arrow_row_columns(spec, batch.schema, names)
        event = batch.column(spec.event_time_column)
        micros = pc.cast(pc.cast(event, pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy(zero_copy_only=False)
        bucket = (micros - start_us) // step_us
        hashes = np.array(ck.arrow_row_hashes(batch, keys), dtype=np.uint64)
        np.add.at(counts, bucket, 1)
        np.add.at(sums, bucket, hashes)
    return [ck.IntervalChecksum(int(c), int(s)) for c, s in zip(counts, sums)]


def _offload_commits(table: Any, spec: TableSpec) -> dict[tuple[datetime, datetime], ib.OffloadSnapshot]:
    """The newest offload commit per interval on the main branch's history."""
    from pyiceberg.table.snapshots import ancestors_of

    found: dict[tuple[datetime, datetime], ib.OffloadSnapshot] = {}
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        for commit in ib.offload_snapshots_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms,
                                                        summary):
            found.setdefault((commit.interval_start, commit.interval_end), commit)
    return found


# --------------------------------------------------------------------------------------
# Row-level detail


def _value_strings(batch: pa.RecordBatch | pa.Table, names: list[str]) -> list[str]:
    """One comparable string per row over `names` (same text for both tiers' Arrow types)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rendered = []
    for name in names:
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if pa.types.is_timestamp(column.type):
            column = pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64())
        rendered.append(pc.fill_null(pc.cast(column, pa.string()), ck.NULL_TOKEN))
    if not rendered:
        return [""] * batch.num_rows
    joined = rendered[0] if len(rendered) == 1 else pc.binary_join_element_wise(*rendered, ck.KEY_SEPARATOR)
    return [hashlib.md5(v.encode("utf-8")).hexdigest() for v in joined.to_pylist()]


def _show(key: str) -> str:
    return "(" + ", ".join(key.split(ck.KEY_SEPARATOR)) + ")"


def _row_detail(result: IntervalResult, spec: TableSpec, ch_client: Any, columns: list[ib.SourceColumn],
                table: Any, snapshot_id: int | None, samples: int, rules: quality.Rules,
                restrict: ColumnRange | None = None) -> None:
    import pyarrow.compute as pc

    extra, extra_params = _restrict_sql(restrict, {c.name: c.clickhouse_type for c in columns})
    ch_rows = ch_client.query_arrow(
        f"SELECT {', '.join(f'`{c.name}`' for c in columns)} FROM `{spec.source}` "
        f"WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)}{extra}",
        parameters={**ck.interval_parameters(result.start, result.end), **extra_params},
        use_strings=True,
    )
    if rules and ch_rows.num_rows:  # the table holds the rows that pass the checks
        ch_rows = ch_rows.filter(pc.invert(quality.arrow_bad_mask(ch_rows, rules)))
    ch_keys = ck.arrow_row_columns(spec, ch_rows.schema, spec.unique_key)
    ice_batches = (list(_batches(table, snapshot_id, spec, result.start, result.end, restrict=restrict))
                   if snapshot_id else [])
    ice_names = set(ice_batches[0].schema.names) if ice_batches else set()
    compared = [c.name for c in columns if c.name in ice_names and c.name not in spec.unique_key]

    ch_values = dict(zip(ck.arrow_canonical_rows(ch_rows, ch_keys).to_pylist(),
                         _value_strings(ch_rows, compared)))
    ice_count: Counter[str] = Counter()
    ice_values: dict[str, str] = {}
    for batch in ice_batches:
        if batch.num_rows == 0:
            continue
        keys = ck.arrow_canonical_rows(batch, ck.arrow_row_columns(spec, batch.schema, spec.unique_key)).to_pylist()
        for key, value in zip(keys, _value_strings(batch, compared)):
            ice_count[key] += 1
            ice_values.setdefault(key, value)

    missing = [k for k in ch_values if k not in ice_count]
    unexpected = [k for k in ice_count if k not in ch_values]
    duplicated = [k for k, n in ice_count.items() if n > 1]
    mismatched = [k for k, v in ch_values.items() if k in ice_values and ice_values[k] != v]
    result.detail = True
    result.missing, result.unexpected = len(missing), len(unexpected)
    result.duplicated, result.mismatched = len(duplicated), len(mismatched)
    result.samples = {
        name: [_show(k) for k in sorted(keys)[:samples]]
        for name, keys in (("missing", missing), ("unexpected", unexpected),
                           ("duplicated", duplicated), ("mismatched", mismatched))
        if keys
    }


# --------------------------------------------------------------------------------------
# Late rows and late changes: what reached ClickHouse after its interval was offloaded


@dataclass(frozen=True)
class LateChange:
    """An offloaded interval whose rows in ClickHouse are no longer what the ledger says was
    offloaded: rows arrived after the offload (`extra_rows`), or rows changed (a gold candle a
    late trade moved, a corrected trade: same count, another checksum)."""

    offloaded: ck.IntervalChecksum  # from the ledger
    now: ck.IntervalChecksum  # ClickHouse's rows passing the quality checks, now

    @property
    def extra_rows(self) -> int:
        return max(0, self.now.rows - self.offloaded.rows)

    @property
    def values_changed(self) -> bool:
        return self.extra_rows == 0


def late_rows_sql(spec: TableSpec, column_types: Mapping[str, str]) -> str:
    """Count and checksum of the rows that pass the quality checks (what the ledger records)
    per offloaded interval in one GROUP BY (parameters: see _figures_now)."""
    ms = ck.clickhouse_time_ms_sql(spec.event_time_column, column_types[spec.event_time_column])
    bucket = f"intDiv({ms} - {{k2_start_ms:Int64}}, {{k2_step_ms:Int64}})"
    good = quality.clickhouse_good_sql(quality.rules(spec, column_types), column_types)
    row_hash = ck.clickhouse_row_hash_sql(ck.clickhouse_row_columns(spec, column_types))
    return (
        f"SELECT {bucket} AS bucket, count() AS rows, sumWithOverflow({row_hash}) AS checksum "
        f"FROM `{spec.source}` "
        f"WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)} "
        f"AND {good} AND {bucket} IN {{k2_buckets:Array(Int64)}} "
        f"GROUP BY bucket ORDER BY bucket"
    )


def _figures_now(ch_client: Any, spec: TableSpec, intervals: Iterable[tuple[datetime, datetime]]
                 ) -> dict[tuple[datetime, datetime], ck.IntervalChecksum]:
    """ClickHouse's figures now (rows passing the checks) of each interval, in one query.
    The intervals must all have one length and lie on one grid (the offload's do)."""
    ordered = sorted({(s.astimezone(timezone.utc), e.astimezone(timezone.utc)) for s, e in intervals})
    if not ordered:
        return {}
    step = ordered[0][1] - ordered[0][0]
    origin = ordered[0][0]
    if step <= timedelta(0) or any(e - s != step or (s - origin) % step for s, e in ordered):
        raise ValueError("late rows are checked on intervals of one length on one grid, e.g. 15 minutes")
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, spec)}
    if spec.event_time_column not in types:
        raise ValueError(f"{spec.source} has no event-time column {spec.event_time_column!r}")
    step_ms = int(step.total_seconds() * 1000)
    buckets = [int((s - origin) / step) for s, _ in ordered]
    params = {**ck.interval_parameters(origin, ordered[-1][1]), "k2_step_ms": step_ms,
              "k2_buckets": buckets}
    found = {interval: ck.IntervalChecksum(0, 0) for interval in ordered}
    for bucket, rows, checksum in ch_client.query(late_rows_sql(spec, types), parameters=params).result_rows:
        interval = (origin + int(bucket) * step, origin + (int(bucket) + 1) * step)
        found[interval] = ck.IntervalChecksum(int(rows), int(checksum or 0))
    return found


def late_rows(ch_client: Any, spec: TableSpec,
              offloaded: Mapping[tuple[datetime, datetime], int]) -> dict[tuple[datetime, datetime], int]:
    """Per already-offloaded interval, how many rows ClickHouse now holds beyond the count
    that was offloaded (`offloaded`: interval -> rows recorded in the ledger).

    Only intervals with extra rows are returned (interval -> extra rows): those are the
    ones to offload again. Fewer rows than offloaded is not "late" and is left to
    `k2 verify`. Only rows passing the table's quality checks are counted, as the ledger's
    rows are; a late bad row shows in `k2 verify` as a quarantine difference.
    """
    now = _figures_now(ch_client, spec, offloaded)
    counts = {(s.astimezone(timezone.utc), e.astimezone(timezone.utc)): int(n) for (s, e), n in offloaded.items()}
    return {interval: figures.rows - counts[interval] for interval, figures in now.items()
            if figures.rows > counts[interval]}


def late_changes(ch_client: Any, spec: TableSpec, entries: Iterable[LedgerEntry]
                 ) -> dict[tuple[datetime, datetime], LateChange]:
    """The ledgered intervals (`entries`, of one length on one grid) whose rows in ClickHouse
    changed since their offload: more rows than offloaded, or the same number of rows with
    another checksum (values changed; compared only for ledger checksums made with this
    definition, k2.checksum.CHECKSUM_VERSION). Fewer rows is left to `k2 verify`."""
    ledger = {(e.interval_start.astimezone(timezone.utc), e.interval_end.astimezone(timezone.utc)): e
              for e in entries}
    out: dict[tuple[datetime, datetime], LateChange] = {}
    for interval, now in _figures_now(ch_client, spec, ledger).items():
        entry = ledger[interval]
        offloaded = ck.IntervalChecksum(entry.rows, entry.checksum)
        comparable = entry.checksum_version == ck.CHECKSUM_VERSION
        if now.rows > offloaded.rows or (comparable and now.rows == offloaded.rows and now != offloaded):
            out[interval] = LateChange(offloaded, now)
    return out
