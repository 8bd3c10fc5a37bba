"""Airflow DAG k2_hot_retention: ClickHouse partitions older than hot_retention, dropped behind a verified offload."""

from k2_dag_factory import build_retention_dag

dag = build_retention_dag()
