"""Iceberg maintenance of one offloaded table: compaction, manifest rewrite, snapshot expiry
and orphan-file removal, planned here and run by spark_jobs/maintain_iceberg.py with
Iceberg's own Spark procedures.

What a run does, in order, for the table and its quarantine table (when it exists):

1. **Compaction** of the closed days: `rewrite_data_files` with the sort strategy (by the
   event-time column) and a target file size, restricted to rows before the start of the
   watermark's day (`compact_before`): every 15-minute offload adds one small file per
   partition value, a closed day partition ends as one file per partition value (two
   when its data exceed the target size). Days the offload still writes are left alone.
2. **Manifests** rewritten (`rewrite_manifests`): one small manifest per commit otherwise.
3. **Snapshot expiry** (`expire_snapshots`) of the snapshots older than
   `snapshot_retention`, keeping at least the newest. What reads snapshot summaries must
   still work afterwards: `k2 watermark repair` keeps ledger rows older than the table's
   retained history (the ledger is the durable record), the offload's skip of an interval
   another run committed looks at the newest intervals only, and the late-row check reads
   the ledger. So the plan expires a snapshot only when the ledger holds every interval
   it committed; the first snapshot whose interval the ledger lacks, and all after it,
   are kept (`held_back` names the intervals) until the commit or a repair ledgers them.
4. **Orphan files** older than `orphan_file_retention` removed (`remove_orphan_files`):
   files of writes that failed before their commit. The margin keeps every file a
   running write may still commit.

The caller holds the table's offload lock (k2.watermarks.offload_lock) for the whole run,
so maintenance never commits between an offload's read and its commit: Iceberg's
optimistic concurrency would refuse one of them, and an offload's audit reads the
snapshot it staged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from k2 import iceberg as ib
from k2.config import REPO_ROOT

if TYPE_CHECKING:
    from k2.config import TableSpec
    from k2.watermarks import WatermarkStore

APPLICATION = REPO_ROOT / "spark_jobs" / "maintain_iceberg.py"
RESULT_MARKER = "K2_MAINTENANCE_RESULT"
# Iceberg's default target size of rewrite_data_files (write.target-file-size-bytes)
TARGET_FILE_BYTES = 512 * 1024 * 1024
DAY = timedelta(days=1)


@dataclass(frozen=True)
class MaintenancePlan:
    """What one maintenance run of a table does (see the module doc)."""

    table: str
    compact_before: datetime | None  # None: no closed day to compact yet
    expire_before: datetime
    orphans_before: datetime
    target_file_bytes: int = TARGET_FILE_BYTES
    retain_last: int = 1
    # intervals whose snapshot is kept past snapshot_retention: not in the ledger
    held_back: tuple[tuple[datetime, datetime], ...] = ()

    def arguments(self) -> list[str]:
        """The job's arguments (spark_jobs/maintain_iceberg.py)."""
        arguments = [
            "--table", self.table,
            "--expire-before", ib.iso_utc(self.expire_before),
            "--orphans-before", ib.iso_utc(self.orphans_before),
            "--target-file-bytes", str(self.target_file_bytes),
            "--retain-last", str(self.retain_last),
        ]
        if self.compact_before is not None:
            arguments += ["--compact-before", ib.iso_utc(self.compact_before)]
        return arguments

    def describe(self) -> list[str]:
        lines = [
            f"compact: {'rows before ' + ib.iso_utc(self.compact_before) if self.compact_before else 'nothing (no closed day)'}",
            f"expire: snapshots before {ib.iso_utc(self.expire_before)} (the newest {self.retain_last} kept)",
            f"orphans: files before {ib.iso_utc(self.orphans_before)}",
        ]
        if self.held_back:
            first = self.held_back[0]
            lines.append(
                f"kept past snapshot_retention: {len(self.held_back)} interval(s) committed in Iceberg but not "
                f"in the offload ledger, first [{ib.iso_utc(first[0])}, {ib.iso_utc(first[1])}) - "
                "their commits ledger them, or run `k2 watermark repair`"
            )
        return lines


