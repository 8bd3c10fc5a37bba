"""Offload benchmark: the offload job against the predecessor's path and a single-process
peer, on one 15-minute interval of bronze_trades_binance per size, in the same script and stack.

    .venv/bin/python benchmarks/offload.py [--rows 1000,1000000,2700000] [--json PATH]

Starts a throwaway local stack (own K2_HOME, free ports: PostgreSQL and the ClickHouse
endpoint), creates the schema and, for each size N, inserts N synthetic trades into a fresh
15-minute interval with one INSERT ... SELECT ... FROM numbers(N), then times on it:

  job, first run     spark_jobs/offload_to_iceberg.py through spark-submit, as
                     benchmarks/catchup.py submits it (master local[2], the stack's Spark
                     environment, ClickHouse and Iceberg settings as the operator passes them)
  job, replace       the same interval again
  job, replace on executors   the same with --driver-max-rows 0: the slices and the audit on
                     the executors, as a cluster runs a large interval
  predecessor        benchmarks/predecessor_jdbc.py through spark-submit: Spark's JDBC source
                     with the official ClickHouse JDBC driver (spark_jobs/bench-jars, `make
                     setup`), appended to cold.bench_predecessor_<N>; no checks
  single process     benchmarks/single_process.py peer: clickhouse-connect Arrow stream ->
                     pyiceberg overwrite of the interval in cold.bench_peer_<N>, with the job's
                     checks (ClickHouse's count and checksum = the read = the new snapshot's)
  export alone       ClickHouse -> Arrow, drained
  Parquet alone      pyarrow.parquet, zstd, of the same Arrow data

The bench tables copy the schema and partition spec of the job's table (made by its first
run), with the project's table properties. Printed per path: wall seconds and CPU seconds
(the whole process tree, JVM or interpreter start included; for the two "alone" figures the
operation alone), rows/s, the peak RSS of the process tree (the summed RSS of the process
and its descendants, sampled every 0.2 s), and the CPU seconds the rest of the machine used
meanwhile (other work on a shared machine inflates wall times; CPU seconds much less); then
the ratios of wall times. Sizes under 100,000 rows run every path --repeat times (default
3), each on an interval of its own, and count the run of median wall time. Nothing is
asserted: figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench_stack import throwaway_stack

from k2.intervals import INTERVAL
from k2.offload import job_arguments, spark_submit_command

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TABLE = "bronze_trades_binance"
MASTER = "local[2]"
DEFAULT_ROWS = "1000,1000000,2700000"
# Below this many rows a run is mostly fixed cost (JVM, session, catalog), where a second of
# noise is a large share: each path runs --repeat times, on intervals of their own, and the
# median run counts.
REPEAT_BELOW_ROWS = 100_000
SAMPLE_SECONDS = 0.2
PATHS = {  # key: label, in the order they run for each size
    "job_first": "job, first run",
    "job_replace": "job, replace",
    "job_executors": "job, replace on executors",
    "predecessor": "predecessor (Spark JDBC)",
    "peer": "single process (peer)",
    "export": "export alone",
    "parquet": "Parquet write alone",
}


def progress(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------
# Synthetic trades


def insert_sql() -> str:
    """One INSERT ... SELECT ... FROM numbers({rows}) of Binance trades spread evenly over
    [{start_ms}, {start_ms} + {span_ms}).

    Realistic as the feed simulator's (k2.feed: its assets, weights, tick and lot sizes,
    half-spread and log-normal notionals), deterministic per row, without its random walk:
    the mid moves +-0.3 % in three smooth waves per interval. Trade ids increase per symbol
    and continue across sizes ({first_sequence}); every row passes the quality checks
    (ingested 20-200 ms after its trade), so no path has rows to quarantine.
    """
    from k2.feed import _HALF_SPREAD, ASSETS, MAX_NOTIONAL_USD, NOTIONAL_SIGMA

    assets = list(ASSETS.values())
    total = sum(a.weight for a in assets)
    bounds, acc = [], 0.0
    for asset in assets:
        acc += asset.weight / total
        bounds.append(acc)
    bounds[-1] = 1.0

    def array(values: Any) -> str:
        return "[" + ", ".join(str(v) for v in values) + "]"

    def pick(values: Any) -> str:
        return f"arrayElement({array(values)}, asset)"

    def uniform(salt: int) -> str:  # in [0, 1), from the row number
        return f"(cityHash64(number, {salt}) % 1000000) / 1e6"

    return f"""
