"""Offload intervals of one table from ClickHouse (hot tier) to Iceberg (cold tier).

    spark-submit --jars <iceberg-spark-runtime>,<postgresql> spark_jobs/offload_to_iceberg.py \\
        --table bronze_trades_binance \\
        --interval-start 2026-11-26T10:00:00+00:00 --interval-end 2026-11-26T11:00:00+00:00 \\
        [--interval-step 15m] --run-id <airflow run id> [--tables-config path] [--slices N] \\
        [--driver-max-rows N]

Connection settings come from the environment (k2.runtime_env: K2_CLICKHOUSE_*,
K2_ICEBERG_*), never from the command line.

[--interval-start, --interval-end) is a whole number of --interval-step steps (default
15m); each step is an interval of its own - its own checks and figures - in one
SparkSession, so a catch-up of many intervals pays for one JVM. Without --interval-step
a range that is not a multiple of 15 minutes is one interval, as before steps existed.
Several intervals without rows failing the checks are written in one piece (a batch):
one read of the range, one staged write, every interval audited, one publish - one
snapshot whose summary carries each interval's figures (k2.intervals), read back
interval by interval (k2.iceberg.offload_snapshots_from_summary). With rows to
quarantine, each interval gets its own write, audit, publish and snapshot, in order.
An interval that cannot be offloaded (duplicate keys in ClickHouse) stops the job
(exit status 1) after the intervals before it are committed (each commit is atomic, and
offloading an interval again replaces it). On success the last lines on stdout are one
result per interval, in interval order:

    K2_OFFLOAD_RESULT {"table": ..., "interval_start": ..., "rows": ..., "checksum": ...,
                       "snapshot_id": ..., ...}

How it works (step 1 and the Spark session once per job, steps 2-5 per interval or batch):

1. DESCRIBE the source in ClickHouse; derive the Iceberg/Spark schema (k2.iceberg);
   create namespace and table when missing (partition spec from tables.yaml). An
   existing table follows ClickHouse's schema drift (k2.iceberg.schema_evolution): new
   columns are added as optional, int->long, float->double and decimal widening are
   promoted in place (ALTER TABLE, metadata only); any other difference stops the job
   before anything is altered or written, naming the table and the column.
2. ClickHouse counts and checksums the interval itself (k2.checksum's SQL), split by
   the table's quality checks (k2.quality): the good rows and the bad ones. Duplicate
   unique keys in ClickHouse (among rows with their whole key) stop the job at that
   interval before it is read - for the first interval, while the Spark session starts,
   before it is used (an interval must hold one row per key to be replaceable); they are an
   upstream fault, not a bad row.
3. The interval is read as Arrow (clickhouse-connect, ArrowStream) in time slices - one
   task and one ClickHouse connection per slice (one slice per 250k rows up to Spark's
   default parallelism, or --slices); no JDBC, no Spark rows - and written, as it
   streams, as Parquet data files of the table (make_slice_writer: one file per
   partition value and slice, the table's field ids in the Parquet schema, the table's
   codec): no shuffle, no pass of its own, at most 512k rows buffered per slice. Where
   the slices run (_run_slices): on the executors, through mapInArrow, with the rows
   each slice read counted in an accumulator keyed by slice (a slice read twice counts
   once) and only the files' names and figures coming back to the driver; or, for an
   interval of at most --driver-max-rows rows (default: any interval on a local master,
   whose executors share this machine's cores; 500k on a cluster), in the driver's own
   threads, running the same function on the same Arrow batches without starting a
   Python worker per executor, which costs more than such an interval's write. A table
   whose partition transforms or sort order the writer does not evaluate
   (_native_plan), and an interval with rows to quarantine, are read into a DataFrame
   on the executors and written by Spark's Iceberg writer instead.
3b. Quarantine (only for tables with checks that can fail, and only when the interval
   has bad rows now or had some before): the read is persisted, and the bad rows, with
   the reasons of every check they fail (k2_reason), the interval, the run id and the
   time, replace the interval's rows of `<iceberg_table>__quarantine` in one MERGE (a 'D'
   row matching every row of the interval deletes them, the bad rows are inserted), so
   re-running an interval never duplicates quarantined rows. It is staged, audited
   against ClickHouse's bad-row figures and published like the table's own commit
   (step 4), before it: the table's snapshot is what marks an interval offloaded, so it
   comes last.
4. Write-audit-publish of the good rows (stage_audit_publish), one snapshot per interval
   or batch (a batch's audit compares every interval's count and checksum, grouped):
   - write, staged (Iceberg WAP: write.wap.enabled on the table; a wap.id on the
     snapshot): an overwrite by the interval's filter - the interval's existing files
     are dropped whole and the new ones added, no read of the table, no join. The driver
     commits the executors' files with Iceberg's OverwriteFiles (stageOnly), which checks
     from the files' Parquet statistics that every new file lies inside the interval and,
     from the snapshot main was at when the read began, that nothing else wrote into the
     interval meanwhile. When a file holds rows of the interval and others (after a
     compaction) Iceberg refuses that, the new files are deleted (no snapshot references
     them), and Spark's writer replaces the interval row by row with a MERGE instead
     (merge_sql). The snapshot carries k2.table / k2.interval-start / k2.interval-end /
     k2.run-id / k2.rows / k2.checksum / k2.quarantined-rows / k2.attempt-id (k2.rows and
     k2.checksum are the good rows'). Readers do not see it.
   - audit: the staged snapshot's interval is read back by id; its count and checksum
     must equal ClickHouse's good rows', the rows read must equal ClickHouse's count
     (every slice read), and rows read = written + quarantined. Any difference fails the
     job naming the figures; main is left exactly as it was. The read-back
     (stored_checksums) is Spark SQL on the snapshot (VERSION AS OF), or, for an
     interval the driver wrote, the driver reading the data files Iceberg plans for the
     interval in that snapshot (by field id, rows outside the interval skipped).
   - publish: main is fast-forwarded to the staged snapshot in one metadata commit, which
     Iceberg only makes while main still points at the snapshot's parent. A commit that
     landed in between (a concurrent run of the interval, a compaction) makes it fail, and
     the interval is written and audited again on the new state: a snapshot is never
     applied to a state it was not checked against, so retries, clears, backfills and two
     runs at once end with one copy of each row.
   An empty interval still publishes a snapshot (an empty staged one when the write
   committed nothing), so "this interval was offloaded and had 0 rows" is findable with
   k2.iceberg.find_offload_snapshot like any other interval.
5. The result line reports the interval's figures; rows_read = rows (written) +
   quarantined_rows.

Deployment: the driver imports the `k2` package (installed in the submitting
virtualenv; in cluster deploy mode ship it with --py-files); the executors only need
pyarrow and clickhouse-connect - the slice reader and writer are defined here and travel
by value - and a path to the warehouse that pyarrow's filesystems open (a local or shared
path, or an object store's URI); so does the driver, which writes and reads back the
intervals of at most --driver-max-rows rows itself.

Exit status: 0 done, 2 bad arguments or settings, 1 anything else; the reason is the
line starting with "offload_to_iceberg: error:" (written to stderr, which spark-submit's
PythonRunner merges into its stdout; on success the result lines are the last lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterator, NamedTuple
from urllib.parse import quote

from k2 import checksum as ck
from k2 import iceberg as ib
from k2 import quality
from k2.config import ConfigError, load_tables, parse_duration
from k2.iceberg import snapshot_property_conf
from k2.intervals import parse_utc
from k2.intervals import split_range as intervals_of
from k2.offload import result_line
from k2.quality import INTERVAL_START_COLUMN
from k2.runtime_env import ClickHouseSettings, IcebergSettings, MissingSetting, configure_job_logging

STARTED = time.monotonic()
SOURCE_VIEW = "k2_offload_rows"
QUARANTINE_VIEW = "k2_quarantine_rows"
PUBLISH_ATTEMPTS = 3  # a staged write that lost a race with another commit is redone on the new state
WAP_ID_CONF = "spark.wap.id"  # Iceberg: a write with this set is staged, not published
WAP_ENABLED = "write.wap.enabled"  # the table property that lets it
STAGED_WAP_ID = "wap.id"  # the staged snapshot's summary key
MAIN_BRANCH = "main"
# Iceberg's refusal to drop a data file that holds rows inside *and* outside an overwrite filter
PARTIAL_FILE = "Cannot delete file where some, but not all, rows match filter"
OP_COLUMN = "__k2_op"
EPOCH_DAY = date(1970, 1, 1)
MAX_STEPS = 1000  # a guard against a typo such as --interval-step 1s over a day
# On a cluster, an interval of at most this many rows is read, written and audited by the
# driver's threads: a Python worker on each executor costs more to start than such a write.
DRIVER_MAX_ROWS = 500_000
# Without --slices, a range is read in one slice per this many rows, up to Spark's default
# parallelism: each slice costs a ClickHouse query and a data file per partition value.
SLICE_ROWS = 250_000

log = logging.getLogger("k2.offload")


class UsageError(Exception):
    """Bad arguments or settings: exit status 2."""


class OffloadError(Exception):
    """The offload cannot proceed or its result does not check out: exit status 1."""


# --------------------------------------------------------------------------------------
# Arguments


def _utc_time(text: str) -> datetime:
    try:
        value = parse_utc(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value.microsecond % 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is finer than milliseconds")
    return value.astimezone(timezone.utc)


def _step(text: str) -> timedelta:
    try:
        return parse_duration(text, positive=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _positive(text: str) -> int:
    value = _count(text)
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
    parser.add_argument("--driver-max-rows", type=_count, default=None,
                        help="intervals of at most this many rows are read, written and audited "
                             "by the driver itself, the larger ones by the executors (default: "
                             f"every interval on a local master, else {DRIVER_MAX_ROWS:,})")
    args = parser.parse_args(argv)
    if args.interval_end <= args.interval_start:
        raise UsageError("--interval-end must be after --interval-start")
    if not args.run_id.strip():
        raise UsageError("--run-id is empty")
    args.intervals = split_range(args.interval_start, args.interval_end, args.interval_step)
    return args


def split_range(start: datetime, end: datetime, step: timedelta | None) -> list[tuple[datetime, datetime]]:
    """[start, end) as consecutive intervals of `step` (k2.intervals.split_range), within the
    job's limits: whole milliseconds, at most MAX_STEPS intervals."""
    if step is not None and step % timedelta(milliseconds=1):
        raise UsageError(f"--interval-step {step} is finer than milliseconds")
    try:
        intervals = intervals_of(start, end, step, step_name="--interval-step")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if len(intervals) > MAX_STEPS:
        raise UsageError(f"the range holds {len(intervals)} intervals of {intervals[0][1] - intervals[0][0]}; "
                         f"at most {MAX_STEPS} per job")
    return intervals


