"""The predecessor's offload path, for benchmarks/offload.py: one interval of a table read
from ClickHouse with Spark's JDBC source and the official ClickHouse JDBC driver, appended
to an Iceberg table. No checks (no counts, no checksums, no replace): what the system this
project replaces did.

    spark-submit --jars <spark_jobs/jars/*>,<spark_jobs/bench-jars/*> benchmarks/predecessor_jdbc.py \\
        --table bronze_trades_binance --iceberg-table cold.bench_predecessor_1000 \\
        --interval-start 2026-11-30T10:00:00+00:00 --interval-end 2026-11-30T10:15:00+00:00

Connection settings come from the environment, as for the offload job (K2_CLICKHOUSE_*,
K2_ICEBERG_*; k2.runtime_env). The Iceberg table must exist (the benchmark creates it with
the schema and partitioning of the offload's table). The read is split by event time into
as many JDBC partitions as Spark's default parallelism, the parallelism of the job's reads.
`compress=false`, as in the runs docs/performance.md reports: the driver's default asks for
ClickHouse's own compressed framing of every response, which the local endpoint did not
speak then; it does now (tests/integration/test_clickhouse_jdbc.py reads with the defaults).
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

DRIVER = "com.clickhouse.jdbc.ClickHouseDriver"


def _utc_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone")
    return value.astimezone(timezone.utc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="clickhouse_table from tables.yaml")
    parser.add_argument("--iceberg-table", required=True, help="namespace.table to append to")
    parser.add_argument("--interval-start", required=True, type=_utc_time)
    parser.add_argument("--interval-end", required=True, type=_utc_time)
    args = parser.parse_args()

    from pyspark.sql import SparkSession

    from k2 import iceberg as ib
    from k2.checksum import to_epoch_ms
    from k2.config import load_tables
    from k2.runtime_env import ClickHouseSettings, IcebergSettings

    spec = load_tables().get(args.table)
    # The same table spec, appending to another Iceberg table (spark_table_name checks the name).
    spec = spec.model_copy(update={"iceberg_table": args.iceberg_table})
    ch = ClickHouseSettings.from_env()
    ice = IcebergSettings.from_env()
    target = ib.spark_table_name(ice, spec)

    builder = SparkSession.builder.appName(f"k2-predecessor-{spec.name}")
    for key, value in {**ib.spark_conf(ice), **ib.spark_secret_conf(ice)}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    try:
        column = f"`{spec.event_time_column}`"  # identifiers validated by TableSpec
        interval = (
            f"(SELECT * FROM `{spec.source}` "
            f"WHERE {column} >= fromUnixTimestamp64Milli({to_epoch_ms(args.interval_start)}, 'UTC') "
            f"AND {column} < fromUnixTimestamp64Milli({to_epoch_ms(args.interval_end)}, 'UTC')) "
            "AS k2_interval"
        )
        scheme = "https" if ch.secure else "http"
        rows = (
            spark.read.format("jdbc")
            .option("url", f"jdbc:clickhouse:{scheme}://{ch.host}:{ch.port}/{ch.database}")
            .option("driver", DRIVER)
            .option("compress", "false")
            .option("user", ch.user)
            .option("password", ch.password)  # from the environment, never the command line
            .option("dbtable", interval)
            .option("partitionColumn", spec.event_time_column)
            .option("lowerBound", args.interval_start.strftime("%Y-%m-%d %H:%M:%S"))
            .option("upperBound", args.interval_end.strftime("%Y-%m-%d %H:%M:%S"))
            .option("numPartitions", str(spark.sparkContext.defaultParallelism))
            .load()
        )
        rows.writeTo(target).append()
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
