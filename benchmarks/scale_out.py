"""Scale-out benchmark: the offload job on `local[2]` with the warehouse on local disk against
the same job on a Spark standalone cluster (a master, two one-core workers) with the warehouse
on the S3 object store, on the same data, in the same script and stack.

    .venv/bin/python benchmarks/scale_out.py [--rows 2700000] [--backlog-hours 6]
                                             [--backlog-rows 1250000] [--json PATH]

Starts a throwaway local stack (own K2_HOME, free ports: PostgreSQL, the ClickHouse endpoint),
the cluster (k2.local.spark_cluster) and the object store (k2.local.object_store) on free
loopback ports, and inserts into bronze_trades_binance (benchmarks/offload.py's INSERT ...
SELECT ... FROM numbers(N)):

  interval   one 15-minute interval of --rows trades (2.7M: the predecessor's peak interval)
  backlog    --backlog-hours of trades (--backlog-rows in all; 1.25M over 6 hours is the
             predecessor's daily Binance volume, ~5M/day) in 15-minute intervals

Then per setup, each on a catalog of its own: the interval offloaded (first run, then a
replace), and the backlog as a catching-up run offloads it: one job per
`max_intervals_per_job` intervals (tables.yaml), one after another. The jobs run as the
operator submits them, with their defaults: on `local[2]` every slice in the driver; on the
cluster intervals over 500k rows on the executors. Also on the cluster, the interval with
every slice on the executors (--driver-max-rows 0). Each job audits every interval it writes
(count and checksum against ClickHouse) before publishing; a failed job ends the script.

Printed per run: wall seconds, rows/s and the CPU seconds of the job's process tree (the
driver; executors are the workers' children, not the job's: the cluster's CPU is the
machine's busy time meanwhile, also printed), then the ratios cluster / local. On one
2-core machine the cluster adds its costs (executor JVMs, the object store's HTTP round
trips) without adding cores: the ratios measure those costs, not a speed-up (see
docs/scaling.md for the projection to real hosts). Nothing is asserted: figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench_stack import free_port, throwaway_stack
from offload import TABLE, insert_sql, machine_cpu_seconds, result_lines, run_process, wait_for_merges

from k2.config import load_tables
from k2.intervals import INTERVAL, split_range
from k2.offload import RESULT_MARKER, job_arguments, job_jars, spark_submit_command


@dataclass
class Timing:
    seconds: float
    rows: int
    jobs: int
    cpu_seconds: float
    machine_cpu_seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def progress(message: str) -> None:
    print(message, flush=True)


def insert(client: Any, start: datetime, span: timedelta, rows: int, first_sequence: int) -> None:
    client.command(insert_sql(), parameters={
        "first_sequence": first_sequence, "start_ms": int(start.timestamp() * 1000),
        "span_ms": int(span.total_seconds() * 1000), "rows": rows})


def offload(name: str, env: dict[str, str], master: str, start: datetime, end: datetime, per_job: int,
            logs: Path, *extra: str) -> Timing:
    """The range [start, end) offloaded in jobs of `per_job` intervals, one after another."""
    intervals = split_range(start, end)
    chunks = [intervals[k:k + per_job] for k in range(0, len(intervals), per_job)]
    seconds = cpu = machine = 0.0
    rows = 0
    for n, chunk in enumerate(chunks):
        argv = spark_submit_command([*job_arguments(TABLE, chunk, f"bench__{name}_{n}"), *extra],
                                    master=master, jars=job_jars())
        busy = machine_cpu_seconds()
        run = run_process(f"{name}-{n}", argv, env, logs)
        machine += machine_cpu_seconds() - busy
        seconds += run.seconds
        cpu += run.cpu_seconds
        results = result_lines(run.stdout, RESULT_MARKER)
        if len(results) != len(chunk):
            sys.exit(f"{name}: {len(results)} results for {len(chunk)} intervals")
        rows += sum(int(r["rows"]) for r in results)
    return Timing(seconds, rows, len(chunks), cpu, machine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_700_000, help="rows of the one interval (default 2.7M)")
    parser.add_argument("--backlog-hours", type=float, default=6.0, help="hours of backlog (default 6)")
    parser.add_argument("--backlog-rows", type=int, default=1_250_000, help="rows of the backlog (default 1.25M)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    # SIGTERM ends the run like Ctrl-C: the cluster, the store and the stack stop on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with throwaway_stack("k2-bench-scale-out-") as (stack, home, local_env):
        from k2.local import object_store as obj
        from k2.local import spark_cluster as sc
        from k2.local.daemons import start_all
        from k2.runtime_env import IcebergSettings

        cluster = sc.SparkCluster(home=home, master_port=free_port(), master_ui_port=free_port(),
                                  worker_ui_ports=(free_port(), free_port()))
        store = obj.ObjectStore(home=home, port=free_port(), host=stack.host, access_key_id="bench" + secrets.token_hex(4),
                                secret_access_key=secrets.token_urlsafe(24))
        logs = home / "bench-logs"
        logs.mkdir()
        try:
            progress(f"starting the Spark cluster ({sc.WORKERS} workers, {sc.WORKER_CORES} core and "
                     f"{sc.WORKER_MEMORY} each) and the object store ...")
            start_all(sc.DAEMONS, cluster, log=lambda _m: None)
            obj.start(store)

            local_ice = IcebergSettings.from_env(local_env)

            def on_disk(catalog: str) -> dict[str, str]:
                return {**local_env, **replace(local_ice, catalog_name=catalog).to_env()}

            def on_s3(catalog: str) -> dict[str, str]:
                return {**local_env, **store.iceberg_settings(replace(local_ice, catalog_name=catalog),
                                                              f"s3://{obj.BUCKET}/{catalog}").to_env()}

            cluster_label = f"cluster ({sc.WORKERS} workers)"
            setups = {  # the two compared, then each change alone (the cluster shares this disk)
                "local": ("local[2], warehouse on local disk", "local[2]", on_disk("bench_local")),
                "cluster": (f"{cluster_label}, warehouse on S3", cluster.master_url, on_s3("bench_s3")),
                "local_s3": ("local[2], warehouse on S3", "local[2]", on_s3("bench_local_s3")),
                "cluster_disk": (f"{cluster_label}, warehouse on local disk", cluster.master_url,
                                 on_disk("bench_cluster_disk")),
            }
            client = stack.clickhouse_client(database="k2")
            now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
            interval = (now - timedelta(days=2), now - timedelta(days=2) + INTERVAL)
            backlog_start = now - timedelta(days=1)
            backlog = (backlog_start, backlog_start + timedelta(hours=args.backlog_hours))
            started = time.monotonic()
            insert(client, interval[0], INTERVAL, args.rows, 10**12)
            insert(client, backlog[0], backlog[1] - backlog[0], args.backlog_rows, 2 * 10**12)
            wait_for_merges(client)
            progress(f"inserted {args.rows:,} rows into [{interval[0]:%Y-%m-%d %H:%M}, +15 min) and "
                     f"{args.backlog_rows:,} over {args.backlog_hours:g} h in {time.monotonic() - started:.0f} s")

            per_job = load_tables().get(TABLE).max_intervals_per_job
            timings: dict[str, dict[str, Timing]] = {}
            for key, (label, master, env) in setups.items():
                progress(f"\n{label}:")
                runs = timings[key] = {}
                runs["interval_first"] = offload(f"{key}-first", env, master, *interval, 1, logs)
                if key in ("local", "cluster"):
                    runs["interval_replace"] = offload(f"{key}-replace", env, master, *interval, 1, logs)
                if key == "cluster":
                    runs["interval_executors"] = offload(f"{key}-executors", env, master, *interval, 1, logs,
                                                         "--driver-max-rows", "0")
                runs["backlog"] = offload(f"{key}-backlog", env, master, *backlog, per_job, logs)
                for name, t in runs.items():
                    progress(f"  {name:<20} {t.seconds:7.1f} s  {t.rows:>10,} rows  {t.rows_per_second:>10,.0f} rows/s  "
                             f"{t.jobs} job(s)  job CPU {t.cpu_seconds:6.1f} s  machine busy {t.machine_cpu_seconds:6.1f} s")
        finally:
            obj.GATEWAY.stop(store)
            for daemon in reversed(sc.DAEMONS):
                daemon.stop(cluster)

    print(f"\nratios of wall times, cluster + S3 / local[2] + disk ({len(split_range(*backlog))}-interval backlog "
          f"in jobs of {per_job}):")
    ratios = {}
    for name in ("interval_first", "interval_replace", "backlog"):
        ratios[name] = timings["cluster"][name].seconds / timings["local"][name].seconds
        print(f"  {name:<20} {ratios[name]:.2f}")
    ratios["interval_executors_over_local_first"] = (timings["cluster"]["interval_executors"].seconds
                                                     / timings["local"]["interval_first"].seconds)
    print(f"  {'interval, executors':<20} {ratios['interval_executors_over_local_first']:.2f} "
          "(every slice on the executors / local[2] first run)")
    print("each change alone / local[2] + disk:")
    for key, label in (("local_s3", "S3 alone"), ("cluster_disk", "cluster alone")):
        for name in ("interval_first", "backlog"):
            ratios[f"{key}_{name}"] = timings[key][name].seconds / timings["local"][name].seconds
            print(f"  {label + ', ' + name:<30} {ratios[f'{key}_{name}']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "rows": args.rows, "backlog_hours": args.backlog_hours, "backlog_rows": args.backlog_rows,
            "timings": {k: {n: {**t.__dict__, "rows_per_second": round(t.rows_per_second)} for n, t in v.items()}
                        for k, v in timings.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
