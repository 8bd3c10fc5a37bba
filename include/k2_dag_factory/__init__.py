"""tables.yaml -> one offload DAG per table: wait_for_hot_data >> offload_to_iceberg >> commit_watermark.

The DAG factory is the layer between the provider (k2_provider: the sensor and operators
it chains) and the DAG bundle: `dags/k2_offload.py` calls :func:`build_dags` and nothing
else. A bad table spec
fails parsing with the ConfigError message (naming the table and the key) when
strict - ``K2_STRICT_DAGS=1``, as in the tests - and otherwise is logged and
skipped, so one bad entry does not take the other tables' DAGs down.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import (
    DAG,
    AsyncCallback,
    CronDataIntervalTimetable,
    CronTriggerTimetable,
    DeadlineAlert,
    DeadlineReference,
)

from k2.config import (
    ALERT_TO_ENV,
    DEFAULT_ALERT_TO,
    DEFAULT_TABLES_FILE,
    SPARK_POOL,
    ConfigError,
    TableSpec,
    load_table_specs,
)
from k2.intervals import SCHEDULE_CRON, first_interval_start, last_interval_start
from k2_provider.assets import DEFAULT_CATALOG, committed_alias, iceberg_table_asset
from k2_provider.hooks.connections import ICEBERG_CONN_ID, WATERMARKS_CONN_ID
from k2_provider.notifications.deadline import DeadlineMissNotifier
from k2_provider.notifications.task_failure import TaskFailureNotifier
from k2_provider.operators.cold_reader import ColdTierReaderOperator
from k2_provider.operators.maintenance import IcebergMaintenanceOperator
from k2_provider.operators.offload import OffloadToIcebergOperator
from k2_provider.operators.retention import HotRetentionOperator
from k2_provider.operators.watermark_commit import WatermarkCommitOperator
from k2_provider.sensors.clickhouse_watermark import ClickHouseWatermarkSensor

log = logging.getLogger(__name__)

STRICT_ENV = "K2_STRICT_DAGS"
# Runs of one table in flight at once; with catch-up the pool bounds the Spark jobs across tables.
MAX_ACTIVE_RUNS = 4
SENSOR_POKE_INTERVAL = timedelta(seconds=30)
# A watermark that has not reached the interval end this long after the run started means the
# feed has stopped: the sensor fails loudly (no retry) instead of holding the run.
SENSOR_TIMEOUT = timedelta(hours=1)
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "k2",
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    # Airflow 3.3 reads this as a multiplier: 2.0 doubles the delay per try; True (== 1) would not.
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=15),
    "depends_on_past": False,
}
# Tests only: K2_RETRY_DELAY (seconds) shortens the first retry delay of every task, so a
# fault-injection test need not wait a minute per retry. Read when the DAG file is parsed.
RETRY_DELAY_ENV = "K2_RETRY_DELAY"
TASK_SENSOR = "wait_for_hot_data"
TASK_OFFLOAD = "offload_to_iceberg"
TASK_COMMIT = "commit_watermark"
# Deadline-miss email (the smtp provider's notifier, run by the triggerer) and task-failure
# email (on_failure_callback, run after a task's last try): same recipients and connection.
ALERT_FROM_ENV = "K2_ALERT_EMAIL_FROM"
DEFAULT_ALERT_FROM = "k2-airflow@localhost"
SMTP_CONN_ID = "smtp_default"


def default_args_from_env() -> dict[str, Any]:
    """DEFAULT_ARGS with the K2_RETRY_DELAY override applied (a positive number of seconds)."""
    args = dict(DEFAULT_ARGS)
    raw = os.environ.get(RETRY_DELAY_ENV, "").strip()
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if seconds <= 0:
            raise ValueError(f"{RETRY_DELAY_ENV}={raw!r}: expected a positive number of seconds")
        args["retry_delay"] = timedelta(seconds=seconds)
    return args


def strict_from_env() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def layer_of(spec: TableSpec) -> str:
    """bronze | silver | gold, from the table name's prefix."""
    prefix = spec.name.split("_", 1)[0]
    if prefix not in {"bronze", "silver", "gold"}:
        raise ConfigError(
            f"table {spec.name!r}: name must start with bronze_, silver_ or gold_ (the layer)"
        )
    return prefix


