"""Offload intervals of one table from ClickHouse (hot tier) to Iceberg (cold tier).

    spark-submit --jars <iceberg-spark-runtime>,<postgresql> spark_jobs/offload_to_iceberg.py \\
        --table bronze_trades_binance \\
        --interval-start 2026-11-26T10:00:00+00:00 --interval-end 2026-11-26T11:00:00+00:00 \\
        [--interval-step 15m] --run-id <airflow run id> [--tables-config path] [--slices N]

Connection settings come from the environment (k2.runtime_env: K2_CLICKHOUSE_*,
K2_ICEBERG_*), never from the command line.

[--interval-start, --interval-end) is a whole number of --interval-step steps (default
15m); each step is offloaded as its own interval - its own checks, one MERGE, one
snapshot whose k2.interval-start/end are the step's bounds - in order, in one
SparkSession, so a catch-up of many intervals pays for one JVM. Without --interval-step
a range that is not a multiple of 15 minutes is one interval, as before steps existed.
The job stops at the first interval that fails (exit status 1); the intervals before it
stay committed (each one is atomic, and offloading it again replaces it). On success the
last lines on stdout are one result per interval, in interval order:

    K2_OFFLOAD_RESULT {"table": ..., "interval_start": ..., "rows": ..., "checksum": ...,
                       "snapshot_id": ..., ...}

How it works (step 1 and the Spark session once per job, steps 2-5 per interval):

1. DESCRIBE the source in ClickHouse; derive the Iceberg/Spark schema (k2.iceberg);
   create namespace and table when missing (partition spec from tables.yaml). An
   existing table follows ClickHouse's schema drift (k2.iceberg.schema_evolution): new
   columns are added as optional, int->long, float->double and decimal widening are
   promoted in place (ALTER TABLE, metadata only); any other difference stops the job
   before anything is altered or written, naming the table and the column.
2. ClickHouse counts and checksums the interval itself (k2.checksum's SQL), split by
   the table's quality checks (k2.quality): the good rows and the bad ones.
3. The executors read the interval as Arrow (clickhouse-connect, ArrowStream) in N
   time slices through mapInArrow - one task and one ClickHouse connection per
   slice; no JDBC, no rows on the driver. The result is persisted, split by the same
   checks (rendered in Spark SQL), counted and checksummed on the executors, and both
   halves must equal ClickHouse's figures before anything is written. Duplicate
   unique keys in ClickHouse (among rows with their whole key) stop the job at that
   interval before it is read - for the first interval, before the Spark session
   starts (an interval must hold one row per key to be replaceable); they are an
   upstream fault, not a bad row.
3b. Quarantine (only for tables with checks that can fail): the bad rows, with the
   reasons of every check they fail (k2_reason), the interval, the run id and the
   time, replace the interval's rows of the quarantine table
   `<iceberg_table>__quarantine` in one MERGE (one snapshot; a 'D' row matching every
   row of the interval deletes them, the bad rows are inserted), so re-running an
   interval never duplicates quarantined rows. Its snapshot is read back and must hold
   ClickHouse's bad-row figures. It commits before the table's MERGE: the table's
   snapshot is what marks an interval offloaded, so it comes last. Nothing is
   committed to the quarantine table when the interval has no bad rows and none
   quarantined before.
4. One MERGE replaces the interval atomically (one Iceberg snapshot, tagged with
   k2.table / k2.interval-start / k2.interval-end / k2.run-id / k2.rows /
   k2.checksum / k2.quarantined-rows / k2.attempt-id through
   spark.sql.iceberg.snapshot-property.*; k2.rows and k2.checksum are the good rows'):
   every row the table holds in the interval is deleted and every good ClickHouse row
   of the interval inserted (see merge_sql). Re-running an interval therefore replaces
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
   checksum must equal ClickHouse's good rows', else the job exits non-zero. Every row
   read is accounted for: rows_read = rows (written) + quarantined_rows, in the result.

Deployment: the driver imports the `k2` package (installed in the submitting
virtualenv; in cluster deploy mode ship it with --py-files); the executors only need
pyarrow and clickhouse-connect - the slice reader is defined here and travels by value.

Exit status: 0 done, 2 bad arguments or settings, 1 anything else; the reason is the
line starting with "offload_to_iceberg: error:" (written to stderr, which spark-submit's
PythonRunner merges into its stdout; on success the result lines are the last lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, NamedTuple

STARTED = time.monotonic()
RESULT_PREFIX = "K2_OFFLOAD_RESULT"
SOURCE_VIEW = "k2_offload_rows"
QUARANTINE_VIEW = "k2_quarantine_rows"
MERGE_ATTEMPTS = 3  # a MERGE that lost a commit race is re-planned on the new table version
OP_COLUMN = "__k2_op"
DEFAULT_STEP = timedelta(minutes=15)
MAX_STEPS = 1000  # a guard against a typo such as --interval-step 1s over a day

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


def _step(text: str) -> timedelta:
    from k2.config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


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
    parser.add_argument("--interval-step", type=_step, default=None,
                        help="length of each interval of the range, e.g. 15m (default 15m)")
    parser.add_argument("--run-id", required=True, help="the Airflow run id (recorded in the snapshots)")
    parser.add_argument("--tables-config", default=None, help="tables.yaml (default: the bundled one)")
    parser.add_argument("--slices", type=_positive, default=None,
                        help="parallel ClickHouse reads (default: Spark's default parallelism)")
    args = parser.parse_args(argv)
    if args.interval_end <= args.interval_start:
        raise UsageError("--interval-end must be after --interval-start")
    if not args.run_id.strip():
        raise UsageError("--run-id is empty")
    args.intervals = split_range(args.interval_start, args.interval_end, args.interval_step)
    return args


def split_range(start: datetime, end: datetime, step: timedelta | None) -> list[tuple[datetime, datetime]]:
    """[start, end) as consecutive intervals of `step` (None: 15 minutes, or the whole range
    as one interval when it is not a multiple of 15 minutes - a single interval as before)."""
    if step is None:
        step = DEFAULT_STEP if (end - start) % DEFAULT_STEP == timedelta(0) else end - start
    if step % timedelta(milliseconds=1):
        raise UsageError(f"--interval-step {step} is finer than milliseconds")
    steps, remainder = divmod(end - start, step)
    if remainder:
        raise UsageError(
            f"[--interval-start, --interval-end) is {end - start}, not a whole number of "
            f"--interval-step {step} steps"
        )
    if steps > MAX_STEPS:
        raise UsageError(f"the range holds {steps} intervals of {step}; at most {MAX_STEPS} per job")
    return [(start + i * step, start + (i + 1) * step) for i in range(steps)]


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


def offload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Offload every interval of args.intervals in order; one result dict per interval."""
    from k2 import iceberg as ib
    from k2 import quality
    from k2.config import ConfigError, load_tables
    from k2.runtime_env import ClickHouseSettings, IcebergSettings, MissingSetting

    try:
        spec = load_tables(args.tables_config).get(args.table)
        ch_settings = ClickHouseSettings.from_env()
        ice_settings = IcebergSettings.from_env()
    except (ConfigError, MissingSetting, ValueError) as exc:
        raise UsageError(str(exc)) from None
    intervals = args.intervals
    log.info("offload %s: %d interval(s) of %s in [%s, %s) run_id=%s from %r to %s",
             spec.name, len(intervals), intervals[0][1] - intervals[0][0],
             args.interval_start.isoformat(), args.interval_end.isoformat(), args.run_id,
             ch_settings, spec.iceberg_table)

    # 1-2. Source schema, and ClickHouse's own figures for the first interval before the JVM
    # starts: an interval that cannot be offloaded costs no Spark session.
    t = time.monotonic()
    client_kwargs = ch_settings.client_kwargs()
    with _clickhouse(client_kwargs, ch_settings) as ch:
        columns = ib.describe_source(ch, spec)
    types = {c.name: c.clickhouse_type for c in columns}
    if spec.event_time_column not in types:
        raise OffloadError(f"{spec.source} has no event-time column {spec.event_time_column!r}")
    struct = ib.spark_struct(columns)  # raises UnsupportedType naming the column
    try:
        rules = quality.rules(spec, types)
    except quality.QualityError as exc:
        raise UsageError(str(exc)) from None
    first = clickhouse_figures(client_kwargs, ch_settings, spec, types, rules, *intervals[0])
    t = _phase("ClickHouse describe + checksum", t)

    spark = build_spark(ice_settings, f"k2-offload-{spec.name}")
    t = _phase("Spark session", t)
    try:
        return _offload_with_spark(spark, args, spec, ice_settings, client_kwargs, ch_settings,
                                   columns, types, struct, rules, first, t)
    except (UsageError, OffloadError):
        raise
    except Exception as exc:  # described while the JVM is still up
        log.exception("offload failed")
        raise OffloadError(describe_storage_error(exc, ice_settings.warehouse)
                           or describe_error(exc)) from None
    finally:
        spark.stop()


