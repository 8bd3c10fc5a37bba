"""Offload one interval of one table from ClickHouse (hot tier) to Iceberg (cold tier).

    spark-submit --jars <iceberg-spark-runtime>,<postgresql> spark_jobs/offload_to_iceberg.py \\
        --table bronze_trades_binance \\
        --interval-start 2026-11-26T10:00:00+00:00 --interval-end 2026-11-26T10:15:00+00:00 \\
        --run-id <airflow run id> [--tables-config path] [--slices N]

Connection settings come from the environment (k2.runtime_env: K2_CLICKHOUSE_*,
K2_ICEBERG_*), never from the command line. The last line on stdout is

    K2_OFFLOAD_RESULT {"table": ..., "rows": ..., "checksum": ..., "snapshot_id": ..., ...}

How it works:

1. DESCRIBE the source in ClickHouse; derive the Iceberg/Spark schema (k2.iceberg);
   create namespace and table when missing (partition spec from tables.yaml).
2. ClickHouse counts and checksums the interval itself (k2.checksum's SQL).
3. The executors read the interval as Arrow (clickhouse-connect, ArrowStream) in N
   time slices through mapInArrow - one task and one ClickHouse connection per
   slice; no JDBC, no rows on the driver. The result is persisted, counted and
   checksummed on the executors, and must equal ClickHouse's figures before
   anything is written. Duplicate unique keys in ClickHouse stop the run before
   Spark starts (an interval must hold one row per key to be replaceable).
4. One MERGE replaces the interval atomically (one Iceberg snapshot, tagged with
   k2.table / k2.interval-start / k2.interval-end / k2.run-id / k2.rows /
   k2.checksum / k2.attempt-id through spark.sql.iceberg.snapshot-property.*):
   every row the table holds in the interval is deleted and every ClickHouse row of
   the interval inserted (see merge_sql). Re-running an interval therefore replaces
   it - also after compaction, because MERGE rewrites rows, not whole files by a
   filter - and concurrent runs of one interval conflict (serializable isolation);
   the loser re-plans its MERGE, which is safe because a MERGE never appends twice.

   The deletes are driven by 'D' rows in the MERGE source (the interval's existing
   keys) instead of `WHEN NOT MATCHED BY SOURCE`: with a NOT MATCHED BY SOURCE clause
   Spark cannot prune the target scan, so every MERGE would read and (copy-on-write)
   rewrite every file of the table - measured: a one-hour re-run rewrote all four
   hourly files. Without it the interval predicate in ON prunes the scan and only files
   holding the interval's rows are rewritten.

   An empty interval still commits a snapshot (Spark commits the MERGE even when it
   changes nothing), so "this interval was offloaded and had 0 rows" is findable
   with k2.iceberg.find_offload_snapshot like any other interval.
5. The committed snapshot is read back (VERSION AS OF) and its interval's count and
   checksum must equal ClickHouse's, else the job exits non-zero.

Deployment: the driver imports the `k2` package (installed in the submitting
virtualenv; in cluster deploy mode ship it with --py-files); the executors only need
pyarrow and clickhouse-connect - the slice reader is defined here and travels by value.

Exit status: 0 done, 2 bad arguments or settings, 1 anything else; the reason is the
line starting with "offload_to_iceberg: error:" (written to stderr, which spark-submit's
PythonRunner merges into its stdout; the result line is always the last line).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

STARTED = time.monotonic()
RESULT_PREFIX = "K2_OFFLOAD_RESULT"
SOURCE_VIEW = "k2_offload_rows"
MERGE_ATTEMPTS = 3  # a MERGE that lost a commit race is re-planned on the new table version
OP_COLUMN = "__k2_op"

log = logging.getLogger("k2.offload")


class UsageError(Exception):
    """Bad arguments or settings: exit status 2."""


class OffloadError(Exception):
    """The offload cannot proceed or its result does not check out: exit status 1."""


# --------------------------------------------------------------------------------------
# Arguments


def _utc_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone (e.g. 2026-11-26T10:00:00+00:00)")
    if value.microsecond % 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is finer than milliseconds")
    return value.astimezone(timezone.utc)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..1024")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit(2), with our prefix
        self.print_usage(sys.stderr)
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="offload_to_iceberg.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, help="clickhouse_table from tables.yaml")
    parser.add_argument("--interval-start", required=True, type=_utc_time, help="inclusive, ISO-8601 with zone")
    parser.add_argument("--interval-end", required=True, type=_utc_time, help="exclusive, ISO-8601 with zone")
    parser.add_argument("--run-id", required=True, help="the Airflow run id (recorded in the snapshot)")
    parser.add_argument("--tables-config", default=None, help="tables.yaml (default: the bundled one)")
    parser.add_argument("--slices", type=_positive, default=None,
                        help="parallel ClickHouse reads (default: Spark's default parallelism)")
    args = parser.parse_args(argv)
    if args.interval_end <= args.interval_start:
        raise UsageError("--interval-end must be after --interval-start")
    if not args.run_id.strip():
        raise UsageError("--run-id is empty")
    return args


# --------------------------------------------------------------------------------------
# Executor side: read one time slice of the interval from ClickHouse as Arrow


def slice_bounds(start_ms: int, end_ms: int, slices: int) -> list[tuple[int, int, int]]:
    """[start, end) cut into `slices` contiguous millisecond ranges (empty ones dropped)."""
    span = end_ms - start_ms
    cuts = [start_ms + (span * i) // slices for i in range(slices + 1)]
    return [(i, cuts[i], cuts[i + 1]) for i in range(slices) if cuts[i] < cuts[i + 1]]


def make_slice_reader(client_kwargs: dict[str, Any], select_sql: str,
                      schema_ipc: bytes) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The mapInArrow function. Everything it needs travels in its closure.

    client_kwargs holds the ClickHouse password: it reaches the executors inside the
    serialized task, not through a command line or the Spark conf.
    """

    def read(descriptors: Iterator[Any]) -> Iterator[Any]:
        import clickhouse_connect
        import pyarrow as pa

        target = pa.ipc.read_schema(pa.py_buffer(schema_ipc))
        client = clickhouse_connect.get_client(**client_kwargs)
        try:
            for batch in descriptors:
                for start_ms, end_ms in zip(batch.column("start_ms").to_pylist(),
                                            batch.column("end_ms").to_pylist()):
                    with client.query_arrow_stream(
                        select_sql,
                        parameters={"k2_start_ms": start_ms, "k2_end_ms": end_ms},
                        use_strings=True,
                    ) as stream:
                        for block in stream:
                            yield _conform(block, target)
        finally:
            client.close()

    return read