INSERT INTO {TABLE}
    (sequence_number, trade_id, symbol, price, quantity, quote_quantity, trade_time_ms,
     is_buyer_maker, ingested_at)
SELECT
    {{first_sequence:UInt64}} + number,
    {{first_sequence:UInt64}} + number + {pick(a.binance_first_id for a in assets)},
    {pick(repr(a.binance_symbol) for a in assets)},
    toDecimal128(ticks, 18) / intExp10(price_decimals),
    toDecimal128(lots, 18) / intExp10(qty_decimals),
    toDecimal128(ticks * lots, 18) / intExp10(price_decimals + qty_decimals),
    trade_time_ms,
    NOT buy,
    fromUnixTimestamp64Milli(toInt64(trade_time_ms + 20 + cityHash64(number, 5) % 180), 'UTC')
FROM
(
    SELECT
        number,
        arrayFirstIndex(bound -> bound > {uniform(1)}, {array(bounds)}) AS asset,
        {{start_ms:UInt64}} + intDiv(number * {{span_ms:UInt64}}, {{rows:UInt64}}) AS trade_time_ms,
        cityHash64(number, 2) % 2 = 0 AS buy,
        {pick(a.start_price for a in assets)}
            * (1 + 0.003 * sin(2 * pi() * (3 * number / {{rows:UInt64}} + asset / 7))) AS mid,
        {pick(a.binance_price_decimals for a in assets)} AS price_decimals,
        {pick(a.binance_qty_decimals for a in assets)} AS qty_decimals,
        greatest(toInt64(round(mid * (1 + if(buy, {_HALF_SPREAD}, -{_HALF_SPREAD}))
                               * intExp10(price_decimals))), 1) AS ticks,
        least({pick(a.median_notional for a in assets)}
              * exp({NOTIONAL_SIGMA} * sqrt(-2 * log({uniform(3)} + 0.5e-6))
                    * cos(2 * pi() * {uniform(4)})), {MAX_NOTIONAL_USD}) AS notional,
        greatest(toInt64(floor(notional / mid * intExp10(qty_decimals))), 1) AS lots
    FROM numbers({{rows:UInt64}})
)"""


def wait_for_merges(client: Any, timeout: float = 300.0) -> None:
    """Until ClickHouse merges no parts, so that no background merge runs during a timing."""
    deadline = time.monotonic() + timeout
    while client.query("SELECT count() FROM system.merges").result_rows[0][0]:
        if time.monotonic() > deadline:
            progress("  (ClickHouse still merging; timing anyway)")
            return
        time.sleep(0.5)


# --------------------------------------------------------------------------------------
# Running one path: wall time and the peak RSS of its process tree


class PeakRss(threading.Thread):
    """Samples the summed RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while True:
            total = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                processes = []
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:  # ended between the listing and the reading
                    pass
            self.peak = max(self.peak, total)
            if self._stop_event.wait(SAMPLE_SECONDS):
                return

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