@contextmanager
def _clickhouse(client_kwargs: dict[str, Any], ch_settings: Any) -> Iterator[Any]:
    import clickhouse_connect

    try:
        client = clickhouse_connect.get_client(**client_kwargs)
    except Exception as exc:
        raise OffloadError(f"cannot connect to ClickHouse at {ch_settings!r}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


def clickhouse_figures(client_kwargs: dict[str, Any], ch_settings: Any, spec: Any,
                       types: dict[str, str], rules: Any, start: datetime, end: datetime) -> Any:
    """ClickHouse's count and checksum of the interval's good and bad rows (k2.quality's
    SplitChecksum); refuses duplicate unique keys among the rows that have a whole key."""
    from k2 import checksum as ck
    from k2 import quality

    with _clickhouse(client_kwargs, ch_settings) as ch:
        expected = quality.clickhouse_split_checksum(ch, spec, rules, types, start, end)
        duplicates = ch.query(
            f"SELECT {', '.join(_quote(k) for k in spec.unique_key)}, count() AS copies "
            f"FROM {_quote(spec.source)} WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)} "
            f"AND {quality.clickhouse_key_present_sql(rules, types)} "
            f"GROUP BY {', '.join(_quote(k) for k in spec.unique_key)} HAVING copies > 1 LIMIT 5",
            parameters=ck.interval_parameters(start, end),
        ).result_rows
    if duplicates:
        sample = ", ".join(str(tuple(row[:-1])) for row in duplicates)
        raise OffloadError(
            f"{spec.source} holds duplicate unique keys {tuple(spec.unique_key)} in the interval "
            f"[{start.isoformat()}, {end.isoformat()}) (e.g. {sample}); nothing written for it"
        )
    log.info("ClickHouse %s [%s, %s): %s", spec.source, start.isoformat(), end.isoformat(), expected)
    return expected


def _offload_with_spark(spark: Any, args: argparse.Namespace, spec: Any, ice_settings: Any,
                        client_kwargs: dict[str, Any], ch_settings: Any, columns: list[Any],
                        types: dict[str, str], struct: Any, rules: Any, first: Any, t: float
                        ) -> list[dict[str, Any]]:
    from pyspark.sql.pandas.types import to_arrow_schema

    from k2 import checksum as ck
    from k2 import iceberg as ib

    target = ib.spark_table_name(ice_settings, spec)
    namespace = spec.iceberg_table.split(".")[0]

    # Namespace and table (schema derived from ClickHouse's DESCRIBE)
    spark.sql(f"CREATE NAMESPACE IF NOT EXISTS `{ib.catalog_name(ice_settings)}`.`{namespace}`")
    spark.sql(ib.create_table_sql(ice_settings, spec, columns))
    evolution = ib.schema_evolution(columns, spark.table(target).schema)
    if evolution.refused:  # before any ALTER: a refused schema changes nothing
        raise OffloadError(
            f"Iceberg table {spec.iceberg_table} cannot take the schema of ClickHouse {spec.source}: "
            + "; ".join(evolution.refused) + "; nothing written"
        )
    for statement in evolution.statements(target):
        log.warning("schema evolution of %s: %s", spec.iceberg_table, statement)
        spark.sql(statement)
    problems = ib.schema_differences(columns, spark.table(target).schema)
    if problems:
        raise OffloadError(
            f"Iceberg table {spec.iceberg_table} does not match ClickHouse {spec.source}: "
            + "; ".join(problems)
        )
    t = _phase("namespace/table", t)

    job = _Job(
        spark=spark, spec=spec, target=target, struct=struct, client_kwargs=client_kwargs,
        run_id=args.run_id,
        slices=args.slices or max(1, spark.sparkContext.defaultParallelism),
        select_sql=(
            f"SELECT {', '.join(_quote(c.name) for c in columns)} FROM {_quote(spec.source)} "
            f"WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)}"
        ),
        schema_ipc=to_arrow_schema(struct).serialize().to_pybytes(),
        key_cols=ck.spark_key_columns(spec, struct),
        application_id=spark.sparkContext.applicationId,
        rules=rules,
        quarantine_target=ib.quarantine_spark_table_name(ice_settings, spec),
        create_quarantine_sql=ib.create_quarantine_table_sql(ice_settings, spec, columns),
        quarantine_columns=ib.quarantine_columns(columns),
    )
    results: list[dict[str, Any]] = []
    intervals = args.intervals
    for index, (start, end) in enumerate(intervals):
        began = time.monotonic()
        try:
            expected = first if index == 0 else clickhouse_figures(
                client_kwargs, ch_settings, spec, types, rules, start, end)
            result = _offload_interval(job, start, end, expected)
        except Exception:
            if results:
                log.error("stopped at interval %d of %d [%s, %s); the %d interval(s) before it are "
                          "committed: %s", index + 1, len(intervals), start.isoformat(),
                          end.isoformat(), len(results),
                          ", ".join(f"[{r['interval_start']}, {r['interval_end']}) -> snapshot "
                                    f"{r['snapshot_id']}" for r in results))
            raise
        result.update(
            interval_index=index,
            intervals=len(intervals),
            interval_seconds=round(time.monotonic() - began, 3),
            seconds=round(time.monotonic() - STARTED, 3),
        )
        results.append(result)
        log.info("interval %d of %d [%s, %s): %s rows read = %s written -> snapshot %s + %s "
                 "quarantined in %.1f s", index + 1, len(intervals), result["interval_start"],
                 result["interval_end"], result["rows_read"], result["rows"], result["snapshot_id"],
                 result["quarantined_rows"], result["interval_seconds"])
    return results


class _Job(NamedTuple):
    """What every interval of one job shares."""

    spark: Any
    spec: Any
    target: str
    struct: Any
    client_kwargs: dict[str, Any]
    run_id: str
    slices: int
    select_sql: str
    schema_ipc: bytes
    key_cols: list[Any]
    application_id: str
    rules: Any  # k2.quality.Rules
    quarantine_target: str
    create_quarantine_sql: str
    quarantine_columns: list[Any]


def _offload_interval(job: _Job, start: datetime, end: datetime, expected: Any) -> dict[str, Any]:
    """Read, check, MERGE and verify one interval: one Iceberg snapshot."""
    from pyspark import StorageLevel

    from k2 import checksum as ck
    from k2 import iceberg as ib
    from k2 import quality

    spark, spec, target = job.spark, job.spec, job.target
    attempt_id = uuid.uuid4().hex  # finds this interval's commit among the job's
    t = time.monotonic()

    # Parallel Arrow read on the executors
    bounds = slice_bounds(ck.to_epoch_ms(start), ck.to_epoch_ms(end), job.slices)
    descriptors = spark.createDataFrame(
        spark.sparkContext.parallelize(bounds, len(bounds)), "slice int, start_ms long, end_ms long"
    )
    source = descriptors.mapInArrow(
        make_slice_reader(job.client_kwargs, job.select_sql, job.schema_ipc), job.struct)
    source = source.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        read = quality.spark_split_checksum(source, job.key_cols, job.rules)
        t = _phase(f"read {read.rows_read} rows in {len(bounds)} slices", t)
        if read != expected:
            raise OffloadError(
                f"read from ClickHouse does not match ClickHouse's own figures for the interval "
                f"[{start.isoformat()}, {end.isoformat()}): read {read}; ClickHouse {expected} "
                "(rows changed during the read?); nothing written for it"
            )

        # The bad rows replace the interval's quarantine, before the table's own commit
        quarantine_id = None
        if job.rules:
            quarantine_id = _quarantine(job, source, start, end, expected.quarantined, attempt_id)
            t = _phase(f"quarantine {expected.quarantined.rows} rows", t)

        # One MERGE: the atomic replace of the interval by its good rows
        good = source.where(f"NOT {quality.spark_bad_sql(job.rules)}") if job.rules else source
        good.createOrReplaceTempView(SOURCE_VIEW)
        statement = merge_sql(target, job.struct, spec.unique_key, spec.event_time_column, start, end)
        properties = ib.snapshot_properties(
            spec, start, end, run_id=job.run_id, rows=expected.good.rows,
            checksum=expected.good.checksum, attempt_id=attempt_id,
            quarantined_rows=expected.quarantined.rows,
        )
        run_merge(spark, statement, ib.snapshot_property_conf(properties))
        t = _phase("MERGE", t)
    finally:
        source.unpersist()

    found = _find_attempt_snapshot(spark, target, attempt_id)
    if found is None:
        found = (_commit_marker_snapshot(spark, target, properties), {})
    snapshot_id, summary = found

    # Read the committed snapshot back
    stored = ck.spark_checksum(
        spark.sql(f"SELECT * FROM {target} VERSION AS OF {snapshot_id} t "
                  f"WHERE {interval_predicate('t', spec.event_time_column, start, end)}"),
        job.key_cols,
    )
    _phase("verify snapshot", t)
    if stored != expected.good:
        raise OffloadError(
            f"after the MERGE, Iceberg snapshot {snapshot_id} holds {stored} for the interval "
            f"[{start.isoformat()}, {end.isoformat()}), ClickHouse {expected.good} good rows"
        )
    if stored.rows + expected.quarantined.rows != read.rows_read:  # every row read is accounted for
        raise OffloadError(f"rows read {read.rows_read} != written {stored.rows} + quarantined "
                           f"{expected.quarantined.rows}")
    return {
        "table": spec.name,
        "iceberg_table": spec.iceberg_table,
        "interval_start": ib.iso_utc(start),
        "interval_end": ib.iso_utc(end),
        "rows": expected.good.rows,
        "checksum": expected.good.checksum,
        "rows_read": read.rows_read,
        "quarantined_rows": expected.quarantined.rows,
        "quarantine_table": quality.quarantine_table_name(spec) if job.rules else None,
        "quarantine_snapshot_id": quarantine_id,
        "snapshot_id": snapshot_id,
        "run_id": job.run_id,
        "attempt_id": attempt_id,
        "slices": len(bounds),
        "application_id": job.application_id,
        # Iceberg's summary of the commit (for the operator's metrics when pyiceberg cannot read it)
        "added_files_size": ib.summary_int(summary, "added-files-size"),
        "total_data_files": ib.summary_int(summary, "total-data-files"),
    }


def quarantine_merge_sql(target: str, names: list[str], interval_start: datetime) -> str:
    """The MERGE that makes `target` (a quarantine table) hold exactly QUARANTINE_VIEW's
    'I' rows for the interval starting at `interval_start`.

    QUARANTINE_VIEW holds the bad rows ('I') and one 'D' row; the 'D' row matches every
    row the table holds for the interval and deletes it ('I' rows never match and are
    inserted), in one commit - a re-run replaces the interval's quarantined rows. Each
    target row matches at most one source row (the single 'D'), as MERGE requires.
    """
    from k2.quality import INTERVAL_START_COLUMN

    cols = ", ".join(_quote(c) for c in names)
    return (
        f"MERGE INTO {target} t USING {QUARANTINE_VIEW} s "
        f"ON s.{OP_COLUMN} = 'D' AND t.{_quote(INTERVAL_START_COLUMN)} = {_ts_literal(interval_start)} "
        f"WHEN MATCHED THEN DELETE "
        f"WHEN NOT MATCHED AND s.{OP_COLUMN} = 'I' THEN INSERT ({cols}) "
        f"VALUES ({', '.join(f's.{_quote(c)}' for c in names)})"
    )


def _quarantine(job: _Job, source: Any, start: datetime, end: datetime, expected: Any,
                attempt_id: str) -> int | None:
    """Replace the interval's rows of the quarantine table by the bad rows of `source`;
    returns the snapshot id, or None when there was nothing to write or delete."""
    from pyspark.sql import functions as F

    from k2 import checksum as ck
    from k2 import iceberg as ib
    from k2 import quality

    spark, target = job.spark, job.quarantine_target
    at_start = f"t.{_quote(quality.INTERVAL_START_COLUMN)} = {_ts_literal(start)}"
    exists = spark.catalog.tableExists(target.replace("`", ""))
    if expected.rows == 0 and (
        not exists or spark.sql(f"SELECT 1 FROM {target} t WHERE {at_start} LIMIT 1").first() is None
    ):
        return None
    if not exists:
        spark.sql(job.create_quarantine_sql)
    evolution = ib.schema_evolution(job.quarantine_columns, spark.table(target).schema)
    if evolution.refused:
        raise OffloadError(f"quarantine table {target} cannot take the schema of {job.spec.source}: "
                           + "; ".join(evolution.refused) + "; nothing written")
    for statement in evolution.statements(target):
        log.warning("schema evolution of %s: %s", target, statement)
        spark.sql(statement)

    bad = source.where(quality.spark_bad_sql(job.rules)).select(
        *[F.col(_quote(f.name)) for f in job.struct.fields],
        F.expr(quality.spark_reason_sql(job.rules)).alias(quality.REASON_COLUMN),
        F.expr(_ts_literal(start)).alias(quality.INTERVAL_START_COLUMN),
        F.expr(_ts_literal(end)).alias(quality.INTERVAL_END_COLUMN),
        F.lit(job.run_id).alias(quality.RUN_ID_COLUMN),  # a value, never SQL text
        F.current_timestamp().alias(quality.QUARANTINED_AT_COLUMN),
    )
    delete_row = spark.range(1).select(
        *[F.lit(None).cast(f.dataType).alias(f.name) for f in bad.schema.fields],
        F.lit("D").alias(OP_COLUMN),
    )
    bad.withColumn(OP_COLUMN, F.lit("I")).unionByName(delete_row).createOrReplaceTempView(QUARANTINE_VIEW)
    properties = ib.snapshot_properties(
        job.spec, start, end, run_id=job.run_id, rows=expected.rows, checksum=expected.checksum,
        attempt_id=attempt_id,
    )
    run_merge(spark, quarantine_merge_sql(target, [f.name for f in bad.schema.fields], start),
              ib.snapshot_property_conf(properties))
    found = _find_attempt_snapshot(spark, target, attempt_id)
    if found is None:
        raise OffloadError(f"the quarantine MERGE into {target} committed no snapshot")
    snapshot_id = found[0]
    stored = ck.spark_checksum(
        spark.sql(f"SELECT * FROM {target} VERSION AS OF {snapshot_id} t WHERE {at_start}"), job.key_cols)
    if stored != expected:
        raise OffloadError(
            f"after the quarantine MERGE, {target} snapshot {snapshot_id} holds {stored} for the "
            f"interval [{start.isoformat()}, {end.isoformat()}), ClickHouse {expected} bad rows"
        )
    return snapshot_id


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


def _find_attempt_snapshot(spark: Any, target: str, attempt_id: str) -> tuple[int, dict[str, str]] | None:
    """(snapshot id, summary) of the commit carrying attempt_id, if any."""
    from k2.iceberg import PROP_ATTEMPT_ID

    rows = spark.sql(
        f"SELECT snapshot_id, summary FROM {target}.snapshots "
        f"WHERE summary['{PROP_ATTEMPT_ID}'] = '{attempt_id}' ORDER BY committed_at DESC LIMIT 1"
    ).collect()
    return (int(rows[0][0]), dict(rows[0][1] or {})) if rows else None


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


# Causes of a failed write that are the warehouse's storage, not the data or the code.
STORAGE_CAUSES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                  "Permission denied", "Access Denied", "AccessDenied", "Not a directory")