def _conform(block: Any, target: Any) -> Any:
    """Cast one ClickHouse Arrow block to the exact Arrow schema Spark expects.

    uint64 -> decimal128(20,0) and timestamp[ms] -> timestamp[us] are exact; casts are
    `safe`, so an impossible value fails the task instead of being changed.
    """
    import pyarrow as pa

    if isinstance(block, pa.Table):
        block = block.combine_chunks().to_batches()[0] if block.num_rows else pa.RecordBatch.from_pylist(
            [], schema=block.schema)
    columns = []
    for field in target:
        column = block.column(field.name)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if column.type != field.type:
            column = column.cast(field.type, safe=True)
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name!r} has NULLs but is not Nullable in ClickHouse's schema")
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=target)


# --------------------------------------------------------------------------------------
# Driver side


def _quote(name: str) -> str:
    return f"`{name}`"


def _ts_literal(value: datetime) -> str:
    return "TIMESTAMP '" + value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") + "+00:00'"


def interval_predicate(alias: str, column: str, start: datetime, end: datetime) -> str:
    col = f"{alias}.{_quote(column)}"
    return f"{col} >= {_ts_literal(start)} AND {col} < {_ts_literal(end)}"


def merge_sql(target: str, struct: Any, keys: list[str], event_time: str,
              start: datetime, end: datetime) -> str:
    """The MERGE that makes [start, end) of `target` hold exactly the rows of SOURCE_VIEW.

    Its source is the ClickHouse rows ('I') plus one 'D' row per distinct key the target
    holds in the interval. 'D' rows match every copy of their key in the interval and
    delete it; 'I' rows never match and are inserted. So the interval is replaced as a
    whole, in one commit: re-runs, late rows, rows gone from ClickHouse and even
    duplicates written by someone else all end as one copy of each ClickHouse row.
    The interval predicate in ON lets Iceberg prune the target to the interval's files
    (a WHEN NOT MATCHED BY SOURCE clause would make Spark scan and rewrite every file).
    The USING subquery is part of the statement, so it reads the table version the
    MERGE commits against (serializable isolation catches anything newer).
    """
    key_fields = {f.name: f for f in struct.fields if f.name in keys}
    match = " AND ".join(
        f"t.{_quote(k)} {'<=>' if key_fields[k].nullable else '='} s.{_quote(k)}" for k in keys
    )
    names = [f.name for f in struct.fields]
    cols = ", ".join(_quote(c) for c in names)
    placeholders = ", ".join(
        f"g.{_quote(f.name)}" if f.name in key_fields
        else f"CAST(NULL AS {f.dataType.simpleString()}) AS {_quote(f.name)}"
        for f in struct.fields
    )
    in_interval = interval_predicate("t", event_time, start, end)
    existing_keys = (
        f"SELECT DISTINCT {placeholders}, 'D' AS {OP_COLUMN} FROM {target} g "
        f"WHERE {interval_predicate('g', event_time, start, end)}"
    )
    return (
        f"MERGE INTO {target} t "
        f"USING (SELECT {cols}, 'I' AS {OP_COLUMN} FROM {SOURCE_VIEW} UNION ALL {existing_keys}) s "
        f"ON s.{OP_COLUMN} = 'D' AND {match} AND {in_interval} "
        f"WHEN MATCHED THEN DELETE "
        f"WHEN NOT MATCHED AND s.{OP_COLUMN} = 'I' THEN INSERT ({cols}) "
        f"VALUES ({', '.join(f's.{_quote(c)}' for c in names)})"
    )