def _doc_md(spec: TableSpec) -> str:
    completeness = spec.completeness
    assert completeness is not None
    return f"""\
### Offload `{spec.name}` to Iceberg `{spec.iceberg_table}`

Every 15 minutes (UTC), one run per interval `[data_interval_start, data_interval_end)`;
catch-up on, at most {MAX_ACTIVE_RUNS} runs at once, one offload of the table at a time, Spark jobs
bounded by the pool `{SPARK_POOL}`. Catching up, one Spark job offloads up to
{spec.max_intervals_per_job} complete intervals; the runs of the others find them offloaded and start no job.

| | |
|---|---|
| ClickHouse source | `{spec.source}` (event time `{spec.event_time_column}`) |
| unique key | `{", ".join(spec.unique_key)}` |
| completeness | `max({completeness.table}.{completeness.column})` − {spec.allowed_lateness} must pass the interval end |
| Iceberg table | `{spec.iceberg_table}`, partitioned by `{", ".join(spec.partition_by) or "(none)"}` |
| hot retention | {spec.hot_retention} |
| deadline | email when a run is not done {spec.deadline} after it was queued |
| task failure | email when a task fails after its last try (not on retries) |

1. **wait_for_hot_data** – deferrable sensor; fails after {SENSOR_TIMEOUT} with "feed looks stopped".
2. **offload_to_iceberg** – under the table's offload lock (PostgreSQL advisory lock): skips an interval
   already offloaded by another run's batch (scheduled runs, first try), else spark-submit of
   `spark_jobs/offload_to_iceberg.py` for the run's interval - plus, for a scheduled first try, the complete
   intervals after it that are not offloaded yet, in one atomic snapshot (audited interval by interval before
   it is published); returns rows, checksum and snapshot id of each. Retries, clears, manual runs and backfills re-offload their own interval.
3. **commit_watermark** – a ledger row per offloaded interval + watermark compare-and-set in PostgreSQL
   (`k2_watermarks`).

#### Runbook
- *Sensor timed out (feed stopped)*: check the feed handlers and inserts into `{completeness.table}`;
  once data flows again, clear the failed `wait_for_hot_data` tasks (downstream included).
- *Offload failed*: read the spark-submit log of the task; retries are automatic (exponential backoff).
  Re-running an interval is safe: it replaces that interval in Iceberg, never duplicates it. A batch that
  failed part-way keeps the intervals it committed; their runs find them and skip Spark.
- *Offload waits for its lock*: the log names the session holding the table's offload lock (its
  application_name is `k2 offload <run id>`); a killed task's lock goes with its connection.
- *Watermark stuck*: `k2 watermark show` lists the watermark, its lag and pending intervals; a pending
  interval means an earlier one is not committed yet – find and clear that run.
- *Verify*: `k2 verify --table {spec.name}` compares ClickHouse and Iceberg interval by interval.
"""


@dataclass(frozen=True)
class Placement:
    """Where one table's offload DAG runs and what it reads and writes through: the executor
    of its tasks (None: Airflow's default executor; e.g. "CeleryExecutor" next to a default
    LocalExecutor), the Spark, Iceberg catalog and watermark-store connections, and the read
    parallelism of its Spark job. The default places every table as `dags/k2_offload.py`
    does. Another placement - a table moved onto a cluster and object storage, say - gets
    its own dag_id (``dag_id_suffix``) and should get its own catalog and watermark store
    (connections), so that the two DAGs never offload into one ledger."""

    dag_id_suffix: str = ""
    executor: str | None = None
    spark_conn_id: str = "spark_default"
    iceberg_conn_id: str = ICEBERG_CONN_ID
    watermarks_conn_id: str = WATERMARKS_CONN_ID
    driver_max_rows: int | None = None  # the offload job's --driver-max-rows (None: its default)
    slices: int | None = None  # the offload job's --slices (None: by the interval's rows)
    tags: tuple[str, ...] = ()
    catalog_name: str = DEFAULT_CATALOG  # the Iceberg connection's catalog_name: the Asset's URI


