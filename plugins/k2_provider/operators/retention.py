"""Operator: hot-tier retention of one table (k2.retention.apply_table) from Airflow."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from k2 import metrics, retention
from k2.config import cached_tables
from k2.iceberg import load_catalog
from k2.watermarks import WatermarkStore
from k2_provider.hooks.clickhouse import K2ClickHouseHook
from k2_provider.hooks.connections import (
    ICEBERG_CONN_ID,
    WATERMARKS_CONN_ID,
    iceberg_settings,
    watermark_store_dsn,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class HotRetentionOperator(BaseOperator):
    """Drop the table's ClickHouse partitions older than its ``hot_retention``, each only after
    a verification against Iceberg made at drop time (k2.retention). A partition old enough
    to drop that has to be kept fails the task, naming it and why; nothing of it is lost.

    Returns the decisions (to XCom). Metrics: ``k2_retention_kept_partitions`` and
    ``k2_retention_dropped_partitions_total`` of the table (the K2RetentionBlocked alert).

    :param table: table name from tables.yaml (templated).
    :param dry_run: decide under the table's offload lock, drop nothing.
    """

    template_fields: Sequence[str] = ("table",)
    ui_color = "#f5e6c6"

    def __init__(
        self,
        *,
        table: str,
        dry_run: bool = False,
        clickhouse_conn_id: str = K2ClickHouseHook.default_conn_name,
        iceberg_conn_id: str = ICEBERG_CONN_ID,
        postgres_conn_id: str = WATERMARKS_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.table = table
        self.dry_run = dry_run
        self.clickhouse_conn_id = clickhouse_conn_id
        self.iceberg_conn_id = iceberg_conn_id
        self.postgres_conn_id = postgres_conn_id

    def execute(self, context: Context) -> list[dict[str, Any]]:
        spec = cached_tables().get(self.table)
        dsn = watermark_store_dsn(self.postgres_conn_id)
        store = WatermarkStore(dsn)
        store.migrate()
        hook = K2ClickHouseHook(self.clickhouse_conn_id)
        try:
            decisions = retention.apply_table(
                spec, ch_client=hook.client, catalog=load_catalog(iceberg_settings(self.iceberg_conn_id)),
                store=store, dsn=dsn, now=datetime.now(timezone.utc), dry_run=self.dry_run,
                log=self.log.info,
            )
        finally:
            hook.close()
        kept = [d for d in decisions if not d.young and not d.droppable]
        dropped = [d for d in decisions if d.dropped]
        metrics.emit_safely(metrics.record_retention, self.table, kept=len(kept), dropped=len(dropped),
                            log=self.log)
        self.log.info("%s: %d partition(s) dropped, %d kept, %d younger than %s", self.table, len(dropped),
                      len(kept), sum(1 for d in decisions if d.young), spec.hot_retention)
        if kept:
            raise AirflowException("; ".join(d.line() for d in kept))
        return [d.to_dict() for d in decisions]
