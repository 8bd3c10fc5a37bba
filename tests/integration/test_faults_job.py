"""Fault matrix, job level: the offload job under faults, on the real components.

Each scenario ends with `verify_table` clean (no missing, duplicated or mismatched
rows) and prints the rows lost and duplicated it measured (FAULT lines). ClickHouse and
PostgreSQL come from the session `stack`; the Iceberg tables live in catalog names and
warehouses of this module's own.

About 4 minutes in the suite: each fault needs Spark jobs of its own (a killed
job and its re-run, a full then read-only warehouse and the retry, two schema changes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from k2 import checksum as ck
from k2 import iceberg as ib
from k2.config import load_tables
from k2.feed import run_feed
from k2.schema import apply_schema
from k2.verify import late_rows, verify_table
from tests.integration.spark_job import iceberg_settings, job_argv
from tests.integration.spark_job import job_env as spark_job_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTC = timezone.utc
FEED_END = datetime(2026, 11, 26, 11, 0, tzinfo=UTC)
I0 = (datetime(2026, 11, 26, 10, 0, tzinfo=UTC), datetime(2026, 11, 26, 10, 15, tzinfo=UTC))
I1 = (I0[1], datetime(2026, 11, 26, 10, 30, tzinfo=UTC))
I2 = (I1[1], datetime(2026, 11, 26, 10, 45, tzinfo=UTC))
I3 = (I2[1], FEED_END)
CATALOG = "k2_test_faults"
BRONZE = load_tables().get("bronze_trades_binance")
# The job's log line once the interval's snapshot is written but staged: audit and
# publication are the next things it does.
# The job's log line once ClickHouse's figures for the first interval are taken, before
# the Spark session starts (seconds before the executors read the interval).
FIGURES_TAKEN = re.compile(r"k2\.offload: ClickHouse describe \+ checksum done")
BEFORE_PUBLISH = re.compile(r"k2\.offload: staged snapshot \d+ of \S+bronze_trades_binance")


@pytest.fixture(scope="module")
def filled(ch_client):
    apply_schema(ch_client)
    stats = run_feed(ch_client, history=timedelta(hours=1), rate=None, seed=3, end=FEED_END, progress=None)
    assert stats.total_rows > 10_000
    return stats


def _argv(table, interval, run_id):
    return job_argv(table, interval[0], interval[1], run_id)


def run_job(env, table, interval, run_id, expect=0):
    proc = subprocess.run(_argv(table, interval, run_id), env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != expect:
        pytest.fail(f"offload exited {proc.returncode} (expected {expect})\n{output[-6000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("K2_OFFLOAD_RESULT ")]
    return (json.loads(lines[-1].split(" ", 1)[1]) if lines else None), output


def snapshot_ids(catalog, spec) -> list[int]:
    """The snapshots readers see: the main branch's history, oldest first."""
    from pyiceberg.table.snapshots import ancestors_of

    table = catalog.load_table(spec.iceberg_table)
    current = table.current_snapshot()
    return [] if current is None else [s.snapshot_id for s in ancestors_of(current, table.metadata)][::-1]


def staged_run_ids(catalog, spec) -> list[str]:
    """k2.run-id of the snapshots in the table's metadata that main never reached."""
    table = catalog.load_table(spec.iceberg_table)
    published = set(snapshot_ids(catalog, spec))
    return [s.summary.get(ib.PROP_RUN_ID) for s in table.snapshots() if s.snapshot_id not in published]


def iceberg_rows(catalog, spec, interval) -> int:
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    scan = catalog.load_table(spec.iceberg_table).scan(row_filter=And(
        GreaterThanOrEqual(spec.event_time_column, interval[0].isoformat()),
        LessThan(spec.event_time_column, interval[1].isoformat())))
    return scan.to_arrow().num_rows


def assert_clean(ch_client, catalog, spec, start, end, label):
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=start, end=end,
                          compare_values=True)
    totals = report.totals()
    print(f"\nFAULT {label}: ClickHouse {totals['clickhouse_rows']} rows, Iceberg "
          f"{totals['iceberg_rows']} rows, lost {totals['missing']}, duplicated "
          f"{totals['duplicated']}, unexpected {totals['unexpected']}, mismatched {totals['mismatched']}")
    assert report.ok, report.format()
    assert (totals["missing"], totals["duplicated"], totals["mismatched"]) == (0, 0, 0)
    return report