def build_spark(iceberg_settings: Any, app_name: str) -> Any:
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    from k2.iceberg import spark_conf, spark_secret_conf

    submitted = SparkConf()  # what spark-submit / the Airflow operator already set wins
    builder = SparkSession.builder.appName(app_name)
    for key, value in spark_conf(iceberg_settings).items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    builder = builder.config("spark.sql.session.timeZone", "UTC")  # the SQL below assumes it
    for key, value in spark_secret_conf(iceberg_settings).items():
        if value:
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _phase(name: str, since: float) -> float:
    now = time.monotonic()
    log.info("%s done in %.2f s", name, now - since)
    return now


def offload(args: argparse.Namespace) -> dict[str, Any]:
    from k2 import checksum as ck
    from k2 import iceberg as ib
    from k2.config import ConfigError, load_tables
    from k2.runtime_env import ClickHouseSettings, IcebergSettings, MissingSetting

    try:
        spec = load_tables(args.tables_config).get(args.table)
        ch_settings = ClickHouseSettings.from_env()
        ice_settings = IcebergSettings.from_env()
    except (ConfigError, MissingSetting, ValueError) as exc:
        raise UsageError(str(exc)) from None
    start, end = args.interval_start, args.interval_end
    attempt_id = uuid.uuid4().hex
    log.info("offload %s [%s, %s) run_id=%s attempt=%s from %r to %s",
             spec.name, start.isoformat(), end.isoformat(), args.run_id, attempt_id, ch_settings,
             spec.iceberg_table)

    # 1-2. Source schema and ClickHouse's own figures for the interval (driver, metadata only)
    import clickhouse_connect

    t = time.monotonic()
    client_kwargs = ch_settings.client_kwargs()
    try:
        ch = clickhouse_connect.get_client(**client_kwargs)
    except Exception as exc:
        raise OffloadError(f"cannot connect to ClickHouse at {ch_settings!r}: {exc}") from None
    try:
        columns = ib.describe_source(ch, spec)
        types = {c.name: c.clickhouse_type for c in columns}
        if spec.event_time_column not in types:
            raise OffloadError(f"{spec.source} has no event-time column {spec.event_time_column!r}")
        struct = ib.spark_struct(columns)  # raises UnsupportedType naming the column
        expected = ck.clickhouse_interval_checksum(ch, spec, types, start, end)
        duplicates = ch.query(
            f"SELECT {', '.join(_quote(k) for k in spec.unique_key)}, count() AS copies "
            f"FROM {_quote(spec.source)} WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)} "
            f"GROUP BY {', '.join(_quote(k) for k in spec.unique_key)} HAVING copies > 1 LIMIT 5",
            parameters=ck.interval_parameters(start, end),
        ).result_rows
    finally:
        ch.close()
    if duplicates:
        sample = ", ".join(str(tuple(row[:-1])) for row in duplicates)
        raise OffloadError(
            f"{spec.source} holds duplicate unique keys {tuple(spec.unique_key)} in the interval "
            f"(e.g. {sample}); nothing written"
        )
    log.info("ClickHouse %s [%s, %s): %s", spec.source, start, end, expected)
    t = _phase("ClickHouse describe + checksum", t)

    spark = build_spark(ice_settings, f"k2-offload-{spec.name}")
    t = _phase("Spark session", t)
    try:
        return _offload_with_spark(spark, args, spec, ice_settings, client_kwargs, columns, struct,
                                   expected, attempt_id, t)
    except (UsageError, OffloadError):
        raise
    except Exception as exc:  # described while the JVM is still up
        log.exception("offload failed")
        raise OffloadError(describe_error(exc)) from None
    finally:
        spark.stop()


