"""The offload as a library: the Spark job's command line and result contract, and one
offload of a planned range of intervals.

Two callers run an offload, and both go through :func:`offload_range`:

- the Airflow task (k2_provider.operators.offload.OffloadToIcebergOperator), whose
  spark-submit is Airflow's SparkSubmitHook on the ``spark_default`` connection;
- ``k2 reoffload`` (the CLI), whose spark-submit is :func:`spark_submit_command` run as a
  subprocess.

Either way the job gets the same application, arguments (:func:`job_arguments`), jars
(:func:`job_jars`) and Iceberg conf (k2.iceberg.spark_conf), and the offload's figures are
read back the same way (:func:`collect_results`): from the Iceberg snapshots the job
committed, else from its ``K2_OFFLOAD_RESULT`` lines. Tests and benchmarks build their
spark-submit command lines with :func:`spark_submit_command` too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from logging import Logger
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2.config import REPO_ROOT, SPARK_JARS_DIR, TableSpec, quote_identifier
from k2.iceberg import load_catalog, offload_snapshots_of, summary_int
from k2.intervals import parse_utc

if TYPE_CHECKING:
    from k2.iceberg import OffloadSnapshot
    from k2.runtime_env import IcebergSettings

Interval = tuple[datetime, datetime]

DEFAULT_APPLICATION = REPO_ROOT / "spark_jobs" / "offload_to_iceberg.py"
# The job prints one line per interval: RESULT_MARKER {json with RESULT_KEYS, ...}
RESULT_MARKER = "K2_OFFLOAD_RESULT"
RESULT_KEYS = (
    "table",
    "interval_start",
    "interval_end",
    "run_id",
    "rows",
    "checksum",
    "snapshot_id",
)


class OffloadResultError(RuntimeError):
    """The offload job finished but its result cannot be found or does not match the run."""


class RetiredIntervalError(RuntimeError):
    """An interval before the hot tier's retention boundary: ClickHouse no longer holds its rows."""


class SparkSubmitError(RuntimeError):
    """spark-submit (run by :func:`run_spark_submit`) failed; the message holds its output's tail."""


# --------------------------------------------------------------------------------------
# The result contract


