"""Catch-up on real services: several intervals per Spark job, the per-table offload lock, and the
offload and commit operators planning, skipping and ledgering a backlog.

ClickHouse (chDB endpoint) and PostgreSQL come from the session `stack` fixture; this module
has its own ClickHouse database (`ch_client`), Iceberg catalog name and warehouse, and ledger
database. The operators are executed directly (no Airflow services): their connections come
from AIRFLOW_CONN_* variables, spark-submit is the real one. Tests run in file order.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from k2 import checksum as ck
from k2 import iceberg as ib
from k2.config import load_tables
from k2.feed import run_feed
from k2.intervals import INTERVAL as STEP
from k2.schema import apply_schema
from k2.verify import verify_table
from tests.integration.spark_job import JOB, job_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTC = timezone.utc
FEED_END = datetime(2026, 11, 26, 11, 0, tzinfo=UTC)
H9 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
H10 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
CATALOG = "k2_test_catchup"
LEDGER_DB = "t_catchup"

TABLES = load_tables()
BRONZE = TABLES.get("bronze_trades_binance")
KRAKEN = TABLES.get("bronze_trades_kraken")

# Wall times of the comparison, filled by the tests that measure them.
PERF: dict[str, float] = {}


def steps(start: datetime, n: int) -> list[tuple[datetime, datetime]]:
    return [(start + k * STEP, start + (k + 1) * STEP) for k in range(n)]


@pytest.fixture(scope="module")
def filled(ch_client):
    apply_schema(ch_client)
    stats = run_feed(ch_client, history=timedelta(hours=2), rate=None, seed=3, end=FEED_END, progress=None)
    assert stats.total_rows > 10_000
    return stats


def submit(env, table, start, end, run_id, *extra, expect=0):
    argv = job_argv(table, start, end, run_id, *extra)
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - started
    if proc.returncode != expect:
        pytest.fail(
            f"offload exited {proc.returncode} (expected {expect}) after {wall:.1f} s\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("K2_OFFLOAD_RESULT ")]
    results = [json.loads(line.split(" ", 1)[1]) for line in lines]
    if expect == 0:
        assert lines
        tail = proc.stdout.strip().splitlines()[-len(lines):]
        assert tail == lines, "the result lines must be the last lines"
    return results, proc, wall


def clickhouse_figures(ch_client, spec, interval):
    types = {c.name: c.clickhouse_type for c in ib.describe_source(ch_client, spec)}
    return ck.clickhouse_interval_checksum(ch_client, spec, types, *interval)


def assert_clean(ch_client, catalog, spec, start, end):
    report = verify_table(spec, ch_client=ch_client, catalog=catalog, start=start, end=end)
    assert report.ok, report.format()
    assert all(r.duplicated == 0 for r in report.intervals)
    return report


# --------------------------------------------------------------------------------------
# The job: a range of intervals in one SparkSession


def test_one_job_offloads_four_intervals_in_one_snapshot(filled, ch_client, catalog, job_env):
    run_id = "scheduled__2026-11-26T10:15:00+00:00"
    results, _, wall = submit(job_env, BRONZE.name, H10, H10 + 4 * STEP, run_id)
    PERF["batch"] = wall

    assert [(r["interval_start"], r["interval_end"]) for r in results] == [
        (s.isoformat(), e.isoformat()) for s, e in steps(H10, 4)
    ]
    assert len({r["application_id"] for r in results}) == 1, "one SparkSession, one JVM"
    assert len({r["snapshot_id"] for r in results}) == 1, "one write, one audit, one publish"
    assert [r["interval_index"] for r in results] == [0, 1, 2, 3]
    table = catalog.load_table(BRONZE.iceberg_table)
    assert len(table.snapshots()) == 1  # the batch's commit, nothing else
    found = ib.find_offload_snapshots(catalog, BRONZE, steps(H10, 4))
    for result, interval in zip(results, steps(H10, 4)):
        expected = clickhouse_figures(ch_client, BRONZE, interval)
        assert expected.rows > 500
        assert (result["rows"], result["checksum"]) == (expected.rows, expected.checksum)
        assert result["run_id"] == run_id
        assert result["total_data_files"] >= 1
        snapshot = found[interval]
        assert (snapshot.snapshot_id, snapshot.rows, snapshot.checksum, snapshot.run_id) == (
            result["snapshot_id"], expected.rows, expected.checksum, run_id)
        assert snapshot.added_files_size == result["added_files_size"]
    # The commit's figures are on its first interval, so that sums over intervals stay true.
    assert results[0]["added_files_size"] > 0 and all(r["added_files_size"] == 0 for r in results[1:])
    summary = table.snapshot_by_id(results[0]["snapshot_id"]).summary.additional_properties
    assert (summary[ib.PROP_INTERVAL_START], summary[ib.PROP_INTERVAL_END]) == (
        H10.isoformat(), (H10 + 4 * STEP).isoformat())
    assert summary[ib.PROP_ROWS] == str(sum(r["rows"] for r in results))
    assert_clean(ch_client, catalog, BRONZE, H10, H10 + 4 * STEP)
    rows = sum(r["rows"] for r in results)
    inner = ", ".join(f"{r['interval_seconds']:.1f}" for r in results)
    print(f"\nPERF 4 intervals of {BRONZE.name} in one spark-submit: {rows:,} rows, wall {wall:.1f} s; "
          f"per interval in the job: {inner} s")


def test_failure_stops_at_the_failing_interval_and_keeps_those_before(filled, ch_client, catalog, job_env):
    bad = (H10 + STEP, H10 + 2 * STEP)
    before_bad = ib.find_offload_snapshot(catalog, BRONZE, *bad)
    # A duplicate unique key in the third interval of [09:45, 10:30) makes that interval fail.
    ch_client.command(
        "INSERT INTO bronze_trades_binance (sequence_number, trade_id, symbol, price, quantity, "
        "quote_quantity, trade_time_ms, is_buyer_maker) SELECT 9000000002, trade_id, symbol, price, "
        "quantity, quote_quantity, trade_time_ms, is_buyer_maker FROM bronze_trades_binance WHERE "
        f"{ck.clickhouse_interval_filter_sql('event_time')} ORDER BY trade_id LIMIT 1",
        parameters=ck.interval_parameters(*bad),
    )
    _, proc, _ = submit(job_env, BRONZE.name, H10 - STEP, bad[1], "manual__partial", expect=1)
    output = proc.stdout + proc.stderr
    assert "K2_OFFLOAD_RESULT" not in output
    assert "stopped at interval 3 of 3" in output
    assert "offload_to_iceberg: error:" in output and "duplicate unique keys" in output
    for interval in steps(H10 - STEP, 2):  # re-offloaded and committed before the failure
        assert ib.find_offload_snapshot(catalog, BRONZE, *interval).run_id == "manual__partial"
    after_bad = ib.find_offload_snapshot(catalog, BRONZE, *bad)
    assert after_bad.snapshot_id == before_bad.snapshot_id  # nothing written for it
    assert_clean(ch_client, catalog, BRONZE, H10 - STEP, bad[0])
    ch_client.command("ALTER TABLE bronze_trades_binance DELETE WHERE sequence_number = 9000000002",
                      settings={"mutations_sync": 2})


@pytest.fixture
def k2_log_handlers():
    """main() adds a handler on the `k2` logger bound to the (captured) stderr: drop it after."""
    k2_log = logging.getLogger("k2")
    before = (list(k2_log.handlers), k2_log.level, k2_log.propagate)
    yield
    k2_log.handlers[:] = before[0]
    k2_log.setLevel(before[1])
    k2_log.propagate = before[2]


def _job_module():
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("offload_to_iceberg", JOB)
    job = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(job)
    return job


@pytest.mark.parametrize(
    "args, message",
    [
        (["--interval-end", "2026-11-26T10:40:00Z", "--interval-step", "15m"],
         "not a whole number of --interval-step"),
        (["--interval-end", "2026-11-26T11:00:00Z", "--interval-step", "0s"], "not a positive duration"),
        (["--interval-end", "2026-11-26T11:00:00Z", "--interval-step", "a while"], "is not a duration"),
        (["--interval-end", "2026-12-26T10:00:00Z", "--interval-step", "15m"], "at most 1000 per job"),
    ],
)
def test_bad_ranges_are_clear(args, message, capsys, k2_log_handlers):
    """Argument errors exit 2 before any Spark or service is touched (checked in-process)."""
    argv = ["--table", BRONZE.name, "--run-id", "r", "--interval-start", "2026-11-26T10:00:00Z", *args]
    assert _job_module().main(argv) == 2
    err = capsys.readouterr().err
    assert "offload_to_iceberg: error:" in err and message in err, err


def test_ranges_split_into_steps():
    split = _job_module().split_range
    assert split(H10, H10 + 4 * STEP, None) == steps(H10, 4)
    assert split(H10, H10 + STEP, None) == steps(H10, 1)
    # Without a step a range that is not a multiple of 15 minutes is one interval, as before.
    assert split(H10, H10 + timedelta(minutes=10), None) == [(H10, H10 + timedelta(minutes=10))]
    assert split(H10, H10 + timedelta(hours=1), timedelta(hours=1)) == [(H10, H10 + timedelta(hours=1))]
    assert split(H10, H10 + timedelta(minutes=10), timedelta(minutes=5)) == [
        (H10, H10 + timedelta(minutes=5)), (H10 + timedelta(minutes=5), H10 + timedelta(minutes=10))]


# --------------------------------------------------------------------------------------
# The per-table offload lock (PostgreSQL advisory lock)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_offload_lock_serializes_and_says_who_holds_it(ledger_dsn):
    from k2.watermarks import offload_lock

    log = logging.getLogger("k2.test.lock")
    lines = _Lines()
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    log.propagate = False
    order: list[str] = []
    with offload_lock(ledger_dsn, "silver_trades", holder="run_A", log=log):
        def second() -> None:
            with offload_lock(ledger_dsn, "silver_trades", holder="run_B", log=log, poll_interval=0.1):
                order.append("B")

        thread = threading.Thread(target=second)
        thread.start()
        # another table's lock is independent
        with offload_lock(ledger_dsn, "gold_ohlcv_1m", holder="run_C", log=log):
            order.append("C")
        time.sleep(1.0)
        assert thread.is_alive() and order == ["C"]
        order.append("A")
    thread.join(timeout=10)
    assert order == ["C", "A", "B"]
    waiting = [line for line in lines.lines if line.startswith("waiting for the offload lock")]
    assert waiting and "silver_trades" in waiting[0] and "k2 offload run_A" in waiting[0], lines.lines
    assert any(line.startswith("got the offload lock of silver_trades") for line in lines.lines)


def test_a_killed_holder_releases_the_lock(ledger_dsn):
    import psycopg

    from k2.catchup import offload_lock_key

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import logging, sys, time\n"
         "from k2.watermarks import offload_lock\n"
         f"with offload_lock({ledger_dsn!r}, 'silver_trades', holder='doomed', log=logging.getLogger()):\n"
         "    print('locked', flush=True)\n"
         "    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        key = offload_lock_key("silver_trades")
        with psycopg.connect(ledger_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0] is False
            holder.kill()  # SIGKILL: no finally, no unlock - only the connection goes
            holder.wait(timeout=10)
            deadline = time.monotonic() + 10
            while not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                assert time.monotonic() < deadline, "the killed holder's lock was not released"
                time.sleep(0.1)
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        if holder.poll() is None:
            holder.kill()


# --------------------------------------------------------------------------------------
# The operators on a backlog: plan, batch, skip, ledger (no Airflow services)


class _StatsdSink:
    """A UDP socket that keeps every StatsD line Airflow's Stats client sends."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.lines.extend(data.decode().splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def values(self, name: str) -> list[tuple[float, str]]:
        """(value, type) of every line named `name` (without the prefix)."""
        out = []
        for line in list(self.lines):
            metric, _, rest = line.partition(":")
            if metric == f"airflow.{name}":
                value, _, kind = rest.partition("|")
                out.append((float(value), kind))
        return out


