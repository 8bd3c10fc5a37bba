"""Catch-up benchmark: one Spark job per interval (the baseline) against one job for a
range of intervals (what a catching-up run does), in the same script and stack.

    .venv/bin/python benchmarks/catchup.py [--intervals 4] [--rate 200]

Starts a throwaway local stack (own K2_HOME, free ports), feeds trades, then times
spark-submit of the offload job both ways on fresh intervals of bronze_trades_binance and
prints wall times, rows/s and the ratio. Nothing is asserted: figures, not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench_stack import throwaway_stack

from k2.intervals import INTERVAL

REPO = Path(__file__).resolve().parents[1]
TABLE = "bronze_trades_binance"


def submit(env: dict[str, str], start: datetime, end: datetime, run_id: str) -> float:
    from k2.intervals import split_range
    from k2.offload import job_arguments, job_jars, spark_submit_command

    argv = spark_submit_command(job_arguments(TABLE, split_range(start, end), run_id),
                                master="local[2]", jars=job_jars())
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"spark-submit failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, default=4, help="intervals per side (default 4)")
    parser.add_argument("--rate", type=float, default=200.0, help="average feed trades/s (default 200)")
    args = parser.parse_args()

    with throwaway_stack("k2-bench-catchup-") as (stack, _home, env):
        from k2.feed import run_feed

        client = stack.clickhouse_client(database="k2")
        n = args.intervals
        end = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        end -= timedelta(minutes=end.minute % 15)
        first = end - 2 * n * INTERVAL
        print(f"feeding {2 * n} intervals at ~{args.rate:.0f} trades/s …", flush=True)
        run_feed(client, history=end - first, rate=args.rate, seed=3, end=end, progress=None)
        rows = client.query(
            f"SELECT count() FROM {TABLE} WHERE event_time >= %(a)s AND event_time < %(b)s",
            parameters={"a": first, "b": end},
        ).result_rows[0][0]

        singles = []
        for i in range(n):
            start = first + i * INTERVAL
            singles.append(submit(env, start, start + INTERVAL, f"bench_single_{i}"))
            print(f"  single-interval job {i + 1}/{n}: {singles[-1]:.1f} s", flush=True)
        batch_start = first + n * INTERVAL
        batch = submit(env, batch_start, batch_start + n * INTERVAL, "bench_batch")
        half = rows / 2
        print()
        print(f"rows per side            ~{half:,.0f} ({TABLE}, {n} intervals)")
        print(f"baseline: {n} jobs        {sum(singles):.1f} s  ({half / sum(singles):,.0f} rows/s)")
        print(f"batched: 1 job           {batch:.1f} s  ({half / batch:,.0f} rows/s)")
        print(f"speed-up                 {sum(singles) / batch:.2f}x")


if __name__ == "__main__":
    main()
