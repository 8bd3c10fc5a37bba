"""Operator: record offloaded intervals in the ledger and advance the table's watermark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from k2 import metrics
from k2.config import cached_tables
from k2.intervals import parse_utc
from k2.lineage import iceberg_asset_name
from k2.metrics import classify_error
from k2.verify import late_changes
from k2.watermarks import WatermarkStore, reoffload_command
from k2_provider.hooks.clickhouse import K2ClickHouseHook
from k2_provider.hooks.connections import WATERMARKS_CONN_ID, watermark_store_dsn

if TYPE_CHECKING:
    from airflow.sdk import Asset, AssetAlias, Context

    from k2.watermarks import CommitResult

INTERVAL_KEYS = ("table", "interval_start", "interval_end", "rows", "checksum", "run_id")
# Late rows: how many ledgered intervals before the ones just committed are re-counted in ClickHouse.
LATE_CHECK_INTERVALS = 4


def late_check_window(first_committed: datetime, step: timedelta, count: int) -> tuple[datetime, datetime]:
    """[start, end) of the `count` intervals just before the first interval committed now."""
    first = _utc(first_committed)
    return first - count * step, first


def commit_error_type(exc: BaseException) -> str:
    """The k2_offload_errors_total type of a failed commit: what the exception names, else
    "watermark" - this task's work is the ledger and the watermark."""
    kind = classify_error(exc)
    return "watermark" if kind == "other" else kind


def _utc(value: Any) -> datetime:
    return parse_utc(value if isinstance(value, datetime) else str(value), naive_is_utc=True)