@pytest.fixture(scope="module")
def airflow_env(stack, job_stack, ledger_dsn):
    """AIRFLOW_CONN_* for the operators, spark-submit on PATH, StatsD into a sink."""
    from k2 import metrics

    ch, ice = job_stack.clickhouse, job_stack.iceberg
    c = stack.credentials
    sink = _StatsdSink()
    conns = {
        "clickhouse_default": {
            "conn_type": "clickhouse", "host": ch.host, "port": ch.port, "login": ch.user,
            "password": ch.password, "schema": ch.database,
        },
        "iceberg_default": {
            "conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
            "login": c["postgres_user"], "password": c["postgres_password"], "schema": "k2",
            "extra": {"warehouse": ice.warehouse, "catalog_name": CATALOG},
        },
        "k2_watermarks": {
            "conn_type": "postgres", "host": stack.host, "port": stack.postgres_port,
            "login": c["postgres_user"], "password": c["postgres_password"], "schema": LEDGER_DB,
        },
        "spark_default": {"conn_type": "spark", "host": "local[2]", "extra": {"spark-binary": "spark-submit"}},
    }
    with pytest.MonkeyPatch.context() as env:
        for conn_id, conn in conns.items():
            env.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
        env.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        env.setenv("PYSPARK_PYTHON", sys.executable)
        env.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        env.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
        env.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
        env.setenv("AIRFLOW__METRICS__STATSD_PORT", str(sink.port))
        env.setenv("AIRFLOW__METRICS__STATSD_PREFIX", "airflow")
        metrics.configure_stats(force=True)
        try:
            yield sink
        finally:
            sink.close()
    metrics.configure_stats(force=True)


