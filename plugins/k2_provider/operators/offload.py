"""Operator: offload a run's interval of a table - and, catching up, the complete intervals after
it - from ClickHouse to Iceberg with one spark-submit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from k2 import metrics
from k2.catchup import backlog, following, may_batch, plan_offload
from k2.config import cached_tables
from k2.iceberg import find_offload_snapshots, load_catalog
from k2.intervals import parse_utc
from k2.metrics import classify_error
from k2.offload import (
    DEFAULT_APPLICATION,
    RESULT_MARKER,
    OffloadResultError,
    normalize_result,
    offload_range,
)
from k2.quality import quarantine_table_name
from k2.runtime_env import IcebergSettings
from k2.watermarks import WatermarkStore, offload_lock
from k2_provider.hooks.clickhouse import K2ClickHouseHook
from k2_provider.lineage import Written, operator_lineage
from k2_provider.hooks.connections import (
    ICEBERG_CONN_ID,
    WATERMARKS_CONN_ID,
    iceberg_settings,
    watermark_store_dsn,
)
from k2_provider.operators.spark_job import DEFAULT_JARS_DIR, K2SparkJobOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from k2.catchup import CatchupPlan, Interval
    from k2.config import TableSpec
    from k2.iceberg import OffloadSnapshot
    from k2.watermarks import LedgerEntry

# --------------------------------------------------------------------------------------
# The operator


@dataclass
class _Facts:
    """What the plan is made from, read under the lock."""

    now: datetime
    hot_watermark: datetime | None = None
    hot_known: bool = False
    ledger: dict[tuple[datetime, datetime], LedgerEntry] = field(default_factory=dict)
    snapshots: dict[tuple[datetime, datetime], OffloadSnapshot] = field(default_factory=dict)

    @property
    def offloaded(self) -> set[tuple[datetime, datetime]]:
        return set(self.ledger) | set(self.snapshots)


class OffloadToIcebergOperator(K2SparkJobOperator):
    """
    Offload ``[data_interval_start, data_interval_end)`` of one table to Iceberg with spark-submit;
    catching up, also the complete intervals after it, in the same Spark job.

    Runs ``spark_jobs/offload_to_iceberg.py --table T --interval-start S --interval-end E
    --interval-step D --run-id R``: one MERGE and one Iceberg snapshot per interval of
    ``[S, E)``. Where ClickHouse and the Iceberg catalog are, the job learns from
    environment variables (:mod:`k2.runtime_env`) built at execute time from the
    ``clickhouse_conn_id`` and ``iceberg_conn_id`` connections; they are never templated,
    logged or put on the command line, and their secrets are registered with Airflow's
    secrets masker. The Spark conf carries only the non-secret catalog settings.

    At execute time, holding the table's PostgreSQL advisory lock (:func:`offload_lock`) from
    planning until the job's result is read, it plans with :func:`k2.catchup.plan_offload`:

    - a scheduled run's first try whose interval is already offloaded - in the ledger, or
      committed in Iceberg by another run's batch that is not ledgered yet - starts no Spark
      job and returns that offload's figures;
    - a scheduled run's first try otherwise offloads its interval and the following ones
      while they are complete in ClickHouse, have ended, are not offloaded yet, and are at
      most ``max_intervals_per_job`` in all;
    - a retry, a clear, a manual run or a backfill re-offloads just its own interval.

    Returns (to XCom) the run's own interval - table, interval_start, interval_end, run_id
    (of the run that wrote it), rows (written to the table), checksum, snapshot_id,
    quarantined_rows (failed the table's quality checks; written to its quarantine
    table) - plus ``intervals``: that
    shape for every interval the job offloaded, own interval first, and ``skipped``. They
    are read from the Iceberg snapshots (their summaries carry ``k2.*`` properties), which
    works in every deploy mode; the job's ``K2_OFFLOAD_RESULT`` lines are the fallback in
    client mode.

    Metrics (:mod:`k2.metrics`, never failing the task): rows, bytes and duration per
    interval, quarantined rows, the table's data-file count, the catch-up backlog, and
    errors by type.

    :param table: table name from tables.yaml (templated).
    :param interval_start: interval start, ISO-8601 UTC (templated); default data_interval_start.
    :param interval_end: interval end, ISO-8601 UTC (templated); default data_interval_end.
    :param max_intervals_per_job: the most intervals one job takes; default the table's
        ``max_intervals_per_job`` in tables.yaml.
    :param clickhouse_conn_id: the ClickHouse connection id.
    :param iceberg_conn_id: the Iceberg JDBC catalog connection id (postgres-style).
    :param postgres_conn_id: the watermark database's connection (ledger and offload lock).
    :param lock_poll_interval: seconds between attempts to take a held offload lock.
    :param application: the PySpark job (templated); default spark_jobs/offload_to_iceberg.py.
    :param jars: comma-separated jars (templated); default every jar in ``jars_dir``.
    :param jars_dir: folder whose jars are used when ``jars`` is not given.
    :param driver_max_rows: the job's ``--driver-max-rows``: intervals of at most this many
        rows are written by the Spark driver itself, larger ones by the executors (default:
        the job's own, every interval on a local master and 500k rows on a cluster).
    :param slices: the job's ``--slices``: every range read in this many slices (Spark tasks,
        spread over the executors); default: one per 250k rows, up to the cluster's cores.
    :param kwargs: everything else goes to SparkSubmitOperator (conn_id, conf, driver_memory...).
    """

    template_fields: Sequence[str] = (
        *SparkSubmitOperator.template_fields,
        "table",
        "interval_start",
        "interval_end",
    )
    ui_color = "#c6e6f5"
    result_marker = RESULT_MARKER

    def __init__(
        self,
        *,
        table: str,
        interval_start: str = "{{ data_interval_start | ts }}",
        interval_end: str = "{{ data_interval_end | ts }}",
        max_intervals_per_job: int | None = None,
        clickhouse_conn_id: str = "clickhouse_default",
        iceberg_conn_id: str = ICEBERG_CONN_ID,
        postgres_conn_id: str = WATERMARKS_CONN_ID,
        lock_poll_interval: float = 5.0,
        application: str | os.PathLike[str] = DEFAULT_APPLICATION,
        jars: str | None = None,
        jars_dir: str | os.PathLike[str] = DEFAULT_JARS_DIR,
        name: str | None = None,
        driver_max_rows: int | None = None,
        slices: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "application_args" in kwargs:
            raise TypeError("OffloadToIcebergOperator builds its application_args itself")
        if max_intervals_per_job is not None and max_intervals_per_job < 1:
            raise ValueError(f"max_intervals_per_job must be >= 1, got {max_intervals_per_job}")
        if driver_max_rows is not None and driver_max_rows < 0:
            raise ValueError(f"driver_max_rows must be >= 0, got {driver_max_rows}")
        if slices is not None and slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices}")
        super().__init__(
            application=str(application),
            jars=jars,
            jars_dir=jars_dir,
            name=name or f"k2-offload-{table}",
            # The own interval's arguments, rendered with the other template fields; execute()
            # replaces them with the planned range (see _job_arguments).
            application_args=[
                "--table",
                table,
                "--interval-start",
                interval_start,
                "--interval-end",
                interval_end,
                "--run-id",
                "{{ run_id }}",
            ],
            **kwargs,
        )
        self.table = table
        self.interval_start = interval_start
        self.interval_end = interval_end
        self.max_intervals_per_job = max_intervals_per_job
        self.driver_max_rows = driver_max_rows
        self.slices = slices
        self.clickhouse_conn_id = clickhouse_conn_id
        self.iceberg_conn_id = iceberg_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.lock_poll_interval = lock_poll_interval
        self._stage = "prepare"
        self._written: Written | None = None  # what this run's job wrote: its lineage statistics

    # Lineage (the openlineage provider calls these; k2_provider.lineage)

    def _lineage(self, written: Written | None) -> Any:
        spec = cached_tables().get(self.table)
        clickhouse = K2ClickHouseHook(clickhouse_conn_id=self.clickhouse_conn_id).settings_for_spark()
        return operator_lineage(spec, clickhouse, iceberg_settings(self.iceberg_conn_id), written)

    def get_openlineage_facets_on_start(self) -> Any:
        return self._lineage(None)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The output's statistics: the rows and bytes this run's job wrote (none when
        an earlier run's batch had offloaded the interval)."""
        return self._lineage(self._written)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return self._lineage(None)

    # Settings

    def _runtime_env(self) -> tuple[dict[str, str], IcebergSettings]:
        clickhouse = K2ClickHouseHook(clickhouse_conn_id=self.clickhouse_conn_id).settings_for_spark()
        iceberg = iceberg_settings(self.iceberg_conn_id)
        return {**clickhouse.to_env(), **iceberg.to_env()}, iceberg

    def _postgres_dsn(self) -> str:
        return watermark_store_dsn(self.postgres_conn_id)

    # Execute

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            return self._execute(context)
        except Exception as exc:
            metrics.emit_safely(
                metrics.record_error, self.table, self._error_type(exc), log=self.log
            )
            raise

    def _error_type(self, exc: BaseException) -> str:
        kind = classify_error(exc)
        if kind == "other" and isinstance(exc, OffloadResultError):
            return "iceberg"
        if kind == "other" and self._stage == "spark":
            return "spark"
        return kind

    def _execute(self, context: Context) -> dict[str, Any]:
        spec = cached_tables().get(self.table)
        own = (parse_utc(self.interval_start, naive_is_utc=True), parse_utc(self.interval_end, naive_is_utc=True))
        run_id = str(context["run_id"])
        dag_run = context.get("dag_run")
        ti = context.get("ti")
        run_type = getattr(dag_run, "run_type", None)
        try_number = int(getattr(ti, "try_number", None) or 1)
        cap = self.max_intervals_per_job or spec.max_intervals_per_job

        env, iceberg = self._runtime_env()
        dsn = self._postgres_dsn()
        store = WatermarkStore(dsn)
        store.migrate()
        self._stage = "lock"
        with offload_lock(
            dsn, spec.name, holder=run_id, log=self.log, poll_interval=self.lock_poll_interval
        ):
            self._stage = "plan"
            batching = may_batch(run_type, try_number)
            facts = self._facts(spec, own, cap, store, iceberg, batching)
            plan = plan_offload(
                own,
                offloaded=facts.offloaded,
                hot_watermark=facts.hot_watermark,
                now=facts.now,
                max_intervals=cap,
                run_type=run_type,
                try_number=try_number,
            )
            if plan.skip:
                result = self._already_offloaded(own, facts)
            else:
                self.log.info(
                    "%s run %s (try %s): offloading [%s, %s) - %s",
                    spec.name,
                    run_id,
                    try_number,
                    plan.range[0].isoformat(),
                    plan.range[1].isoformat(),
                    plan.reason,
                )
                boundary = store.retention_boundary(spec.name)
                result = self._offload(context, env, iceberg, spec, plan, run_id,
                                       offloadable_from=boundary.offloadable_from if boundary else None)
            self._stage = "metrics"
            self._emit_backlog(spec, own, store, facts, plan)
        # the catalog written to: the commit task checks it against the Asset it announces
        return {**result, "catalog_name": iceberg.catalog_name}

    def _facts(
        self,
        spec: TableSpec,
        own: Interval,
        cap: int,
        store: WatermarkStore,
        iceberg: IcebergSettings,
        batching: bool,
    ) -> _Facts:
        """Ledger, Iceberg snapshots and ClickHouse completeness of the intervals a batch may take."""
        facts = _Facts(now=datetime.now(timezone.utc))
        if not batching:
            return facts
        window = list(following(own, cap))
        facts.ledger = {
            (e.interval_start, e.interval_end): e
            for e in store.ledger_range(spec.name, window[0][0], window[-1][1])
        }
        try:
            facts.snapshots = find_offload_snapshots(load_catalog(iceberg), spec, window)
        except Exception as exc:  # the ledger alone still gives a correct, if larger, plan
            self.log.warning("cannot read the Iceberg snapshots of %s: %s", spec.name, exc)
        self._read_hot_watermark(spec, facts)
        return facts

    def _read_hot_watermark(self, spec: TableSpec, facts: _Facts) -> None:
        completeness = spec.completeness
        assert completeness is not None
        hook = K2ClickHouseHook(clickhouse_conn_id=self.clickhouse_conn_id)
        try:
            facts.hot_watermark = hook.watermark(
                completeness.table, completeness.column, spec.allowed_lateness
            )
            facts.hot_known = True
        except Exception as exc:  # without it the batch is just the own interval
            self.log.warning("cannot read the ClickHouse watermark of %s: %s", completeness.table, exc)
        finally:
            hook.close()

    def _already_offloaded(self, own: Interval, facts: _Facts) -> dict[str, Any]:
        entry = facts.ledger.get(own)
        if entry is not None:
            result = {
                "table": self.table,
                "interval_start": own[0].isoformat(),
                "interval_end": own[1].isoformat(),
                "run_id": entry.run_id,
                "rows": entry.rows,
                "checksum": entry.checksum,
                "snapshot_id": entry.snapshot_id,
                "quarantined_rows": (
                    facts.snapshots[own].quarantined_rows if own in facts.snapshots else None
                ),
            }
            where = "the ledger"
        else:
            result = normalize_result(facts.snapshots[own].to_dict())
            where = "its Iceberg snapshot; not ledgered yet"
        self.log.info(
            "%s [%s, %s) already offloaded by run %s in snapshot %s (%s rows, from %s): no Spark job",
            self.table,
            result["interval_start"],
            result["interval_end"],
            result["run_id"],
            result["snapshot_id"],
            result["rows"],
            where,
        )
        return {**result, "intervals": [dict(result)], "skipped": True}

    def _offload(
        self,
        context: Context,
        env: dict[str, str],
        iceberg: IcebergSettings,
        spec: TableSpec,
        plan: CatchupPlan,
        run_id: str,
        offloadable_from: datetime | None = None,
    ) -> dict[str, Any]:
        self.use_settings(env, iceberg)

        def submit(arguments: list[str]) -> list[str]:
            self._stage = "spark"
            lines = self.submit(context, arguments)
            self._stage = "result"
            return lines

        done = offload_range(
            spec, plan.intervals, run_id, iceberg=iceberg, submit=submit, log=self.log,
            driver_max_rows=self.driver_max_rows, slices=self.slices, offloadable_from=offloadable_from,
        )
        results, extras, data_files, wall = done.results, done.raw, done.data_files, done.wall_seconds

        self._stage = "metrics"
        for result, extra in zip(results, extras):
            metrics.emit_safely(
                metrics.record_offload,
                self.table,
                result["rows"],
                extra.get("added_files_size") or 0,
                # The job's wall time (JVM start included) spread over its intervals, so that
                # the sum is the Spark time spent and rows / duration the throughput.
                wall / len(results),
                log=self.log,
            )
            if result.get("quarantined_rows"):
                metrics.emit_safely(
                    metrics.record_quarantined_rows, self.table, result["quarantined_rows"], log=self.log
                )
                self.log.warning(
                    "%s [%s, %s): %s row(s) failed the quality checks and were written to %s",
                    self.table,
                    result["interval_start"],
                    result["interval_end"],
                    result["quarantined_rows"],
                    quarantine_table_name(spec),
                )
        if data_files is not None:
            metrics.emit_safely(metrics.set_iceberg_data_files, self.table, data_files, log=self.log)
        self._written = Written(rows=sum(int(r["rows"]) for r in results),
                                bytes=sum(int(e.get("added_files_size") or 0) for e in extras))
        self.log.info(
            "offloaded %s in %d interval(s) [%s, %s) with one Spark job in %.1f s: %s",
            self.table,
            len(results),
            results[0]["interval_start"],
            results[-1]["interval_end"],
            wall,
            "; ".join(
                f"[{r['interval_start']}, {r['interval_end']}) {r['rows']} rows, checksum "
                f"{r['checksum']}, snapshot {r['snapshot_id']}, {r['quarantined_rows'] or 0} quarantined"
                for r in results
            ),
        )
        return {**results[0], "intervals": results, "skipped": False}

    def _emit_backlog(
        self,
        spec: TableSpec,
        own: Interval,
        store: WatermarkStore,
        facts: _Facts,
        plan: CatchupPlan,
    ) -> None:
        """k2_catchup_backlog_intervals: complete intervals not offloaded once this job is done."""
        try:
            if not facts.hot_known:
                self._read_hot_watermark(spec, facts)
            if not facts.hot_known:
                return
            current = store.get(spec.name)
            watermark = current.watermark_ts if current is not None else own[0]
            limit = min(facts.hot_watermark or watermark, facts.now)
            offloaded = facts.offloaded | set(plan.intervals)
            offloaded |= {
                (e.interval_start, e.interval_end)
                for e in store.ledger_range(spec.name, watermark, max(limit, watermark))
            }
            due = backlog(
                watermark,
                own[1] - own[0],
                hot_watermark=facts.hot_watermark,
                now=facts.now,
                offloaded=offloaded,
            )
        except Exception as exc:
            self.log.warning("catch-up backlog of %s not measured: %s", spec.name, exc)
            return
        self.log.info("%s: %d complete interval(s) wait to be offloaded", spec.name, due)
        metrics.emit_safely(metrics.set_catchup_backlog, spec.name, due, log=self.log)
