"""Operator: record an offloaded interval in the ledger and advance the table's watermark."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

if TYPE_CHECKING:
    from airflow.sdk import Connection, Context
    from k2.watermarks import WatermarkStore

WATERMARKS_CONN_ID = "k2_watermarks"


def postgres_dsn_from_connection(conn: Connection) -> str:
    """libpq DSN from a postgres-style Airflow connection (schema = database; extra = libpq options)."""
    from psycopg.conninfo import make_conninfo

    options: dict[str, Any] = {
        "host": conn.host or "localhost",
        "port": conn.port or 5432,
        "dbname": conn.schema or "k2",
        "user": conn.login or None,
        "password": conn.password or None,
    }
    # libpq options such as sslmode or application_name may sit in extra.
    for key, value in (conn.extra_dejson or {}).items():
        if key in {
            "sslmode",
            "sslrootcert",
            "sslcert",
            "sslkey",
            "application_name",
            "connect_timeout",
        }:
            options[key] = value
    return make_conninfo("", **{k: v for k, v in options.items() if v is not None})


def _utc(value: Any) -> datetime:
    parsed = (
        value
        if isinstance(value, datetime)
        else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    )
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


class WatermarkCommitOperator(BaseOperator):
    """
    Commit the interval the offload task wrote: ledger row + watermark advance, in one transaction.

    Pulls the offload result (table, interval, rows, checksum, snapshot id, run id) from
    the XCom of ``offload_task_id`` and commits it through :mod:`k2.watermarks` using the
    PostgreSQL connection ``postgres_conn_id``. The watermark is a compare-and-set on its
    sequence number; a concurrent commit of the same table makes it re-read and retry
    (bounded). Re-running the task is safe: a committed interval is an idempotent
    re-commit. Returns the commit result (to XCom).

    :param table: table name from tables.yaml (templated).
    :param initial_watermark: the table's watermark when it is seen for the first time
        (the start of its first interval).
    :param offload_task_id: task whose XCom holds the offload result.
    :param postgres_conn_id: connection of the watermark database.
    :param attempts: commit attempts when the watermark moved concurrently.
    """

    template_fields: Sequence[str] = ("table",)
    ui_color = "#d9f2d9"

    def __init__(
        self,
        *,
        table: str,
        initial_watermark: datetime,
        offload_task_id: str = "offload_to_iceberg",
        postgres_conn_id: str = WATERMARKS_CONN_ID,
        attempts: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if initial_watermark.tzinfo is None:
            raise ValueError("initial_watermark needs a timezone")
        self.table = table
        self.initial_watermark = initial_watermark
        self.offload_task_id = offload_task_id
        self.postgres_conn_id = postgres_conn_id
        self.attempts = attempts

    def _store(self) -> WatermarkStore:
        from airflow.sdk import BaseHook

        from k2.watermarks import WatermarkStore

        conn = BaseHook.get_connection(self.postgres_conn_id)
        return WatermarkStore(postgres_dsn_from_connection(conn))

    def _offload_result(self, context: Context) -> dict[str, Any]:
        result = context["ti"].xcom_pull(task_ids=self.offload_task_id)
        if not isinstance(result, dict):
            raise AirflowException(
                f"no offload result in the XCom of {self.offload_task_id!r}: {result!r}"
            )
        missing = {
            "table",
            "interval_start",
            "interval_end",
            "rows",
            "checksum",
            "run_id",
        } - result.keys()
        if missing:
            raise AirflowException(f"offload result lacks {sorted(missing)}: {result!r}")
        if result["table"] != self.table:
            raise AirflowException(
                f"offload result is for table {result['table']!r}, not {self.table!r}"
            )
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is not None and end is not None:
            if (_utc(result["interval_start"]), _utc(result["interval_end"])) != (
                _utc(start),
                _utc(end),
            ):
                raise AirflowException(
                    f"offload result covers [{result['interval_start']}, {result['interval_end']}), "
                    f"not this run's [{_utc(start).isoformat()}, {_utc(end).isoformat()})"
                )
        return result

    def execute(self, context: Context) -> dict[str, Any]:
        result = self._offload_result(context)
        store = self._store()
        store.migrate()
        store.initialize(self.table, self.initial_watermark)
        commit = store.commit_with_retry(
            self.table,
            _utc(result["interval_start"]),
            _utc(result["interval_end"]),
            int(result["rows"]),
            int(result["checksum"]),
            None if result.get("snapshot_id") is None else int(result["snapshot_id"]),
            str(result["run_id"]),
            attempts=self.attempts,
        )
        if commit.advanced:
            note = ""
        elif commit.recommit:
            note = " (unchanged: re-commit of an offloaded interval)"
        else:
            note = " (unchanged: an earlier interval is still open)"
        self.log.info(
            "%s: watermark %s, sequence %s%s",
            self.table,
            commit.watermark_ts.isoformat(),
            commit.sequence_number,
            note,
        )
        return commit.as_dict()
