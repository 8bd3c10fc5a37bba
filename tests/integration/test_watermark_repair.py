"""`k2 watermark repair` on the real stack: a watermark corrupted by hand in PostgreSQL
(ahead of, or behind, what the Iceberg table holds) is rebuilt from the table's offload
snapshot summaries, and `k2 verify` is clean afterwards.

The Iceberg data comes from one real spark-submit of the offload job (two intervals of
gold_ohlcv_1m); the ledger and watermark are corrupted with plain SQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from k2.intervals import INTERVAL as STEP
from k2.local import airflow as local_airflow
from k2.watermarks import WatermarkStore
from tests.integration.spark_job import job_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TABLE = "gold_ohlcv_1m"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def env(stack, start_date):
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    env.update({"K2_HOME": os.environ["K2_HOME"], "K2_START_DATE": start_date.isoformat()})
    env.update({k: v for k, v in os.environ.items() if k.startswith("K2_") and k.endswith("_PORT")})
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def offloaded(stack, hot_data, start_date, env):
    """Intervals 0 and 1 (from start_date) of TABLE offloaded by one Spark job and ledgered."""
    job_env = dict(env)
    job_env.update(local_airflow.clickhouse_settings(stack).to_env())
    job_env.update(local_airflow.iceberg_settings(stack).to_env())
    end = start_date + 2 * STEP
    proc = subprocess.run(
        job_argv(TABLE, start_date, end, "repair-test", master="local[1]"),
        env=job_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("K2_OFFLOAD_RESULT ")]
    assert len(results) == 2, proc.stdout[-2000:]
    assert all(int(r["rows"]) > 0 for r in results), results
    store = WatermarkStore(stack.postgres_dsn("k2"))
    store.migrate()
    store.initialize(TABLE, start_date)
    for r in results:
        store.commit_interval(
            TABLE, datetime.fromisoformat(r["interval_start"]), datetime.fromisoformat(r["interval_end"]),
            int(r["rows"]), int(r["checksum"]), int(r["snapshot_id"]), "repair-test",
        )
    assert store.get(TABLE).watermark_ts == end
    return store, end


def k2(env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_bin("k2"), *args], env=env, capture_output=True, text=True, timeout=300)


def _sql(stack, statement: str, *params) -> None:
    with psycopg.connect(stack.postgres_dsn("k2")) as conn:
        conn.execute(statement, params)


def _check_repaired(store, env, start_date, end) -> None:
    assert store.get(TABLE).watermark_ts == end
    ledger = store.ledger_all(TABLE)
    assert [(e.interval_start, e.interval_end) for e in ledger] == [
        (start_date, start_date + STEP), (start_date + STEP, end)]
    assert all(e.snapshot_id is not None for e in ledger)
    verify = k2(env, "verify", "--table", TABLE, "--json")
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-2000:]
    report = json.loads(verify.stdout)[0]
    lost = sum(i.get("missing", 0) for i in report.get("intervals", []))
    dup = sum(i.get("duplicated", 0) for i in report.get("intervals", []))
    print(f"\n[watermark repair] {TABLE}: rows lost={lost} duplicated={dup}")


def test_watermark_ahead_with_a_rogue_ledger_row_and_a_lost_one(stack, start_date, env, offloaded):
    store, end = offloaded
    ahead = end + 4 * STEP
    _sql(stack, "UPDATE k2_watermarks SET watermark_ts = %s WHERE table_name = %s", ahead, TABLE)
    _sql(stack, "INSERT INTO k2_offload_ledger (table_name, interval_start, interval_end, rows, checksum, "
         "snapshot_id, run_id) VALUES (%s, %s, %s, 5, 5, 1, 'forged')", TABLE, end + STEP, end + 2 * STEP)
    _sql(stack, "DELETE FROM k2_offload_ledger WHERE table_name = %s AND interval_start = %s",
         TABLE, start_date + STEP)

    dry = k2(env, "watermark", "repair", "--table", TABLE, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "would change" in dry.stdout and "drop ledger row" in dry.stdout, dry.stdout
    assert store.get(TABLE).watermark_ts == ahead  # --dry-run changed nothing

    fixed = k2(env, "watermark", "repair", "--table", TABLE)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    print(fixed.stdout)
    assert f"watermark {ahead.isoformat()} -> {end.isoformat()}" in fixed.stdout
    assert "forged" in fixed.stdout and "ledger [" in fixed.stdout
    _check_repaired(store, env, start_date, end)

    again = k2(env, "watermark", "repair", "--table", TABLE)
    assert "nothing to change" in again.stdout, again.stdout


def test_watermark_behind_with_an_empty_ledger(stack, start_date, env, offloaded):
    store, end = offloaded
    _sql(stack, "UPDATE k2_watermarks SET watermark_ts = %s WHERE table_name = %s", start_date - STEP, TABLE)
    _sql(stack, "DELETE FROM k2_offload_ledger WHERE table_name = %s", TABLE)

    fixed = k2(env, "watermark", "repair", "--table", TABLE)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    print(fixed.stdout)
    assert f"-> {end.isoformat()}" in fixed.stdout
    _check_repaired(store, env, start_date, end)