def insert_late_row(ch_client, trade_id: int, at: datetime) -> None:
    ch_client.command(
        "INSERT INTO bronze_trades_binance (sequence_number, trade_id, symbol, price, quantity, "
        "quote_quantity, trade_time_ms, is_buyer_maker) VALUES "
        f"({trade_id}, {trade_id}, 'BTCUSDT', 1.5, 2, 3, {ck.to_epoch_ms(at)}, true)")


# --------------------------------------------------------------------------------------
# 1. spark-submit killed with SIGKILL after its write, before the audit and publication


def test_sigkill_before_publish_leaves_nothing_partial_and_rerun_is_exactly_once(
        filled, ch_client, catalog, job_env, tmp_path):
    first, _ = run_job(job_env, BRONZE.name, I0, "scheduled__i0")
    snapshots = snapshot_ids(catalog, BRONZE)
    rows_before = iceberg_rows(catalog, BRONZE, I0)
    assert rows_before == first["rows"] > 1000

    # a late row makes the re-run's MERGE a real change
    insert_late_row(ch_client, 9_100_000_001, I0[0] + timedelta(minutes=3))
    # the late-rows helper (used by the commit operator) sees it against the ledger count
    assert late_rows(ch_client, BRONZE, {I0: first["rows"]}) == {I0: 1}

    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_argv(BRONZE.name, I0, "manual__killed"), env=job_env,
                                stdout=subprocess.PIPE, stderr=log_file, text=True,
                                start_new_session=True)  # own process group: JVM + Python + workers
        killed_at = None
        deadline = time.monotonic() + 600
        try:
            for line in proc.stdout:
                if BEFORE_PUBLISH.search(line):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = line.strip()
                    break
                if time.monotonic() > deadline:
                    break
        finally:
            if killed_at is None:  # it ended or hung before staging: make sure it is gone
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=60)
    assert killed_at is not None, log_path.read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    # nothing of the killed run is visible: same snapshots, same rows in the interval
    assert snapshot_ids(catalog, BRONZE) == snapshots
    assert iceberg_rows(catalog, BRONZE, I0) == rows_before
    assert ib.find_offload_snapshot(catalog, BRONZE, *I0).run_id == "scheduled__i0"
    # ... although its write reached the table's metadata, staged: written, never published
    assert "manual__killed" in staged_run_ids(catalog, BRONZE)
    print(f"\nFAULT sigkill: killed at {killed_at!r}; snapshots unchanged ({len(snapshots)}), "
          f"interval rows unchanged ({rows_before})")

    rerun, _ = run_job(job_env, BRONZE.name, I0, "manual__rerun_after_kill")
    assert rerun["rows"] == first["rows"] + 1
    assert ib.find_offload_snapshot(catalog, BRONZE, *I0).run_id == "manual__rerun_after_kill"
    assert late_rows(ch_client, BRONZE, {I0: rerun["rows"]}) == {}
    assert_clean(ch_client, catalog, BRONZE, *I0, "sigkill+rerun")


# --------------------------------------------------------------------------------------
# 13. The audit fails: a row lands in ClickHouse between its figures and the read