# --------------------------------------------------------------------------------------
# Executor side: read one time slice of the interval from ClickHouse as Arrow


def slice_bounds(start_ms: int, end_ms: int, slices: int) -> list[tuple[int, int, int]]:
    """[start, end) cut into `slices` contiguous millisecond ranges (empty ones dropped)."""
    span = end_ms - start_ms
    cuts = [start_ms + (span * i) // slices for i in range(slices + 1)]
    return [(i, cuts[i], cuts[i + 1]) for i in range(slices) if cuts[i] < cuts[i + 1]]


def make_slice_reader(client_kwargs: dict[str, Any], select_sql: str, schema_ipc: bytes,
                      counts: Any = None) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The mapInArrow function. Everything it needs travels in its closure.

    client_kwargs holds the ClickHouse password: it reaches the executors inside the
    serialized task, not through a command line or the Spark conf. `counts` (an
    accumulator of SliceCounts) receives {slice: rows read} once a slice is read whole.
    """

    def read(descriptors: Iterator[Any]) -> Iterator[Any]:
        import clickhouse_connect
        import pyarrow as pa

        target = pa.ipc.read_schema(pa.py_buffer(schema_ipc))
        client = clickhouse_connect.get_client(**client_kwargs)
        try:
            for slice_id, start_ms, end_ms in _slices(descriptors):
                rows = 0
                with client.query_arrow_stream(
                    select_sql,
                    parameters={"k2_start_ms": start_ms, "k2_end_ms": end_ms},
                    use_strings=True,
                ) as stream:
                    for block in stream:
                        out = _conform(block, target)
                        rows += out.num_rows
                        yield out
                if counts is not None:
                    counts.add({slice_id: rows})
        finally:
            client.close()

    return read


def _slices(descriptors: Iterator[Any]) -> Iterator[tuple[int, int, int]]:
    """(slice, start_ms, end_ms) of each row of the task's descriptor batches."""
    for batch in descriptors:
        yield from zip(batch.column("slice").to_pylist(), batch.column("start_ms").to_pylist(),
                       batch.column("end_ms").to_pylist())


class LocalCounts:
    """{slice: rows read} when the slices run in the driver's threads (_run_slices)."""

    def __init__(self) -> None:
        self.value: dict[int, int] = {}

    def add(self, term: dict[int, int]) -> None:
        self.value.update(term)  # one slice per call; dict.update holds the GIL


class SliceCounts:
    """AccumulatorParam of {slice: rows read}: merging keeps one figure per slice, so a
    slice read again (a retried task, a recomputed partition) is not counted twice."""

    def zero(self, value: dict[int, int]) -> dict[int, int]:
        return {}

    def addInPlace(self, left: dict[int, int], right: dict[int, int]) -> dict[int, int]:
        left.update(right)
        return left


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
# Executor side: write one time slice straight into Parquet data files of the table

# The partition transforms the executors evaluate on Arrow data (Iceberg's spec: days,
# months, years or hours since 1970-01-01, or the value itself); other transforms, and
# identity on other types, leave the write to Spark's Iceberg writer.
NATIVE_TRANSFORMS = {
    "identity": ("string", "int", "long", "date", "boolean"),
    "year": ("timestamp", "timestamptz", "date"),
    "month": ("timestamp", "timestamptz", "date"),
    "day": ("timestamp", "timestamptz", "date"),
    "hour": ("timestamp", "timestamptz"),
}
ROW_GROUP_ROWS = 1 << 19  # rows a task buffers (all its partitions) before writing row groups
# What the slice writer yields per file: Arrow types on the executors, Spark's DDL for mapInArrow
FILE_FIELDS = [("slice", "int32"), ("path", "string"), ("bytes", "int64"), ("rows", "int64"),
               ("partition", "string")]
# A slice as a task gets it
SLICE_FIELDS = [("slice", "int32"), ("start_ms", "int64"), ("end_ms", "int64")]
_SPARK_DDL = {"int32": "int", "int64": "long", "string": "string"}


def spark_ddl(fields: list[tuple[str, str]]) -> str:
    """Spark's DDL of FILE_FIELDS-like (name, Arrow type) pairs."""
    return ", ".join(f"{name} {_SPARK_DDL[kind]}" for name, kind in fields)


FILE_SCHEMA = spark_ddl(FILE_FIELDS)
_US_PER = {"day": 86_400_000_000, "hour": 3_600_000_000}


def make_slice_writer(client_kwargs: dict[str, Any], select_sql: str, plan: dict[str, Any],
                      counts: Any = None) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The mapInArrow function of the native write: each slice is read from ClickHouse as
    Arrow (as make_slice_reader does) and written, as it streams, into Parquet data files
    of the table - one file per partition value and slice, the table's field ids in the
    Parquet schema - without becoming Spark rows and without a shuffle. It yields one row
    per file (FILE_SCHEMA: path, bytes, rows, the partition values as Iceberg parses
    them) and counts the slice's rows in `counts` once the slice is read whole. Nothing is
    visible until the driver commits the files; a failed task deletes the files it began,
    and the files of a task that died are referenced by no snapshot.

    `plan` (_native_plan): the Arrow schema with field ids (IPC bytes), the data location,
    the partition fields, the Parquet codec and the files' name prefix.
    """

    def write(descriptors: Iterator[Any]) -> Iterator[Any]:
        import clickhouse_connect
        import pyarrow as pa

        target = pa.ipc.read_schema(pa.py_buffer(plan["schema_ipc"]))
        fs, base = ib.arrow_filesystem(plan["data_location"], plan["s3_options"])
        out_schema = pa.schema(FILE_FIELDS)
        client = clickhouse_connect.get_client(**client_kwargs)
        try:
            for slice_id, start_ms, end_ms in _slices(descriptors):
                files: dict[tuple[Any, ...], _PartitionFile] = {}
                rows = pending = 0
                try:
                    with client.query_arrow_stream(
                        select_sql, parameters={"k2_start_ms": start_ms, "k2_end_ms": end_ms},
                        use_strings=True,
                    ) as stream:
                        for block in stream:
                            out = _conform(block, target)
                            rows += out.num_rows
                            for key, part in partition_split(out, plan["partition"]):
                                if key not in files:
                                    files[key] = _PartitionFile(fs, base, plan, key, slice_id, len(files))
                                files[key].add(part)
                            pending += out.num_rows
                            if pending >= ROW_GROUP_ROWS:
                                for file in files.values():
                                    file.flush()
                                pending = 0
                    written = [file.close() for file in files.values()]
                except BaseException:
                    for file in files.values():
                        file.abort()
                    raise
                if written:
                    yield pa.RecordBatch.from_pylist([{"slice": slice_id, **w} for w in written],
                                                     schema=out_schema)
                if counts is not None:
                    counts.add({slice_id: rows})
        finally:
            client.close()

    return write


def partition_split(batch: Any, fields: list[dict[str, str]]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(partition key, rows) pairs of an Arrow batch: the key holds each partition field's
    transform result (an int, a string, a date, ...; None for NULL)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not fields:
        yield (), batch
        return
    if batch.num_rows == 0:
        return
    keys = [partition_column(batch.column(f["source"]), f["transform"]) for f in fields]
    if all(k.null_count in (0, len(k)) and pc.count_distinct(k).as_py() <= 1 for k in keys):
        yield tuple(k[0].as_py() for k in keys), batch  # the common case: one value per field
        return
    names = [f"k{i}" for i in range(len(keys))]
    grouped = pa.table([*keys, pa.array(range(batch.num_rows), pa.int64())], names=[*names, "row"]) \
        .group_by(names).aggregate([("row", "list")])
    for group in grouped.to_pylist():
        yield tuple(group[n] for n in names), batch.take(pa.array(group["row_list"], pa.int64()))


def partition_column(values: Any, transform: str) -> Any:
    """Iceberg's partition transform of one Arrow column (timestamps in UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if transform == "identity":
        return values
    if pa.types.is_date(values.type):
        if transform == "day":
            return values.cast(pa.int32())
        stamps = values
    else:
        stamps = values.cast(pa.timestamp("us", tz="UTC"))
    if transform in _US_PER:
        micros = stamps.cast(pa.int64())
        step = _US_PER[transform]
        quotient = pc.divide(micros, step)  # truncates toward zero: floored for times before 1970
        below = pc.and_(pc.less(micros, 0), pc.not_equal(pc.multiply(quotient, step), micros))
        return pc.subtract(quotient, below.cast(pa.int64()))
    years = pc.subtract(pc.year(stamps), 1970)
    if transform == "year":
        return years.cast(pa.int32())
    return pc.add(pc.multiply(years, 12), pc.subtract(pc.month(stamps), 1)).cast(pa.int32())


def partition_value(field: dict[str, str], value: Any) -> str | None:
    """A transform result as Iceberg's DataFiles.Builder.withPartitionValues parses it."""
    if value is None:
        return None
    if field["transform"] == "day" or isinstance(value, date):
        day = value if isinstance(value, date) else EPOCH_DAY + timedelta(days=value)
        return day.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def partition_path_value(field: dict[str, str], value: Any) -> str:
    """A transform result as Iceberg names it in data file paths."""
    if value is None:
        return "null"
    transform = field["transform"]
    if transform == "month":
        year, month = divmod(value, 12)
        return f"{1970 + year:04d}-{month + 1:02d}"
    if transform == "year":
        return f"{1970 + value:04d}"
    if transform == "hour":
        return (datetime(1970, 1, 1) + timedelta(hours=value)).strftime("%Y-%m-%d-%H")
    return partition_value(field, value) or "null"


class _PartitionFile:
    """One Parquet data file of one partition value and slice. Arrow blocks are buffered
    and written as row groups when the task's buffer is full (flush) or at close."""

    def __init__(self, fs: Any, base: str, plan: dict[str, Any], key: tuple[Any, ...],
                 slice_id: int, index: int) -> None:
        directory = posixpath.join(base, *(
            f"{quote(field['name'], safe='')}={quote(partition_path_value(field, value), safe='')}"
            for field, value in zip(plan["partition"], key)))
        fs.create_dir(directory, recursive=True)
        name = f"{plan['file_prefix']}-{slice_id:05d}-{index:05d}.parquet"
        self.fs, self.plan = fs, plan
        self.path = posixpath.join(directory, name)
        self.location = plan["data_location"].rstrip("/") + self.path[len(base.rstrip("/")):]
        self.values = [partition_value(field, value) for field, value in zip(plan["partition"], key)]
        self.sink = fs.open_output_stream(self.path)
        self.writer: Any = None
        self.pending: list[Any] = []
        self.rows = 0

    def add(self, batch: Any) -> None:
        self.pending.append(batch)

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.sink, table.schema, compression=self.plan["codec"],
                                           compression_level=self.plan["codec_level"])
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.rows += table.num_rows
        self.pending = []

    def close(self) -> dict[str, Any]:
        self.flush()
        self.writer.close()
        self.sink.close()
        return {"path": self.location, "bytes": self.fs.get_file_info(self.path).size,
                "rows": self.rows, "partition": json.dumps(self.values)}

    def abort(self) -> None:
        with suppress(Exception):
            if self.writer is not None:
                self.writer.close()
        with suppress(Exception):
            self.sink.close()
        with suppress(Exception):
            self.fs.delete_file(self.path)


