"""Airflow DAGs k2_offload_<table>: one per table in include/config/tables.yaml, made by k2_dag_factory."""

from k2_dag_factory import build_dags

globals().update(build_dags())