def test_failed_audit_publishes_nothing_and_the_retry_publishes_once(filled, ch_client, catalog, job_env,
                                                                     tmp_path):
    """The interval changes under a running offload (a row arrives after ClickHouse's
    count and checksum, before the executors read): the staged snapshot holds one row more
    than ClickHouse's figures, the audit fails, main is not moved - readers see the
    interval exactly as before - and the retry publishes it once, with the new row.

    The failing run and the retry are a batch (I2 and I3 in one write, one audit of each
    interval, one publish), so a batch's audit is what refuses here; I2 alone is the
    single-interval path, audited the same way (the sigkill test above stages one)."""
    first, _ = run_job(job_env, BRONZE.name, I2, "scheduled__i2")
    snapshots = snapshot_ids(catalog, BRONZE)
    rows_before = iceberg_rows(catalog, BRONZE, I2)
    assert rows_before == first["rows"] > 1000
    batch = (I2[0], I3[1])
    assert ib.find_offload_snapshot(catalog, BRONZE, *I3) is None

    log_path = tmp_path / "audit.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_argv(BRONZE.name, batch, "manual__audit_fails"), env=job_env,
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
        inserted = False
        output = []
        for line in proc.stdout:  # the job's log (spark-submit merges the job's stderr here)
            output.append(line)
            if not inserted and FIGURES_TAKEN.search(line):
                insert_late_row(ch_client, 9_100_000_013, I2[0] + timedelta(minutes=5))
                inserted = True
        proc.wait(timeout=600)
    text = "".join(output)
    assert inserted, text[-3000:]
    assert proc.returncode == 1, text[-3000:]
    [error] = [l for l in text.splitlines() if l.startswith("offload_to_iceberg: error:")]
    assert "audit of staged snapshot" in error and "not published" in error, error
    # The interval that changed is named with both figures; the read is one row over.
    assert f"[{I2[0].isoformat()}, {I2[1].isoformat()}): the snapshot holds {first['rows'] + 1} rows" in error, error
    assert f"ClickHouse {first['rows']} rows" in error, error
    read, counted = map(int, re.search(r"the job read (\d+) rows, ClickHouse counts (\d+)", error).groups())
    assert read == counted + 1, error
    assert f"[{I3[0].isoformat()}" not in error, "I3 did not change and is not named"
    # nothing visible changed: main's history, the interval's rows, the interval's snapshot
    assert snapshot_ids(catalog, BRONZE) == snapshots
    assert iceberg_rows(catalog, BRONZE, I2) == rows_before
    assert ib.find_offload_snapshot(catalog, BRONZE, *I2).run_id == "scheduled__i2"
    assert ib.find_offload_snapshot(catalog, BRONZE, *I3) is None
    assert "manual__audit_fails" in staged_run_ids(catalog, BRONZE)  # written, audited, refused
    print(f"\nFAULT audit: {error}")

    retry, _ = run_job(job_env, BRONZE.name, batch, "manual__audit_retry")  # the result of I3
    assert snapshot_ids(catalog, BRONZE) == snapshots + [retry["snapshot_id"]]
    assert iceberg_rows(catalog, BRONZE, I2) == first["rows"] + 1
    for interval in (I2, I3):
        found = ib.find_offload_snapshot(catalog, BRONZE, *interval)
        assert (found.run_id, found.snapshot_id) == ("manual__audit_retry", retry["snapshot_id"])
    assert_clean(ch_client, catalog, BRONZE, *batch, "audit failed+retry")


# --------------------------------------------------------------------------------------
# 4. The warehouse full or read-only: a tmpfs of its own (root ignores chmod; a tmpfs can
#    really be filled, and remounted read-only)


