"""The official ClickHouse JDBC driver (com.clickhouse:clickhouse-jdbc, the predecessor's) against
the local ClickHouse endpoint, with the driver's default settings: it asks for ClickHouse's own
compressed framing of every response (`compress=1`), which the endpoint once refused with 501.

Directly, through tests/integration/java/JdbcCheck.java (Java runs a single source file), and
through Spark's JDBC source, as the predecessor's offload read. The jars are those `make setup`
copies to spark_jobs/bench-jars (spark_jobs/pom.xml, profile predecessor-bench).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from decimal import Decimal, localcontext
from pathlib import Path

import pytest

# The endpoint fixture of the endpoint's own tests: one endpoint for this module, started as
# `k2 local up` starts it.
from tests.integration.test_clickhouse_endpoint import Endpoint, endpoint  # noqa: F401

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_JARS = REPO / "spark_jobs" / "bench-jars"
JDBC_CHECK = Path(__file__).resolve().parent / "java" / "JdbcCheck.java"
ROWS = 100_000
COLUMNS = ("(id UInt64, big UInt64, ts DateTime64(3, 'UTC'), amount Decimal(38, 18), "
           "venue LowCardinality(String), qty Nullable(Int64)) ENGINE = MergeTree ORDER BY id")
# The formulas JdbcCheck.java checks every value against, for ids 0 .. ROWS - 1.
SOURCE_ROWS = f"""
    SELECT number, 18446744073709551615 - number,
        fromUnixTimestamp64Milli(toInt64(1700000000123 + number * 1001), 'UTC'),
        toDecimal128(concat(if(number % 2 = 0, '', '-'), toString(number), '000000000000.',
                            leftPad(toString(number), 18, '0')), 18),
        ['binance', 'kraken', 'bitstamp-€'][number % 3 + 1],
        if(number % 7 = 0, NULL, -3 * toInt64(number))
    FROM numbers({ROWS})"""
# The batches JdbcCheck.java inserts: (first id, size); the second with request compression.
BATCHES = ((1_000_000, 1000), (2_000_000, 100))


def _amount(i: int) -> Decimal:  # i * 10^12 + i * 10^-18, negative for odd i
    return Decimal(f"{'' if i % 2 == 0 else '-'}{i}{'0' * 12}.{i:018d}")


def _qty(i: int) -> int | None:
    return None if i % 7 == 0 else -3 * i


def _jdbc_url(server: Endpoint) -> str:
    return f"jdbc:clickhouse:http://{server.host}:{server.port}/default"


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest):
    """The endpoint with jdbc_src filled and jdbc_dst empty; a clickhouse-connect client."""
    if not any(BENCH_JARS.glob("clickhouse-jdbc-*.jar")):
        pytest.fail(f"no ClickHouse JDBC driver in {BENCH_JARS}: run `make setup`")
    server: Endpoint = request.getfixturevalue("endpoint")
    client = server.client()
    for table in ("jdbc_src", "jdbc_dst"):
        client.command(f"DROP TABLE IF EXISTS {table}")
        client.command(f"CREATE TABLE {table} {COLUMNS}")
    client.command(f"INSERT INTO jdbc_src {SOURCE_ROWS}")
    yield server, client
    client.close()


def _env(server: Endpoint) -> dict[str, str]:  # the password never on a command line
    return {**os.environ, "K2_CLICKHOUSE_PASSWORD": server.password}


def test_jdbc_driver_with_default_settings_reads_and_batch_inserts(served) -> None:
    server, client = served
    java = shutil.which("java")
    assert java, "Java 17 is required (make setup checks for it)"
    run = subprocess.run(
        [java, "-cp", f"{BENCH_JARS}/*", str(JDBC_CHECK), _jdbc_url(server), server.user,
         str(ROWS)],
        env=_env(server), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split("\n")[:5] == [
        f"read {ROWS}", "batch 1000000 1000", "error UNKNOWN_TABLE", "batch 2000000 100", ""]
    # What the driver wrote, value by value, read back with clickhouse-connect
    rows = client.query(
        "SELECT id, big, toUnixTimestamp64Milli(ts), amount, venue, qty FROM jdbc_dst "
        "ORDER BY id").result_rows
    expected = [
        (i, 2**64 - 1 - j, 1_700_000_000_123 + i * 1001, _amount(i),
         "it's a \\ back'slash" if j % 10 == 0 else ("binance", "kraken", "bitstamp-€")[i % 3],
         _qty(i))
        for first, size in BATCHES for j in range(size) for i in (first + j,)]
    assert rows == expected


SPARK_READ = """
import glob, json, os, sys
from pyspark.sql import SparkSession, functions as F

url, user, jars = sys.argv[1:4]
spark = (SparkSession.builder.master("local[2]").appName("k2-jdbc-endpoint-check")
         .config("spark.jars", ",".join(sorted(glob.glob(os.path.join(jars, "*.jar")))))
         .config("spark.ui.enabled", "false").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
try:
    frame = (spark.read.format("jdbc").option("url", url)
             .option("driver", "com.clickhouse.jdbc.ClickHouseDriver")
             .option("user", user).option("password", os.environ["K2_CLICKHOUSE_PASSWORD"])
             .option("dbtable", "(SELECT id, ts, amount, venue, qty FROM jdbc_src) AS src")
             .option("partitionColumn", "id").option("lowerBound", "0")
             .option("upperBound", sys.argv[4]).option("numPartitions", "2").load())
    row = frame.agg(F.count("*").alias("rows"), F.sum("id").alias("ids"),
                    F.count("qty").alias("qtys"), F.sum("qty").alias("qty"),
                    F.sum("amount").alias("amount"), F.countDistinct("venue").alias("venues"),
                    F.unix_millis(F.min("ts")).alias("first"),
                    F.unix_millis(F.max("ts")).alias("last")).collect()[0]
    print(json.dumps({"schema": frame.schema.simpleString(),
                      **{key: str(value) for key, value in row.asDict().items()}}))
finally:
    spark.stop()
"""


def test_spark_jdbc_source_reads_through_the_endpoint(served) -> None:
    server, _ = served
    run = subprocess.run(
        [sys.executable, "-c", SPARK_READ, _jdbc_url(server), server.user, str(BENCH_JARS),
         str(ROWS)],
        env=_env(server), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ids = range(ROWS)
    with localcontext() as exact:
        exact.prec = 60  # 35 significant digits a value, more for the sum
        amount = sum(_amount(i) for i in ids).quantize(Decimal(10) ** -18)
    assert got == {
        "schema": "struct<id:decimal(20,0),ts:timestamp,amount:decimal(38,18),venue:string,"
                  "qty:bigint>",
        "rows": str(ROWS),
        "ids": str(sum(ids)),
        "qtys": str(sum(1 for i in ids if _qty(i) is not None)),
        "qty": str(sum(_qty(i) or 0 for i in ids)),
        "amount": str(amount),
        "venues": "3",
        "first": str(1_700_000_000_123),
        "last": str(1_700_000_000_123 + (ROWS - 1) * 1001),
    }
