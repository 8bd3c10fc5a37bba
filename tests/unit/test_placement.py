"""k2_dag_factory.Placement: one table's offload DAG placed on other engines (an executor, the
Spark, Iceberg and watermark-store connections, the job's read parallelism) under its own
dag_id; the default placement is the bundle's."""

from __future__ import annotations

from k2.config import load_tables
from k2_dag_factory import DEFAULT_PLACEMENT, TASK_COMMIT, TASK_OFFLOAD, TASK_SENSOR, Placement, build_dag

SPEC = load_tables().get("bronze_trades_kraken")


def test_a_placement_routes_every_task_and_connection() -> None:
    dag = build_dag(SPEC, Placement(dag_id_suffix="__cluster", executor="CeleryExecutor",
                                    spark_conn_id="spark_cluster", iceberg_conn_id="iceberg_s3",
                                    watermarks_conn_id="k2_watermarks_s3", driver_max_rows=0, slices=4,
                                    tags=("scale-out",)))
    assert dag.dag_id == SPEC.dag_id + "__cluster" and "scale-out" in dag.tags
    assert {task.executor for task in dag.tasks} == {"CeleryExecutor"}
    offload, commit = dag.get_task(TASK_OFFLOAD), dag.get_task(TASK_COMMIT)
    assert offload._conn_id == "spark_cluster"
    assert (offload.iceberg_conn_id, offload.postgres_conn_id) == ("iceberg_s3", "k2_watermarks_s3")
    assert (offload.driver_max_rows, offload.slices) == (0, 4)
    assert commit.postgres_conn_id == "k2_watermarks_s3"
    assert [alert.name for alert in dag.deadline] == [f"{SPEC.dag_id}__cluster_deadline"]


def test_the_default_placement_is_the_bundles() -> None:
    dag = build_dag(SPEC, DEFAULT_PLACEMENT)
    assert dag.dag_id == SPEC.dag_id
    assert {task.executor for task in dag.tasks} == {None}
    offload = dag.get_task(TASK_OFFLOAD)
    assert (offload._conn_id, offload.iceberg_conn_id, offload.postgres_conn_id) == (
        "spark_default", "iceberg_default", "k2_watermarks")
    assert (offload.driver_max_rows, offload.slices) == (None, None)
    assert dag.get_task(TASK_SENSOR).clickhouse_conn_id == "clickhouse_default"