@pytest.fixture
def small_warehouse(tmp_path):
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(directory: Path) -> int:
    """Write a file until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * (256 * 1024)
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    return written


def test_full_or_read_only_warehouse_fails_clearly_and_commits_nothing(
        filled, ch_client, job_stack, stack, small_warehouse):
    ice = iceberg_settings(stack, "k2_test_faults_small", small_warehouse / "warehouse")
    env = spark_job_env(job_stack.clickhouse, ice)
    small_catalog = ib.load_catalog(ice)
    run_job(env, BRONZE.name, I0, "scheduled__i0")
    snapshots = snapshot_ids(small_catalog, BRONZE)

    filler = _fill(small_warehouse)
    _, output = run_job(env, BRONZE.name, I1, "scheduled__i1_full", expect=1)
    assert (f"offload_to_iceberg: error: cannot write to the Iceberg warehouse {ice.warehouse}: "
            "No space left on device") in output, output[-4000:]
    assert snapshot_ids(small_catalog, BRONZE) == snapshots
    assert iceberg_rows(small_catalog, BRONZE, I1) == 0
    (small_warehouse / "filler").unlink()

    subprocess.run(["mount", "-o", "remount,ro", str(small_warehouse)], check=True)
    try:
        _, output = run_job(env, BRONZE.name, I1, "scheduled__i1_ro", expect=1)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_warehouse)], check=True)
    assert (f"offload_to_iceberg: error: cannot write to the Iceberg warehouse {ice.warehouse}: "
            "Read-only file system") in output, output[-4000:]
    assert snapshot_ids(small_catalog, BRONZE) == snapshots
    print(f"\nFAULT warehouse: full ({filler} filler bytes) and read-only runs exited 1, "
          f"snapshots unchanged ({len(snapshots)})")

    result, _ = run_job(env, BRONZE.name, I1, "scheduled__i1_retry")
    assert len(snapshot_ids(small_catalog, BRONZE)) == len(snapshots) + 1
    assert result["rows"] == iceberg_rows(small_catalog, BRONZE, I1)
    assert_clean(ch_client, small_catalog, BRONZE, I0[0], I1[1], "warehouse full/ro+retry")


# --------------------------------------------------------------------------------------
# 2. Schema drift in ClickHouse: new columns and safe promotions evolve Iceberg, the rest
#    is refused before anything changes


def _ch_alter(ch_client, clauses: str) -> None:
    ch_client.command(f"ALTER TABLE bronze_trades_binance {clauses}", settings={"mutations_sync": 2})


def _iceberg_types(catalog, spec) -> dict[str, tuple[str, bool]]:
    schema = catalog.load_table(spec.iceberg_table).schema()
    return {f.name: (str(f.field_type), f.required) for f in schema.fields}


def test_schema_drift_evolves_new_columns_and_refuses_incompatible_types(
        filled, ch_client, catalog, job_env):
    if ib.find_offload_snapshot(catalog, BRONZE, *I0) is None:  # when run on its own
        run_job(job_env, BRONZE.name, I0, "scheduled__i0")
    in_i1 = (f"event_time >= toDateTime64('{I1[0]:%Y-%m-%d %H:%M:%S}', 3, 'UTC') "
             f"AND event_time < toDateTime64('{I1[1]:%Y-%m-%d %H:%M:%S}', 3, 'UTC')")
    _ch_alter(ch_client, "ADD COLUMN venue Nullable(String), ADD COLUMN lot Nullable(Int32)")
    _ch_alter(ch_client, f"UPDATE venue = '42', lot = 7 WHERE {in_i1}")

    run_job(job_env, BRONZE.name, I1, "scheduled__i1_new_columns")
    types = _iceberg_types(catalog, BRONZE)
    assert types["venue"] == ("string", False) and types["lot"] == ("int", False)
    table = catalog.load_table(BRONZE.iceberg_table)
    old = table.scan(row_filter=f"event_time < '{I0[1].isoformat()}'",
                     selected_fields=("venue", "lot")).to_arrow()
    assert old.num_rows > 1000 and old["venue"].null_count == old.num_rows == old["lot"].null_count
    assert_clean(ch_client, catalog, BRONZE, I0[0], I1[1], "schema drift: new columns")

    # a promotion (lot int -> long) and an incompatible change (venue string -> long) at once:
    # refused as a whole, naming the table and the column; neither is applied, nothing written
    snapshots = snapshot_ids(catalog, BRONZE)
    _ch_alter(ch_client, "MODIFY COLUMN lot Nullable(Int64), MODIFY COLUMN venue Nullable(Int64)")
    _, output = run_job(job_env, BRONZE.name, I1, "scheduled__i1_incompatible", expect=1)
    assert "offload_to_iceberg: error: Iceberg table cold.bronze_trades_binance cannot take" in output
    assert "column 'venue' is string in Iceberg but ClickHouse now maps it to bigint" in output
    assert snapshot_ids(catalog, BRONZE) == snapshots
    assert _iceberg_types(catalog, BRONZE)["lot"] == ("int", False)

    _ch_alter(ch_client, "MODIFY COLUMN venue Nullable(String)")
    run_job(job_env, BRONZE.name, I1, "scheduled__i1_promoted")
    assert _iceberg_types(catalog, BRONZE)["lot"] == ("long", False)
    assert len(snapshot_ids(catalog, BRONZE)) == len(snapshots) + 1
    assert_clean(ch_client, catalog, BRONZE, I0[0], I1[1], "schema drift: promotion after refusal")