class _TI:
    def __init__(self, try_number: int = 1) -> None:
        self.try_number = try_number
        self.xcom: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str) -> Any:
        return self.xcom.get(task_ids)


def _context(interval, run_type="scheduled", try_number=1, run_id=None):
    start, end = interval
    return {
        "run_id": run_id or f"{run_type}__{end.isoformat()}",
        "dag_run": SimpleNamespace(run_type=run_type, start_date=datetime.now(UTC) - timedelta(seconds=30)),
        "ti": _TI(try_number),
        "data_interval_start": start,
        "data_interval_end": end,
    }


def _offload(context, **kwargs):
    from k2_provider.operators.offload import OffloadToIcebergOperator

    start, end = context["data_interval_start"], context["data_interval_end"]
    operator = OffloadToIcebergOperator(
        task_id="offload_to_iceberg", table=KRAKEN.name, interval_start=start.isoformat(),
        interval_end=end.isoformat(), conf={"spark.ui.enabled": "false"}, lock_poll_interval=0.2,
        **kwargs,
    )
    context["operator"] = operator
    result = operator.execute(context)
    json.dumps(result)  # XCom-serializable
    context["ti"].xcom["offload_to_iceberg"] = result
    return result


def _commit(context):
    from k2_provider.operators.watermark_commit import WatermarkCommitOperator

    return WatermarkCommitOperator(
        task_id="commit_watermark", table=KRAKEN.name, initial_watermark=H10
    ).execute(context)