class WatermarkCommitOperator(BaseOperator):
    """
    Commit the intervals the offload task wrote: a ledger row each, and the watermark advance.

    Pulls the offload result from the XCom of ``offload_task_id``: the run's own interval
    (table, interval, rows, checksum, snapshot id, run id) and ``intervals``, every interval
    its Spark job offloaded (catching up, a job takes the complete intervals after the
    run's own). Each is committed through :mod:`k2.watermarks` in its own transaction, in
    interval order, using the PostgreSQL connection ``postgres_conn_id``: ledger row +
    compare-and-set of the watermark on its sequence number (a concurrent commit of the
    same table makes it re-read and retry, bounded). So the watermark jumps over a batch.
    Re-running the task is safe: a committed interval is an idempotent re-commit; a run
    whose offload found its interval already offloaded re-commits just that one.

    Metrics (:mod:`k2.metrics`, never failing the task): the new watermark, the time of
    this success and the run's wall time so far (its cycle).

    Returns (to XCom) the last commit's result plus ``intervals_committed``.

    :param table: table name from tables.yaml (templated).
    :param initial_watermark: the table's watermark when it is seen for the first time
        (the start of its first interval).
    :param offload_task_id: task whose XCom holds the offload result.
    :param postgres_conn_id: connection of the watermark database.
    :param attempts: commit attempts when the watermark moved concurrently.
    :param late_check_intervals: after committing, the ledgered intervals just before the
        committed ones whose ClickHouse count and checksum are compared with the ledger
        (late rows and changed rows: metrics ``k2_late_rows_total`` and
        ``k2_late_changed_intervals_total`` and a warning naming the interval and the command
        that re-offloads it). 0 turns the check off. It never fails the task.
    :param clickhouse_conn_id: connection of the hot tier, for the late-row check.
    :param asset: the table's Iceberg Asset (k2_provider.assets), announced once per interval
        the run's offload wrote, through ``asset_alias``, which must be among the task's
        ``outlets``. A run whose offload found its interval already offloaded (``skipped``)
        announces nothing; a commit-only retry or clear announces the same snapshot again,
        with the same extras (consumers key on interval and snapshot id).
    :param asset_alias: the AssetAlias outlet the events go through.
    """

    template_fields: Sequence[str] = ("table",)
    ui_color = "#d9f2d9"

    def __init__(
        self,
        *,
        table: str,
        initial_watermark: datetime,
        offload_task_id: str = "offload_to_iceberg",
        postgres_conn_id: str = WATERMARKS_CONN_ID,
        attempts: int = 5,
        late_check_intervals: int = LATE_CHECK_INTERVALS,
        clickhouse_conn_id: str = "clickhouse_default",
        asset: Asset | None = None,
        asset_alias: AssetAlias | None = None,
        **kwargs: Any,
    ) -> None:
        if (asset is None) != (asset_alias is None):
            raise ValueError("asset and asset_alias go together")
        if asset_alias is not None and asset_alias not in (kwargs.get("outlets") or []):
            raise ValueError(f"asset_alias {asset_alias.name!r} must be one of the task's outlets")
        super().__init__(**kwargs)
        self.table = table
        # aware UTC; a naive time is refused, naming the argument
        self.initial_watermark = parse_utc(initial_watermark, "initial_watermark")
        self.offload_task_id = offload_task_id
        self.postgres_conn_id = postgres_conn_id
        self.attempts = attempts
        self.late_check_intervals = late_check_intervals
        self.clickhouse_conn_id = clickhouse_conn_id
        self.asset = asset
        self.asset_alias = asset_alias

    def _store(self) -> WatermarkStore:
        return WatermarkStore(watermark_store_dsn(self.postgres_conn_id))

    def _check_interval(self, item: Any) -> dict[str, Any]:
        if not isinstance(item, Mapping):
            raise AirflowException(f"offload result entry is not a mapping: {item!r}")
        missing = set(INTERVAL_KEYS) - item.keys()
        if missing:
            raise AirflowException(f"offload result lacks {sorted(missing)}: {item!r}")
        if item["table"] != self.table:
            raise AirflowException(
                f"offload result is for table {item['table']!r}, not {self.table!r}"
            )
        if _utc(item["interval_end"]) <= _utc(item["interval_start"]):
            raise AirflowException(f"offload result has an empty interval: {item!r}")
        return dict(item)

    def _offload_result(self, context: Context) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The run's own interval and every interval to commit (own included), by start."""
        result = self._pulled(context)
        if not isinstance(result, dict):
            raise AirflowException(
                f"no offload result in the XCom of {self.offload_task_id!r}: {result!r}"
            )
        own = self._check_interval(result)
        self._check_catalog(result.get("catalog_name"))
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is not None and end is not None:
            if (_utc(own["interval_start"]), _utc(own["interval_end"])) != (_utc(start), _utc(end)):
                raise AirflowException(
                    f"offload result covers [{own['interval_start']}, {own['interval_end']}), "
                    f"not this run's [{_utc(start).isoformat()}, {_utc(end).isoformat()})"
                )
        listed = result.get("intervals")
        if listed is None:  # a result from before batches: the own interval alone
            listed = [own]
        if not isinstance(listed, list):
            raise AirflowException(f"offload result 'intervals' is not a list: {listed!r}")
        intervals = [self._check_interval(item) for item in listed]
        own_key = (_utc(own["interval_start"]), _utc(own["interval_end"]))
        keys = [(_utc(i["interval_start"]), _utc(i["interval_end"])) for i in intervals]
        if own_key not in keys:
            intervals.append(own)
        if len(set(keys)) != len(keys):
            raise AirflowException(f"offload result lists an interval twice: {listed!r}")
        intervals.sort(key=lambda i: _utc(i["interval_start"]))
        return own, intervals

    def _check_catalog(self, catalog_name: Any) -> None:
        """The Asset names the catalog the offload wrote to (a placement's ``catalog_name``
        is given at parsing, its Iceberg connection is read at run time): refuse to ledger
        and announce an interval under another catalog's name."""
        if self.asset is None or catalog_name is None:  # a result from before the check
            return
        if self.asset.name != iceberg_asset_name(str(catalog_name), cached_tables().get(self.table)):
            raise AirflowException(
                f"{self.table}: the offload wrote to Iceberg catalog {catalog_name!r} but this DAG "
                f"announces the Asset {self.asset.uri!r}; make the DAG's placement catalog_name "
                f"and the Iceberg connection's catalog_name the same"
            )

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            return self._execute(context)
        except Exception as exc:
            metrics.emit_safely(metrics.record_error, self.table, commit_error_type(exc), log=self.log)
            raise

    def _pulled(self, context: Context) -> Any:
        return context["ti"].xcom_pull(task_ids=self.offload_task_id)

    def _announce(self, context: Context, intervals: list[dict[str, Any]]) -> int:
        """One asset event per interval the run's offload wrote (none when it skipped)."""
        if self.asset is None or self.asset_alias is None:
            return 0
        result = self._pulled(context)
        if isinstance(result, dict) and result.get("skipped"):
            self.log.info("no asset event: the run's interval was already offloaded by another run")
            return 0
        events = context["outlet_events"][self.asset_alias]
        for item in intervals:
            events.add(self.asset, extra={
                "table": self.table,
                "iceberg_table": cached_tables().get(self.table).iceberg_table,
                "interval_start": _utc(item["interval_start"]).isoformat(),
                "interval_end": _utc(item["interval_end"]).isoformat(),
                "snapshot_id": None if item.get("snapshot_id") is None else int(item["snapshot_id"]),
                "rows": int(item["rows"]),
                "checksum": str(item["checksum"]),
            })
        self.log.info("%d asset event(s) of %s", len(intervals), self.asset.uri)
        return len(intervals)

    def _execute(self, context: Context) -> dict[str, Any]:
        _, intervals = self._offload_result(context)
        store = self._store()
        store.migrate()
        store.initialize(self.table, self.initial_watermark)
        commits: list[CommitResult] = []
        for item in intervals:
            commit = store.commit_interval(
                self.table,
                _utc(item["interval_start"]),
                _utc(item["interval_end"]),
                int(item["rows"]),
                int(item["checksum"]),
                None if item.get("snapshot_id") is None else int(item["snapshot_id"]),
                str(item["run_id"]),
                attempts=self.attempts,
            )
            commits.append(commit)
            if commit.advanced:
                note = ""
            elif commit.recommit:
                note = " (unchanged: re-commit of an offloaded interval)"
            else:
                note = " (unchanged: an earlier interval is still open)"
            self.log.info(
                "%s [%s, %s) committed: watermark %s, sequence %s%s",
                self.table,
                commit.interval_start.isoformat(),
                commit.interval_end.isoformat(),
                commit.watermark_ts.isoformat(),
                commit.sequence_number,
                note,
            )
        # Commits ran in interval order, each reading the watermark under its row lock.
        last = commits[-1]
        self._emit_metrics(context, last)
        if self.late_check_intervals > 0:
            try:
                self._check_late_rows(context, store, commits[0])
            except Exception as exc:  # a check, not the commit: never fail the task for it
                self.log.warning("late-row check of %s skipped: %s", self.table, exc)
        announced = self._announce(context, intervals)
        return {**last.as_dict(), "intervals_committed": len(commits), "asset_events": announced}

    def _check_late_rows(self, context: Context, store: WatermarkStore, first: CommitResult) -> None:
        """Rows that arrived in ClickHouse after their interval was offloaded, and rows that
        changed since (a candle a late trade moved): compare ClickHouse's count and checksum
        of the few ledgered intervals before this commit with the ledger; warn with the
        command that re-offloads; add what no earlier check reported to k2_late_rows_total
        and k2_late_changed_intervals_total."""
        step = first.interval_end - first.interval_start
        start, end = late_check_window(first.interval_start, step, self.late_check_intervals)
        entries = [e for e in store.ledger_range(self.table, start, end) if e.interval_end - e.interval_start == step]
        if not entries:
            return
        spec = cached_tables().get(self.table)
        hook = K2ClickHouseHook(self.clickhouse_conn_id)
        try:
            changes = late_changes(hook.client, spec, entries)
        finally:
            hook.close()
        for (s, e), change in sorted(changes.items()):
            what = (f"rows changed since the offload ({change.offloaded}; ClickHouse now {change.now})"
                    if change.values_changed else
                    f"{change.extra_rows} late rows in ClickHouse beyond the {change.offloaded.rows} offloaded")
            self.log.warning("%s [%s, %s): %s; re-offload with: %s", self.table, s.isoformat(), e.isoformat(),
                             what, reoffload_command(self.table, s))
        # The ledger remembers what was reported: later commits that find the same late rows
        # or the same change (each re-checks the intervals before it) do not count them again.
        late = {k: c.extra_rows for k, c in changes.items() if c.extra_rows}
        fresh = sum(store.note_late_rows(self.table, late).values()) if late else 0
        if fresh:
            metrics.emit_safely(metrics.record_late_rows, self.table, fresh, log=self.log)
        changed = {k: c.now.checksum for k, c in changes.items() if c.values_changed}
        fresh_changes = len(store.note_late_changes(self.table, changed)) if changed else 0
        if fresh_changes:
            metrics.emit_safely(metrics.record_late_changes, self.table, fresh_changes, log=self.log)

    def _emit_metrics(self, context: Context, last: CommitResult) -> None:
        metrics.emit_safely(metrics.set_watermark, self.table, last.watermark_ts, log=self.log)
        metrics.emit_safely(metrics.set_last_success, self.table, log=self.log)
        dag_run = context.get("dag_run")
        started = _aware(getattr(dag_run, "start_date", None))
        if started is not None:
            cycle = max(0.0, (datetime.now(timezone.utc) - started).total_seconds())
            catchup = _started_in_a_backlog(started, context)
            metrics.emit_safely(metrics.record_cycle, self.table, cycle, catchup=catchup, log=self.log)


def _aware(moment: Any) -> datetime | None:
    if not isinstance(moment, datetime):
        return None
    return parse_utc(moment, naive_is_utc=True)


def _started_in_a_backlog(started: datetime, context: Context) -> bool:
    """A run that started more than one interval after its data interval ended waited in a
    backlog (catch-up, a backfill, a clear of an old run): its cycle is labelled `catchup`.
    A scheduled run starts when its interval closes."""
    start = _aware(context.get("data_interval_start"))
    end = _aware(context.get("data_interval_end"))
    if start is None or end is None:
        return False
    return started - end > end - start
