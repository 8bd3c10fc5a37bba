"""Where the offload's data is, named for Airflow Assets and OpenLineage: one place for the
names a consumer subscribes to and a lineage backend shows.

- The Iceberg table as an Airflow Asset: ``iceberg://<catalog>/<namespace>/<table>`` (no
  Airflow provider registers an ``iceberg`` scheme; this one names the catalog as the
  ``iceberg_default`` connection's ``catalog_name`` and the table as in tables.yaml).
- OpenLineage datasets, after the naming the OpenLineage integrations use (the spec lists
  neither engine): ClickHouse ``clickhouse://<host>:<port>`` / ``<database>.<table>``; an
  Iceberg table by its location, as OpenLineage's Spark integration names it - a path:
  namespace ``file``, name the absolute path; S3: namespace ``s3://<bucket>``, name the key
  prefix - with the catalog's name of the table as a symlink.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from k2.config import TableSpec

ICEBERG_SCHEME = "iceberg"


def iceberg_asset_uri(catalog_name: str, spec: TableSpec) -> str:
    namespace, table = spec.iceberg_table.split(".", 1)
    return f"{ICEBERG_SCHEME}://{catalog_name}/{namespace}/{table}"


def iceberg_asset_name(catalog_name: str, spec: TableSpec) -> str:
    return f"{catalog_name}.{spec.iceberg_table}"


@dataclass(frozen=True)
class DatasetName:
    namespace: str
    name: str


def clickhouse_dataset(host: str, port: int, database: str, table: str) -> DatasetName:
    return DatasetName(f"clickhouse://{host}:{port}", f"{database}.{table}")


def table_location(warehouse: str, spec: TableSpec) -> str:
    """Where the JDBC catalog puts a new table: <warehouse>/<namespace>/<table>."""
    namespace, table = spec.iceberg_table.split(".", 1)
    return f"{warehouse.rstrip('/')}/{namespace}/{table}"


def iceberg_dataset(location: str) -> DatasetName:
    """An Iceberg table's OpenLineage name from its location (file:/..., file:///..., s3://b/k)."""
    parts = urlsplit(location)
    if parts.scheme in ("", "file"):
        return DatasetName("file", "/" + parts.path.lstrip("/"))
    return DatasetName(f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/"))
