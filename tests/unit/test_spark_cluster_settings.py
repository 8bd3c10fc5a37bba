"""The local Spark cluster's settings: ports from the environment, the master the local
stack's jobs use, and the daemons' command lines (loopback, pyspark's own spark-class)."""

from __future__ import annotations

import os

import pytest

from k2.local import spark_cluster as sc


def test_ports_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(sc.MASTER_PORT_ENV, "17077")
    monkeypatch.setenv(sc.MASTER_UI_PORT_ENV, "18081")
    monkeypatch.setenv(sc.WORKER_UI_PORTS_ENV, "18082,18083")
    cluster = sc.SparkCluster.from_env(tmp_path)
    assert (cluster.master_url, cluster.master_ui) == ("spark://127.0.0.1:17077", "http://127.0.0.1:18081")
    assert cluster.worker_ui_ports == (18082, 18083)


def test_a_wrong_number_of_worker_ports_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(sc.WORKER_UI_PORTS_ENV, "18082")
    with pytest.raises(ValueError, match="K2_SPARK_WORKER_UI_PORTS needs 2 ports"):
        sc.SparkCluster.from_env(tmp_path)


def test_jobs_use_the_running_cluster_else_local(tmp_path, monkeypatch):
    monkeypatch.delenv("K2_SPARK_MASTER", raising=False)
    monkeypatch.delenv(sc.MASTER_PORT_ENV, raising=False)
    assert sc.spark_master(tmp_path) == "local[2]"  # no master pid file
    pid_file = sc.MASTER.pid_file(sc.SparkCluster.from_env(tmp_path))  # a live process holds it
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{os.getpid()}\n")
    assert sc.spark_master(tmp_path) == "spark://127.0.0.1:7077"
    monkeypatch.setenv("K2_SPARK_MASTER", "spark://elsewhere:7077")
    assert sc.spark_master(tmp_path) == "spark://elsewhere:7077"


def test_daemons_run_spark_class_on_loopback(tmp_path):
    cluster = sc.SparkCluster(home=tmp_path, master_port=17077, master_ui_port=18081, worker_ui_ports=(18082, 18083))
    master = sc.MASTER.argv(cluster)
    assert master[0].endswith("bin/spark-class") and (sc.spark_home() / "bin" / "spark-class").exists()
    assert master[1:] == ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", "17077",
                          "--webui-port", "18081"]
    worker = sc.WORKER_DAEMONS[1].argv(cluster)
    assert worker[-1] == "spark://127.0.0.1:17077" and "--work-dir" in worker
    assert worker[worker.index("--webui-port") + 1] == "18083"
    assert sc.MASTER.env(cluster)["SPARK_LOCAL_IP"] == "127.0.0.1"
