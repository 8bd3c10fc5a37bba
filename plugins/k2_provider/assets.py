"""The offloaded tables as Airflow Assets: what a consumer DAG schedules on.

Each offload DAG's commit task declares an AssetAlias as its outlet and, for every interval
its run offloaded and committed, adds one event of the table's Asset with the extras
{table, iceberg_table, interval_start, interval_end, snapshot_id, rows, checksum}. An alias
because Airflow 3.3 records one event per task run for a plain Asset outlet, and one per
distinct extra through an alias: a catch-up batch of 16 intervals is 16 events, each naming
its interval and snapshot. A run whose interval an earlier batch already offloaded adds none.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias

from k2.config import TableSpec
from k2.lineage import iceberg_asset_name, iceberg_asset_uri

DEFAULT_CATALOG = "k2"  # the iceberg_default connection's catalog_name on the local stack
ASSET_GROUP = "iceberg"


def iceberg_table_asset(spec: TableSpec, catalog_name: str = DEFAULT_CATALOG) -> Asset:
    """The table's Asset: iceberg://<catalog>/<namespace>/<table> (k2.lineage)."""
    return Asset(name=iceberg_asset_name(catalog_name, spec), uri=iceberg_asset_uri(catalog_name, spec),
                 group=ASSET_GROUP)


def committed_alias(dag_id: str) -> AssetAlias:
    """The commit task's outlet, through which it adds one event per committed interval."""
    return AssetAlias(name=f"{dag_id}__committed")
