"""Operator: offload one run's interval of a table from ClickHouse to Iceberg with spark-submit."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

if TYPE_CHECKING:
    from airflow.sdk import Connection, Context
    from k2.runtime_env import IcebergSettings

# plugins/k2_provider/operators/offload.py -> repository root (the package is installed editable).
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_APPLICATION = REPO_ROOT / "spark_jobs" / "offload_to_iceberg.py"
DEFAULT_JARS_DIR = REPO_ROOT / "spark_jobs" / "jars"
ICEBERG_CONN_ID = "iceberg_default"
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


def iceberg_settings_from_connection(conn: Connection) -> IcebergSettings:
    """A postgres-style Airflow connection -> the Iceberg JDBC catalog settings.

    host, port, login, password, schema = the catalog database; extra ``warehouse``
    (``file:///...`` or ``s3://...``) and ``catalog_name`` (default ``k2``).
    """
    from k2.runtime_env import IcebergSettings

    extra = conn.extra_dejson or {}
    warehouse = extra.get("warehouse")
    if not conn.host or not conn.schema or not warehouse:
        raise ValueError(
            f"connection {conn.conn_id!r} needs host, schema (the catalog database) and extra.warehouse"
        )
    return IcebergSettings(
        catalog_name=extra.get("catalog_name") or "k2",
        uri=f"postgresql://{conn.host}:{conn.port or 5432}/{conn.schema}",
        user=conn.login or "",
        password=conn.password or "",
        warehouse=warehouse,
    )


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    else:
        parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def normalize_result(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The XCom shape of an offload result, from the job's stdout JSON or an OffloadSnapshot dict."""
    missing = [key for key in RESULT_KEYS if raw.get(key) is None]
    if missing:
        raise OffloadResultError(f"offload result lacks {missing}: {dict(raw)!r}")
    return {
        "table": str(raw["table"]),
        "interval_start": _parse_time(raw["interval_start"]).isoformat(),
        "interval_end": _parse_time(raw["interval_end"]).isoformat(),
        "run_id": str(raw["run_id"]),
        "rows": int(raw["rows"]),
        "checksum": int(raw["checksum"]),
        "snapshot_id": int(raw["snapshot_id"]),
    }


def parse_result_line(lines: Sequence[str]) -> dict[str, Any] | None:
    """The last ``K2_OFFLOAD_RESULT {json}`` line of the job's output, if any."""
    for line in reversed(list(lines)):
        _, marker, payload = line.partition(RESULT_MARKER)
        if marker and payload.strip().startswith("{"):
            return normalize_result(json.loads(payload.strip()))
    return None


class OffloadToIcebergOperator(SparkSubmitOperator):
    """
    Offload ``[data_interval_start, data_interval_end)`` of one table to Iceberg with spark-submit.

    Runs ``spark_jobs/offload_to_iceberg.py --table T --interval-start S --interval-end E
    --run-id R``. Where ClickHouse and the Iceberg catalog are, the job learns from
    environment variables (:mod:`k2.runtime_env`) built at execute time from the
    ``clickhouse_conn_id`` and ``iceberg_conn_id`` connections; they are never templated,
    logged or put on the command line, and their secrets are registered with Airflow's
    secrets masker. The Spark conf carries only the non-secret catalog settings.

    Returns (to XCom) the offload result: table, interval_start, interval_end, run_id,
    rows, checksum, snapshot_id. It is read from the Iceberg snapshot the job committed
    (its summary carries ``k2.*`` properties), which works in every deploy mode; the
    job's ``K2_OFFLOAD_RESULT`` stdout line is the fallback in client mode.

    :param table: table name from tables.yaml (templated).
    :param interval_start: interval start, ISO-8601 UTC (templated); default data_interval_start.
    :param interval_end: interval end, ISO-8601 UTC (templated); default data_interval_end.
    :param clickhouse_conn_id: the ClickHouse connection id.
    :param iceberg_conn_id: the Iceberg JDBC catalog connection id (postgres-style).
    :param application: the PySpark job (templated); default spark_jobs/offload_to_iceberg.py.
    :param jars: comma-separated jars (templated); default every jar in ``jars_dir``.
    :param jars_dir: folder whose jars are used when ``jars`` is not given.
    :param kwargs: everything else goes to SparkSubmitOperator (conn_id, conf, driver_memory...).
    """

    template_fields: Sequence[str] = (
        *SparkSubmitOperator.template_fields,
        "table",
        "interval_start",
        "interval_end",
    )
    ui_color = "#c6e6f5"

    def __init__(
        self,
        *,
        table: str,
        interval_start: str = "{{ data_interval_start | ts }}",
        interval_end: str = "{{ data_interval_end | ts }}",
        clickhouse_conn_id: str = "clickhouse_default",
        iceberg_conn_id: str = ICEBERG_CONN_ID,
        application: str | os.PathLike[str] = DEFAULT_APPLICATION,
        jars: str | None = None,
        jars_dir: str | os.PathLike[str] = DEFAULT_JARS_DIR,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "application_args" in kwargs:
            raise TypeError("OffloadToIcebergOperator builds its application_args itself")
        super().__init__(
            application=str(application),
            jars=jars,
            name=name or f"k2-offload-{table}",
            # Rendered with the other template fields: the same templates as interval_start/end.
            application_args=[
                "--table",
                table,
                "--interval-start",
                interval_start,
                "--interval-end",
                interval_end,
                "--run-id",
                "{{ run_id }}",
            ],
            **kwargs,
        )
        self.table = table
        self.interval_start = interval_start
        self.interval_end = interval_end
        self.clickhouse_conn_id = clickhouse_conn_id
        self.iceberg_conn_id = iceberg_conn_id
        self.jars_dir = str(jars_dir)

    def _default_jars(self) -> str | None:
        folder = Path(self.jars_dir)
        jars = sorted(str(p) for p in folder.glob("*.jar")) if folder.is_dir() else []
        if not jars:
            self.log.warning(
                "no jars in %s; run `make setup` (mvn dependency:copy-dependencies)", folder
            )
        return ",".join(jars) or None

    def _runtime_env(self) -> tuple[dict[str, str], IcebergSettings]:
        from airflow.sdk import BaseHook
        from airflow.sdk.log import mask_secret

        from k2.runtime_env import SECRET_VARIABLES
        from k2_provider.hooks.clickhouse import ClickHouseHook

        clickhouse = ClickHouseHook(clickhouse_conn_id=self.clickhouse_conn_id).settings_for_spark()
        iceberg = iceberg_settings_from_connection(BaseHook.get_connection(self.iceberg_conn_id))
        env = {**clickhouse.to_env(), **iceberg.to_env()}
        for name in SECRET_VARIABLES:
            if env.get(name):
                mask_secret(env[name], name)
        return env, iceberg

    def execute(self, context: Context) -> dict[str, Any]:
        from k2.iceberg import spark_conf

        env, iceberg = self._runtime_env()
        # Set only now: rendered template fields were recorded before execute() (and are
        # not re-recorded), so the values never reach the UI; the hook hands them to
        # spark-submit through its environment (client mode) and does not log them.
        self.env_vars = {**(self.env_vars or {}), **env}
        self.conf = {**spark_conf(iceberg), **(self.conf or {})}
        if not self.jars:
            self.jars = self._default_jars()
        super().execute(context)
        result = self._offload_result(iceberg, context)
        self.log.info(
            "offloaded %s [%s, %s): %s rows, checksum %s, snapshot %s",
            result["table"],
            result["interval_start"],
            result["interval_end"],
            result["rows"],
            result["checksum"],
            result["snapshot_id"],
        )
        return result

    def _offload_result(self, iceberg: IcebergSettings, context: Context) -> dict[str, Any]:
        start, end = _parse_time(self.interval_start), _parse_time(self.interval_end)
        try:
            result = self._result_from_snapshot(iceberg, start, end)
        except Exception as exc:  # the job's own output below is the same evidence (client mode)
            self.log.warning("cannot read the Iceberg snapshots of %s: %s", self.table, exc)
            result = None
        if result is None:
            lines = list(getattr(self._hook, "_last_submit_log_lines", None) or [])
            result = parse_result_line(lines)
        if result is None:
            raise OffloadResultError(
                f"the offload of {self.table} [{start.isoformat()}, {end.isoformat()}) finished but "
                "left no Iceberg snapshot for the interval and no K2_OFFLOAD_RESULT line"
            )
        if (
            result["table"],
            _parse_time(result["interval_start"]),
            _parse_time(result["interval_end"]),
        ) != (
            self.table,
            start,
            end,
        ):
            raise OffloadResultError(f"offload result is for another interval or table: {result!r}")
        run_id = context.get("run_id")
        if run_id and result["run_id"] != run_id:
            # Another run of the same interval committed after this one (two runs at once, e.g. a
            # clear during a run): the newest commit is what Iceberg holds, so that is recorded.
            self.log.warning(
                "the newest commit of the interval is run %s's, not %s's", result["run_id"], run_id
            )
        return result

    def _result_from_snapshot(
        self, iceberg: IcebergSettings, start: datetime, end: datetime
    ) -> dict[str, Any] | None:
        """The newest offload commit of the interval, from the Iceberg table's own snapshot summaries."""
        from k2.config import cached_tables
        from k2.iceberg import find_offload_snapshot, load_catalog

        spec = cached_tables().get(self.table)
        snapshot = find_offload_snapshot(load_catalog(iceberg), spec, start, end)
        if snapshot is None:
            self.log.warning(
                "no Iceberg snapshot of %s carries the interval; trying the job's output",
                self.table,
            )
            return None
        return normalize_result(snapshot.to_dict())
