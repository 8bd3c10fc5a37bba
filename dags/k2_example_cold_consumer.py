"""Airflow DAG k2_example_cold_consumer: an example downstream DAG scheduled on the cold tier's Assets."""

from k2_dag_factory import build_example_consumer_dag

dag = build_example_consumer_dag()