DEFAULT_PLACEMENT = Placement()


def alert_recipients() -> str:
    """Who gets the deadline-miss and task-failure emails (K2_ALERT_EMAIL_TO, read at parsing)."""
    return os.environ.get(ALERT_TO_ENV) or DEFAULT_ALERT_TO


def alert_sender() -> str:
    return os.environ.get(ALERT_FROM_ENV) or DEFAULT_ALERT_FROM


def failure_notifier() -> TaskFailureNotifier:
    """The on_failure_callback of every offload task: one email per task that failed for good
    (Airflow calls on_retry_callback, not this, for a try that will be retried)."""
    return TaskFailureNotifier(
        to=alert_recipients(), from_email=alert_sender(), smtp_conn_id=SMTP_CONN_ID
    )


def _deadline_alert(spec: TableSpec, dag_id: str) -> DeadlineAlert:
    # The triggerer awaits DeadlineMissNotifier(**kwargs, context=...) with a small context:
    # dag_run (the run's API fields) and deadline (id, deadline_time). Only those are templated.
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=spec.deadline,
        callback=AsyncCallback(
            DeadlineMissNotifier,
            kwargs={
                "table": spec.name,
                "to": alert_recipients(),
                "from_email": alert_sender(),
                "smtp_conn_id": SMTP_CONN_ID,
                "subject": f"[K2 SLA miss] {dag_id} run {{{{ dag_run.dag_run_id }}}}",
                "html_content": (
                    f"<p>The offload of <b>{spec.name}</b> for the interval "
                    "{{ dag_run.data_interval_start }} – {{ dag_run.data_interval_end }} "
                    f"has not finished within {spec.deadline} of being queued "
                    "(queued at {{ dag_run.queued_at }}, deadline {{ deadline.deadline_time }}).</p>"
                    "<p>Run state: {{ dag_run.state }}. See the DAG's runbook.</p>"
                ),
            },
        ),
        name=f"{dag_id}_deadline",
    )


def build_dag(spec: TableSpec, placement: Placement = DEFAULT_PLACEMENT) -> DAG:
    """The offload DAG of one table (placed by `placement`)."""
    completeness = spec.completeness
    assert completeness is not None  # filled in by TableSpec
    executor = {"executor": placement.executor} if placement.executor else {}
    dag_id = spec.dag_id + placement.dag_id_suffix
    alias = committed_alias(dag_id)
    with DAG(
        dag_id=dag_id,
        description=f"Offload {spec.name} from ClickHouse to Iceberg {spec.iceberg_table} every 15 minutes",
        # A data-interval timetable: a cron string or timedelta would make a trigger
        # timetable whose runs have no data interval in Airflow 3.
        schedule=CronDataIntervalTimetable(SCHEDULE_CRON, timezone="UTC"),
        start_date=spec.start_date,
        end_date=last_interval_start(spec.end_date),
        catchup=True,
        max_active_runs=MAX_ACTIVE_RUNS,
        default_args={**default_args_from_env(), "on_failure_callback": failure_notifier(), **executor},
        tags=["k2", "offload", layer_of(spec), *placement.tags],
        doc_md=_doc_md(spec),
        deadline=_deadline_alert(spec, dag_id),
    ) as dag:
        wait = ClickHouseWatermarkSensor(
            task_id=TASK_SENSOR,
            table=completeness.table,
            column=completeness.column,
            lateness=spec.allowed_lateness,
            poke_interval=SENSOR_POKE_INTERVAL,
            timeout=SENSOR_TIMEOUT,
        )
        offload = OffloadToIcebergOperator(
            task_id=TASK_OFFLOAD,
            table=spec.name,
            max_intervals_per_job=spec.max_intervals_per_job,
            conn_id=placement.spark_conn_id,
            iceberg_conn_id=placement.iceberg_conn_id,
            postgres_conn_id=placement.watermarks_conn_id,
            driver_max_rows=placement.driver_max_rows,
            slices=placement.slices,
            pool=SPARK_POOL,
            pool_slots=1,
            # One offload of a table at a time, so that a run waiting for the table's offload
            # lock never holds a Spark pool slot that another table could use. The lock itself
            # (k2_provider.operators.offload.offload_lock) also covers writers outside this DAG.
            max_active_tis_per_dag=1,
        )
        commit = WatermarkCommitOperator(
            task_id=TASK_COMMIT,
            table=spec.name,
            initial_watermark=first_interval_start(spec.start_date),
            offload_task_id=TASK_OFFLOAD,
            postgres_conn_id=placement.watermarks_conn_id,
            # one event of the table's Asset per committed interval, through the alias
            outlets=[alias],
            asset=iceberg_table_asset(spec, placement.catalog_name),
            asset_alias=alias,
        )
        wait >> offload >> commit
    return dag