# --------------------------------------------------------------------------------------
# Driver side


def _quote(name: str) -> str:
    return f"`{name}`"


def _ts_literal(value: datetime) -> str:
    return "TIMESTAMP '" + value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") + "+00:00'"


def interval_predicate(alias: str | None, column: str, start: datetime, end: datetime) -> str:
    col = f"{alias}.{_quote(column)}" if alias else _quote(column)
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


def _phase(name: str, since: float) -> float:
    now = time.monotonic()
    log.info("%s done in %.2f s", name, now - since)
    return now


def offload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Offload every interval of args.intervals in order; one result dict per interval."""
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

    # 1-2. Source schema, and ClickHouse's own figures for the first interval, while the
    # Spark session starts: an interval that cannot be offloaded stops the job before the
    # session is used.
    t = time.monotonic()
    client_kwargs = ch_settings.client_kwargs()
    # Both threads import from these packages: import them whole first, in this one
    import clickhouse_connect  # noqa: F401
    import pyspark.sql  # noqa: F401
    import pyspark.sql.types  # noqa: F401

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-clickhouse") as pool:
        facts = pool.submit(_source_facts, client_kwargs, ch_settings, spec, intervals[0])
        spark = ib.spark_session(ice_settings, f"k2-offload-{spec.name}")
        t = _phase("Spark session", t)
        try:
            columns, types, struct, rules, first = facts.result()
        except BaseException:
            spark.stop()
            raise
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


def _source_facts(client_kwargs: dict[str, Any], ch_settings: Any, spec: Any,
                  interval: tuple[datetime, datetime]) -> tuple[Any, ...]:
    """ClickHouse's DESCRIBE of the source (columns, types, Spark struct), the table's
    quality rules and ClickHouse's figures for `interval`."""
    t = time.monotonic()
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
    first = clickhouse_figures(client_kwargs, ch_settings, spec, types, rules, *interval)
    _phase("ClickHouse describe + checksum", t)
    return columns, types, struct, rules, first


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

    target = ib.spark_table_name(ice_settings, spec)

    _prepare_table(spark, ice_settings, spec, columns, target)
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
        row_cols=ck.spark_row_columns(spec, struct),
        application_id=spark.sparkContext.applicationId,
        rules=rules,
        quarantine_target=ib.quarantine_spark_table_name(ice_settings, spec),
        create_quarantine_sql=ib.create_quarantine_table_sql(ice_settings, spec, columns),
        quarantine_columns=ib.quarantine_columns(columns),
        native=None,
        s3_options=ib.arrow_s3_options(ice_settings),
        fixed_slices=args.slices is not None,
        driver_max_rows=(args.driver_max_rows if args.driver_max_rows is not None
                         else sys.maxsize if spark.sparkContext.master.startswith("local")
                         else DRIVER_MAX_ROWS),
    )
    job = job._replace(native=_native_plan(spark, target, job.schema_ipc, job.s3_options))
    t = _phase("write plan" + ("" if job.native else " (Spark's Iceberg writer)"), t)
    intervals = args.intervals
    # ClickHouse's figures of every interval first: an interval that cannot be offloaded
    # (duplicate keys) ends the job after the intervals before it are committed.
    expected, refused = [first], None
    for start, end in intervals[1:]:
        try:
            expected.append(clickhouse_figures(client_kwargs, ch_settings, spec, types, rules, start, end))
        except OffloadError as exc:
            refused = exc
            break
    if len(intervals) > 1:
        t = _phase(f"ClickHouse figures of {len(expected)} interval(s)", t)
    taken = intervals[:len(expected)]
    results: list[dict[str, Any]] = []
    try:
        if len(taken) > 1 and not _quarantine_due(job, taken[0][0], taken[-1][1], [x.quarantined for x in expected]):
            results = _offload_batch(job, taken, expected)
        else:
            for (start, end), figures in zip(taken, expected):
                began = time.monotonic()
                result = _offload_interval(job, start, end, figures)
                results.append({**result, "interval_seconds": round(time.monotonic() - began, 3)})
        if refused is not None:
            raise refused
    except Exception:
        if results:
            start, end = intervals[len(results)]
            log.error("stopped at interval %d of %d [%s, %s); the %d interval(s) before it are "
                      "committed: %s", len(results) + 1, len(intervals), start.isoformat(),
                      end.isoformat(), len(results),
                      ", ".join(f"[{r['interval_start']}, {r['interval_end']}) -> snapshot "
                                f"{r['snapshot_id']}" for r in results))
        raise
    for index, result in enumerate(results):
        result.update(interval_index=index, intervals=len(intervals),
                      seconds=round(time.monotonic() - STARTED, 3))
        log.info("interval %d of %d [%s, %s): %s rows read = %s written -> snapshot %s + %s "
                 "quarantined", index + 1, len(intervals), result["interval_start"],
                 result["interval_end"], result["rows_read"], result["rows"], result["snapshot_id"],
                 result["quarantined_rows"])
    return results


