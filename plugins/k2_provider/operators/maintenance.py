"""Operator: Iceberg maintenance of one table (k2.maintenance) with one spark-submit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from k2 import metrics
from k2.config import cached_tables
from k2.iceberg import load_catalog
from k2.maintenance import (
    APPLICATION,
    RESULT_MARKER,
    TARGET_FILE_BYTES,
    TableMaintenance,
    parse_results,
    plan_maintenance,
)
from k2.watermarks import WatermarkStore, offload_lock
from k2_provider.hooks.connections import (
    ICEBERG_CONN_ID,
    WATERMARKS_CONN_ID,
    iceberg_settings,
    watermark_store_dsn,
)
from k2_provider.operators.spark_job import DEFAULT_JARS_DIR, K2SparkJobOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

class IcebergMaintenanceError(RuntimeError):
    """The maintenance job ran but its result cannot be read."""


class IcebergMaintenanceOperator(K2SparkJobOperator):
    """Compact the closed days of the table's Iceberg table, rewrite its manifests, expire
    its old snapshots and remove its orphan files (and its quarantine table's), with one
    spark-submit of spark_jobs/maintain_iceberg.py (Iceberg's Spark procedures).

    Holds the table's offload lock (the PostgreSQL advisory lock the offload holds from
    planning to commit) for the whole run, so it never commits between an offload's read
    and its commit; it waits for a running offload. The plan (k2.maintenance) is made under
    the lock: the closed days from the watermark, and the expiry cutoff held back before
    the oldest snapshot whose intervals the offload ledger does not hold yet.

    Returns (to XCom) what the job did per Iceberg table. Metrics: the table's data-file
    and snapshot counts, the last success time, files compacted and orphan files removed,
    failures (the K2MaintenanceFailed and K2MaintenanceStale alerts).

    :param table: table name from tables.yaml (templated).
    :param snapshot_retention: expire snapshots older than this; default the table's
        ``snapshot_retention`` (tables.yaml, 2 days).
    :param orphan_file_retention: remove unreferenced files older than this; default the
        table's ``orphan_file_retention`` (3 days).
    :param target_file_bytes: compaction's target data-file size.
    :param kwargs: everything else goes to SparkSubmitOperator (conn_id, conf, driver_memory...).
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "table")
    ui_color = "#d9f5c6"
    result_marker = RESULT_MARKER

    def __init__(
        self,
        *,
        table: str,
        snapshot_retention: timedelta | None = None,
        orphan_file_retention: timedelta | None = None,
        target_file_bytes: int = TARGET_FILE_BYTES,
        iceberg_conn_id: str = ICEBERG_CONN_ID,
        postgres_conn_id: str = WATERMARKS_CONN_ID,
        lock_poll_interval: float = 5.0,
        application: str | os.PathLike[str] = APPLICATION,
        jars: str | None = None,
        jars_dir: str | os.PathLike[str] = DEFAULT_JARS_DIR,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "application_args" in kwargs:
            raise TypeError("IcebergMaintenanceOperator builds its application_args itself")
        super().__init__(application=str(application), jars=jars, jars_dir=jars_dir,
                         name=name or f"k2-maintain-{table}", **kwargs)
        self.table = table
        self.snapshot_retention = snapshot_retention
        self.orphan_file_retention = orphan_file_retention
        self.target_file_bytes = target_file_bytes
        self.iceberg_conn_id = iceberg_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.lock_poll_interval = lock_poll_interval
        self.stage = "prepare"

    def execute(self, context: Context) -> list[dict[str, Any]]:
        try:
            return self._execute(context)
        except Exception:
            metrics.emit_safely(metrics.record_maintenance_failure, self.table, log=self.log)
            raise

    def _execute(self, context: Context) -> list[dict[str, Any]]:
        from pyiceberg.exceptions import NoSuchTableError

        spec = cached_tables().get(self.table)
        iceberg = iceberg_settings(self.iceberg_conn_id)
        dsn = watermark_store_dsn(self.postgres_conn_id)
        store = WatermarkStore(dsn)
        store.migrate()
        self.stage = "lock"
        with offload_lock(dsn, spec.name, holder=f"maintenance {context.get('run_id', '')}", log=self.log,
                          poll_interval=self.lock_poll_interval):
            self.stage = "plan"
            try:
                table = load_catalog(iceberg).load_table(spec.iceberg_table)
            except NoSuchTableError:
                self.log.info("%s: Iceberg table %s does not exist yet: nothing to maintain",
                              spec.name, spec.iceberg_table)
                return []
            plan = plan_maintenance(spec, table=table, store=store, now=datetime.now(timezone.utc),
                                    snapshot_retention=self.snapshot_retention,
                                    orphan_file_retention=self.orphan_file_retention,
                                    target_file_bytes=self.target_file_bytes)
            for line in plan.describe():
                (self.log.warning if line.startswith("kept past") else self.log.info)("%s: %s", spec.name, line)
            self.use_settings(iceberg.to_env(), iceberg)
            self.stage = "spark"
            lines = self.submit(context, plan.arguments())
            self.stage = "result"
        results = parse_results(lines)
        main = next((r for r in results if r.iceberg_table == spec.iceberg_table), None)
        if main is None:
            raise IcebergMaintenanceError(
                f"the maintenance job of {spec.name} ended without a {RESULT_MARKER} line for "
                f"{spec.iceberg_table}; see its output above")
        for result in results:
            self.log.info("%s", result.line())
        self._emit(main, results)
        return [r.to_dict() for r in results]

    def _emit(self, main: TableMaintenance, results: list[TableMaintenance]) -> None:
        metrics.emit_safely(
            metrics.record_maintenance, self.table, data_files=main.data_files, snapshots=main.snapshots,
            rewritten_files=sum(r.rewritten_data_files for r in results),
            orphan_files=sum(len(r.orphan_files) for r in results), log=self.log,
        )
