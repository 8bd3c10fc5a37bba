"""The single-process paths of benchmarks/offload.py, one per process so that each one's
peak memory is its own:

    python benchmarks/single_process.py peer    --table T --iceberg-table cold.bench_peer_1000 \\
        --interval-start 2026-11-30T10:00:00+00:00 --interval-end 2026-11-30T10:15:00+00:00
    python benchmarks/single_process.py export  --table T --interval-start ... --interval-end ...
    python benchmarks/single_process.py parquet --table T --interval-start ... --interval-end ... \\
        --directory DIR

peer: the offload as one Python process, with the job's checks. ClickHouse counts and
  checksums the interval's good and bad rows (k2.quality) and is asked for duplicate unique
  keys; the interval is read as an Arrow stream (clickhouse-connect), each batch cast to the
  Iceberg table's Arrow schema and counted and checksummed as it arrives; the read must
  equal ClickHouse's figures before anything is written; pyiceberg's
  `overwrite(..., overwrite_filter=<interval>)` replaces the interval in one snapshot, which is
  read back and must hold ClickHouse's good rows. It has no quarantine table: an interval
  with bad rows stops it.
export: the interval from ClickHouse as Arrow, drained (nothing kept), alone.
parquet: the same Arrow data (read first, not timed) written to one zstd Parquet file with
  pyarrow.parquet, alone.

Connection settings come from the environment as for the offload job (K2_CLICKHOUSE_*,
K2_ICEBERG_*). The last line on stdout is `K2_BENCH_RESULT {"rows": ..., "seconds": ...}`,
seconds being the timed part (peer: from the first ClickHouse query to the verified commit).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULT_PREFIX = "K2_BENCH_RESULT"


def cpu_seconds() -> float:
    """This process's user + system time (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _utc_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone")
    return value.astimezone(timezone.utc)


class Source:
    """The interval of spec.source and the connection to read it, as the job has them."""

    def __init__(self, args: argparse.Namespace) -> None:
        import clickhouse_connect

        from k2 import iceberg as ib
        from k2.checksum import clickhouse_interval_filter_sql, interval_parameters
        from k2.config import load_tables
        from k2.runtime_env import ClickHouseSettings

        self.spec = load_tables().get(args.table)
        self.start, self.end = args.interval_start, args.interval_end
        self.client = clickhouse_connect.get_client(**ClickHouseSettings.from_env().client_kwargs())
        self.columns = ib.describe_source(self.client, self.spec)
        self.types = {c.name: c.clickhouse_type for c in self.columns}
        self.parameters = interval_parameters(self.start, self.end)
        # The job's select: the source's columns, the interval's rows.
        self.select_sql = (
            f"SELECT {', '.join(f'`{c.name}`' for c in self.columns)} FROM `{self.spec.source}` "
            f"WHERE {clickhouse_interval_filter_sql(self.spec.event_time_column)}"
        )

    def batches(self) -> Any:
        """The interval as Arrow record batches, streamed."""
        import pyarrow as pa

        with self.client.query_arrow_stream(self.select_sql, parameters=self.parameters,
                                            use_strings=True) as stream:
            for block in stream:
                yield from (block.to_batches() if isinstance(block, pa.Table) else [block])


JOB_FILE = Path(__file__).resolve().parents[1] / "spark_jobs" / "offload_to_iceberg.py"