def _prepare_table(spark: Any, ice_settings: Any, spec: Any, columns: list[Any], target: str) -> None:
    """Namespace and table (schema derived from ClickHouse's DESCRIBE): created when
    missing, evolved with ClickHouse's schema drift, refused when incompatible."""

    namespace = spec.iceberg_table.split(".")[0]
    schema = _table_schema(spark, target)
    if schema is None:  # not there yet
        spark.sql(f"CREATE NAMESPACE IF NOT EXISTS `{ib.catalog_name(ice_settings)}`.`{namespace}`")
        spark.sql(ib.create_table_sql(ice_settings, spec, columns))
        schema = _table_schema(spark, target)
    evolution = ib.schema_evolution(columns, schema)
    if evolution.refused:  # before any ALTER: a refused schema changes nothing
        raise OffloadError(
            f"Iceberg table {spec.iceberg_table} cannot take the schema of ClickHouse {spec.source}: "
            + "; ".join(evolution.refused) + "; nothing written"
        )
    statements = evolution.statements(target)
    for statement in statements:
        log.warning("schema evolution of %s: %s", spec.iceberg_table, statement)
        spark.sql(statement)
    problems = ib.schema_differences(columns, _table_schema(spark, target) if statements else schema)
    if problems:
        raise OffloadError(
            f"Iceberg table {spec.iceberg_table} does not match ClickHouse {spec.source}: "
            + "; ".join(problems)
        )
    ensure_wap_enabled(spark, target)


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
    row_cols: list[Any]
    application_id: str
    rules: Any  # k2.quality.Rules
    quarantine_target: str
    create_quarantine_sql: str
    quarantine_columns: list[Any]
    native: dict[str, Any] | None  # _native_plan: None when Spark's Iceberg writer must write
    driver_max_rows: int  # intervals up to this many rows: slices run in the driver's threads
    fixed_slices: bool  # --slices given: every range in `slices` slices, whatever its size
    s3_options: dict[str, Any]  # pyarrow's S3 options for the warehouse's store (k2.iceberg)

    def slices_for(self, rows: int) -> int:
        """How many slices a range of `rows` rows is read in."""
        if self.fixed_slices:
            return self.slices
        return max(1, min(self.slices, -(-rows // SLICE_ROWS)))

    def on_driver(self, rows: int) -> bool:
        """Whether the slices of a range of `rows` rows run on the driver (_run_slices)."""
        return rows <= self.driver_max_rows


def _offload_interval(job: _Job, start: datetime, end: datetime, expected: Any) -> dict[str, Any]:
    """Read, write (staged), audit and publish one interval: one Iceberg snapshot."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark, spec, target = job.spark, job.spec, job.target
    attempt_id = uuid.uuid4().hex  # finds this interval's commit among the job's
    t = time.monotonic()

    quarantine = _quarantine_due(job, start, end, [expected.quarantined])
    source = read = None
    if quarantine:  # read once, written to two tables
        source, read = _read_source(job, start, end)
        source = source.persist(StorageLevel.MEMORY_AND_DISK)
    in_interval = interval_predicate(None, spec.event_time_column, start, end)
    try:
        quarantine_id = None
        if quarantine:
            quarantine_id = _quarantine(job, source, start, end, expected.quarantined, attempt_id)
            t = _phase(f"quarantine {expected.quarantined.rows} rows", t)
        properties = ib.snapshot_properties(
            spec, start, end, run_id=job.run_id, rows=expected.good.rows,
            checksum=expected.good.checksum, attempt_id=attempt_id,
            quarantined_rows=expected.quarantined.rows,
        )

        def write(wap_id: str) -> _Read:
            if source is None:
                return _write_range(job, start, end, properties, wap_id, expected.rows_read)
            good = source.where(f"NOT {quality.spark_bad_sql(job.rules)}")
            _replace_interval(job, good, F.expr(in_interval), start, end)
            return read

        def audit(snapshot_id: int, written: _Read) -> None:
            stored = stored_checksums(job, snapshot_id, start, end, end - start,
                                      expected.rows_read).get(0, ck.IntervalChecksum(0, 0))
            problems = written.problems(expected.rows_read, stored.rows, expected.quarantined.rows)
            if stored != expected.good:
                problems.append(f"the snapshot holds {stored}, ClickHouse {expected.good} good rows")
            if problems:
                raise AuditError(target, snapshot_id, start, end, problems)

        snapshot_id, summary, read = stage_audit_publish(spark, target, attempt_id, properties, write, audit)
        _phase(f"{read.rows()} rows read in {len(read.bounds)} slices, written ({read.how}), "
               "audited and published", t)
    finally:
        if quarantine:
            source.unpersist()
    return {
        "table": spec.name,
        "iceberg_table": spec.iceberg_table,
        "interval_start": ib.iso_utc(start),
        "interval_end": ib.iso_utc(end),
        "rows": expected.good.rows,
        "checksum": expected.good.checksum,
        "rows_read": read.rows(),
        "quarantined_rows": expected.quarantined.rows,
        "quarantine_table": quality.quarantine_table_name(spec) if job.rules else None,
        "quarantine_snapshot_id": quarantine_id,
        "snapshot_id": snapshot_id,
        "run_id": job.run_id,
        "attempt_id": attempt_id,
        "slices": len(read.bounds),
        "application_id": job.application_id,
        # Iceberg's summary of the commit (for the operator's metrics when pyiceberg cannot read it)
        "added_files_size": ib.summary_int(summary, "added-files-size"),
        "total_data_files": ib.summary_int(summary, "total-data-files"),
    }


class _Read(NamedTuple):
    """The slices of one read and the rows read in each (an accumulator, or LocalCounts on the driver)."""

    bounds: list[tuple[int, int, int]]
    counts: Any
    how: str = "Spark's Iceberg writer"

    def rows(self) -> int:
        return sum(self.counts.value.values())

    def problems(self, clickhouse_rows: int, written: int, quarantined: int) -> list[str]:
        """What is wrong with the read's accounting: every slice read, as many rows as
        ClickHouse counts, and every row read written or quarantined."""
        slices_read = dict(self.counts.value)
        rows_read = sum(slices_read.values())
        problems = []
        if len(slices_read) != len(self.bounds):
            problems.append(f"{len(slices_read)} of {len(self.bounds)} slices were read")
        if rows_read != clickhouse_rows:
            problems.append(f"the job read {rows_read} rows, ClickHouse counts {clickhouse_rows} "
                            "(rows changed during the read?)")
        if written + quarantined != rows_read:
            problems.append(f"rows read {rows_read} != written {written} + quarantined {quarantined}")
        return problems


def _descriptor_frame(spark: Any, descriptors: list[Any], fields: list[tuple[str, str]]) -> Any:
    """One row per descriptor (a slice, a file), one descriptor per task: a local relation,
    scanned by the JVM (a parallelized Python RDD would start a Python worker per task only
    to hand over a few values, beside the one the task's mapInArrow needs). Spark spreads a
    local relation over at most defaultParallelism tasks; more rows than that are
    repartitioned."""
    frame = spark.createDataFrame(descriptors, spark_ddl(fields))
    if len(descriptors) > spark.sparkContext.defaultParallelism:
        frame = frame.repartition(len(descriptors))
    return frame


def _read_source(job: _Job, start: datetime, end: datetime) -> tuple[Any, _Read]:
    """[start, end) of the source as a DataFrame: a parallel Arrow read on the executors,
    one task and one ClickHouse connection per time slice, straight into the write (no
    pass of its own)."""
    spark = job.spark
    bounds = slice_bounds(ck.to_epoch_ms(start), ck.to_epoch_ms(end), job.slices)
    counts = spark.sparkContext.accumulator({}, SliceCounts())
    descriptors = _descriptor_frame(spark, bounds, SLICE_FIELDS)
    source = descriptors.mapInArrow(
        make_slice_reader(job.client_kwargs, job.select_sql, job.schema_ipc, counts), job.struct)
    return source, _Read(bounds, counts)


def _offload_batch(job: _Job, intervals: list[tuple[datetime, datetime]], expected: list[Any]
                   ) -> list[dict[str, Any]]:
    """Contiguous intervals without quarantined rows in one read, one write (staged), one
    audit of every interval and one publish: one Iceberg snapshot replacing the range,
    whose summary carries each interval's figures (k2.iceberg.batch_snapshot_properties),
    so that every interval is found, verified and ledgered as if it had a commit of its
    own. A catch-up's intervals cost one Spark write instead of one each."""
    spark, spec, target = job.spark, job.spec, job.target
    start, end = intervals[0][0], intervals[-1][1]
    step = intervals[0][1] - intervals[0][0]
    attempt_id = uuid.uuid4().hex
    t = time.monotonic()
    properties = ib.batch_snapshot_properties(
        spec, [ib.IntervalFigures(s, e, x.good.rows, x.good.checksum, x.quarantined.rows)
               for (s, e), x in zip(intervals, expected)],
        run_id=job.run_id, attempt_id=attempt_id)
    def write(wap_id: str) -> _Read:
        return _write_range(job, start, end, properties, wap_id, sum(x.rows_read for x in expected))

    def audit(snapshot_id: int, read: _Read) -> None:
        stored = stored_checksums(job, snapshot_id, start, end, step, sum(x.rows_read for x in expected))
        empty = ck.IntervalChecksum(0, 0)
        problems = [
            f"[{s.isoformat()}, {e.isoformat()}): the snapshot holds {stored.get(k, empty)}, "
            f"ClickHouse {x.good} good rows"
            for k, ((s, e), x) in enumerate(zip(intervals, expected)) if stored.get(k, empty) != x.good
        ]
        problems += read.problems(sum(x.rows_read for x in expected),
                                  sum(figures.rows for figures in stored.values()),
                                  sum(x.quarantined.rows for x in expected))
        if problems:
            raise AuditError(target, snapshot_id, start, end, problems)

    snapshot_id, summary, read = stage_audit_publish(spark, target, attempt_id, properties, write, audit)
    seconds = time.monotonic() - t
    _phase(f"{len(intervals)} intervals: {read.rows()} rows read in {len(read.bounds)} slices, written "
           f"({read.how}), audited and published in one snapshot", t)
    results = []
    for k, ((s, e), x) in enumerate(zip(intervals, expected)):
        results.append({
            "table": spec.name,
            "iceberg_table": spec.iceberg_table,
            "interval_start": ib.iso_utc(s),
            "interval_end": ib.iso_utc(e),
            "rows": x.good.rows,
            "checksum": x.good.checksum,
            "rows_read": x.rows_read,  # each slice spans intervals: ClickHouse's count, audited in total
            "quarantined_rows": 0,
            "quarantine_table": None,
            "quarantine_snapshot_id": None,
            "snapshot_id": snapshot_id,
            "run_id": job.run_id,
            "attempt_id": attempt_id,
            "slices": len(read.bounds),
            "application_id": job.application_id,
            # the commit's figures on its first interval, so that sums over intervals stay true
            "added_files_size": ib.summary_int(summary, "added-files-size") if k == 0 else 0,
            "total_data_files": ib.summary_int(summary, "total-data-files"),
            "interval_seconds": round(seconds / len(intervals), 3),
        })
    return results


class AuditError(OffloadError):
    """A staged snapshot failed its audit: it was not published."""

    def __init__(self, target: str, snapshot_id: int, start: datetime, end: datetime,
                 problems: list[str]) -> None:
        super().__init__(
            f"audit of staged snapshot {snapshot_id} of {target} for the interval "
            f"[{start.isoformat()}, {end.isoformat()}) failed: {'; '.join(problems)}; not published, "
            "the table is as it was"
        )


def _write_range(job: _Job, start: datetime, end: datetime, properties: dict[str, str],
                 wap_id: str, rows: int) -> _Read:
    """Replace [start, end) of the table by ClickHouse's rows in one staged commit carrying
    `properties` and `wap_id`; returns the read's accounting.

    The native write when the table allows it (_native_plan); when the interval's files
    also hold rows of other intervals (after a compaction) it cannot replace them whole,
    and the range is written by Spark's Iceberg writer instead (_replace_interval, which
    then MERGEs)."""
    from pyspark.sql import functions as F

    if job.native is not None:
        try:
            return _write_native(job, start, end, properties, wap_id, rows)
        except Exception as exc:
            if PARTIAL_FILE not in "\n".join([*_java_messages(exc), str(exc)]):
                raise
        log.info("files of %s span [%s, %s) and other rows (compacted); Spark's writer replaces "
                 "the range's rows", job.target, start.isoformat(), end.isoformat())
    source, read = _read_source(job, start, end)
    # The figures of the range count no row failing the checks (else the job writes
    # interval by interval, quarantining); the filter stays so that Spark and ClickHouse
    # disagreeing on a row fails the audit.
    good = source.where(f"NOT {quality.spark_bad_sql(job.rules)}") if job.rules else source
    condition = F.expr(interval_predicate(None, job.spec.event_time_column, start, end))
    _replace_interval(job, good, condition, start, end)
    return read


def _native_plan(spark: Any, target: str, schema_ipc: bytes, s3_options: dict[str, Any]
                 ) -> dict[str, Any] | None:
    """What the executors need to write the table's data files themselves
    (make_slice_writer), or None when Spark's Iceberg writer has to: a partition transform
    or type the executors do not evaluate, a sort order, a codec pyarrow lacks."""
    import pyarrow as pa

    jvm = spark.sparkContext._jvm
    table = _iceberg_table(spark, target)
    schema = json.loads(jvm.org.apache.iceberg.SchemaParser.toJson(table.schema()))
    partition = json.loads(jvm.org.apache.iceberg.PartitionSpecParser.toJson(table.spec()))
    by_id = {f["id"]: f for f in schema["fields"]}
    by_name = {f["name"]: f for f in schema["fields"]}

    def refuse(why: str) -> None:
        log.info("%s is written by Spark's Iceberg writer: %s", target, why)

    fields = []
    for field in partition["fields"]:
        source, transform = by_id.get(field["source-id"]), field["transform"]
        if source is None or source["type"] not in NATIVE_TRANSFORMS.get(transform, ()):
            return refuse(f"partition field {field['name']} ({transform} of "
                          f"{source and source['type']})")
        fields.append({"name": field["name"], "source": source["name"], "transform": transform})
    if table.sortOrder().isSorted():
        return refuse("it has a sort order")
    codec = (table.properties().get("write.parquet.compression-codec") or "zstd").lower()
    if codec not in ("zstd", "snappy", "gzip", "lz4", "brotli", "uncompressed"):
        return refuse(f"Parquet codec {codec}")
    level = table.properties().get("write.parquet.compression-level")
    arrow = pa.ipc.read_schema(pa.py_buffer(schema_ipc))
    with_ids = []
    for field in arrow:
        column = by_name.get(field.name)
        if column is None:
            return refuse(f"column {field.name} is not in the table's schema")
        with_ids.append(field.with_nullable(field.nullable and not column["required"])
                        .with_metadata({b"PARQUET:field_id": str(column["id"]).encode()}))
    location = arrow_uri(table.properties().get("write.data.path")
                         or f"{str(table.location()).rstrip('/')}/data")
    return {
        "schema_ipc": pa.schema(with_ids).serialize().to_pybytes(),
        "data_location": location,
        "s3_options": s3_options,  # the store's pyarrow options (credentials: in the task, never logged)
        "partition": fields,
        "codec": "none" if codec == "uncompressed" else codec,
        "codec_level": int(level) if level else None,
    }


def _write_native(job: _Job, start: datetime, end: datetime, properties: dict[str, str],
                  wap_id: str, rows: int) -> _Read:
    """The range read from ClickHouse and written as data files by the executors
    (make_slice_writer), then committed by the driver as one staged overwrite of the range:
    Iceberg's OverwriteFiles, which drops the range's files whole, checks that every new
    file lies inside the range (from the files' own Parquet statistics) and, from the
    snapshot main was at when the read began, that no other commit wrote into the range
    meanwhile (serializable, as the table's merge isolation). Only file names and figures
    reach the driver, never rows. A file holding rows of the range and others (after a
    compaction) makes the commit fail with PARTIAL_FILE; the new files are then deleted
    (no snapshot references them) and the caller writes the range another way."""
    spark, jvm = job.spark, job.spark.sparkContext._jvm
    table = _iceberg_table(spark, job.target)
    base = table.currentSnapshot()
    bounds = slice_bounds(ck.to_epoch_ms(start), ck.to_epoch_ms(end), job.slices_for(rows))
    on_driver = job.on_driver(rows)
    counts = LocalCounts() if on_driver else spark.sparkContext.accumulator({}, SliceCounts())
    plan = {**job.native, "file_prefix": f"{wap_id}-{uuid.uuid4().hex[:8]}"}
    files = _run_slices(job, make_slice_writer(job.client_kwargs, job.select_sql, plan, counts),
                        [list(b) for b in bounds], SLICE_FIELDS, FILE_SCHEMA, on_driver)
    in_range = _range_expression(jvm, job.spec.event_time_column, start, end)
    if not files:  # the range is empty in ClickHouse: its rows are deleted, nothing added
        overwrite = table.newDelete().deleteFromRowFilter(in_range)
    else:
        overwrite = table.newOverwrite().overwriteByRowFilter(in_range).validateAddedFilesMatchOverwriteFilter()
    if base is not None and files:
        overwrite = overwrite.validateFromSnapshot(base.snapshotId()).conflictDetectionFilter(in_range) \
            .validateNoConflictingData().validateNoConflictingDeletes()
    metrics_config = jvm.org.apache.iceberg.MetricsConfig.forTable(table)
    parquet_util = jvm.org.apache.iceberg.parquet.ParquetUtil
    try:
        for file in files:
            metrics = parquet_util.fileMetrics(table.io().newInputFile(file["path"]), metrics_config)
            if int(metrics.recordCount()) != file["rows"]:
                raise OffloadError(f"data file {file['path']} holds {metrics.recordCount()} rows, "
                                   f"its writer wrote {file['rows']}")
            builder = jvm.org.apache.iceberg.DataFiles.builder(table.spec()).withPath(file["path"]) \
                .withFormat("parquet").withFileSizeInBytes(file["bytes"]).withMetrics(metrics)
            values = json.loads(file["partition"])
            if values:
                java_values = jvm.java.util.ArrayList()
                for value in values:
                    java_values.add(value)
                builder = builder.withPartitionValues(java_values)
            overwrite = overwrite.addFile(builder.build())
        for key, value in properties.items():
            overwrite = overwrite.set(key, value)
        overwrite.set(STAGED_WAP_ID, wap_id).stageOnly().commit()

    except Exception as exc:
        if "CommitStateUnknownException" not in "\n".join(_java_messages(exc)):
            for file in files:  # written by this attempt, referenced by no snapshot
                with suppress(Exception):
                    table.io().deleteFile(file["path"])
        raise
    return _Read(bounds, counts, how=f"{len(files)} data file(s) by the "
                 + ("driver" if on_driver else "executors"))


def arrow_uri(location: str) -> str:
    """An Iceberg location as pyarrow's FileSystem.from_uri takes it (file:/x -> file:///x)."""
    if location.startswith("file:") and not location.startswith("file://"):
        return "file://" + location[len("file:"):]
    return location


def stored_checksums(job: _Job, snapshot_id: int, start: datetime, end: datetime, step: timedelta,
                     rows: int) -> dict[int, Any]:
    """The count and checksum of snapshot `snapshot_id`'s rows in [start, end), per `step`:
    {k: IntervalChecksum of [start + k*step, start + (k+1)*step)}, intervals without rows
    left out. What the audit compares with ClickHouse's figures.

    For a range the driver wrote (job.on_driver) the driver reads it back itself from the
    data files Iceberg plans for the range in that snapshot (_file_checksums); else, or when
    a planned file has delete files (rows removed by a row-level MERGE) or lacks a key
    column, Spark SQL reads the snapshot (VERSION AS OF)."""
    if job.on_driver(rows):
        stored = _file_checksums(job, snapshot_id, start, end, step)
        if stored is not None:
            return stored
    column = _quote(job.spec.event_time_column)
    # Which interval a row is in: whole steps of microseconds since the range's start
    bucket = (f"(unix_micros({column}) - {ck.to_epoch_ms(start) * 1000}) "
              f"div {step // timedelta(microseconds=1)}")
    return {
        int(row["k2_interval"]): ck.spark_checksum_of(row)
        for row in job.spark.sql(
            f"SELECT {bucket} AS k2_interval, {', '.join(ck.spark_checksum_sql(job.row_cols))} "
            f"FROM {job.target} VERSION AS OF {snapshot_id} "
            f"WHERE {interval_predicate(None, job.spec.event_time_column, start, end)} GROUP BY 1"
        ).collect()
    }


def _file_checksums(job: _Job, snapshot_id: int, start: datetime, end: datetime, step: timedelta
                    ) -> dict[int, Any] | None:
    """stored_checksums read by the driver: the data files Iceberg plans for [start, end) in
    the snapshot, each read (its key and event-time columns, found by Iceberg field id) in
    a thread of its own, rows outside the range skipped. None when a file cannot be read
    this way (delete files, a column missing)."""
    jvm = job.spark.sparkContext._jvm
    table = _iceberg_table(job.spark, job.target)
    schema = table.schema()
    time_column = job.spec.event_time_column
    names = list(dict.fromkeys([time_column, *(name for name, _ in job.row_cols)]))
    field_ids = {int(schema.findField(name).fieldId()): name for name in names}
    tasks = table.newScan().useSnapshot(snapshot_id) \
        .filter(_range_expression(jvm, time_column, start, end)).planFiles()
    paths = []
    try:
        iterator = tasks.iterator()
        while iterator.hasNext():
            task = iterator.next()
            if not task.deletes().isEmpty():
                log.info("the audit reads %s with Spark: a data file has delete files", job.target)
                return None
            paths.append(str(task.file().location()))
    finally:
        tasks.close()
    bounds_us = (ck.to_epoch_ms(start) * 1000, ck.to_epoch_ms(end) * 1000, step // timedelta(microseconds=1))

    def one(path: str) -> dict[int, Any] | None:
        return _file_checksum(path, field_ids, time_column, job.row_cols, *bounds_us,
                              s3_options=job.s3_options)

    with ThreadPoolExecutor(max_workers=max(1, min(job.slices, len(paths))),
                            thread_name_prefix="k2-audit") as pool:
        per_file = list(pool.map(one, paths))
    if any(figures is None for figures in per_file):
        log.info("the audit reads %s with Spark: a data file lacks one of its columns", job.target)
        return None
    total: dict[int, Any] = {}
    for figures in per_file:
        for k, figure in figures.items():
            before = total.get(k, ck.IntervalChecksum(0, 0))
            total[k] = ck.IntervalChecksum(before.rows + figure.rows,
                                           (before.checksum + figure.checksum) % ck.MODULUS)
    return total


def open_data_file(location: str, s3_options: dict[str, Any] | None = None) -> Any:
    """An Iceberg data file's location opened with pyarrow (k2.iceberg.arrow_filesystem: the
    path taken as it is, escapes of partition values kept)."""
    fs, path = ib.arrow_filesystem(location, s3_options)
    return fs.open_input_file(path)


def _file_checksum(location: str, field_ids: dict[int, str], time_column: str, row_cols: list[Any],
                   start_us: int, end_us: int, step_us: int, s3_options: dict[str, Any] | None = None
                   ) -> dict[int, Any] | None:
    """{k: IntervalChecksum} of one Parquet data file's rows in [start_us, end_us) (k: the
    step of the row's event time), streamed by row group; None when the file has no
    column with one of `field_ids` (a column added to the table after it was written)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with open_data_file(location, s3_options) as source:
        parquet = pq.ParquetFile(source)
        by_id = {int(f.metadata[b"PARQUET:field_id"]): f.name
                 for f in parquet.schema_arrow if f.metadata and b"PARQUET:field_id" in f.metadata}
        if not all(field_id in by_id for field_id in field_ids):
            return None
        found: dict[int, list[Any]] = {}
        for batch in parquet.iter_batches(columns=[by_id[i] for i in field_ids], use_threads=False):
            batch = pa.RecordBatch.from_arrays(batch.columns, names=list(field_ids.values()))
            micros = batch.column(time_column).cast(pa.int64())
            keep = pc.and_(pc.greater_equal(micros, start_us), pc.less(micros, end_us))
            batch, micros = batch.filter(keep), micros.filter(keep)
            if not batch.num_rows:
                continue
            if end_us - start_us <= step_us:
                found.setdefault(0, []).append(batch)
                continue
            steps = pc.divide(pc.subtract(micros, start_us), step_us)  # >= 0: integer division
            for k in pc.unique(steps).to_pylist():
                found.setdefault(k, []).append(batch.filter(pc.equal(steps, k)))
    return {k: ck.arrow_checksum(batches, row_cols) for k, batches in found.items()}


def _range_expression(jvm: Any, column: str, start: datetime, end: datetime) -> Any:
    """Iceberg's expression of [start, end) on a timestamp column."""
    expressions = jvm.org.apache.iceberg.expressions.Expressions
    return getattr(expressions, "and")(  # a Python keyword
        expressions.greaterThanOrEqual(column, jvm.java.lang.Long(ck.to_epoch_ms(start) * 1000)),
        expressions.lessThan(column, jvm.java.lang.Long(ck.to_epoch_ms(end) * 1000)))


def _run_slices(job: _Job, fn: Callable[[Iterator[Any]], Iterator[Any]], descriptors: list[list[Any]],
                fields: list[tuple[str, str]], spark_schema: str, on_driver: bool) -> list[dict[str, Any]]:
    """Run a mapInArrow function `fn` over `descriptors` (one task each: rows of `fields`),
    returning the rows it yields (small: file names and figures, never table rows).

    On the executors: a local relation of the descriptors, mapInArrow, collect. On the
    driver: one thread per descriptor calls `fn` itself - the same code on the same Arrow
    batches, without starting Python workers, for ranges too small to repay them (and on a
    local master, whose executors are this machine's cores anyway). Arrow and Parquet
    release the GIL while they decode, cast, compress and write."""
    import pyarrow as pa

    if not on_driver:
        frame = _descriptor_frame(job.spark, descriptors, fields)
        return [row.asDict() for row in frame.mapInArrow(fn, spark_schema).collect()]
    schema = pa.schema(fields)

    def task(descriptor: list[Any]) -> list[dict[str, Any]]:
        batch = pa.RecordBatch.from_pylist([dict(zip(schema.names, descriptor))], schema=schema)
        return [row for out in fn(iter([batch])) for row in out.to_pylist()]

    with ThreadPoolExecutor(max_workers=max(1, len(descriptors)), thread_name_prefix="k2-slice") as pool:
        return [row for rows in pool.map(task, descriptors) for row in rows]


def _replace_interval(job: _Job, good: Any, condition: Any, start: datetime, end: datetime) -> None:
    """Write `good` as the interval's rows, replacing whatever the table holds in it.

    Fast path: an overwrite by the interval's filter, which drops the interval's files
    whole (each offload writes files of its own interval) and adds the new ones - no read
    of the table, no join. A file that holds rows of the interval *and* others (after a
    compaction) cannot be dropped whole; Iceberg refuses such an overwrite and the
    interval is replaced row by row with the MERGE instead (see merge_sql).
    """
    try:
        # Iceberg's default hash distribution: one writer per partition and task. (Writing
        # the slices as they come with a fanout writer skips that shuffle, but holds a
        # Parquet writer open per partition and slice: at 1M rows benchmarks/offload.py
        # measured 112 CPU s for a first run against 65 with the shuffle, and 2.9 GB peak
        # on a replace against 1.2 GB.)
        good.writeTo(job.target).overwrite(condition)
        return
    except Exception as exc:
        if PARTIAL_FILE not in "\n".join([*_java_messages(exc), str(exc)]):
            raise
    log.info("files of %s span the interval's bounds (compacted); replacing its rows with a MERGE",
             job.target)
    good.createOrReplaceTempView(SOURCE_VIEW)
    job.spark.sql(merge_sql(job.target, job.struct, job.spec.unique_key, job.spec.event_time_column,
                            start, end))


def stage_audit_publish(spark: Any, target: str, attempt_id: str, properties: dict[str, str],
                        write: Callable[[str], Any], audit: Callable[[int, Any], None]
                        ) -> tuple[int, dict[str, str], Any]:
    """Write-audit-publish: `write` commits a *staged* snapshot (Iceberg WAP: the table's
    write.wap.enabled and the session's spark.wap.id), invisible to readers; `audit`
    checks it by id and raises to stop; only then is the table's main branch
    fast-forwarded to it (publish). Returns (snapshot id, its summary).

    Publishing is a fast-forward or nothing: it succeeds only while main still points at
    the staged snapshot's parent (a check Iceberg repeats in the commit itself). If another
    commit landed in between (a concurrent run of the interval, a compaction), the staged
    snapshot is dropped from consideration and the interval is written and audited again
    on the new state - it can never be applied on top of a state it was not checked
    against. A failed audit leaves main exactly as it was; the unpublished snapshot stays
    in the table's metadata (found by its k2.attempt-id) until snapshot expiry.
    """
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        wap_id = f"{attempt_id}-{attempt}"
        try:
            t = time.monotonic()
            with _session_conf(spark, {**_snapshot_property_conf(properties), WAP_ID_CONF: wap_id}):
                written = write(wap_id)
            t = _phase("write (staged)", t)
            table = _iceberg_table(spark, target)
            staged = _staged_snapshot(table, wap_id) or _stage_marker(table, properties, wap_id)
            snapshot_id = int(staged.snapshotId())
            current = table.currentSnapshot()
            if current is not None and int(current.snapshotId()) == snapshot_id:
                raise OffloadError(f"{target}: the write was published without an audit "
                                   f"(table property {WAP_ENABLED} is not true)")
            log.info("staged snapshot %s of %s (parent %s); auditing", snapshot_id, target,
                     staged.parentId())
            audit(snapshot_id, written)
            t = _phase("audit", t)
            _fast_forward_main(table, snapshot_id)
            _phase("publish", t)
            summary = staged.summary()
            return (snapshot_id, {key: summary.get(key) for key in ("added-files-size", "total-data-files")},
                    written)
        except OffloadError:
            raise
        except Exception as exc:
            if attempt == PUBLISH_ATTEMPTS or not _is_commit_conflict(exc):
                raise
            log.warning("attempt %d to publish into %s lost a race with another commit (%s); "
                        "writing and auditing again", attempt, target, describe_error(exc))
            time.sleep(attempt)
    raise AssertionError("unreachable")


@contextmanager
def _session_conf(spark: Any, conf: dict[str, str]) -> Iterator[None]:
    """Session conf set for exactly the statements inside the block."""
    try:
        for key, value in conf.items():
            spark.conf.set(key, value)
        yield
    finally:
        for key in conf:
            spark.conf.unset(key)


def _snapshot_property_conf(properties: dict[str, str]) -> dict[str, str]:
    return snapshot_property_conf(properties)


def _table_schema(spark: Any, target: str) -> Any:
    """The Spark schema of an Iceberg table (as spark.table(target).schema has it, without
    analysing a query), or None when the table does not exist."""
    from pyspark.errors import AnalysisException
    from pyspark.sql.types import StructType

    jvm = spark.sparkContext._jvm
    try:
        table = _iceberg_table(spark, target)
    except AnalysisException:  # Iceberg's NoSuchTableException, as pyspark raises it
        return None
    return StructType.fromJson(json.loads(
        jvm.org.apache.iceberg.spark.SparkSchemaUtil.convert(table.schema()).json()))


def _iceberg_table(spark: Any, target: str) -> Any:
    """The Iceberg Java table behind a Spark table name, refreshed."""
    jvm = spark.sparkContext._jvm
    table = jvm.org.apache.iceberg.spark.Spark3Util.loadIcebergTable(
        spark._jsparkSession, target.replace("`", ""))
    table.refresh()
    return table


def _staged_snapshot(table: Any, wap_id: str) -> Any | None:
    """The snapshot staged with `wap_id` (newest first: it is one of the last)."""
    snapshots = table.snapshots()
    for index in range(snapshots.size() - 1, -1, -1):
        snapshot = snapshots.get(index)
        summary = snapshot.summary()
        if summary is not None and summary.get(STAGED_WAP_ID) == wap_id:
            return snapshot
    return None


def _stage_marker(table: Any, properties: dict[str, str], wap_id: str) -> Any:
    """An empty staged append carrying the properties, should a write ever commit nothing
    (so "offloaded with 0 rows" is findable like any other interval)."""
    append = table.newAppend()
    for key, value in properties.items():
        append = append.set(key, value)
    append.set(STAGED_WAP_ID, wap_id).stageOnly().commit()
    table.refresh()
    log.info("the write committed no snapshot; staged an empty one for the interval")
    staged = _staged_snapshot(table, wap_id)
    if staged is None:
        raise OffloadError(f"staging an empty snapshot with wap id {wap_id} left none in the table")
    return staged


def _fast_forward_main(table: Any, snapshot_id: int) -> None:
    """Move main to `snapshot_id` iff main is its parent (or the table has no main yet),
    in one metadata commit; any other state fails (a conflict: write and audit again)."""
    manage = table.manageSnapshots()
    if table.currentSnapshot() is None:
        manage.createBranch(MAIN_BRANCH, snapshot_id).commit()
    else:
        scratch = f"k2-publish-{snapshot_id}"
        manage.createBranch(scratch, snapshot_id).fastForwardBranch(MAIN_BRANCH, scratch) \
            .removeBranch(scratch).commit()
    table.refresh()
    if int(table.currentSnapshot().snapshotId()) != snapshot_id:
        raise OffloadError(f"published snapshot {snapshot_id}, but main points at "
                           f"{table.currentSnapshot().snapshotId()}")


def quarantine_merge_sql(target: str, names: list[str], interval_start: datetime) -> str:
    """The MERGE that makes `target` (a quarantine table) hold exactly QUARANTINE_VIEW's
    'I' rows for the interval starting at `interval_start`.

    QUARANTINE_VIEW holds the bad rows ('I') and one 'D' row; the 'D' row matches every
    row the table holds for the interval and deletes it ('I' rows never match and are
    inserted), in one commit - a re-run replaces the interval's quarantined rows. Each
    target row matches at most one source row (the single 'D'), as MERGE requires.
    """
    cols = ", ".join(_quote(c) for c in names)
    return (
        f"MERGE INTO {target} t USING {QUARANTINE_VIEW} s "
        f"ON s.{OP_COLUMN} = 'D' AND t.{_quote(INTERVAL_START_COLUMN)} = {_ts_literal(interval_start)} "
        f"WHEN MATCHED THEN DELETE "
        f"WHEN NOT MATCHED AND s.{OP_COLUMN} = 'I' THEN INSERT ({cols}) "
        f"VALUES ({', '.join(f's.{_quote(c)}' for c in names)})"
    )


def _quarantine_due(job: _Job, start: datetime, end: datetime, quarantined: list[Any]) -> bool:
    """Whether the quarantine table needs a commit for [start, end): ClickHouse has bad rows
    in it now (`quarantined`: the intervals' figures), or the table held some for an
    interval in it before (a re-run must delete them)."""
    if not job.rules:
        return False
    if any(figures.rows for figures in quarantined):
        return True
    target = job.quarantine_target
    if not job.spark.catalog.tableExists(target.replace("`", "")):
        return False
    column = f"t.{_quote(quality.INTERVAL_START_COLUMN)}"
    held = f"{column} >= {_ts_literal(start)} AND {column} < {_ts_literal(end)}"
    return job.spark.sql(f"SELECT 1 FROM {target} t WHERE {held} LIMIT 1").first() is not None


def _quarantine(job: _Job, source: Any, start: datetime, end: datetime, expected: Any,
                attempt_id: str) -> int:
    """Replace the interval's rows of the quarantine table by the bad rows of `source`
    (staged, audited against ClickHouse's bad-row figures, then published); returns the
    snapshot id."""
    from pyspark.sql import functions as F

    spark, target = job.spark, job.quarantine_target
    at_start = f"t.{_quote(quality.INTERVAL_START_COLUMN)} = {_ts_literal(start)}"
    if not spark.catalog.tableExists(target.replace("`", "")):
        spark.sql(job.create_quarantine_sql)
    evolution = ib.schema_evolution(job.quarantine_columns, spark.table(target).schema)
    if evolution.refused:
        raise OffloadError(f"quarantine table {target} cannot take the schema of {job.spec.source}: "
                           + "; ".join(evolution.refused) + "; nothing written")
    for statement in evolution.statements(target):
        log.warning("schema evolution of %s: %s", target, statement)
        spark.sql(statement)
    ensure_wap_enabled(spark, target)

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
    properties = ib.snapshot_properties(
        job.spec, start, end, run_id=job.run_id, rows=expected.rows, checksum=expected.checksum,
        attempt_id=attempt_id,
    )

    def write(wap_id: str) -> None:
        bad.withColumn(OP_COLUMN, F.lit("I")).unionByName(delete_row).createOrReplaceTempView(QUARANTINE_VIEW)
        spark.sql(quarantine_merge_sql(target, [f.name for f in bad.schema.fields], start))

    def audit(snapshot_id: int, written: None) -> None:
        stored = ck.spark_checksum(
            spark.sql(f"SELECT * FROM {target} VERSION AS OF {snapshot_id} t WHERE {at_start}"),
            job.row_cols)
        if stored != expected:
            raise AuditError(target, snapshot_id, start, end,
                             [f"the snapshot holds {stored}, ClickHouse {expected} bad rows"])

    return stage_audit_publish(spark, target, attempt_id, properties, write, audit)[0]


def ensure_wap_enabled(spark: Any, target: str) -> None:
    """Staged (write-audit-publish) commits need the table property; tables created before
    it was part of the offload's table properties get it here, once."""
    if _iceberg_table(spark, target).properties().get(WAP_ENABLED) != "true":
        log.warning("enabling write-audit-publish on %s (%s=true)", target, WAP_ENABLED)
        spark.sql(f"ALTER TABLE {target} SET TBLPROPERTIES ('{WAP_ENABLED}'='true')")


def _is_commit_conflict(exc: BaseException) -> bool:
    text = "\n".join(_java_messages(exc))
    return any(name in text for name in (
        "org.apache.iceberg.exceptions.ValidationException",
        "org.apache.iceberg.exceptions.CommitFailedException",
        "org.apache.iceberg.exceptions.CommitStateUnknownException",
        "Cannot fast-forward",  # main moved since the snapshot was staged
    ))


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
    configure_job_logging()
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
    print("\n".join(result_line(r) for r in results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
