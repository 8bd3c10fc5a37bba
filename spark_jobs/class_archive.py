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
        java_api(spark, "warm.ns.trades")
        count = spark.table(table).count()
        jdbc_catalog(spark)
    finally:
        spark.stop()
        shutil.rmtree(warehouse, ignore_errors=True)
    print(f"class archive warm-up: {count} rows written and read back")
    return 0 if count == 2000 else 1


def java_api(spark, name: str) -> None:
    """The Iceberg Java calls the offload job's driver makes (py4j): the table's schema as
    Spark's, file metrics of a new data file, a staged overwrite by filter with its
    validations, a fast-forward of main, and a scan plan of a snapshot."""
    jvm = spark.sparkContext._jvm
    iceberg = jvm.org.apache.iceberg
    table = jvm.org.apache.iceberg.spark.Spark3Util.loadIcebergTable(spark._jsparkSession, name)
    table.refresh()
    iceberg.spark.SparkSchemaUtil.convert(table.schema()).json()
    expressions = iceberg.expressions.Expressions
    sym1 = expressions.equal("symbol", "SYM1")
    tasks = table.newScan().useSnapshot(table.currentSnapshot().snapshotId()).filter(sym1).planFiles()
    iterator = tasks.iterator()
    task = iterator.next()
    task.deletes().isEmpty()
    source = str(task.file().location())
    tasks.close()
    copy = source.replace(".parquet", "-copy.parquet")
    shutil.copyfile(source.removeprefix("file:"), copy.removeprefix("file:"))
    metrics = iceberg.parquet.ParquetUtil.fileMetrics(
        table.io().newInputFile(copy), iceberg.MetricsConfig.forTable(table))
    values = jvm.java.util.ArrayList()
    values.add("2025-12-02")  # days(event_time) of every row written above
    values.add("SYM1")
    data_file = iceberg.DataFiles.builder(table.spec()).withPath(copy).withFormat("parquet") \
        .withFileSizeInBytes(task.file().fileSizeInBytes()).withMetrics(metrics) \
        .withPartitionValues(values).build()
    base = table.currentSnapshot().snapshotId()
    table.newOverwrite().overwriteByRowFilter(sym1).validateAddedFilesMatchOverwriteFilter() \
        .validateFromSnapshot(base).conflictDetectionFilter(sym1).validateNoConflictingData() \
        .validateNoConflictingDeletes().addFile(data_file).set("k2.warm-up", "1") \
        .set("wap.id", "warm-up-2").stageOnly().commit()
    table.refresh()
    staged = [s for s in table.snapshots() if s.summary().get("wap.id") == "warm-up-2"][0]
    table.manageSnapshots().createBranch("k2-warm", staged.snapshotId()) \
        .fastForwardBranch("main", "k2-warm").removeBranch("k2-warm").commit()
    table.refresh()


def jdbc_catalog(spark) -> None:
    """A JDBC catalog's classes (PostgreSQL's driver included), up to the refused connection:
    no database runs while the archive is made."""
    spark.conf.set("spark.sql.catalog.jdbcwarm", "org.apache.iceberg.spark.SparkCatalog")
    spark.conf.set("spark.sql.catalog.jdbcwarm.catalog-impl", "org.apache.iceberg.jdbc.JdbcCatalog")
    spark.conf.set("spark.sql.catalog.jdbcwarm.uri", "jdbc:postgresql://127.0.0.1:9/none")
    spark.conf.set("spark.sql.catalog.jdbcwarm.jdbc.user", "none")
    spark.conf.set("spark.sql.catalog.jdbcwarm.jdbc.password", "none")
    spark.conf.set("spark.sql.catalog.jdbcwarm.warehouse", "file:/nonexistent")
    try:
        spark.sql("SHOW NAMESPACES IN jdbcwarm").collect()
    except Exception:  # connection refused: expected
        pass


if __name__ == "__main__":
    sys.exit(main())