def build_dags(
    config_path: Path | str | None = None, *, strict: bool | None = None
) -> dict[str, DAG]:
    """One DAG per table spec, keyed by dag_id (put them into the DAG file's globals())."""
    strict = strict_from_env() if strict is None else strict
    path = Path(config_path) if config_path else DEFAULT_TABLES_FILE
    # Lenient: a bad entry is logged and left out, so one bad table does not take the other
    # tables' DAGs down; the entries kept are read exactly as the strict path reads them.
    specs = load_table_specs(path, strict=strict, on_error=lambda msg: log.error("k2: %s", msg))

    dags: dict[str, DAG] = {}
    for spec in specs:
        try:
            dags[spec.dag_id] = build_dag(spec)
        except Exception as exc:
            if strict:
                raise
            log.exception("k2: skipping DAG %s: %s", spec.dag_id, exc)
    return dags


DAILY_START = datetime(2026, 1, 1, tzinfo=timezone.utc)  # a daily DAG's start when no table is listed
RETENTION_DAG_ID = "k2_hot_retention"
RETENTION_SCHEDULE = "30 3 * * *"  # daily, 03:30 UTC
RETENTION_DOC = """\
### Hot-tier retention

Daily (03:30 UTC) and on demand (Trigger): per table, the ClickHouse partitions older than the
table's `hot_retention` (tables.yaml) are dropped, each only when every 15-minute interval of
its rows is in the offload ledger, the watermark has passed them and a verification against
Iceberg made at drop time is clean (`k2.retention`). A partition that fails any of these is
kept - nothing of it is lost - and its task fails naming it and why (alert
K2RetentionBlocked; runbook: docs/operations/runbooks.md#retention-blocked).
The same from a shell: `k2 retention plan` / `k2 retention apply [--table T] [--dry-run]`.

Created paused: unpause it once `k2 retention plan` shows what it would drop.
"""
MAINTENANCE_DAG_ID = "k2_iceberg_maintenance"
MAINTENANCE_SCHEDULE = "0 4 * * *"  # daily, 04:00 UTC, after retention
MAINTENANCE_DOC = """\
### Iceberg maintenance

Daily (04:00 UTC) and on demand (Trigger): per table, under the table's offload lock (it waits
for a running offload and never races one), one Spark job runs Iceberg's procedures on the
table and its quarantine table (`k2.maintenance`): compaction of the closed days
(`rewrite_data_files`, sorted by event time: one file per partition value and day),
`rewrite_manifests`, `expire_snapshots` older than the table's `snapshot_retention` (2 days;
never a snapshot whose intervals the offload ledger lacks), `remove_orphan_files` older than
`orphan_file_retention` (3 days). A failed task retries once; alerts K2MaintenanceFailed and
K2MaintenanceStale; runbook: docs/operations/runbooks.md#maintenance-failed.

Created paused: unpause it with the offload DAGs in production.
"""


