"""A warehouse on S3 or an S3-compatible store: the settings travel through the environment,
become Iceberg's S3FileIO conf (secrets only in the session conf set at run time, never on
spark-submit's command line), pyiceberg's FileIO properties and pyarrow's S3 options."""

from __future__ import annotations

import pytest

from k2 import iceberg as ib
from k2.offload import spark_submit_command
from k2.runtime_env import SECRET_VARIABLES, IcebergSettings

S3 = IcebergSettings("k2", "postgresql://db:5432/k2", "k2", "jdbc-secret", "s3://k2-warehouse/warehouse",
                     s3_endpoint="http://127.0.0.1:7070", s3_region="us-east-1",
                     s3_access_key_id="AKIDK2", s3_secret_access_key="s3-secret-value",
                     s3_path_style_access=True)
LOCAL = IcebergSettings("k2", "postgresql://db:5432/k2", "k2", "jdbc-secret", "file:///var/k2/warehouse")


def test_the_settings_round_trip_through_the_environment_and_the_secret_is_a_secret_variable() -> None:
    env = S3.to_env()
    assert IcebergSettings.from_env(env) == S3
    assert "K2_S3_SECRET_ACCESS_KEY" in SECRET_VARIABLES and env["K2_S3_SECRET_ACCESS_KEY"] == "s3-secret-value"
    # a warehouse on a path carries no S3 variables
    assert not any(name.startswith("K2_S3_") for name in LOCAL.to_env())
    assert IcebergSettings.from_env(LOCAL.to_env()) == LOCAL


def test_spark_gets_an_s3_capable_file_io_with_the_keys_only_in_the_secret_conf() -> None:
    conf, secret = ib.spark_conf(S3), ib.spark_secret_conf(S3)
    assert conf["spark.sql.catalog.k2.io-impl"] == "org.apache.iceberg.io.ResolvingFileIO"
    assert conf["spark.sql.catalog.k2.s3.endpoint"] == "http://127.0.0.1:7070"
    assert conf["spark.sql.catalog.k2.s3.path-style-access"] == "true"
    assert conf["spark.sql.catalog.k2.client.region"] == "us-east-1"
    assert secret["spark.sql.catalog.k2.s3.secret-access-key"] == "s3-secret-value"
    assert secret["spark.sql.catalog.k2.s3.access-key-id"] == "AKIDK2"
    argv = spark_submit_command(["--table", "t"], master="local[2]", jars=[], conf=conf)
    assert not [arg for arg in argv if "s3-secret-value" in arg or "AKIDK2" in arg or "jdbc-secret" in arg]
    # on a path: Hadoop's file IO, no S3 keys anywhere
    assert not [key for key in {**ib.spark_conf(LOCAL), **ib.spark_secret_conf(LOCAL)} if ".s3." in key or "io-impl" in key]


def test_pyiceberg_and_pyarrow_reach_the_same_store_path_style() -> None:
    props = ib.pyiceberg_s3_properties(S3)
    assert props == {"s3.force-virtual-addressing": "false", "s3.endpoint": "http://127.0.0.1:7070",
                     "s3.region": "us-east-1", "s3.access-key-id": "AKIDK2",
                     "s3.secret-access-key": "s3-secret-value"}
    assert ib.pyiceberg_s3_properties(LOCAL) == {}
    options = ib.arrow_s3_options(S3)
    assert options == {"force_virtual_addressing": False, "endpoint_override": "127.0.0.1:7070",
                       "scheme": "http", "region": "us-east-1", "access_key": "AKIDK2",
                       "secret_key": "s3-secret-value"}


@pytest.mark.parametrize(("location", "path"), [
    ("s3://k2-warehouse/warehouse/cold/t/data/pair=ETH%2FUSD/f.parquet",
     "k2-warehouse/warehouse/cold/t/data/pair=ETH%2FUSD/f.parquet"),
    ("file:/var/k2/warehouse/cold/t/data/pair=ETH%2FUSD/f.parquet",
     "/var/k2/warehouse/cold/t/data/pair=ETH%2FUSD/f.parquet"),
    ("file:///var/k2/w/f.parquet", "/var/k2/w/f.parquet"),
])
def test_a_data_file_location_keeps_its_escapes_on_either_store(location: str, path: str) -> None:
    import pyarrow.fs as pafs

    fs, found = ib.arrow_filesystem(location, ib.arrow_s3_options(S3))
    assert found == path
    assert isinstance(fs, pafs.S3FileSystem if location.startswith("s3") else pafs.LocalFileSystem)
