"""Airflow DAG k2_iceberg_maintenance: compaction, snapshot expiry and orphan removal of the Iceberg tables."""

from k2_dag_factory import build_maintenance_dag

dag = build_maintenance_dag()
