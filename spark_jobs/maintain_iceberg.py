"""Iceberg maintenance of one offloaded table (and its quarantine table, when it exists).

    spark-submit --jars <iceberg-spark-runtime>,<postgresql> spark_jobs/maintain_iceberg.py \\
        --table bronze_trades_binance --expire-before 2026-12-05T03:00:00Z \\
        --orphans-before 2026-12-04T03:00:00Z [--compact-before 2026-12-07T00:00:00Z] \\
        [--target-file-bytes 536870912] [--retain-last 1] [--tables-config path]

The plan's figures come from k2.maintenance.plan_maintenance (the Airflow operator, or a
caller of its own): this job only runs Iceberg's Spark procedures with them, in order -
rewrite_data_files (sort strategy by the event-time column, rows before
--compact-before), rewrite_manifests, expire_snapshots (before --expire-before, the
newest --retain-last kept), remove_orphan_files (before --orphans-before). Connection
settings come from the environment (k2.runtime_env: K2_ICEBERG_*), never from the command
line. The caller holds the table's offload lock for the run.

On success the last lines on stdout are one result per table:

    K2_MAINTENANCE_RESULT {"table": ..., "iceberg_table": ..., "rewritten_data_files": ...,
                           "expired_snapshots": ..., "orphan_files": [...], ...}

Exit status: 0 done, 2 bad arguments or settings, 1 anything else; the reason is the
line starting with "maintain_iceberg: error:".
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from typing import Any

from k2 import iceberg as ib
from k2 import maintenance as mt
from k2.config import ConfigError, load_tables
from k2.intervals import parse_utc
from k2.runtime_env import IcebergSettings, MissingSetting, configure_job_logging

log = logging.getLogger("k2.maintenance")


class UsageError(Exception):
    """Bad arguments or settings: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit(2), with our prefix
        self.exit(2, f"maintain_iceberg: error: {message}\n")


def _time(text: str) -> datetime:
    try:
        return parse_utc(text, "time")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="maintain_iceberg.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, help="clickhouse_table from tables.yaml")
    parser.add_argument("--compact-before", type=_time, default=None,
                        help="compact the rows whose event time is before this (closed days)")
    parser.add_argument("--expire-before", type=_time, required=True, help="expire snapshots older than this")
    parser.add_argument("--orphans-before", type=_time, required=True,
                        help="remove unreferenced files older than this")
    parser.add_argument("--target-file-bytes", type=int, default=mt.TARGET_FILE_BYTES)
    parser.add_argument("--retain-last", type=int, default=1, help="snapshots always kept (>= 1)")
    parser.add_argument("--tables-config", default=None, help="tables.yaml (default: the bundled one)")
    args = parser.parse_args(argv)
    if args.retain_last < 1:
        raise UsageError("--retain-last must be >= 1")
    if args.target_file_bytes < 1024 * 1024:
        raise UsageError("--target-file-bytes must be at least 1 MiB")
    return args


def _literal(value: datetime) -> str:
    return f"TIMESTAMP '{value:%Y-%m-%d %H:%M:%S.%f}'"  # the session's time zone is UTC


def _row(spark: Any, sql: str) -> dict[str, Any]:
    rows = spark.sql(sql).collect()
    return rows[0].asDict() if rows else {}


def _count(spark: Any, sql: str) -> int:
    return int(spark.sql(sql).collect()[0][0])


def maintain_table(spark: Any, catalog: str, spark_name: str, iceberg_table: str, table: str,
                   sort_column: str, args: argparse.Namespace, prefix_listing: bool = False
                   ) -> mt.TableMaintenance:
    """`prefix_listing`: orphan files are found by listing the table's prefix with its FileIO
    (a warehouse on object storage, which Hadoop's file systems do not list here)."""
    started = time.monotonic()
    done = mt.TableMaintenance(table=table, iceberg_table=iceberg_table)
    quoted = f"'{iceberg_table}'"
    call = f"CALL `{catalog}`.system"
    if args.compact_before is not None:
        rewritten = _row(spark, (
            f"{call}.rewrite_data_files(table => {quoted}, strategy => 'sort', "
            f"sort_order => '{sort_column} ASC NULLS LAST', "
            f"where => \"{sort_column} < {_literal(args.compact_before)}\", "
            f"options => map('target-file-size-bytes', '{args.target_file_bytes}', 'min-input-files', '2'))"))
        done.rewritten_data_files = mt.counts(rewritten, "rewritten_data_files_count")
        done.added_data_files = mt.counts(rewritten, "added_data_files_count")
        done.rewritten_bytes = mt.counts(rewritten, "rewritten_bytes_count")
        log.info("%s: rewrite_data_files %s", iceberg_table, rewritten)
    manifests = _row(spark, f"{call}.rewrite_manifests(table => {quoted})")
    done.rewritten_manifests = mt.counts(manifests, "rewritten_manifests_count")
    done.added_manifests = mt.counts(manifests, "added_manifests_count")
    snapshots_before = _count(spark, f"SELECT count(*) FROM {spark_name}.snapshots")
    expired = _row(spark, (
        f"{call}.expire_snapshots(table => {quoted}, older_than => {_literal(args.expire_before)}, "
        f"retain_last => {args.retain_last})"))
    done.deleted_data_files = mt.counts(expired, "deleted_data_files_count")
    done.snapshots = _count(spark, f"SELECT count(*) FROM {spark_name}.snapshots")
    done.expired_snapshots = snapshots_before - done.snapshots
    log.info("%s: expire_snapshots %s", iceberg_table, expired)
    orphans = spark.sql(
        f"{call}.remove_orphan_files(table => {quoted}, older_than => {_literal(args.orphans_before)}"
        + (", prefix_listing => true)" if prefix_listing else ")")).collect()
    done.orphan_files = sorted(str(r["orphan_file_location"]) for r in orphans)
    done.data_files = _count(spark, f"SELECT count(*) FROM {spark_name}.data_files")
    done.seconds = round(time.monotonic() - started, 2)
    return done


def run(args: argparse.Namespace) -> list[mt.TableMaintenance]:
    try:
        spec = load_tables(args.tables_config).get(args.table)
        settings = IcebergSettings.from_env()
    except (ConfigError, MissingSetting, ValueError) as exc:
        raise UsageError(str(exc)) from None
    spark = ib.spark_session(settings, f"k2-maintain-{spec.name}")
    try:
        catalog = ib.catalog_name(settings)
        results = []
        for iceberg_table, spark_name in ((spec.iceberg_table, ib.spark_table_name(settings, spec)),
                                          (ib.quarantine_table_name(spec),
                                           ib.quarantine_spark_table_name(settings, spec))):
            if not spark.catalog.tableExists(f"{catalog}.{iceberg_table}"):
                log.info("%s does not exist: nothing to maintain", iceberg_table)
                continue
            result = maintain_table(spark, catalog, spark_name, iceberg_table, spec.name,
                                    spec.event_time_column, args, prefix_listing=settings.on_object_store)
            log.info("%s", result.line())
            results.append(result)
        return results
    finally:
        spark.stop()


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    try:
        results = run(parse_args(argv))
    except UsageError as exc:
        print(f"maintain_iceberg: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Spark / Iceberg errors: the trace in the log, a clear line last
        log.exception("maintenance failed")
        print(f"maintain_iceberg: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 1
    print("\n".join(mt.result_line(r) for r in results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