def test_operators_catch_up_a_backlog_with_one_spark_job(
    filled, ch_client, catalog, ledger_dsn, airflow_env
):
    """Runs of 10:00, 10:15, 10:30 (10:45 is not complete: the feed ends at 11:00, lateness 2m).

    The first run offloads all three in one job; the second starts before the first one's
    commit and finds its interval in Iceberg; the third finds it in the ledger. A manual
    run re-offloads its interval. Then the ledger, the watermark, Iceberg and ClickHouse agree.
    """
    import psycopg

    from k2.watermarks import WatermarkStore

    sink = airflow_env
    runs = steps(H10, 3)
    a = _context(runs[0])
    started = time.monotonic()
    result_a = _offload(a)
    wall_a = time.monotonic() - started
    assert result_a["skipped"] is False
    assert [(i["interval_start"], i["interval_end"]) for i in result_a["intervals"]] == [
        (s.isoformat(), e.isoformat()) for s, e in runs]
    assert result_a["interval_start"] == runs[0][0].isoformat()
    assert {i["run_id"] for i in result_a["intervals"]} == {a["run_id"]}
    for item, interval in zip(result_a["intervals"], runs):
        expected = clickhouse_figures(ch_client, KRAKEN, interval)
        assert (item["rows"], item["checksum"]) == (expected.rows, expected.checksum)
    assert len(catalog.load_table(KRAKEN.iceberg_table).snapshots()) == 1  # one for the batch
    # every result line was kept (the fallback when Iceberg cannot be read), one per interval
    assert len(a["operator"]._result_lines) == 3

    # Run B starts before run A's commit: its interval is in Iceberg, not yet in the ledger.
    b = _context(runs[1])
    result_b = _offload(b)
    assert result_b["skipped"] is True
    assert (result_b["run_id"], result_b["snapshot_id"]) == (a["run_id"], result_a["intervals"][1]["snapshot_id"])

    commit_a = _commit(a)
    assert commit_a["intervals_committed"] == 3
    assert commit_a["watermark_ts"] == runs[-1][1].isoformat()
    commit_b = _commit(b)
    assert commit_b["recommit"] is True and commit_b["watermark_ts"] == runs[-1][1].isoformat()

    # Run C waits for the lock held by someone else, then finds its interval in the ledger.
    from k2.watermarks import offload_lock

    c = _context(runs[2])
    outcome: dict[str, Any] = {}
    with offload_lock(ledger_dsn, KRAKEN.name, holder="maintenance", log=logging.getLogger("t")):
        thread = threading.Thread(target=lambda: outcome.update(_offload(c)))
        thread.start()
        time.sleep(1.5)
        assert thread.is_alive(), "run C did not wait for the offload lock"
        with psycopg.connect(ledger_dsn, autocommit=True) as conn:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (f"k2 offload {c['run_id']}",),
            ).fetchone()[0]
        assert waiting == 1
    thread.join(timeout=60)
    assert outcome["skipped"] is True and outcome["run_id"] == a["run_id"]
    _commit(c)

    # A manual run re-offloads its own interval, even though it is offloaded.
    m = _context(runs[1], run_type="manual", run_id="manual__rerun")
    started = time.monotonic()
    result_m = _offload(m)
    wall_m = time.monotonic() - started
    assert result_m["skipped"] is False and len(result_m["intervals"]) == 1
    assert result_m["run_id"] == "manual__rerun"
    assert result_m["snapshot_id"] != result_a["intervals"][1]["snapshot_id"]
    _commit(m)

    store = WatermarkStore(ledger_dsn)
    ledger = store.ledger_range(KRAKEN.name, runs[0][0], runs[-1][1])
    assert [(e.interval_start, e.interval_end) for e in ledger] == runs
    assert [e.run_id for e in ledger] == [a["run_id"], "manual__rerun", a["run_id"]]
    assert ledger[1].snapshot_id == result_m["snapshot_id"]
    assert store.get(KRAKEN.name).watermark_ts == runs[-1][1]
    assert len(catalog.load_table(KRAKEN.iceberg_table).snapshots()) == 2  # 2 Spark jobs in all
    report = assert_clean(ch_client, catalog, KRAKEN, runs[0][0], runs[-1][1])
    assert [(r.clickhouse.rows, r.clickhouse.checksum) for r in report.intervals] == [
        (e.rows, e.checksum) for e in ledger]

    # Metrics, as Airflow's StatsD client sent them
    time.sleep(0.5)
    rows = sink.values(f"k2.offload.rows.{KRAKEN.name}")
    assert sum(v for v, _ in rows) == sum(i["rows"] for i in result_a["intervals"]) + result_m["rows"]
    assert all(kind == "c" for _, kind in rows)
    assert sum(v for v, _ in sink.values(f"k2.offload.bytes.{KRAKEN.name}")) > 0
    durations = [v for v, kind in sink.values(f"k2.offload.duration.{KRAKEN.name}") if kind == "ms"]
    assert len(durations) == 4  # one per offloaded interval: 3 + 1
    # the spark-submit wall time, spread over the job's intervals
    assert 0.5 * (wall_a + wall_m) < sum(durations) / 1000 <= wall_a + wall_m
    assert sink.values(f"k2.iceberg.data_files.{KRAKEN.name}")[-1][0] >= 1
    assert sink.values(f"k2.catchup.backlog.{KRAKEN.name}")[-1] == (0.0, "g")
    assert sink.values(f"k2.offload.watermark.{KRAKEN.name}")[-1] == (runs[-1][1].timestamp(), "g")
    assert sink.values(f"k2.offload.last_success.{KRAKEN.name}")
    # these runs' intervals closed days before they started: runs of a backlog
    assert [kind for _, kind in sink.values(f"k2.cycle.duration.{KRAKEN.name}.catchup")] == ["ms"] * 4
    assert sink.values(f"k2.cycle.duration.{KRAKEN.name}.live") == []
    print(f"\nPERF operator: 3-interval catch-up job {wall_a:.1f} s (lock, plan, spark-submit, "
          f"results), manual single-interval re-run {wall_m:.1f} s; skipped runs start no JVM")


def test_a_failing_offload_counts_an_error(filled, airflow_env):
    sink = airflow_env
    context = _context((H10, H10 + STEP), run_type="manual", run_id="manual__broken")
    with pytest.raises(Exception):
        _offload(context, iceberg_conn_id="no_such_connection")
    time.sleep(0.3)
    errors = [line for line in sink.lines if line.startswith(f"airflow.k2.offload.errors.{KRAKEN.name}.")]
    assert any(not line.endswith(":0|c") for line in errors), errors