def plan_maintenance(spec: TableSpec, *, table: Any, store: WatermarkStore, now: datetime,
                     snapshot_retention: timedelta | None = None,
                     orphan_file_retention: timedelta | None = None,
                     target_file_bytes: int = TARGET_FILE_BYTES) -> MaintenancePlan:
    """The plan for `spec`'s Iceberg table (a loaded pyiceberg table, None when it does not
    exist yet) at `now`: the closed days from the watermark, the expiry cutoff held back
    before the oldest snapshot whose intervals the ledger lacks."""
    now = now.astimezone(timezone.utc)
    retention = snapshot_retention if snapshot_retention is not None else spec.snapshot_retention
    orphans = orphan_file_retention if orphan_file_retention is not None else spec.orphan_file_retention
    if retention < timedelta(0) or orphans < timedelta(0):
        raise ValueError("snapshot and orphan-file retention must not be negative")
    watermark = store.get(spec.name)
    compact_before = None
    if watermark is not None:
        day = watermark.watermark_ts.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        compact_before = day if day > spec.start_date - DAY else None
    expire_before = now - retention
    held: list[tuple[datetime, datetime]] = []
    if table is not None:
        expire_before, held = _hold_back(spec, table, store, expire_before)
    return MaintenancePlan(table=spec.name, compact_before=compact_before, expire_before=expire_before,
                           orphans_before=now - orphans, target_file_bytes=target_file_bytes,
                           held_back=tuple(held))


def _hold_back(spec: TableSpec, table: Any, store: WatermarkStore, expire_before: datetime
               ) -> tuple[datetime, list[tuple[datetime, datetime]]]:
    """The expiry cutoff moved back to the oldest snapshot (older than the cutoff, on the
    main branch) that committed an interval the ledger does not hold, and those intervals."""
    from pyiceberg.table.snapshots import ancestors_of

    current = table.current_snapshot()
    if current is None:
        return expire_before, []
    cutoff_ms = int(expire_before.timestamp() * 1000)
    expiring = []
    for snapshot in ancestors_of(current, table.metadata):
        if snapshot.timestamp_ms >= cutoff_ms:
            continue
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        expiring.append((snapshot.timestamp_ms,
                         ib.offload_snapshots_from_summary(spec, snapshot.snapshot_id, snapshot.timestamp_ms,
                                                           summary)))
    offloads = [o for _, found in expiring for o in found]
    if not offloads:
        return expire_before, []
    ledgered = {(e.interval_start, e.interval_end) for e in store.ledger_range(
        spec.name, min(o.interval_start for o in offloads), max(o.interval_end for o in offloads))}
    held: list[tuple[datetime, datetime]] = []
    oldest_ms = None
    for timestamp_ms, found in expiring:
        missing = [(o.interval_start, o.interval_end) for o in found
                   if (o.interval_start, o.interval_end) not in ledgered]
        if missing:
            held.extend(missing)
            oldest_ms = timestamp_ms if oldest_ms is None else min(oldest_ms, timestamp_ms)
    if oldest_ms is None:
        return expire_before, []
    # expire_snapshots removes those strictly older than the cutoff: this one stays
    return datetime.fromtimestamp(oldest_ms / 1000, tz=timezone.utc), sorted(held)


# --------------------------------------------------------------------------------------
# The job's result contract


@dataclass
class TableMaintenance:
    """What the job did to one Iceberg table."""

    table: str
    iceberg_table: str
    rewritten_data_files: int = 0
    added_data_files: int = 0
    rewritten_bytes: int = 0
    rewritten_manifests: int = 0
    added_manifests: int = 0
    expired_snapshots: int = 0
    deleted_data_files: int = 0
    orphan_files: list[str] = field(default_factory=list)
    data_files: int = 0  # in the current snapshot, after the run
    snapshots: int = 0  # in the table's metadata, after the run
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        return (f"{self.iceberg_table}: compacted {self.rewritten_data_files} data file(s) into "
                f"{self.added_data_files} ({self.rewritten_bytes:,} bytes), manifests "
                f"{self.rewritten_manifests} -> {self.added_manifests}, expired {self.expired_snapshots} "
                f"snapshot(s) ({self.deleted_data_files} data file(s) deleted), removed "
                f"{len(self.orphan_files)} orphan file(s); now {self.data_files} data file(s), "
                f"{self.snapshots} snapshot(s) ({self.seconds:.1f} s)")


def result_line(result: TableMaintenance) -> str:
    return f"{RESULT_MARKER} {json.dumps(result.to_dict(), separators=(',', ':'))}"


def parse_results(lines: Iterable[str]) -> list[TableMaintenance]:
    """The job's result lines (anywhere in its output, e.g. behind a log prefix)."""
    found = []
    for line in lines:
        text = str(line)
        if RESULT_MARKER not in text:
            continue
        raw = json.loads(text.split(RESULT_MARKER, 1)[1].strip())
        found.append(TableMaintenance(**{k: v for k, v in raw.items() if k in TableMaintenance.__dataclass_fields__}))
    return found


def counts(values: Mapping[str, Any], *names: str) -> int:
    """The sum of the integer columns `names` of a procedure's result row (absent: 0)."""
    return sum(int(values.get(name) or 0) for name in names)