def _daily_table_dag(dag_id: str, schedule: str, description: str, doc: str, tags: list[str],
                     retries: int, task: Any, config_path: Path | str | None, strict: bool | None) -> DAG:
    """A daily DAG, created paused, with one task per table of tables.yaml (`task(spec)`)."""
    strict = strict_from_env() if strict is None else strict
    path = Path(config_path) if config_path else DEFAULT_TABLES_FILE
    specs = load_table_specs(path, strict=strict, on_error=lambda msg: log.error("k2: %s", msg))
    with DAG(
        dag_id=dag_id,
        description=description,
        schedule=CronTriggerTimetable(schedule, timezone="UTC"),
        start_date=min((spec.start_date for spec in specs), default=DAILY_START),
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=True,
        default_args={**default_args_from_env(), "retries": retries, "on_failure_callback": failure_notifier()},
        tags=["k2", *tags],
        doc_md=doc,
    ) as dag:
        for spec in specs:
            task(spec)
    return dag


def build_retention_dag(config_path: Path | str | None = None, *, strict: bool | None = None) -> DAG:
    """The DAG k2_hot_retention: one retention task per table of tables.yaml."""
    return _daily_table_dag(
        RETENTION_DAG_ID, RETENTION_SCHEDULE,
        "Drop ClickHouse partitions older than hot_retention behind a verified offload", RETENTION_DOC,
        ["retention"],
        # A kept partition fails its task for good: retrying cannot fix what it reports.
        0, lambda spec: HotRetentionOperator(task_id=f"retain_{spec.name}", table=spec.name),
        config_path, strict)


def build_maintenance_dag(config_path: Path | str | None = None, *, strict: bool | None = None) -> DAG:
    """The DAG k2_iceberg_maintenance: one maintenance task per table of tables.yaml."""
    return _daily_table_dag(
        MAINTENANCE_DAG_ID, MAINTENANCE_SCHEDULE,
        "Compact, expire snapshots and remove orphan files of the Iceberg tables", MAINTENANCE_DOC,
        ["maintenance"],
        1, lambda spec: IcebergMaintenanceOperator(task_id=f"maintain_{spec.name}", table=spec.name),
        config_path, strict)


EXAMPLE_CONSUMER_DAG_ID = "k2_example_cold_consumer"
EXAMPLE_CONSUMER_TABLES = ("silver_trades", "gold_ohlcv_15m")
EXAMPLE_CONSUMER_DOC = """\
### Example: a consumer of the cold tier

Scheduled on the Iceberg Assets of `silver_trades` and `gold_ohlcv_15m` (either): each
offload DAG's commit task adds one asset event per interval it committed, with the extras
`table, iceberg_table, interval_start, interval_end, snapshot_id, rows, checksum`. A run of
this DAG reads each triggering event's interval from that snapshot with pyiceberg (Arrow
batches) and logs a summary; it fails when the rows read differ from the rows announced.
Events that arrive together (a catch-up batch) are consumed by one run.

Created paused; tagged `example`. Copy it as the start of a research job or a backtest.
"""


def build_example_consumer_dag(tables: tuple[str, ...] = EXAMPLE_CONSUMER_TABLES,
                               config_path: Path | str | None = None) -> DAG:
    """The example downstream DAG k2_example_cold_consumer (created paused, tagged example)."""
    path = Path(config_path) if config_path else DEFAULT_TABLES_FILE
    specs = {spec.name: spec for spec in load_table_specs(path, strict=True)}
    assets = [iceberg_table_asset(specs[name]) for name in tables]
    with DAG(
        dag_id=EXAMPLE_CONSUMER_DAG_ID,
        description="Example: read each newly committed interval of the cold tier from Iceberg",
        schedule=functools.reduce(operator.or_, assets),  # any of them
        start_date=DAILY_START,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=True,
        default_args={**default_args_from_env(), "retries": 1},
        tags=["k2", "example"],
        doc_md=EXAMPLE_CONSUMER_DOC,
    ) as dag:
        ColdTierReaderOperator(task_id="read_new_intervals", assets=assets)
    return dag