def _offload_with_spark(spark: Any, args: argparse.Namespace, spec: Any, ice_settings: Any,
                        client_kwargs: dict[str, Any], columns: list[Any], struct: Any,
                        expected: Any, attempt_id: str, t: float) -> dict[str, Any]:
    from pyspark import StorageLevel
    from pyspark.sql.pandas.types import to_arrow_schema

    from k2 import checksum as ck
    from k2 import iceberg as ib

    start, end = args.interval_start, args.interval_end
    target = ib.spark_table_name(ice_settings, spec)
    namespace = spec.iceberg_table.split(".")[0]

    # Namespace and table (schema derived from ClickHouse's DESCRIBE)
    spark.sql(f"CREATE NAMESPACE IF NOT EXISTS `{ib.catalog_name(ice_settings)}`.`{namespace}`")
    spark.sql(ib.create_table_sql(ice_settings, spec, columns))
    problems = ib.schema_differences(columns, spark.table(target).schema)
    if problems:
        raise OffloadError(
            f"Iceberg table {spec.iceberg_table} does not match ClickHouse {spec.source}: "
            + "; ".join(problems)
        )
    t = _phase("namespace/table", t)

    # Parallel Arrow read on the executors
    slices = args.slices or max(1, spark.sparkContext.defaultParallelism)
    bounds = slice_bounds(ck.to_epoch_ms(start), ck.to_epoch_ms(end), slices)
    select_sql = (
        f"SELECT {', '.join(_quote(c.name) for c in columns)} FROM {_quote(spec.source)} "
        f"WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)}"
    )
    schema_ipc = to_arrow_schema(struct).serialize().to_pybytes()
    descriptors = spark.createDataFrame(
        spark.sparkContext.parallelize(bounds, len(bounds)), "slice int, start_ms long, end_ms long"
    )
    source = descriptors.mapInArrow(make_slice_reader(client_kwargs, select_sql, schema_ipc), struct)
    source = source.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        key_cols = ck.spark_key_columns(spec, struct)
        read = ck.spark_checksum(source, key_cols)
        t = _phase(f"read {read.rows} rows in {len(bounds)} slices", t)
        if read != expected:
            raise OffloadError(
                f"read from ClickHouse does not match ClickHouse's own figures for the interval: "
                f"read {read}, ClickHouse {expected} (rows changed during the read?); nothing written"
            )

        # One MERGE: the atomic replace of the interval
        source.createOrReplaceTempView(SOURCE_VIEW)
        statement = merge_sql(target, struct, spec.unique_key, spec.event_time_column, start, end)
        properties = ib.snapshot_properties(
            spec, start, end, run_id=args.run_id, rows=expected.rows, checksum=expected.checksum,
            attempt_id=attempt_id,
        )
        run_merge(spark, statement, ib.snapshot_property_conf(properties))
        t = _phase("MERGE", t)
    finally:
        source.unpersist()

    snapshot_id = _find_attempt_snapshot(spark, target, attempt_id)
    if snapshot_id is None:
        snapshot_id = _commit_marker_snapshot(spark, target, properties)

    # Read the committed snapshot back
    stored = ck.spark_checksum(
        spark.sql(f"SELECT * FROM {target} VERSION AS OF {snapshot_id} t "
                  f"WHERE {interval_predicate('t', spec.event_time_column, start, end)}"),
        key_cols,
    )
    t = _phase("verify snapshot", t)
    if stored != expected:
        raise OffloadError(
            f"after the MERGE, Iceberg snapshot {snapshot_id} holds {stored} for the interval, "
            f"ClickHouse {expected}"
        )
    return {
        "table": spec.name,
        "iceberg_table": spec.iceberg_table,
        "interval_start": ib.iso_utc(start),
        "interval_end": ib.iso_utc(end),
        "rows": expected.rows,
        "checksum": expected.checksum,
        "snapshot_id": snapshot_id,
        "run_id": args.run_id,
        "attempt_id": attempt_id,
        "slices": len(bounds),
        "seconds": round(time.monotonic() - STARTED, 3),
    }