def normalize_result(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The XCom shape of an offload result, from the job's stdout JSON or an OffloadSnapshot dict."""
    missing = [key for key in RESULT_KEYS if raw.get(key) is None]
    if missing:
        raise OffloadResultError(f"offload result lacks {missing}: {dict(raw)!r}")
    return {
        "table": str(raw["table"]),
        "interval_start": parse_utc(str(raw["interval_start"]), naive_is_utc=True).isoformat(),
        "interval_end": parse_utc(str(raw["interval_end"]), naive_is_utc=True).isoformat(),
        "run_id": str(raw["run_id"]),
        "rows": int(raw["rows"]),
        "checksum": int(raw["checksum"]),
        "snapshot_id": int(raw["snapshot_id"]),
        # rows of the interval set aside in the quarantine table (None: not known here)
        "quarantined_rows": None if raw.get("quarantined_rows") is None else int(raw["quarantined_rows"]),
    }


def result_line(result: Mapping[str, Any]) -> str:
    """The job's line for one interval (what :func:`parse_result_lines` reads back)."""
    return f"{RESULT_MARKER} {json.dumps(dict(result), sort_keys=True, default=str)}"


def parse_result_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every ``K2_OFFLOAD_RESULT {json}`` line of the job's output, raw, in output order."""
    results = []
    for line in lines:
        _, marker, payload = str(line).partition(RESULT_MARKER)
        if marker and payload.strip().startswith("{"):
            results.append(json.loads(payload.strip()))
    return results


def parse_result_line(lines: Iterable[str]) -> dict[str, Any] | None:
    """The last ``K2_OFFLOAD_RESULT {json}`` line of the job's output, normalized, if any."""
    results = parse_result_lines(lines)
    return normalize_result(results[-1]) if results else None


# --------------------------------------------------------------------------------------
# The job's command line


def job_arguments(
    table: str,
    intervals: Sequence[Interval],
    run_id: str,
    *,
    driver_max_rows: int | None = None,
    slices: int | None = None,
) -> list[str]:
    """The offload job's arguments for consecutive intervals of one length (one or a batch)."""
    if not intervals:
        raise ValueError("no interval to offload")
    step = intervals[0][1] - intervals[0][0]
    if step <= timedelta(0) or step % timedelta(seconds=1):
        raise ValueError(f"interval length {step} is not a positive whole number of seconds")
    arguments = [
        "--table", table,
        "--interval-start", intervals[0][0].isoformat(),
        "--interval-end", intervals[-1][1].isoformat(),
        "--interval-step", f"{int(step.total_seconds())}s",
        "--run-id", run_id,
    ]
    if driver_max_rows is not None:
        arguments += ["--driver-max-rows", str(driver_max_rows)]
    if slices is not None:
        arguments += ["--slices", str(slices)]
    return arguments


def job_jars(jars_dir: Path | str = SPARK_JARS_DIR) -> list[str]:
    """Every jar `make setup` copied into ``jars_dir`` (spark_jobs/pom.xml), sorted."""
    folder = Path(jars_dir)
    return sorted(str(p) for p in folder.glob("*.jar")) if folder.is_dir() else []


def spark_submit_binary() -> str:
    """spark-submit of this Python environment (pyspark's), else the first on PATH."""
    beside = Path(sys.executable).with_name("spark-submit")
    if beside.exists():
        return str(beside)
    found = shutil.which("spark-submit")
    if found is None:
        raise SparkSubmitError("spark-submit not found (pyspark is not installed in this environment)")
    return found


def spark_submit_command(
    arguments: Sequence[str],
    *,
    master: str,
    jars: Sequence[str],
    conf: Mapping[str, str] | None = None,
    application: Path | str = DEFAULT_APPLICATION,
    binary: str | None = None,
) -> list[str]:
    """spark-submit's argv for a PySpark application. Never put a secret in ``conf`` or
    ``arguments``: connection settings travel in the environment (k2.runtime_env)."""
    argv = [binary or spark_submit_binary(), "--master", master, "--conf", "spark.ui.enabled=false"]
    for key, value in (conf or {}).items():
        argv += ["--conf", f"{key}={value}"]
    if jars:
        argv += ["--jars", ",".join(jars)]
    return [*argv, str(application), *arguments]


def run_spark_submit(argv: Sequence[str], env: Mapping[str, str], *,
                     log: Logger | None = None) -> list[str]:
    """Run spark-submit, streaming its output to ``log``; its output lines. Raises
    SparkSubmitError with the output's tail when it fails."""
    full_env = {**os.environ, **env}
    full_env.setdefault("PYSPARK_PYTHON", sys.executable)
    full_env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    lines: list[str] = []
    with subprocess.Popen(list(argv), env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if log is not None:
                log.info("%s", lines[-1])
    if proc.returncode != 0:
        tail = "\n".join(lines[-40:])
        raise SparkSubmitError(f"spark-submit exited with {proc.returncode}:\n{tail}")
    return lines


# --------------------------------------------------------------------------------------
# ClickHouse completeness


def max_event_time(client: Any, table: str, column: str) -> datetime | None:
    """max(column) of a ClickHouse table as an aware UTC datetime; None when it has no rows."""
    sql = f"SELECT maxOrNull({quote_identifier(column)}) FROM {quote_identifier(table)}"
    value = client.query(sql).first_row[0]
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"{table}.{column} is not a DateTime column (max returned {value!r})")
    # clickhouse-connect returns naive UTC for DateTime64(3, 'UTC') (tz_mode naive_utc)
    return parse_utc(value, naive_is_utc=True)


def hot_watermark(client: Any, spec: TableSpec) -> datetime | None:
    """What the sensor waits for: the completeness table's max event time minus the allowed
    lateness; every interval ending at or before it holds all its rows. None: no rows."""
    completeness = spec.completeness
    assert completeness is not None  # filled in by TableSpec
    latest = max_event_time(client, completeness.table, completeness.column)
    return None if latest is None else latest - spec.allowed_lateness


# --------------------------------------------------------------------------------------
# One offload


@dataclass
class OffloadResults:
    """What one offload job committed: per interval the normalized result and its raw record
    (snapshot summary or result line), the table's data-file count, the job's wall time."""

    results: list[dict[str, Any]]
    raw: list[dict[str, Any]]
    data_files: int | None
    wall_seconds: float


def collect_results(
    iceberg: IcebergSettings,
    spec: TableSpec,
    intervals: Sequence[Interval],
    run_id: str,
    lines: Iterable[str],
    log: Logger,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int | None]:
    """Each interval's committed offload (normalized), its raw record, and the table's
    data-file count: from the Iceberg snapshots, else from the job's result lines."""
    snapshots: dict[Interval, OffloadSnapshot] = {}
    data_files = None
    try:
        table = load_catalog(iceberg).load_table(spec.iceberg_table)
        snapshots = offload_snapshots_of(table, spec, intervals)
        current = table.current_snapshot()
        if current is not None and current.summary is not None:
            data_files = summary_int(current.summary.additional_properties, "total-data-files")
    except Exception as exc:  # the job's own output below is the same evidence (client mode)
        log.warning("cannot read the Iceberg snapshots of %s: %s", spec.name, exc)

    printed = {
        (parse_utc(raw["interval_start"], naive_is_utc=True),
         parse_utc(raw["interval_end"], naive_is_utc=True)): raw
        for raw in parse_result_lines(lines)
        if raw.get("interval_start") and raw.get("interval_end")
    }
    results, extras, missing = [], [], []
    for start, end in intervals:
        snapshot = snapshots.get((start, end))
        raw = snapshot.to_dict() if snapshot is not None else printed.get((start, end))
        if raw is None:
            missing.append(f"[{start.isoformat()}, {end.isoformat()})")
            continue
        result = normalize_result(raw)
        if (result["table"], parse_utc(result["interval_start"]), parse_utc(result["interval_end"])) != (
            spec.name, start, end,
        ):
            raise OffloadResultError(f"offload result is for another interval or table: {result!r}")
        if result["run_id"] != run_id:
            # Another run of the same interval committed after this one (a writer outside
            # this Airflow): the newest commit is what Iceberg holds, so that is recorded.
            log.warning("the newest commit of [%s, %s) is run %s's, not %s's",
                        start.isoformat(), end.isoformat(), result["run_id"], run_id)
        results.append(result)
        extras.append(raw)
    if missing:
        raise OffloadResultError(
            f"the offload of {spec.name} finished but left no Iceberg snapshot and no "
            f"{RESULT_MARKER} line for {', '.join(missing)}"
        )
    if data_files is None and extras:
        data_files = extras[-1].get("total_data_files")
    return results, extras, data_files


def offload_range(
    spec: TableSpec,
    intervals: Sequence[Interval],
    run_id: str,
    *,
    iceberg: IcebergSettings,
    submit: Callable[[list[str]], Iterable[str]],
    log: Logger,
    driver_max_rows: int | None = None,
    slices: int | None = None,
    offloadable_from: datetime | None = None,
) -> OffloadResults:
    """Offload consecutive intervals of one table with one Spark job, and read back what it
    committed. ``submit(arguments)`` runs the job with those application arguments and
    returns its output lines (or raises); the caller holds the table's offload lock
    (k2.watermarks.offload_lock) around this and commits the ledger after it.

    ``offloadable_from``: the table's retention boundary (k2.watermarks.RetentionBoundary):
    an interval that starts before it is refused, since retention dropped its rows from
    ClickHouse after verifying them in Iceberg, and offloading it again would empty it there."""
    retired = [i for i in intervals if offloadable_from is not None and i[0] < offloadable_from]
    if retired:
        raise RetiredIntervalError(
            f"{spec.name} [{retired[0][0].isoformat()}, {retired[-1][1].isoformat()}) lies before the hot "
            f"tier's retention boundary {offloadable_from.isoformat()}: ClickHouse no longer holds those "
            "rows (dropped after a verified offload), so the interval stays as Iceberg has it"
        )
    arguments = job_arguments(spec.name, intervals, run_id, driver_max_rows=driver_max_rows, slices=slices)
    started = time.monotonic()
    lines = list(submit(arguments))
    wall = time.monotonic() - started
    results, raw, data_files = collect_results(iceberg, spec, intervals, run_id, lines, log)
    return OffloadResults(results, raw, data_files, wall)
