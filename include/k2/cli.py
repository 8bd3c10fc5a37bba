"""The `k2` command line: the local stack, the schema, the feed, verification, watermarks."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional, TypeVar

import typer

from k2.intervals import parse_utc

T = TypeVar("T")
app = typer.Typer(
    help="K2 cold-tier offload: ClickHouse hot tier to Iceberg, orchestrated by Airflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
local_app = typer.Typer(
    help="The local stack: PostgreSQL, the ClickHouse endpoint, an SMTP sink, statsd_exporter, "
    "Prometheus and Alertmanager.",
    no_args_is_help=True,
)
schema_app = typer.Typer(help="The ClickHouse data model.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(schema_app, name="schema")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _stack():
    from k2.local.settings import LocalStack

    try:
        return LocalStack.from_env()
    except ValueError as exc:
        _fail(str(exc), 2)


def _parsed(value: Optional[str], parse: Callable[[str], T]) -> Optional[T]:
    """An option's value parsed; a ValueError becomes the usage error naming it."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _duration(value: Optional[str]) -> Optional[timedelta]:
    from k2.config import parse_duration

    return _parsed(value, lambda text: parse_duration(text, positive=True))


def _timestamp(value: Optional[str]) -> Optional[datetime]:
    return _parsed(value, lambda text: parse_utc(text, naive_is_utc=True))


def clickhouse_client(stack=None):
    """A client for the k2 database of the local endpoint (created on first use)."""
    from k2.local.stack import clickhouse_client as client

    return client(stack or _stack())


@local_app.command("up")
def local_up(
    spark_cluster: bool = typer.Option(
        False, "--spark-cluster",
        help="Also a Spark standalone master and two workers on 127.0.0.1 (spark_default then points "
        "at it under `k2 run`; ports K2_SPARK_MASTER_PORT, K2_SPARK_MASTER_UI_PORT, K2_SPARK_WORKER_UI_PORTS)."),
    object_store: bool = typer.Option(
        False, "--object-store",
        help="Also an S3-compatible object store on 127.0.0.1 (versitygw; port K2_OBJECT_STORE_PORT): "
        "the Iceberg warehouse moves to s3://k2-warehouse/warehouse under `k2 run` (new tables; "
        "tables already on disk stay readable)."),
    celery: bool = typer.Option(
        False, "--celery",
        help="Also Redis on 127.0.0.1 (port K2_REDIS_PORT): `k2 run` then runs Airflow's CeleryExecutor "
        "with two Celery workers (K2_AIRFLOW_EXECUTOR overrides)."),
) -> None:
    """Start the local services on 127.0.0.1 (idempotent)."""
    from k2.local import stack as local_stack
    from k2.local.processes import StackError

    stack = _stack()
    try:
        local_stack.up(stack, with_spark_cluster=spark_cluster, with_object_store=object_store,
                       with_celery=celery)
    except StackError as exc:
        _fail(str(exc))
    typer.echo(f"local stack up; data in {stack.home}")
    if spark_cluster:
        from k2.local.spark_cluster import SparkCluster

        cluster = SparkCluster.from_env(stack.home)
        typer.echo(f"Spark cluster: {cluster.master_url} (workers and applications: {cluster.master_ui})")
    if object_store:
        from k2.local.object_store import WAREHOUSE, ObjectStore

        typer.echo(f"object store: {ObjectStore.for_local_stack(stack).endpoint} (warehouse {WAREHOUSE}; "
                   f"keys in {stack.credentials_file})")
    if celery:
        from k2.local.celery import redis_port

        typer.echo(f"Redis (Celery broker): {stack.host}:{redis_port()}; `k2 run` starts two Celery workers")


@local_app.command("down")
def local_down() -> None:
    """Stop the local services; their data stays for the next `up`."""
    from k2.local import stack as local_stack
    from k2.local.processes import StackError

    try:
        local_stack.down(_stack())
    except StackError as exc:
        _fail(str(exc))