def _is_commit_conflict(exc: BaseException) -> bool:
    text = "\n".join(_java_messages(exc))
    return any(name in text for name in (
        "org.apache.iceberg.exceptions.ValidationException",
        "org.apache.iceberg.exceptions.CommitFailedException",
        "org.apache.iceberg.exceptions.CommitStateUnknownException",
    ))


def run_merge(spark: Any, statement: str, snapshot_conf: dict[str, str]) -> None:
    """Run the MERGE with the snapshot summary properties set for exactly this statement.

    A concurrent commit to the interval (another run of it, a compaction) makes Iceberg
    reject ours (serializable isolation); so does an unknown commit outcome. Repeating a
    MERGE is safe - it replaces, it never appends twice - so it is retried a few times.
    """
    for attempt in range(1, MERGE_ATTEMPTS + 1):
        try:
            for key, value in snapshot_conf.items():
                spark.conf.set(key, value)
            spark.sql(statement)
            return
        except Exception as exc:
            if attempt == MERGE_ATTEMPTS or not _is_commit_conflict(exc):
                raise
            log.warning("MERGE attempt %d lost a commit race (%s); retrying", attempt, describe_error(exc))
            time.sleep(attempt)
        finally:
            for key in snapshot_conf:
                spark.conf.unset(key)


def _find_attempt_snapshot(spark: Any, target: str, attempt_id: str) -> int | None:
    from k2.iceberg import PROP_ATTEMPT_ID

    rows = spark.sql(
        f"SELECT snapshot_id FROM {target}.snapshots WHERE summary['{PROP_ATTEMPT_ID}'] = '{attempt_id}' "
        f"ORDER BY committed_at DESC LIMIT 1"
    ).collect()
    return int(rows[0][0]) if rows else None


def _commit_marker_snapshot(spark: Any, target: str, properties: dict[str, str]) -> int:
    """An empty append carrying the properties, should a MERGE ever commit nothing."""
    jvm = spark.sparkContext._jvm
    table = jvm.org.apache.iceberg.spark.Spark3Util.loadIcebergTable(
        spark._jsparkSession, target.replace("`", "")
    )
    append = table.newAppend()
    for key, value in properties.items():
        append = append.set(key, value)
    append.commit()
    table.refresh()
    log.info("MERGE committed no snapshot; recorded the interval in an empty snapshot")
    return int(table.currentSnapshot().snapshotId())


def _java_messages(exc: BaseException) -> list[str]:
    """toString() of a JVM exception and its causes (empty for Python exceptions)."""
    java = getattr(exc, "java_exception", None)
    messages: list[str] = []
    try:
        while java is not None and len(messages) < 12:
            text = str(java.toString()).strip()
            if text and text not in messages:
                messages.append(text)
            java = java.getCause()
    except Exception:  # the JVM may already be gone
        pass
    return messages


def describe_error(exc: BaseException) -> str:
    """One line: the exception and, for JVM errors, the root cause's message."""
    messages = _java_messages(exc)
    if len(messages) > 1:
        return f"{messages[0].splitlines()[0]} (caused by: {messages[-1].splitlines()[0]})"
    if messages:
        return messages[0].splitlines()[0]
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)  # stdout carries only the result line
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    k2_log = logging.getLogger("k2")
    k2_log.addHandler(handler)
    k2_log.setLevel(logging.INFO)
    k2_log.propagate = False
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        args = parse_args(argv)
        result = offload(args)
    except UsageError as exc:
        print(f"offload_to_iceberg: error: {exc}", file=sys.stderr)
        return 2
    except OffloadError as exc:
        print(f"offload_to_iceberg: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # Spark / Iceberg / ClickHouse errors: the trace in the log, a clear line last
        log.exception("offload failed")
        print(f"offload_to_iceberg: error: {describe_error(exc)}", file=sys.stderr)
        return 1
    log.info("offloaded %s rows of %s [%s, %s) in %.1f s -> snapshot %s", result["rows"], result["table"],
             result["interval_start"], result["interval_end"], result["seconds"], result["snapshot_id"])
    print(f"{RESULT_PREFIX} {json.dumps(result, sort_keys=True)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
