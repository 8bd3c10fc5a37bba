"""OpenLineage of an offload: the ClickHouse table read, the Iceberg table written, and what
the run wrote (rows, bytes) as the output's statistics. Names: k2.lineage. The
offload operator reports it through the openlineage provider's operator methods
(get_openlineage_facets_on_start / _complete / _failure); the provider's listener sends the
START, COMPLETE or FAIL run events through the configured transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2.config import TableSpec
from k2.lineage import ICEBERG_SCHEME, clickhouse_dataset, iceberg_dataset, table_location
from k2.runtime_env import ClickHouseSettings, IcebergSettings


@dataclass(frozen=True)
class Written:
    rows: int
    bytes: int  # of the data files the job's commits added


def operator_lineage(spec: TableSpec, clickhouse: ClickHouseSettings, iceberg: IcebergSettings,
                     written: Written | None = None) -> Any:
    """OperatorLineage: input the ClickHouse table, output the Iceberg table (by location, with
    the catalog's name as a symlink), its statistics when the run wrote something."""
    from airflow.providers.common.compat.openlineage.facet import (
        Identifier,
        InputDataset,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
        SymlinksDatasetFacet,
    )
    from airflow.providers.openlineage.extractors import OperatorLineage

    source = clickhouse_dataset(clickhouse.host, clickhouse.port, clickhouse.database, spec.source)
    target = iceberg_dataset(table_location(iceberg.warehouse, spec))
    symlink = SymlinksDatasetFacet(identifiers=[Identifier(
        namespace=f"{ICEBERG_SCHEME}://{iceberg.catalog_name}", name=spec.iceberg_table, type="TABLE")])
    output_facets = {}
    if written is not None:
        output_facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(
            rowCount=written.rows, size=written.bytes)
    return OperatorLineage(
        inputs=[InputDataset(namespace=source.namespace, name=source.name)],
        outputs=[OutputDataset(namespace=target.namespace, name=target.name, facets={"symlinks": symlink},
                               outputFacets=output_facets)],
    )