@dataclass
class Run:
    seconds: float
    peak_rss: int
    cpu_seconds: float  # user + system of the process and the descendants it waited for
    stdout: str
    hot_tier_cpu_seconds: float = 0.0  # the ClickHouse endpoint meanwhile
    others_cpu_seconds: float = 0.0  # the rest of the machine meanwhile (other work)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_process(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Run:
    """Run argv to its end; its own session, so that an interrupt stops its whole tree."""
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        cpu_before = children_cpu_seconds()  # nothing else of ours is reaped meanwhile
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sampler = PeakRss(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=3600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            peak = sampler.stop()
        seconds = time.monotonic() - started
    if returncode != 0:
        tail = "\n".join((out.read_text() + err.read_text()).splitlines()[-40:])
        sys.exit(f"{name} failed (exit {returncode}); the end of its output:\n{tail}")
    return Run(seconds, peak, children_cpu_seconds() - cpu_before, out.read_text())


def result_lines(stdout: str, prefix: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(prefix):]) for line in stdout.splitlines()
            if line.startswith(prefix + " ")]


# --------------------------------------------------------------------------------------
# Figures


@dataclass
class Figure:
    seconds: float
    peak_rss: int
    rows: int
    cpu_seconds: float
    others_cpu_seconds: float = 0.0  # the rest of the machine meanwhile: contention
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "rows_per_second": round(self.rows_per_second),
                "peak_rss_bytes": self.peak_rss, "cpu_seconds": round(self.cpu_seconds, 2),
                "others_cpu_seconds": round(self.others_cpu_seconds, 2), **self.extra}