@local_app.command("status")
def local_status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each service and process of the local stack (those `k2 local up` starts, and Airflow's
    and the feed that `k2 run` adds) with its address, pid and state: healthy, stopped, or
    unhealthy (running but not answering). Exit 1 when any is unhealthy; a stopped stack
    is not an error."""
    from k2.local import airflow
    from k2.local import stack as local_stack
    from k2.local.pipeline import live_feed

    stack = _stack()
    rows = local_stack.status(stack, [*airflow.components(stack), live_feed(0)])
    if as_json:
        typer.echo(json.dumps([{**row.__dict__, "state": row.state} for row in rows], indent=2))
    else:
        width = max(len(row.name) for row in rows) + 2
        typer.echo(f"{'service':<{width}}{'address':<22}{'pid':>8}  state")
        for row in rows:
            typer.echo(f"{row.name:<{width}}{row.address:<22}{row.pid or '-':>8}  {row.state}")
    if any(row.state == "unhealthy" for row in rows):
        raise typer.Exit(1)


@schema_app.command("apply")
def schema_apply() -> None:
    """Create the bronze, silver and gold tables and their views (idempotent)."""
    from k2.local.processes import StackError
    from k2.local.settings import CLICKHOUSE_DATABASE
    from k2.schema import apply_schema

    try:
        client = clickhouse_client()
    except StackError as exc:
        _fail(str(exc))
    names = apply_schema(client)
    typer.echo(f"schema applied in database {CLICKHOUSE_DATABASE}: {len(names)} objects")


@app.command("feed")
def feed(
    history: Optional[str] = typer.Option(None, help="Write this much past data first, e.g. 6h, 90m."),
    rate: Optional[float] = typer.Option(None, help="Then keep feeding live at this many trades/s."),
    duration: Optional[str] = typer.Option(None, help="Stop the live feed after this long (default: Ctrl-C)."),
    seed: int = typer.Option(1, help="Random seed; the same seed and end time give the same trades."),
    end: Optional[str] = typer.Option(None, help="End of the history (ISO-8601, default now)."),
    exchange: Optional[list[str]] = typer.Option(
        None, help="Feed only this exchange (binance, kraken; repeatable): the others' feed is down."
    ),
) -> None:
    """The market feed simulator: history as fast as possible, then live trades."""
    from k2.feed import feed_tables, run_feed
    from k2.local.processes import StackError

    history_span = _duration(history)
    live_duration = _duration(duration)
    if rate is not None and rate <= 0:
        raise typer.BadParameter(f"--rate must be positive, got {rate}")
    if history_span is None and rate is None:
        raise typer.BadParameter("give --history, --rate or both")
    try:
        feed_tables(exchange or None)
    except ValueError as exc:
        raise typer.BadParameter(f"--exchange: {exc}") from None
    try:
        client = clickhouse_client()
    except StackError as exc:
        _fail(str(exc))
    try:
        stats = run_feed(
            client, history=history_span, rate=rate, seed=seed, end=_timestamp(end), duration=live_duration,
            exchanges=exchange or None,
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        typer.echo("feed stopped")
        return
    typer.echo(f"feed done: {stats}")


def _targets(with_spark: bool = False):
    """ClickHouse and Iceberg settings: from K2_* environment variables when set (a real
    deployment), else the local stack's. ``with_spark``: also the environment spark-submit
    needs (the local stack's Spark settings; nothing for a real deployment)."""
    import os

    from k2 import runtime_env
    from k2.local import airflow as local_airflow
    from k2.local.settings import spark_environment
    from k2.local.stack import require_up

    if os.environ.get(runtime_env.CLICKHOUSE_HOST) and os.environ.get(runtime_env.ICEBERG_CATALOG_URI):
        targets = runtime_env.ClickHouseSettings.from_env(), runtime_env.IcebergSettings.from_env()
        return (*targets, {}) if with_spark else targets
    stack = _stack()
    require_up(stack)
    targets = local_airflow.clickhouse_settings(stack), local_airflow.iceberg_settings(stack)
    return (*targets, spark_environment(stack.host)) if with_spark else targets


def _clickhouse_and_catalog():
    """A ClickHouse client and the Iceberg catalog of the targets (_targets)."""
    import clickhouse_connect

    from k2.iceberg import load_catalog
    from k2.local.processes import StackError

    try:
        ch_settings, ice_settings = _targets()
    except StackError as exc:
        _fail(str(exc))
    return clickhouse_connect.get_client(**ch_settings.client_kwargs()), load_catalog(ice_settings)


def _watermark_dsn() -> str:
    import os

    return os.environ.get("K2_WATERMARK_DSN") or _stack().postgres_dsn("k2")


def _tables(table: Optional[str]):
    from k2.config import ConfigError, load_tables

    try:
        config = load_tables()
        return [config.get(table)] if table else list(config.tables)
    except ConfigError as exc:
        _fail(str(exc), 2)


@app.command("verify")
def verify(
    table: Optional[str] = typer.Option(None, "--table", help="One table (default: all of tables.yaml)."),
    from_: Optional[str] = typer.Option(None, "--from", help="Start (ISO-8601); default: first offloaded interval."),
    to: Optional[str] = typer.Option(None, "--to", help="End, exclusive; default: the table's watermark."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compare ClickHouse and Iceberg per 15-minute interval: counts, checksums, missing,
    duplicated and mismatched rows. Exit 1 on any difference."""

    from k2.verify import ColumnRange, verify_table
    from k2.watermarks import WatermarkStore

    specs = _tables(table)
    start, end = _timestamp(from_), _timestamp(to)
    client, catalog = _clickhouse_and_catalog()
    store = WatermarkStore(_watermark_dsn()) if start is None or end is None else None
    ledger_store = store or _optional_store()
    reports, ok = [], True
    for spec in specs:
        table_start, table_end = start, end
        if store is not None:
            ledger = store.ledger_tail(spec.name, 1_000_000)
            watermark = store.get(spec.name)
            if table_start is None:
                table_start = min((e.interval_start for e in ledger), default=None)
            if table_end is None and watermark is not None:
                table_end = watermark.watermark_ts
        if table_start is None or table_end is None or table_end <= table_start:
            message = f"{spec.name}: nothing offloaded yet (give --from and --to to check a range)"
            reports.append({"table": spec.name, "ok": True, "note": message})
            if not as_json:
                typer.echo(message)
            continue
        # After hot-tier retention only the rows ClickHouse still holds can be compared.
        boundary = ledger_store.retention_boundary(spec.name) if ledger_store is not None else None
        restrict = ColumnRange(boundary.column, boundary.hot_from) if boundary is not None else None
        report = verify_table(spec, ch_client=client, catalog=catalog, start=table_start, end=table_end,
                              restrict=restrict)
        if boundary is not None:
            report.notes.append(f"compared the rows with {boundary.column} >= {boundary.hot_from.isoformat()}: "
                                "older ones were retired from ClickHouse after verification")
        late = _late_intervals(spec, report, ledger_store)
        ok = ok and report.ok
        reports.append({**report.to_dict(), "late_rows": late})
        if not as_json:
            typer.echo(report.format())
            for item in late:
                what = (f"late rows: {item['rows']} in [{item['start']}, {item['end']}) arrived after the "
                        f"offload ({item['ledger_rows']} offloaded)" if item["rows"] else
                        f"changed rows: [{item['start']}, {item['end']}) changed in ClickHouse after the "
                        f"offload ({item['ledger_rows']} rows, other values)")
                typer.echo(f"  {what}; re-offload with: {item['command']}")
    if as_json:
        typer.echo(json.dumps(reports, indent=2, default=str))
    if not ok:
        raise typer.Exit(1)


def _optional_store():
    """The watermark store when it is reachable, else None (verify then shows no late rows)."""
    import psycopg

    from k2.local.processes import StackError
    from k2.watermarks import WatermarkStore

    try:
        store = WatermarkStore(_watermark_dsn())
        store.get("")  # reachable and migrated?
        return store
    except (psycopg.Error, StackError, typer.Exit):
        return None


def _late_intervals(spec, report, store) -> list[dict]:
    """Intervals of a verify report whose rows in ClickHouse changed after the offload: more
    rows than the ledger says were offloaded (late rows, `rows` > 0), or as many with other
    values while Iceberg still holds what was offloaded (`rows` 0); with the command that
    re-offloads."""
    from k2.checksum import CHECKSUM_VERSION, IntervalChecksum
    from k2.iceberg import iso_utc
    from k2.watermarks import reoffload_command

    if store is None or report.ok:
        return []
    ledger = {(e.interval_start, e.interval_end): e for e in store.ledger_range(spec.name, report.start, report.end)}
    late = []
    for result in report.failed:
        entry = ledger.get((result.start, result.end))
        if entry is None:
            continue
        offloaded = IntervalChecksum(entry.rows, entry.checksum)
        changed = (entry.checksum_version == CHECKSUM_VERSION and result.clickhouse.rows == entry.rows
                   and result.iceberg == offloaded != result.clickhouse)
        if result.clickhouse.rows > entry.rows or changed:
            late.append({
                "start": iso_utc(result.start),
                "end": iso_utc(result.end),
                "rows": result.clickhouse.rows - entry.rows,
                "ledger_rows": entry.rows,
                "command": reoffload_command(spec.name, result.start),
            })
    return late


@app.command("reoffload")
def reoffload(
    table: str = typer.Option(..., "--table", help="The table (clickhouse_table of tables.yaml)."),
    interval_start: str = typer.Option(..., "--interval-start", help="Start of the 15-minute interval (ISO-8601)."),
    master: Optional[str] = typer.Option(
        None, "--master", help="Spark master (default: $K2_SPARK_MASTER, else local[2])."
    ),
) -> None:
    """Offload one interval again, e.g. after late rows: one Spark job replaces the interval in
    Iceberg (exactly one copy of each row, late rows included) under the table's offload lock,
    then its ledger row is re-committed with the new count, checksum and snapshot.

    The same library function as the Airflow task (k2.offload.offload_range), with
    spark-submit run here instead of by Airflow's SparkSubmitHook."""
    import logging
    import os

    import clickhouse_connect
    import psycopg

    from k2.iceberg import spark_conf
    from k2.intervals import INTERVAL, first_interval_start, is_boundary
    from k2.local.processes import StackError
    from k2.offload import (
        OffloadResultError,
        RetiredIntervalError,
        SparkSubmitError,
        hot_watermark,
        job_jars,
        offload_range,
        run_spark_submit,
        spark_submit_command,
    )
    from k2.verify import late_changes
    from k2.watermarks import WatermarkStore, offload_lock

    (spec,) = _tables(table)
    start = _timestamp(interval_start)
    assert start is not None
    if not is_boundary(start):
        raise typer.BadParameter(f"{interval_start!r} is not the start of a 15-minute interval")
    end = start + INTERVAL
    try:
        ch_settings, ice_settings, spark_env = _targets(with_spark=True)
    except StackError as exc:
        _fail(str(exc))
    jars = job_jars()
    if not jars:
        _fail("no jars in spark_jobs/jars: run `make setup`")
    client = clickhouse_connect.get_client(**ch_settings.client_kwargs())
    try:
        hot = hot_watermark(client, spec)
        if hot is None or hot < end:
            _fail(f"{spec.name} [{start.isoformat()}, {end.isoformat()}) is not complete in ClickHouse yet "
                  f"(max {spec.completeness.table}.{spec.completeness.column} - {spec.allowed_lateness} "
                  f"= {hot.isoformat() if hot else 'no rows'}); its scheduled run will offload it")
    finally:
        client.close()
    dsn = _watermark_dsn()
    store = WatermarkStore(dsn)
    try:
        store.migrate()
        before = store.ledger_entry(spec.name, start)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach the watermark store: {exc}")
    run_id = f"reoffload__{start:%Y-%m-%dT%H:%M:%SZ}__{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("k2.reoffload")
    # Connection settings go through the environment, never the command line (secrets).
    env = {**spark_env, **ch_settings.to_env(), **ice_settings.to_env()}
    master = master or os.environ.get("K2_SPARK_MASTER") or "local[2]"

    def submit(arguments: list[str]) -> list[str]:
        argv = spark_submit_command(arguments, master=master, jars=jars, conf=spark_conf(ice_settings))
        return run_spark_submit(argv, env, log=log)

    with offload_lock(dsn, spec.name, holder=run_id, log=log):
        boundary = store.retention_boundary(spec.name)
        try:
            done = offload_range(spec, [(start, end)], run_id, iceberg=ice_settings, submit=submit, log=log,
                                 offloadable_from=boundary.offloadable_from if boundary else None)
        except RetiredIntervalError as exc:
            _fail(str(exc))
        except (SparkSubmitError, OffloadResultError) as exc:
            _fail(f"the offload job for [{start.isoformat()}, {end.isoformat()}) failed; nothing was "
                  f"re-committed: {exc}")
        (result,) = done.results
        store.initialize(spec.name, first_interval_start(spec.start_date))
        store.commit_interval(spec.name, start, end, result["rows"], result["checksum"],
                                result["snapshot_id"], run_id)
    client = clickhouse_connect.get_client(**ch_settings.client_kwargs())
    try:
        change = late_changes(client, spec, [store.ledger_entry(spec.name, start)]).get((start, end))
    finally:
        client.close()
    still_late = ("0" if change is None else f"{change.extra_rows}" if change.extra_rows
                  else "0, but rows changed again since")
    was = f"{before.rows:,} rows before" if before else "not ledgered before"
    typer.echo(
        f"{spec.name} [{start.isoformat()}, {end.isoformat()}) re-offloaded: {result['rows']:,} rows "
        f"({was}), snapshot {result['snapshot_id']}, run {run_id} in {done.wall_seconds:.0f} s; "
        f"late rows now {still_late}.\n"
        f"check: k2 verify --table {spec.name} --from {start:%Y-%m-%dT%H:%M:%SZ} --to {end:%Y-%m-%dT%H:%M:%SZ}"
    )


retention_app = typer.Typer(
    help="Hot-tier retention: drop ClickHouse partitions older than hot_retention, only behind a "
    "verified offload.", no_args_is_help=True)
app.add_typer(retention_app, name="retention")


def _retention(table: Optional[str], as_json: bool, apply: bool, dry_run: bool) -> None:
    from k2 import metrics, retention
    from k2.watermarks import WatermarkStore

    specs = _tables(table)
    client, catalog = _clickhouse_and_catalog()
    dsn = _watermark_dsn()
    store = WatermarkStore(dsn)
    store.migrate()
    decisions, kept = [], 0
    if apply and not dry_run:
        metrics.emit_safely(metrics.configure_stats)
    for spec in specs:
        try:
            if apply:
                found = retention.apply_table(spec, ch_client=client, catalog=catalog, store=store, dsn=dsn,
                                              dry_run=dry_run, log=(lambda _l: None) if as_json else typer.echo)
            else:
                found = retention.plan_table(spec, ch_client=client, catalog=catalog, store=store)
                if not as_json:
                    for decision in found:
                        typer.echo(decision.line())
        except retention.RetentionError as exc:
            _fail(str(exc), 2)
        decisions += found
        kept_here = sum(1 for d in found if not d.young and not d.droppable)
        kept += kept_here
        if apply and not dry_run:  # the same metrics as the k2_hot_retention DAG's task
            metrics.emit_safely(metrics.record_retention, spec.name, kept=kept_here,
                                dropped=sum(1 for d in found if d.dropped))
    if as_json:
        typer.echo(json.dumps([d.to_dict() for d in decisions], indent=2))
    if kept:
        raise typer.Exit(1)


@retention_app.command("plan")
def retention_plan(
    table: Optional[str] = typer.Option(None, "--table", help="One table (default: all of tables.yaml)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Per partition: young, droppable (verified now), or kept with the reasons. Exit 1 when a
    partition old enough to drop has to be kept."""
    _retention(table, as_json, apply=False, dry_run=False)


@retention_app.command("apply")
def retention_apply(
    table: Optional[str] = typer.Option(None, "--table", help="One table (default: all of tables.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Decide under the lock, drop nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Drop the old partitions that verify clean, oldest first, under the table's offload lock;
    stop at the first one kept. Exit 1 when a partition old enough to drop had to be kept."""
    _retention(table, as_json, apply=True, dry_run=dry_run)


@retention_app.command("views")
def retention_views(
    table: Optional[str] = typer.Option(None, "--table", help="One table (default: all of tables.yaml)."),
) -> None:
    """Create (or replace) the hot + cold views <table>_all: Iceberg before the table's retention
    boundary, ClickHouse from it on (k2.hotcold). Retention creates a table's view at its first
    drop; this makes them now, for every table already in Iceberg."""
    from pyiceberg.exceptions import NoSuchTableError

    from k2 import hotcold, retention

    client, catalog = _clickhouse_and_catalog()
    for spec in _tables(table):
        try:
            name = hotcold.create_view(client, catalog, spec, retention.partition_key(client, spec.name).column)
        except NoSuchTableError:
            typer.echo(f"{spec.name}: not in Iceberg yet (no offload committed): no view")
            continue
        except (hotcold.HotColdError, retention.RetentionError) as exc:
            _fail(f"{spec.name}: {exc}", 2)
        typer.echo(f"{name}: Iceberg before {hotcold.boundary(client, spec).isoformat()}, ClickHouse from then on")


maintenance_app = typer.Typer(help="Iceberg maintenance: compaction, snapshot expiry, orphan files "
                              "(the k2_iceberg_maintenance DAG).", no_args_is_help=True)
app.add_typer(maintenance_app, name="maintenance")


@maintenance_app.command("plan")
def maintenance_plan(
    table: Optional[str] = typer.Option(None, "--table", help="One table (default: all of tables.yaml)."),
) -> None:
    """What a maintenance run of each table would do now: the closed days it compacts, the
    snapshot and orphan-file cutoffs, and the snapshots kept because the ledger lacks their
    intervals (exit 1 when there are such). Trigger the DAG k2_iceberg_maintenance to run it."""
    from datetime import datetime, timezone

    from pyiceberg.exceptions import NoSuchTableError

    from k2.maintenance import plan_maintenance
    from k2.watermarks import WatermarkStore

    _, catalog = _clickhouse_and_catalog()
    store = WatermarkStore(_watermark_dsn())
    store.migrate()
    held = 0
    for spec in _tables(table):
        try:
            iceberg_table = catalog.load_table(spec.iceberg_table)
        except NoSuchTableError:
            typer.echo(f"{spec.name}: not in Iceberg yet: nothing to maintain")
            continue
        plan = plan_maintenance(spec, table=iceberg_table, store=store, now=datetime.now(timezone.utc))
        held += len(plan.held_back)
        typer.echo(f"{spec.name} ({spec.iceberg_table}, {len(iceberg_table.snapshots())} snapshot(s)):")
        for line in plan.describe():
            typer.echo(f"  {line}")
    if held:
        raise typer.Exit(1)


watermark_app = typer.Typer(help="Per-table watermarks and the offload ledger.", no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("show")
def watermark_show(
    table: Optional[str] = typer.Option(None, "--table", help="One table with its ledger tail."),
    tail: int = typer.Option(5, help="Ledger rows to show per table with --table."),
) -> None:
    """Per table: watermark, lag, last success, and the tail of the offload ledger."""
    import psycopg

    from k2.watermarks import WatermarkStore, format_status

    store = WatermarkStore(_watermark_dsn())
    try:
        store.migrate()
        rows = store.status([table] if table else None)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach the watermark store: {exc}")
    if not rows:
        typer.echo("no watermarks yet: no offload has run")
        return
    typer.echo(format_status(rows))
    if table:
        typer.echo(f"\nlast {tail} ledger rows of {table}:")
        for entry in store.ledger_tail(table, tail):
            typer.echo(
                f"  [{entry.interval_start:%Y-%m-%d %H:%M}, {entry.interval_end:%H:%M})  rows={entry.rows:<8} "
                f"snapshot={entry.snapshot_id}  run={entry.run_id}  at {entry.committed_at:%Y-%m-%d %H:%M:%S}"
            )


@watermark_app.command("repair")
def watermark_repair(
    table: str = typer.Option(..., "--table", help="The table to repair (clickhouse_table of tables.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would change; change nothing."),
) -> None:
    """Rebuild a table's ledger and watermark from its Iceberg snapshot summaries: ledger the
    intervals Iceberg holds, drop ledger rows it does not, set the watermark to the end of
    the contiguous run from the table's start_date. Prints every change."""
    import psycopg

    from k2.iceberg import load_catalog
    from k2.local.processes import StackError
    from k2.watermarks import WatermarkError, WatermarkStore, repair_table

    (spec,) = _tables(table)
    try:
        _, ice_settings = _targets()
    except StackError as exc:
        _fail(str(exc))
    store = WatermarkStore(_watermark_dsn())
    try:
        plan = repair_table(store, load_catalog(ice_settings), spec, dry_run=dry_run)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach the watermark store: {exc}")
    except WatermarkError as exc:
        _fail(str(exc))
    prefix = "would change: " if dry_run and plan.changed else ""
    for line in plan.describe():
        typer.echo(prefix + line)


@app.command("run")
def run(
    history: str = typer.Option("3h", help="Feed history written before the DAGs start catching up."),
    rate: float = typer.Option(20.0, help="Live feed rate, trades/s."),
    seed: int = typer.Option(1, help="Feed random seed."),
) -> None:
    """The whole pipeline on the local stack until Ctrl-C (what `make run` does)."""
    from k2.local.pipeline import Pipeline, wait_for_interrupt
    from k2.local.processes import StackError

    history_span = _duration(history)
    pipeline = Pipeline(_stack())
    try:
        start_date = pipeline.start(history=history_span, rate=rate, seed=seed)
        typer.echo(pipeline.banner(start_date))
        wait_for_interrupt()
    except StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    finally:
        typer.echo("stopping…")
        pipeline.stop()


@app.command("demo")
def demo(
    until_caught_up: bool = typer.Option(False, "--until-caught-up", help="Exit once every table is caught up and verified."),
    history: str = typer.Option("1h", help="Feed history to catch up on."),
    rate: float = typer.Option(20.0, help="Live feed rate, trades/s."),
    seed: int = typer.Option(1, help="Feed random seed."),
    timeout: str = typer.Option("30m", help="Give up (exit 1) after this long."),
) -> None:
    """Run the pipeline on a short history; with --until-caught-up, the DAGs end at the last
    interval closed at the start, and it exits 0 once every table's watermark has reached it
    and `k2 verify` is clean."""
    from k2.local.pipeline import Pipeline, wait_for_interrupt, wait_until_caught_up
    from k2.local.processes import StackError

    history_span, limit = _duration(history), _duration(timeout)
    pipeline = Pipeline(_stack())
    try:
        start_date = pipeline.start(history=history_span, rate=rate, seed=seed, bounded=until_caught_up)
        typer.echo(pipeline.banner(start_date))
        if not until_caught_up:
            wait_for_interrupt()
            return
        problem = wait_until_caught_up(pipeline, start_date, limit)
    except StackError as exc:
        problem = str(exc)
    finally:
        pipeline.stop()
    if problem:
        _fail(problem)
    typer.echo("caught up: every table's watermark reached the last closed interval; k2 verify clean")


@app.command("health")
def health(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The 30-second health check: local services, Airflow heartbeats, import errors, per-table
    lag, last success and watermark staleness. Exit 0 ok, 1 warning, 2 critical."""
    import psycopg

    from k2 import health as hc
    from k2.config import load_tables
    from k2.local import stack as local_stack
    from k2.watermarks import WatermarkStore

    stack = _stack()
    checks = [
        hc.Check(f"service {row.name}", "ok" if row.state == "healthy" else "critical",
                 f"{row.host}:{row.port} {row.state}")
        for row in local_stack.status(stack)
    ]
    checks += hc.airflow_checks(f"http://{stack.host}:{stack.airflow_port}")
    try:
        with psycopg.connect(stack.postgres_dsn("airflow"), connect_timeout=5) as conn:
            errors = conn.execute("SELECT count(*) FROM import_error").fetchone()[0]
    except psycopg.Error:
        errors = None
    checks.append(hc.import_error_check(errors))
    tables = [spec.name for spec in load_tables().tables]
    try:
        store = WatermarkStore(_watermark_dsn())
        store.migrate()
        marks = {row.table_name: row for row in store.status()}
        checks += hc.table_checks(tables, marks, hc.thresholds(), hc.now_utc())
    except psycopg.Error as exc:
        checks.append(hc.Check("watermark store", "critical", f"unreachable: {exc}"))
    typer.echo(hc.to_json(checks) if as_json else hc.format_checks(checks))
    raise typer.Exit(hc.STATUS_CODE[hc.worst(checks)])


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