def job_conform() -> Any:
    """The offload job's own cast of a ClickHouse Arrow batch to the Iceberg table's Arrow
    schema (uint64 -> decimal(20,0), timestamp[ms] -> timestamp[us]: exact, and `safe` casts
    fail otherwise), so that the peer reads exactly what the job writes. The job file
    imports only the standard library when loaded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("k2_offload_job", JOB_FILE)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job._conform


def peer(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    from k2 import checksum as ck
    from k2 import iceberg as ib
    from k2 import quality
    from k2.runtime_env import IcebergSettings

    started = phase = time.monotonic()
    cpu_started = cpu_seconds()
    phases: dict[str, float] = {}  # where the time goes, for the figures' JSON

    def lap(name: str) -> None:
        nonlocal phase
        now = time.monotonic()
        phases[name], phase = round(now - phase, 3), now

    source = Source(args)
    spec, client = source.spec, source.client
    rules = quality.rules(spec, source.types)
    expected = quality.clickhouse_split_checksum(client, spec, rules, source.types,
                                                 source.start, source.end)
    keys = ", ".join(f"`{k}`" for k in spec.unique_key)
    duplicates = client.query(
        f"SELECT {keys}, count() AS copies FROM `{spec.source}` "
        f"WHERE {ck.clickhouse_interval_filter_sql(spec.event_time_column)} "
        f"AND {quality.clickhouse_key_present_sql(rules, source.types)} "
        f"GROUP BY {keys} HAVING copies > 1 LIMIT 5",
        parameters=source.parameters,
    ).result_rows
    if duplicates:
        raise SystemExit(f"duplicate unique keys in the interval, e.g. {duplicates[0][:-1]}")
    lap("clickhouse_figures")

    table = ib.load_catalog(IcebergSettings.from_env()).load_table(args.iceberg_table)
    target = schema_to_pyarrow(table.schema(), include_field_ids=False)
    row_columns = ck.arrow_row_columns(spec, target)
    good_batches = []
    good, bad = ck.IntervalChecksum(0, 0), ck.IntervalChecksum(0, 0)
    conform = job_conform()
    for block in source.batches():
        batch = conform(block, target)
        failed = quality.arrow_bad_mask(batch, rules)
        kept, dropped = batch.filter(pc.invert(failed)), batch.filter(failed)
        good = _add(good, ck.arrow_checksum([kept], row_columns))
        bad = _add(bad, ck.arrow_checksum([dropped], row_columns))
        good_batches.append(kept)
    lap("read_and_checksum")
    read = quality.SplitChecksum(good, bad)
    if read != expected:
        raise SystemExit(f"read {read}; ClickHouse {expected}: nothing written")
    if bad.rows:
        raise SystemExit(f"{bad.rows} rows fail the quality checks; the peer has no quarantine")

    column = spec.event_time_column
    interval = And(GreaterThanOrEqual(column, ib.iso_utc(source.start)),
                   LessThan(column, ib.iso_utc(source.end)))
    properties = ib.snapshot_properties(
        spec, source.start, source.end, run_id="bench_peer", rows=expected.good.rows,
        checksum=expected.good.checksum, attempt_id=f"bench-peer-{time.time_ns()}",
        quarantined_rows=0,
    )
    table.overwrite(pa.Table.from_batches(good_batches, schema=target),
                    overwrite_filter=interval, snapshot_properties=properties)
    del good_batches
    lap("overwrite")
    snapshot = table.current_snapshot()
    assert snapshot is not None
    stored = ck.arrow_checksum(
        table.scan(row_filter=interval, snapshot_id=snapshot.snapshot_id).to_arrow_batch_reader(),
        row_columns,
    )
    if stored != expected.good:
        raise SystemExit(f"snapshot {snapshot.snapshot_id} holds {stored}; ClickHouse {expected.good}")
    lap("read_back_and_checksum")
    return {"rows": stored.rows, "checksum": stored.checksum, "snapshot_id": snapshot.snapshot_id,
            "seconds": time.monotonic() - started, "cpu_seconds": cpu_seconds() - cpu_started,
            "phases": phases}


def _add(a: Any, b: Any) -> Any:
    from k2.checksum import IntervalChecksum

    return IntervalChecksum(a.rows + b.rows, a.checksum + b.checksum)


def export(args: argparse.Namespace) -> dict[str, Any]:
    source = Source(args)
    started, cpu_started = time.monotonic(), cpu_seconds()
    rows = 0
    for batch in source.batches():
        rows += batch.num_rows
    return {"rows": rows, "seconds": time.monotonic() - started,
            "cpu_seconds": cpu_seconds() - cpu_started}


def parquet(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = pa.Table.from_batches(list(Source(args).batches()))
    path = Path(args.directory) / f"k2-bench-{time.time_ns()}.parquet"
    try:
        started, cpu_started = time.monotonic(), cpu_seconds()
        pq.write_table(data, path, compression="zstd")
        seconds, cpu = time.monotonic() - started, cpu_seconds() - cpu_started
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    return {"rows": data.num_rows, "seconds": seconds, "cpu_seconds": cpu, "file_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=("peer", "export", "parquet"))
    parser.add_argument("--table", required=True, help="clickhouse_table from tables.yaml")
    parser.add_argument("--interval-start", required=True, type=_utc_time)
    parser.add_argument("--interval-end", required=True, type=_utc_time)
    parser.add_argument("--iceberg-table", help="peer: namespace.table to replace the interval of")
    parser.add_argument("--directory", help="parquet: where the file is written (then removed)")
    args = parser.parse_args()
    if args.path == "peer" and not args.iceberg_table:
        parser.error("peer needs --iceberg-table")
    if args.path == "parquet" and not args.directory:
        parser.error("parquet needs --directory")
    result = {"peer": peer, "export": export, "parquet": parquet}[args.path](args)
    print(f"{RESULT_PREFIX} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