@dataclass
class SizeRun:
    rows: int
    start: datetime
    end: datetime
    insert_seconds: float = 0.0
    figures: dict[str, Figure] = field(default_factory=dict)
    repeats: list[SizeRun] = field(default_factory=list)  # when the figures are their medians

    @classmethod
    def median_of(cls, runs: list[SizeRun]) -> SizeRun:
        """One size's repeated runs as one: per path the run of median wall time."""
        if len(runs) == 1:
            return runs[0]
        figures = {}
        for key in runs[0].figures:
            ordered = sorted((run.figures[key] for run in runs), key=lambda f: f.seconds)
            figures[key] = ordered[len(ordered) // 2]
        return cls(runs[0].rows, runs[0].start, runs[-1].end,
                   sum(run.insert_seconds for run in runs) / len(runs), figures, runs)

    def ratio(self, over: str, under: str) -> float | None:
        a, b = self.figures.get(over), self.figures.get(under)
        return a.seconds / b.seconds if a and b and b.seconds > 0 else None


RATIOS = {  # key: (label, numerator path, denominator path)
    "job_first_over_predecessor": ("job first run / predecessor", "job_first", "predecessor"),
    "job_replace_over_job_first": ("job replace / job first run", "job_replace", "job_first"),
    "job_first_over_peer": ("job first run / single-process peer", "job_first", "peer"),
    "job_executors_over_predecessor": ("job on executors / predecessor", "job_executors", "predecessor"),
}


def mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def secs(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def report(runs: list[SizeRun]) -> dict[str, Any]:
    """Print the table and the ratios; return everything as a JSON-ready dict."""
    print()
    print(f"offload of one 15-minute interval of {TABLE}, spark-submit --master {MASTER}, "
          f"{os.cpu_count()} cores")
    header = (f"{'rows':>11}  {'path':<26}{'wall s':>9}{'rows/s':>12}{'CPU s':>9}"
              f"{'peak RSS MiB':>14}{'others CPU s':>14}")
    print(header)
    print("-" * len(header))
    for run in runs:
        for key, label in PATHS.items():
            figure = run.figures.get(key)
            if figure is not None:
                print(f"{run.rows:>11,}  {label:<26}{secs(figure.seconds):>9}"
                      f"{figure.rows_per_second:>12,.0f}{secs(figure.cpu_seconds):>9}"
                      f"{mib(figure.peak_rss):>14}{figure.others_cpu_seconds:>14.1f}")
    print("wall s and CPU s: the whole process tree (JVM or interpreter start included), for\n"
          "the two 'alone' rows the operation alone; peak RSS: the process tree's; others CPU s:\n"
          "what the rest of the machine used meanwhile (besides the ClickHouse endpoint): other\n"
          "work on the same cores, which inflates the wall times. 'job, replace on executors':\n"
          "the same job with --driver-max-rows 0, the path a cluster takes for a large interval")
    for run in runs:
        if run.repeats:
            print(f"{run.rows:,} rows: the median of {len(run.repeats)} runs per path, each on an "
                  "interval of its own; wall s of each: " + "; ".join(
                      f"{PATHS[key]} " + ", ".join(secs(r.figures[key].seconds) for r in run.repeats)
                      for key in ("job_first", "job_replace", "predecessor")))

    print()
    print(f"{'ratio of wall times':<40}" + "".join(f"{run.rows:>13,}" for run in runs))
    ratios: dict[str, dict[str, float | None]] = {}
    for key, (label, over, under) in RATIOS.items():
        values = {str(run.rows): run.ratio(over, under) for run in runs}
        ratios[key] = {n: round(v, 3) if v is not None else None for n, v in values.items()}
        print(f"{label:<40}" + "".join(f"{v:>13.2f}" if v is not None else f"{'-':>13}"
                                       for v in values.values()))
    smallest = min(runs, key=lambda run: run.rows)
    fixed = smallest.ratio("job_first", "predecessor")
    largest = max(runs, key=lambda run: run.rows)
    job_peak = largest.figures["job_first"].peak_rss
    print()
    if fixed is not None:
        print(f"job / predecessor at {smallest.rows:,} rows, the smallest size: {fixed:.2f}")
    print(f"job's peak RSS at {largest.rows:,} rows: {mib(job_peak)} MiB "
          f"(first run; replace {mib(largest.figures['job_replace'].peak_rss)} MiB)")
    return {
        "ratios": ratios,
        "job_over_predecessor_smallest": {"rows": smallest.rows,
                                          "ratio": round(fixed, 3) if fixed else None},
        "job_peak_rss_bytes_largest": {"rows": largest.rows, "peak_rss_bytes": job_peak},
        "runs": [{"rows": run.rows, "interval_start": run.start.isoformat(),
                  "interval_end": run.end.isoformat(),
                  "insert_seconds": round(run.insert_seconds, 3),
                  "paths": {key: figure.to_dict() for key, figure in run.figures.items()},
                  "repeats": [{"interval_start": r.start.isoformat(),
                               "paths": {key: f.to_dict() for key, f in r.figures.items()}}
                              for r in run.repeats]}
                 for run in runs],
    }


# --------------------------------------------------------------------------------------
# The benchmark


def parse_rows(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of row counts") from None
    if not sizes or any(size < 1 for size in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: row counts must be positive, each once")
    return sizes


def jars(folder: Path) -> list[str]:
    from k2.offload import job_jars as jars_in

    found = jars_in(folder)
    if not found:
        sys.exit(f"no jars in {folder}: run `make setup`")
    return found


def job_jars() -> list[str]:  # every production job is submitted with these
    return jars(REPO / "spark_jobs" / "jars")


def bench_jars() -> list[str]:  # the predecessor's JDBC driver, only for its path
    return jars(REPO / "spark_jobs" / "bench-jars")


class Benchmark:
    def __init__(self, stack: Any, env: dict[str, str], logs: Path, hot_tier_pid: int) -> None:
        import psutil

        from k2 import iceberg as ib
        from k2.config import load_tables
        from k2.local import airflow

        self.stack, self.env, self.logs = stack, env, logs
        self.spec = load_tables().get(TABLE)
        self.client = stack.clickhouse_client(database=airflow.CLICKHOUSE_DATABASE)
        self.catalog = ib.load_catalog(airflow.iceberg_settings(stack))
        self.job_jars, self.bench_jars = job_jars(), bench_jars()
        self.hot_tier = psutil.Process(hot_tier_pid)
        self.inserted = 0

    def insert(self, run: SizeRun) -> None:
        from k2.checksum import clickhouse_interval_filter_sql, interval_parameters, to_epoch_ms

        progress(f"N={run.rows:,}: inserting {run.rows:,} rows into "
                 f"[{run.start:%Y-%m-%d %H:%M}, {run.end:%H:%M}) ...")
        started = time.monotonic()
        self.client.command(insert_sql(), parameters={
            "first_sequence": self.inserted, "start_ms": to_epoch_ms(run.start),
            "span_ms": int(INTERVAL.total_seconds() * 1000), "rows": run.rows,
        })
        run.insert_seconds = time.monotonic() - started
        self.inserted += run.rows
        count = self.client.query(
            f"SELECT count() FROM {TABLE} WHERE {clickhouse_interval_filter_sql('event_time')}",
            parameters=interval_parameters(run.start, run.end)).result_rows[0][0]
        if count != run.rows:
            sys.exit(f"the interval holds {count} rows after inserting {run.rows}")
        wait_for_merges(self.client)
        progress(f"  inserted in {run.insert_seconds:.1f} s")

    def interval_args(self, run: SizeRun) -> list[str]:
        return ["--interval-start", run.start.isoformat(), "--interval-end", run.end.isoformat()]

    def hot_tier_cpu_seconds(self) -> float:
        times = self.hot_tier.cpu_times()
        return times.user + times.system

    def time_path(self, run: SizeRun, key: str, argv: list[str]) -> Run:
        progress(f"N={run.rows:,}: {PATHS[key]} ...")
        hot, machine, own = self.hot_tier_cpu_seconds(), machine_cpu_seconds(), own_cpu_seconds()
        result = run_process(f"{key}_{run.rows}", argv, self.env, self.logs)
        result.hot_tier_cpu_seconds = self.hot_tier_cpu_seconds() - hot
        machine, own = machine_cpu_seconds() - machine, own_cpu_seconds() - own
        result.others_cpu_seconds = max(
            0.0, machine - result.cpu_seconds - result.hot_tier_cpu_seconds - own)
        return result

    def figure(self, result: Run, rows: int, extra: dict[str, Any], seconds: float | None = None,
               cpu_seconds: float | None = None) -> Figure:
        return Figure(
            seconds if seconds is not None else result.seconds, result.peak_rss, rows,
            cpu_seconds if cpu_seconds is not None else result.cpu_seconds,
            result.others_cpu_seconds,
            {"hot_tier_cpu_seconds": round(result.hot_tier_cpu_seconds, 2), **extra},
        )

    def record(self, run: SizeRun, key: str, figure: Figure) -> None:
        if figure.rows != run.rows:
            sys.exit(f"{PATHS[key]} handled {figure.rows} rows of {run.rows}")
        run.figures[key] = figure
        progress(f"  {secs(figure.seconds)} s, {figure.rows_per_second:,.0f} rows/s, "
                 f"CPU {secs(figure.cpu_seconds)} s, peak RSS {mib(figure.peak_rss)} MiB "
                 f"(others' CPU meanwhile {figure.others_cpu_seconds:.1f} s)")

    def job(self, run: SizeRun, key: str) -> None:
        arguments = job_arguments(TABLE, [(run.start, run.end)], f"bench_{key}_{run.rows}",
                                  driver_max_rows=0 if key == "job_executors" else None)
        argv = spark_submit_command(arguments, master=MASTER, jars=self.job_jars)
        result = self.time_path(run, key, argv)
        lines = result_lines(result.stdout, "K2_OFFLOAD_RESULT")
        if len(lines) != 1:
            sys.exit(f"{PATHS[key]}: expected one K2_OFFLOAD_RESULT line, got {len(lines)}")
        line = lines[0]
        self.record(run, key, self.figure(result, int(line["rows"]), {
            "job_seconds": line.get("seconds"), "snapshot_id": line.get("snapshot_id")}))

    def bench_table(self, kind: str, rows: int) -> str:
        """cold.bench_<kind>_<rows>, made anew with the job table's schema and partitioning."""
        from k2 import iceberg as ib

        name = f"{self.spec.iceberg_table.split('.')[0]}.bench_{kind}_{rows}"
        if self.catalog.table_exists(name):
            self.catalog.drop_table(name)
        job_table = self.catalog.load_table(self.spec.iceberg_table)
        self.catalog.create_table(name, schema=job_table.schema(),
                                  partition_spec=job_table.spec(),
                                  properties=dict(ib.TABLE_PROPERTIES))
        return name

    def predecessor(self, run: SizeRun) -> None:
        table = self.bench_table("predecessor", run.rows)
        argv = spark_submit_command(
            ["--table", TABLE, "--iceberg-table", table, *self.interval_args(run)],
            master=MASTER, jars=self.job_jars + self.bench_jars, application=BENCH / "predecessor_jdbc.py")
        result = self.time_path(run, "predecessor", argv)
        written = self.catalog.load_table(table).scan().count()  # it checks nothing itself
        self.record(run, "predecessor", self.figure(result, written, {}))

    def single_process(self, run: SizeRun, key: str) -> None:
        argv = [sys.executable, str(BENCH / "single_process.py"), key, "--table", TABLE,
                *self.interval_args(run)]
        if key == "peer":
            argv += ["--iceberg-table", self.bench_table("peer", run.rows)]
        if key == "parquet":
            argv += ["--directory", str(self.logs)]
        result = self.time_path(run, key, argv)
        (line,) = result_lines(result.stdout, "K2_BENCH_RESULT")
        rows, timed = int(line.pop("rows")), float(line.pop("seconds"))
        timed_cpu = float(line.pop("cpu_seconds"))
        if key == "peer":  # the whole process, as for spark-submit
            figure = self.figure(result, rows, {"work_seconds": timed, "work_cpu_seconds": timed_cpu,
                                                **line})
        else:  # the operation alone
            figure = self.figure(result, rows, {"process_seconds": round(result.seconds, 3),
                                                "process_cpu_seconds": round(result.cpu_seconds, 2),
                                                **line}, seconds=timed, cpu_seconds=timed_cpu)
        self.record(run, key, figure)

    def measure(self, run: SizeRun) -> None:
        self.insert(run)
        self.job(run, "job_first")
        self.job(run, "job_replace")
        self.job(run, "job_executors")
        self.predecessor(run)
        for key in ("peer", "export", "parquet"):
            self.single_process(run, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=parse_rows, default=parse_rows(DEFAULT_ROWS),
                        help=f"interval sizes, comma-separated (default {DEFAULT_ROWS})")
    parser.add_argument("--json", type=Path, help="also write all figures and ratios here")
    parser.add_argument("--repeat", type=int, default=3,
                        help=f"runs per path for sizes under {REPEAT_BELOW_ROWS:,} rows, the median "
                             "counts (default 3)")
    args = parser.parse_args()

    job_jars(), bench_jars()  # before anything starts
    load_average = os.getloadavg()[0]
    # SIGTERM ends the run like Ctrl-C: the stack is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    end = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    end -= timedelta(minutes=end.minute % 15)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = [[rows] * (args.repeat if rows < REPEAT_BELOW_ROWS else 1) for rows in args.rows]
    count = sum(len(group) for group in sizes)
    starts = iter(end - (count - i) * INTERVAL for i in range(count))
    groups = [[SizeRun(rows, start, start + INTERVAL) for rows, start in zip(group, starts)]
              for group in sizes]
    started = datetime.now(timezone.utc)
    with throwaway_stack("k2-bench-offload-") as (stack, home, env):
        from k2.local import stack as local_stack

        logs = home / "bench"
        logs.mkdir()
        bench = Benchmark(stack, env, logs, local_stack.CLICKHOUSE.pid(stack))
        for group in groups:
            for run in group:
                bench.measure(run)
        figures = report([SizeRun.median_of(group) for group in groups])
        if args.json:
            figures = {
                "measured_at": started.isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "table": TABLE, "master": MASTER, "cpus": os.cpu_count(),
                "load_average_at_start": load_average, **figures,
            }
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
            print(f"\nfigures written to {args.json}")

if __name__ == "__main__":
    main()
