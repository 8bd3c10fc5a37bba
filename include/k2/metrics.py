"""The project's metrics: defined once here, emitted through Airflow's own StatsD client.

Each metric is a StatsD name under Airflow's `[metrics] statsd_prefix` (default `airflow`)
with the table (and, for errors, the error type) as dotted path components, the way
Airflow's legacy names carry dag_id and task_id. statsd_exporter turns the path back into
labels: `airflow.k2.offload.rows.silver_trades:500|c` becomes
`k2_offload_rows_total{table="silver_trades"} 500`. No tag format needs configuring.

`monitoring/statsd_exporter/mappings.yml` holds a mapping per metric; `mapping_entries()`
renders them from the definitions below and a unit test keeps the two equal. Alert rules,
recording rules and the dashboard refer to the Prometheus names defined here.

The emit helpers use `airflow.sdk.observability.stats.Stats` (Airflow 3.3). Inside a task,
the triggerer, the scheduler or the dag-processor Airflow has already initialised it from
`[metrics]`; elsewhere (a CLI, a test) `configure_stats()` does the same from Airflow's
config. With `[metrics] statsd_on = False` every helper is a no-op.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from string import Formatter
from typing import Any, Literal

MetricKind = Literal["counter", "gauge", "timer"]

DEFAULT_STATSD_PREFIX = "airflow"

# Buckets (seconds). One Spark job per interval takes ~10 s locally; a catch-up job that
# takes several intervals takes minutes. The cycle buckets hold the 300 s and 600 s edges the
# cycle-duration alerts count against.
OFFLOAD_DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
CYCLE_DURATION_BUCKETS = (30.0, 60.0, 120.0, 180.0, 300.0, 450.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0)

# The error types `record_error` accepts; anything else is reported as "other" so that a
# new exception class cannot grow the label set without bound.
ERROR_TYPES = (
    "clickhouse",  # reading the interval from the hot tier
    "spark",  # spark-submit failed or the job crashed
    "iceberg",  # catalog or commit errors in the cold tier
    "watermark",  # PostgreSQL ledger / compare-and-set conflicts
    "verification",  # row count or checksum mismatch after the write
    "timeout",  # task or sensor timeout
    "config",  # bad table spec or connection
    "other",
)
_ERROR_TYPE_BY_MODULE = (
    ("clickhouse_connect", "clickhouse"),
    ("chdb", "clickhouse"),
    ("pyspark", "spark"),
    ("py4j", "spark"),
    ("airflow.providers.apache.spark", "spark"),
    ("pyiceberg", "iceberg"),
    ("psycopg", "watermark"),
    ("k2.watermarks", "watermark"),
    ("k2.verify", "verification"),
    ("k2.config", "config"),
    ("pydantic", "config"),
)
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Metric:
    """One project metric: its StatsD name (a template) and what Prometheus makes of it.

    :param statsd: name under Airflow's StatsD prefix; `{label}` placeholders are the
        labels, each one dotted path component.
    :param prometheus: the Prometheus metric name the exporter maps it to (for a timer the
        histogram's base name: `_bucket`, `_sum` and `_count` series exist).
    :param kind: counter, gauge or timer (a timer is sent in milliseconds and becomes a
        histogram in seconds).
    :param help: HELP text on /metrics.
    :param buckets: histogram buckets (seconds), timers only.
    """

    statsd: str
    prometheus: str
    kind: MetricKind
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(field for _, field, _, _ in Formatter().parse(self.statsd) if field)

    @property
    def statsd_type(self) -> str:
        """statsd_exporter's `match_metric_type`."""
        return "observer" if self.kind == "timer" else self.kind

    @property
    def series_names(self) -> tuple[str, ...]:
        """Names that appear on /metrics and in PromQL."""
        if self.kind == "timer":
            return tuple(f"{self.prometheus}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.prometheus,)

    def stat(self, **labels: str) -> str:
        """The StatsD name to send (without the prefix), e.g. `k2.offload.rows.silver_trades`."""
        missing = set(self.labels) - set(labels)
        if missing:
            raise ValueError(f"{self.prometheus}: missing label(s) {sorted(missing)}")
        for name in self.labels:
            if not _LABEL_VALUE.match(str(labels[name])):
                raise ValueError(
                    f"{self.prometheus}: {name}={labels[name]!r} must match [A-Za-z0-9_-]+ "
                    "(it becomes one component of a dotted StatsD name)"
                )
        return self.statsd.format(**{name: labels[name] for name in self.labels})

    def glob(self, prefix: str = DEFAULT_STATSD_PREFIX) -> str:
        """statsd_exporter glob: every label placeholder becomes `*`."""
        pattern = re.sub(r"\{[a-z_]+\}", "*", self.statsd)
        return f"{prefix}.{pattern}" if prefix else pattern

    def mapping(self, prefix: str = DEFAULT_STATSD_PREFIX) -> dict[str, Any]:
        """The statsd_exporter mapping entry of this metric."""
        entry: dict[str, Any] = {
            "match": self.glob(prefix),
            "match_metric_type": self.statsd_type,
            "name": self.prometheus,
            "help": self.help,
            "labels": {name: f"${i}" for i, name in enumerate(self.labels, start=1)},
        }
        if self.kind == "timer":
            entry["observer_type"] = "histogram"
            entry["histogram_options"] = {"buckets": list(self.buckets)}
        return entry


# --- the metrics -------------------------------------------------------------------------

OFFLOAD_ROWS = Metric(
    "k2.offload.rows.{table}", "k2_offload_rows_total", "counter",
    "Rows written to Iceberg by the offload, per table.",
)
OFFLOAD_BYTES = Metric(
    "k2.offload.bytes.{table}", "k2_offload_bytes_total", "counter",
    "Bytes of Iceberg data files written by the offload, per table.",
)
OFFLOAD_DURATION = Metric(
    "k2.offload.duration.{table}", "k2_offload_duration_seconds", "timer",
    "Wall time of one offload job (read from ClickHouse, write and commit to Iceberg).",
    OFFLOAD_DURATION_BUCKETS,
)
CYCLE_DURATION = Metric(
    "k2.cycle.duration.{table}.{run}", "k2_cycle_duration_seconds", "timer",
    "Wall time of one DAG run, from its start to the watermark commit; run=live for a run "
    "that started within one interval of its data interval's end, run=catchup for a run "
    "that waited in a backlog.",
    CYCLE_DURATION_BUCKETS,
)
# The `run` label of CYCLE_DURATION. The cycle-duration alerts count live runs only: a run of
# a backlog is slow because of the backlog, which the lag and backlog alerts report.
CYCLE_RUNS = ("live", "catchup")
WATERMARK = Metric(
    "k2.offload.watermark.{table}", "k2_offload_watermark_timestamp_seconds", "gauge",
    "Contiguous offload high-water mark (end of the last committed interval), unix seconds.",
)
LAST_SUCCESS = Metric(
    "k2.offload.last_success.{table}", "k2_offload_last_success_timestamp_seconds", "gauge",
    "When the last watermark commit succeeded, unix seconds.",
)
ERRORS = Metric(
    "k2.offload.errors.{table}.{error_type}", "k2_offload_errors_total", "counter",
    "Offload failures by table and error type.",
)
LATE_ROWS = Metric(
    "k2.offload.late_rows.{table}", "k2_late_rows_total", "counter",
    "Rows that arrived in ClickHouse after their interval was offloaded.",
)
LATE_CHANGES = Metric(
    "k2.offload.late_changes.{table}", "k2_late_changed_intervals_total", "counter",
    "Offloaded intervals whose rows changed in ClickHouse afterwards (same count, other values).",
)
QUARANTINED_ROWS = Metric(
    "k2.offload.quarantined_rows.{table}", "k2_quarantined_rows_total", "counter",
    "Rows set aside instead of offloaded (invalid or unplaceable).",
)
CATCHUP_BACKLOG = Metric(
    "k2.catchup.backlog.{table}", "k2_catchup_backlog_intervals", "gauge",
    "15-minute intervals that are due but not offloaded yet.",
)
ICEBERG_DATA_FILES = Metric(
    "k2.iceberg.data_files.{table}", "k2_iceberg_data_files", "gauge",
    "Data files in the Iceberg table's current snapshot (grows until compaction).",
)
HOT_MAX_EVENT_TIME = Metric(
    "k2.hot.max_event_timestamp.{table}", "k2_hot_max_event_timestamp_seconds", "gauge",
    "Newest event time in the ClickHouse hot tier as seen by the sensor, unix seconds.",
)
DEADLINE_MISSED = Metric(
    "k2.deadline.missed.{table}", "k2_deadline_missed_total", "counter",
    "DAG runs that missed their deadline (Airflow deadline alert fired).",
)
RETENTION_KEPT = Metric(
    "k2.retention.kept_partitions.{table}", "k2_retention_kept_partitions", "gauge",
    "Hot-tier partitions older than hot_retention that the last retention run had to keep.",
)
RETENTION_DROPPED = Metric(
    "k2.retention.dropped_partitions.{table}", "k2_retention_dropped_partitions_total", "counter",
    "Hot-tier partitions dropped after a verified offload.",
)
ICEBERG_SNAPSHOTS = Metric(
    "k2.iceberg.snapshots.{table}", "k2_iceberg_snapshots", "gauge",
    "Snapshots in the Iceberg table's metadata after the last maintenance run.",
)
MAINTENANCE_LAST_SUCCESS = Metric(
    "k2.maintenance.last_success.{table}", "k2_maintenance_last_success_timestamp_seconds", "gauge",
    "When the last Iceberg maintenance run of the table succeeded, unix seconds.",
)
MAINTENANCE_FAILURES = Metric(
    "k2.maintenance.failures.{table}", "k2_maintenance_failures_total", "counter",
    "Iceberg maintenance runs of the table that failed.",
)
MAINTENANCE_REWRITTEN_FILES = Metric(
    "k2.maintenance.rewritten_files.{table}", "k2_maintenance_rewritten_files_total", "counter",
    "Small data files compacted by Iceberg maintenance.",
)
MAINTENANCE_ORPHAN_FILES = Metric(
    "k2.maintenance.orphan_files.{table}", "k2_maintenance_orphan_files_total", "counter",
    "Unreferenced files Iceberg maintenance removed.",
)

METRICS: tuple[Metric, ...] = (
    OFFLOAD_ROWS,
    OFFLOAD_BYTES,
    OFFLOAD_DURATION,
    CYCLE_DURATION,
    WATERMARK,
    LAST_SUCCESS,
    ERRORS,
    LATE_ROWS,
    LATE_CHANGES,
    QUARANTINED_ROWS,
    CATCHUP_BACKLOG,
    ICEBERG_DATA_FILES,
    HOT_MAX_EVENT_TIME,
    DEADLINE_MISSED,
    RETENTION_KEPT,
    RETENTION_DROPPED,
    ICEBERG_SNAPSHOTS,
    MAINTENANCE_LAST_SUCCESS,
    MAINTENANCE_FAILURES,
    MAINTENANCE_REWRITTEN_FILES,
    MAINTENANCE_ORPHAN_FILES,
)
METRIC_BY_NAME = {metric.prometheus: metric for metric in METRICS}


def mapping_entries(prefix: str = DEFAULT_STATSD_PREFIX) -> list[dict[str, Any]]:
    """statsd_exporter mapping entries of every project metric, in definition order."""
    return [metric.mapping(prefix) for metric in METRICS]


# --- emitting ------------------------------------------------------------------------------


def _stats():
    from airflow.sdk.observability.stats import Stats

    return Stats


def configure_stats(*, force: bool = False) -> None:
    """Initialise Airflow's Stats from `[metrics]` if no Airflow component has done it.

    Airflow's processes call `stats.initialize(...)` at start-up; a process of our own
    (a CLI command, a test) has not, and would silently send nothing. `force=True`
    re-reads the configuration (e.g. after changing AIRFLOW__METRICS__* variables).
    """
    from airflow.sdk._shared.observability.metrics import stats as stats_module
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability.metrics.stats_utils import get_stats_factory

    # Airflow keeps the factory in a module global; None means "never initialised here".
    if not force and getattr(stats_module, "_factory", None) is not None:
        return
    stats_module.initialize(
        factory=get_stats_factory(),
        export_legacy_names=conf.getboolean("metrics", "legacy_names_on", fallback=True),
    )


_seeded_tables: set[str] = set()


def _seed_counters(table: str) -> None:
    """Send 0 to every counter of `table` once per process.

    A statsd_exporter counter appears at its first value; Prometheus' increase() cannot see
    that first step. A zero creates the series early so that the first real error, late
    row, changed interval or deadline miss counts.
    """
    if table in _seeded_tables:
        return
    _seeded_tables.add(table)
    stats = _stats()
    for metric in (OFFLOAD_ROWS, OFFLOAD_BYTES, LATE_ROWS, LATE_CHANGES, QUARANTINED_ROWS, DEADLINE_MISSED,
                   MAINTENANCE_FAILURES, MAINTENANCE_REWRITTEN_FILES, MAINTENANCE_ORPHAN_FILES):
        stats.incr(metric.stat(table=table), 0)
    for error_type in ERROR_TYPES:
        stats.incr(ERRORS.stat(table=table, error_type=error_type), 0)


def _unix_seconds(ts: datetime | float | int) -> float:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError(f"{ts!r} is a naive datetime; pass an aware (UTC) one")
        return round(ts.timestamp(), 3)
    value = float(ts)
    if not math.isfinite(value):
        raise ValueError(f"{ts!r} is not a timestamp")
    return round(value, 3)


def _count(value: int, what: str) -> int:
    value = int(value)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def _incr(metric: Metric, count: int, **labels: str) -> None:
    _seed_counters(labels["table"])
    if count:
        _stats().incr(metric.stat(**labels), count)


def _gauge(metric: Metric, value: float, **labels: str) -> None:
    _seed_counters(labels["table"])
    _stats().gauge(metric.stat(**labels), value)


def _timing(metric: Metric, seconds: float | timedelta, **labels: str) -> None:
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"{metric.prometheus}: duration must be >= 0 seconds, got {seconds}")
    _seed_counters(labels["table"])
    # statsd's timing() takes a timedelta and sends milliseconds; the exporter divides by 1000.
    _stats().timing(metric.stat(**labels), timedelta(seconds=seconds))


def record_offload(table: str, rows: int, bytes_written: int, seconds: float | timedelta) -> None:
    """One finished offload job: rows and bytes written, and how long it took."""
    _incr(OFFLOAD_ROWS, _count(rows, "rows"), table=table)
    _incr(OFFLOAD_BYTES, _count(bytes_written, "bytes_written"), table=table)
    _timing(OFFLOAD_DURATION, seconds, table=table)


def record_cycle(table: str, seconds: float | timedelta, *, catchup: bool = False) -> None:
    """One DAG run's wall time (run start to watermark commit); `catchup` for a run that
    started more than one interval after its data interval ended (see CYCLE_RUNS)."""
    _timing(CYCLE_DURATION, seconds, table=table, run=CYCLE_RUNS[1] if catchup else CYCLE_RUNS[0])


def set_watermark(table: str, ts: datetime | float) -> None:
    """The table's contiguous watermark after a commit (end of the last committed interval)."""
    _gauge(WATERMARK, _unix_seconds(ts), table=table)


def set_last_success(table: str, ts: datetime | float | None = None) -> None:
    """A watermark commit succeeded (now, unless given)."""
    _gauge(LAST_SUCCESS, _unix_seconds(ts if ts is not None else datetime.now(timezone.utc)), table=table)


def record_error(table: str, error_type: str) -> None:
    """An offload failure; `error_type` is one of ERROR_TYPES (others count as "other")."""
    kind = error_type if error_type in ERROR_TYPES else "other"
    _incr(ERRORS, 1, table=table, error_type=kind)


def classify_error(exc: BaseException) -> str:
    """Best-effort ERROR_TYPES value for an exception, from its class and module."""
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return "timeout"
    module = type(exc).__module__ or ""
    for prefix, kind in _ERROR_TYPE_BY_MODULE:
        if module == prefix or module.startswith(prefix + "."):
            return kind
    return "other"


def record_late_rows(table: str, rows: int) -> None:
    _incr(LATE_ROWS, _count(rows, "rows"), table=table)


def record_late_changes(table: str, intervals: int) -> None:
    _incr(LATE_CHANGES, _count(intervals, "intervals"), table=table)


def record_quarantined_rows(table: str, rows: int) -> None:
    _incr(QUARANTINED_ROWS, _count(rows, "rows"), table=table)


def set_catchup_backlog(table: str, intervals: int) -> None:
    _gauge(CATCHUP_BACKLOG, _count(intervals, "intervals"), table=table)


def set_iceberg_data_files(table: str, files: int) -> None:
    _gauge(ICEBERG_DATA_FILES, _count(files, "files"), table=table)


def set_hot_max_event_time(table: str, ts: datetime | float) -> None:
    """Newest event time the sensor saw in ClickHouse (the feed-stopped alert watches it)."""
    _gauge(HOT_MAX_EVENT_TIME, _unix_seconds(ts), table=table)


def record_deadline_missed(table: str) -> None:
    _incr(DEADLINE_MISSED, 1, table=table)


def record_retention(table: str, *, kept: int, dropped: int) -> None:
    """One retention run of a table: partitions it had to keep (a gauge: the alert holds
    until a run keeps none) and partitions it dropped."""
    _gauge(RETENTION_KEPT, _count(kept, "kept"), table=table)
    if dropped:
        _incr(RETENTION_DROPPED, _count(dropped, "dropped"), table=table)


def record_maintenance(table: str, *, data_files: int, snapshots: int, rewritten_files: int,
                       orphan_files: int, finished: datetime | float | None = None) -> None:
    """One successful Iceberg maintenance run of a table (its main Iceberg table's figures)."""
    _gauge(ICEBERG_DATA_FILES, _count(data_files, "data_files"), table=table)
    _gauge(ICEBERG_SNAPSHOTS, _count(snapshots, "snapshots"), table=table)
    if rewritten_files:
        _incr(MAINTENANCE_REWRITTEN_FILES, _count(rewritten_files, "rewritten_files"), table=table)
    if orphan_files:
        _incr(MAINTENANCE_ORPHAN_FILES, _count(orphan_files, "orphan_files"), table=table)
    _gauge(MAINTENANCE_LAST_SUCCESS, _unix_seconds(finished if finished is not None else time.time()),
           table=table)


def record_maintenance_failure(table: str) -> None:
    _incr(MAINTENANCE_FAILURES, 1, table=table)


def emit_safely(helper: Callable[..., None], *args: Any, log: logging.Logger | None = None,
                **kwargs: Any) -> bool:
    """Call an emit helper; a failure is logged, never raised: metrics must not fail a task."""
    try:
        helper(*args, **kwargs)
    except Exception as exc:
        (log or logging.getLogger(__name__)).warning(
            "metric %s not sent: %s: %s", getattr(helper, "__name__", helper), type(exc).__name__, exc
        )
        return False
    return True