def describe_storage_error(exc: BaseException, warehouse: str) -> str | None:
    """'cannot write to the Iceberg warehouse <path>: <cause> (...)' when the failure's
    cause chain names a storage problem, else None. Spark wraps a task's IOException in
    several layers whose first line hides it, so the whole chain is searched."""
    text = "\n".join([*_java_messages(exc), str(exc)])
    for cause in STORAGE_CAUSES:
        if cause in text:
            return f"cannot write to the Iceberg warehouse {warehouse}: {cause} ({describe_error(exc)})"
    return None


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
    handler = logging.StreamHandler(sys.stderr)  # stdout carries only the result lines
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    k2_log = logging.getLogger("k2")
    k2_log.addHandler(handler)
    k2_log.setLevel(logging.INFO)
    k2_log.propagate = False
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        args = parse_args(argv)
        results = offload(args)
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
    last = results[-1]
    log.info("offloaded %s rows (%s quarantined) of %s in %d interval(s) [%s, %s) in %.1f s "
             "-> snapshot(s) %s", sum(r["rows"] for r in results),
             sum(r["quarantined_rows"] for r in results), last["table"], len(results),
             results[0]["interval_start"], last["interval_end"], last["seconds"],
             ", ".join(str(r["snapshot_id"]) for r in results))
    # Printed together at the end, so that they are the last lines of the output.
    print("\n".join(f"{RESULT_PREFIX} {json.dumps(r, sort_keys=True)}" for r in results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
