"""A day's backlog through Airflow: the local pipeline catching up 24 hours of all 9 tables
at the predecessor's daily volume, from the scheduler's start to every watermark at the goal.

    .venv/bin/python benchmarks/catchup_day.py [--hours 24] [--binance-per-day 5000000]
        [--kraken-per-day 26000] [--limit 60m]

Starts the whole local stack in a throwaway K2_HOME on free ports (as `k2 demo` does),
feeds `--hours` of history ending now (Binance and Kraken at the given daily volumes;
silver and gold fill through ClickHouse's materialized views), then starts the live feed
at the same average rate and Airflow with the offload DAGs ending at the last interval
closed at that moment (K2_END_DATE), and times:

  caught up   from Airflow's start (scheduler, DAG processor, API server, triggerer) to
              every table's watermark at the goal, by the real scheduler, catch-up runs,
              pool and Spark jobs as they run in production
  verify      `k2 verify` of every table over the whole range (must be clean)

Printed: rows per table, the catch-up time, the number of DAG runs and task tries, the
number of Spark jobs that published (distinct Airflow runs among the offload snapshots
on each table's main branch) and the alerts firing at the end (information: a catch-up
is allowed to trip the speed alerts). Nothing is asserted: figures, not a test; the exit
status is 1 when the catch-up failed or verify found differences.

With --hold D the DAGs have no end date: the goal is still the last interval closed when
Airflow starts, and once it is reached and verified the pipeline keeps running live (the
feed at the day's average rate, a run every 15 minutes per table) for D, while the script
checks every 30 s that no alert fires (exit status 1 if one does).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime, timedelta, timezone

from bench_stack import use_throwaway_home

DAY = timedelta(days=1)


def progress(message: str) -> None:
    print(message, flush=True)


def airflow_counts(stack) -> dict[str, int]:
    import psycopg

    with psycopg.connect(stack.postgres_dsn("airflow"), connect_timeout=5) as conn:
        runs = conn.execute("SELECT count(*) FROM dag_run WHERE dag_id LIKE 'k2_offload_%%'").fetchone()[0]
        tries = conn.execute(
            "SELECT coalesce(sum(try_number), 0) FROM task_instance WHERE dag_id LIKE 'k2_offload_%%'"
        ).fetchone()[0]
    return {"dag_runs": int(runs), "task_tries": int(tries)}


def spark_jobs(catalog, specs, start: datetime, end: datetime) -> dict[str, int]:
    """Per table: the distinct Airflow runs (k2.run-id) among the offload snapshots of
    [start, end) on the main branch - one per Spark job that published."""
    from pyiceberg.table.snapshots import ancestors_of

    from k2 import iceberg as ib

    jobs = {}
    for spec in specs:
        table = catalog.load_table(spec.iceberg_table)
        current = table.current_snapshot()
        run_ids = set()
        for snapshot in ([] if current is None else ancestors_of(current, table.metadata)):
            summary = snapshot.summary.additional_properties if snapshot.summary else {}
            if summary.get(ib.PROP_RUN_ID) and summary.get(ib.PROP_INTERVAL_START):
                if start.isoformat() <= summary[ib.PROP_INTERVAL_START] < end.isoformat():
                    run_ids.add(summary[ib.PROP_RUN_ID])
        jobs[spec.name] = len(run_ids)
    return jobs


def hold(stack, duration: timedelta, firing_alerts) -> int:
    """Keep the caught-up pipeline running live for `duration`; every 30 s, the alerts
    firing. Returns 1 when any fired."""
    print(f"\nholding live for {duration}, checking Prometheus's alerts every 30 s", flush=True)
    seen: dict[str, str] = {}
    checks = 0
    until = time.monotonic() + duration.total_seconds()
    while time.monotonic() < until:
        time.sleep(30)
        now = datetime.now(timezone.utc).strftime("%H:%M:%S")
        checks += 1
        for alert in firing_alerts(stack):
            if alert not in seen:
                seen[alert] = now
                print(f"  {now} FIRING {alert}", flush=True)
        if checks % 10 == 0:
            print(f"  {now} {checks} checks, {len(seen)} alert(s) fired so far", flush=True)
    print(f"held {duration} live after the catch-up: {checks} checks, "
          + (f"alerts fired: {', '.join(f'{a} (first at {t})' for a, t in seen.items())}"
             if seen else "no alert fired"))
    return 1 if seen else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="hours of backlog (default 24)")
    parser.add_argument("--binance-per-day", type=int, default=5_000_000)
    parser.add_argument("--kraken-per-day", type=int, default=26_000)
    parser.add_argument("--limit", default="60m", help="give up after this long (default 60m)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hold", default=None,
                        help="then keep the pipeline running live this long (e.g. 60m), checking "
                             "every 30 s that no alert fires")
    args = parser.parse_args()
    if args.hours <= 0 or args.binance_per_day <= 0 or args.kraken_per_day < 0:
        parser.error("--hours and --binance-per-day must be positive, --kraken-per-day not negative")

    # SIGTERM ends the run like Ctrl-C: what it started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    home = use_throwaway_home("k2-bench-day-")
    import shutil

    from k2.config import load_tables, parse_duration
    from k2.feed import run_feed
    from k2.intervals import floor_interval
    from k2.local import airflow
    from k2.local import stack as local_stack
    from k2.local.pipeline import (
        Pipeline,
        failed_tries,
        firing_alerts,
        verify_all,
        wait_for_watermarks,
    )
    from k2.local.settings import LocalStack
    from k2.local.stack import clickhouse_client
    from k2.schema import apply_schema

    history = timedelta(hours=args.hours)
    per_day = args.binance_per_day + args.kraken_per_day
    rate = per_day / DAY.total_seconds()
    share = args.kraken_per_day / per_day
    stack = LocalStack.from_env()
    pipeline = Pipeline(stack, log=progress)
    specs = load_tables().tables
    try:
        local_stack.up(stack, log=progress)
        client = clickhouse_client(stack)
        apply_schema(client)
        end = datetime.now(timezone.utc)
        progress(f"feeding {history} of history: {rate:.1f} trades/s on average, Kraken's share "
                 f"{share:.4f} (~{args.binance_per_day * args.hours / 24:,.0f} Binance and "
                 f"~{args.kraken_per_day * args.hours / 24:,.0f} Kraken trades)")
        fed = time.monotonic()
        run_feed(client, history=history, rate=rate, seed=args.seed, end=end, progress=progress,
                 kraken_share=share, live=False)
        fed = time.monotonic() - fed
        counts = {spec.source: client.query(f"SELECT count() FROM `{spec.source}`").result_rows[0][0]
                  for spec in specs}
        client.close()

        started = time.monotonic()
        goal = floor_interval(datetime.now(timezone.utc))
        start_date = pipeline.start(history=history, rate=rate, seed=args.seed, bounded=not args.hold)
        airflow_up = time.monotonic() - started
        target = pipeline.end_date or goal
        problem = wait_for_watermarks(stack, target, parse_duration(args.limit), progress)
        caught_up = time.monotonic() - started
        if problem:
            progress(f"CATCH-UP FAILED after {caught_up:.0f} s: {problem}")
            return 1
        progress(f"caught up in {caught_up:.0f} s ({caught_up / 60:.1f} min) from Airflow's start "
                 f"({airflow_up:.0f} s of it starting Airflow)")
        firing = firing_alerts(stack)
        checked = time.monotonic()
        problems = verify_all(stack, specs, start_date, target, progress)
        verify_seconds = time.monotonic() - checked

        from k2.iceberg import load_catalog

        jobs = spark_jobs(load_catalog(airflow.iceberg_settings(stack)), specs, start_date, target)
        af = airflow_counts(stack)
        intervals = int((target - start_date) / timedelta(minutes=15))
        print()
        print(f"{history} backlog of {len(specs)} tables, [{start_date.isoformat()}, {target.isoformat()}): "
              f"{intervals} intervals per table; history fed in {fed:.0f} s")
        print(f"{'table':<28}{'rows in ClickHouse':>20}{'Spark jobs':>12}")
        for spec in specs:
            print(f"{spec.name:<28}{counts[spec.source]:>20,}{jobs[spec.name]:>12}")
        print(f"caught up: {caught_up:.0f} s = {caught_up / 60:.1f} min from Airflow's start "
              f"(target 10 min); Spark jobs: {sum(jobs.values())}; DAG runs: {af['dag_runs']}, "
              f"task tries: {af['task_tries']}; verify: {'clean' if not problems else 'DIFFERENCES'} "
              f"in {verify_seconds:.0f} s")
        print(f"alerts firing when caught up: {', '.join(firing) or 'none'}")
        tries = failed_tries(stack)
        if tries:
            print("failed tries:\n  " + "\n  ".join(tries))
        if problems:
            print("\n".join(problems))
            return 1
        if args.hold:
            return hold(stack, parse_duration(args.hold), firing_alerts)
        return 0
    finally:
        pipeline.stop()
        local_stack.down(stack, log=lambda _m: None)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
