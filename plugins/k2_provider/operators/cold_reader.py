"""Operator: read what the asset events that triggered the run announce - each committed
interval of an offloaded table - from Iceberg, and log a summary of each (the example
consumer of the cold tier; a research job or a backtest would start from the same events)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowException

from k2.config import load_tables
from k2.consumer import summarize_interval
from k2.iceberg import load_catalog
from k2_provider.hooks.connections import ICEBERG_CONN_ID, iceberg_settings

if TYPE_CHECKING:
    from airflow.sdk import Context

EVENT_KEYS = ("table", "interval_start", "interval_end", "snapshot_id", "rows")


class ColdTierReaderOperator(BaseOperator):
    """For every triggering event of ``assets`` (k2_provider.assets: extras table,
    interval_start, interval_end, snapshot_id, rows), read that interval of that snapshot
    from Iceberg as Arrow batches and log one summary line; fail when the rows read differ
    from the rows the event announced. Returns the summaries (XCom).

    :param assets: the table Assets the DAG is scheduled on.
    :param iceberg_conn_id: the Iceberg catalog's connection.
    """

    ui_color = "#e8f0fe"

    def __init__(self, *, assets: Sequence[Asset], iceberg_conn_id: str = ICEBERG_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.assets = list(assets)
        self.iceberg_conn_id = iceberg_conn_id

    def execute(self, context: Context) -> list[dict[str, Any]]:
        triggering = context["triggering_asset_events"]
        events = [(asset, event) for asset in self.assets for event in triggering.get(asset, ())]
        for asset, event in events:  # every event checked before anything is read
            missing = [k for k in EVENT_KEYS if (event.extra or {}).get(k) is None]
            if missing:  # e.g. an event created by hand through the API
                raise AirflowException(
                    f"asset event of {asset.uri} from {event.source_dag_id} {event.source_run_id} "
                    f"lacks {missing}: not an offload's event (extra {event.extra!r})"
                )
        catalog = load_catalog(iceberg_settings(self.iceberg_conn_id))
        tables = load_tables()
        summaries: list[dict[str, Any]] = []
        for asset, event in events:
            extra = event.extra
            spec = tables.get(str(extra["table"]))
            summary = summarize_interval(catalog, spec, extra["interval_start"], extra["interval_end"],
                                         int(extra["snapshot_id"]))
            self.log.info("%s (from %s %s)", summary.line(), event.source_dag_id, event.source_run_id)
            if summary.rows != int(extra["rows"]):
                raise AirflowException(f"{summary.line()}: the asset event announced {extra['rows']} rows")
            summaries.append({"asset": asset.uri, "source_run_id": event.source_run_id,
                              "interval_start": summary.interval_start.isoformat(),
                              "interval_end": summary.interval_end.isoformat(),
                              "snapshot_id": summary.snapshot_id, "rows": summary.rows, "keys": summary.keys})
        self.log.info("%d interval(s) read", len(summaries))
        return summaries
