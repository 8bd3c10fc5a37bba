"""A short Spark job whose driver JVM archives the classes it loads (AppCDS), so that every
later job on the local stack maps them instead of loading and verifying them again.

`make setup` runs it through k2.local.spark_archive with -XX:ArchiveClassesAtExit. It walks
the offload job's paths on a throwaway Hadoop catalog: a session with Iceberg's extensions,
a partitioned table, an Arrow UDF, an append, a staged (WAP) overwrite and its cherry-pick,
a MERGE, a time-travel read and aggregates over decimals. Nothing it writes is kept.
"""

from __future__ import annotations

import shutil
import sys
import tempfile


def main() -> int:
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    warehouse = tempfile.mkdtemp(prefix="k2-class-archive-")
    spark = (
        SparkSession.builder.appName("k2-class-archive")
        .config("spark.sql.extensions", "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions")
        .config("spark.sql.catalog.warm", "org.apache.iceberg.spark.SparkCatalog")
        .config("spark.sql.catalog.warm.type", "hadoop")
        .config("spark.sql.catalog.warm.warehouse", warehouse)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    try:
        table = "warm.ns.trades"
        spark.sql(
            f"CREATE TABLE {table} (symbol STRING, trade_id BIGINT, event_time TIMESTAMP, "
            "price DECIMAL(18, 8), side STRING) USING iceberg "
            "PARTITIONED BY (days(event_time), symbol) TBLPROPERTIES ('write.wap.enabled'='true')"
        )
        rows = spark.range(2000).selectExpr(
            "concat('SYM', cast(id % 3 AS STRING)) AS symbol", "id AS trade_id",
            "timestamp_seconds(1764633600 + id) AS event_time",
            "cast(id / 7 AS DECIMAL(18, 8)) AS price", "if(id % 2 = 0, 'buy', 'sell') AS side",
        )

        def passthrough(batches):
            yield from batches

        rows.mapInArrow(passthrough, rows.schema).writeTo(table).append()
        spark.conf.set("spark.wap.id", "warm-up")
        rows.where("symbol = 'SYM0'").writeTo(table).overwrite(F.col("symbol") == "SYM0")
        spark.conf.unset("spark.wap.id")
        staged = spark.sql(f"SELECT snapshot_id FROM {table}.snapshots ORDER BY committed_at DESC").first()[0]
        spark.sql(f"CALL warm.system.cherrypick_snapshot('warm.ns.trades', {staged})")
        spark.sql(
            f"MERGE INTO {table} t USING (SELECT * FROM {table} WHERE trade_id < 10) s "
            "ON t.symbol = s.symbol AND t.trade_id = s.trade_id "
            "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
        )
        spark.sql(
            f"SELECT symbol, count(*), sum(price), sum(hash(trade_id)) FROM {table} "
            f"VERSION AS OF {staged} GROUP BY symbol"
        ).collect()
        count = spark.table(table).count()
    finally:
        spark.stop()
        shutil.rmtree(warehouse, ignore_errors=True)
    print(f"class archive warm-up: {count} rows written and read back")
    return 0 if count == 2000 else 1


if __name__ == "__main__":
    sys.exit(main())
