"""ClickHouse hook: an Airflow connection of type ``clickhouse`` -> a clickhouse-connect client.

Connection fields:

- host, port (default 8123, or 8443 when secure), login (default ``default``), password
- schema: the database (default: the user's default database)
- extra: ``secure`` (bool), ``settings`` (object of ClickHouse settings sent with every
  query), ``connect_timeout`` and ``send_receive_timeout`` (seconds)

The mapping connection -> client kwargs is a pure function (:func:`client_kwargs_from_connection`)
so it is tested without a server; clickhouse-connect is imported only when a client is made.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from airflow.sdk import Connection
    from k2.runtime_env import ClickHouseSettings

HTTP_PORT = 8123
HTTPS_PORT = 8443
CONN_TYPE = "clickhouse"

# Same rule as the table specs (k2.config.IDENTIFIER); repeated here so the hook can be used
# without loading the table config. Identifiers are checked, then backquoted.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _extra_field(extra: dict[str, Any], name: str) -> Any:
    """An extra field, whether the form stored it plainly or with the legacy prefix."""
    if name in extra:
        return extra[name]
    return extra.get(f"extra__{CONN_TYPE}__{name}")


def _as_bool(value: Any, field: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"clickhouse connection extra {field!r}: {value!r} is not a boolean")


def _as_int(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"clickhouse connection extra {field!r}: {value!r} is not an integer"
        ) from None
    if number <= 0:
        raise ValueError(f"clickhouse connection extra {field!r} must be positive, got {number}")
    return number


def _as_settings(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"clickhouse connection extra 'settings' is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(
            "clickhouse connection extra 'settings' must be an object of ClickHouse settings"
        )
    return dict(value)


def client_kwargs_from_connection(conn: Connection) -> dict[str, Any]:
    """Keyword arguments for ``clickhouse_connect.get_client`` from an Airflow connection."""
    extra = conn.extra_dejson or {}
    secure = _as_bool(_extra_field(extra, "secure"), "secure")
    kwargs: dict[str, Any] = {
        "host": conn.host or "localhost",
        "port": int(conn.port) if conn.port else (HTTPS_PORT if secure else HTTP_PORT),
        "username": conn.login or "default",
        "password": conn.password or "",
        "secure": secure,
    }
    if conn.schema:
        kwargs["database"] = conn.schema
    settings = _as_settings(_extra_field(extra, "settings"))
    if settings:
        kwargs["settings"] = settings
    for field in ("connect_timeout", "send_receive_timeout"):
        number = _as_int(_extra_field(extra, field), field)
        if number is not None:
            kwargs[field] = number
    return kwargs


def quote_identifier(name: str) -> str:
    """Backquote a plain identifier; anything else is refused (no SQL from run-time input)."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return f"`{name}`"


def _to_utc(value: datetime) -> datetime:
    # clickhouse-connect returns naive UTC for DateTime64(3, 'UTC') by default (tz_mode naive_utc).
    return (
        value.replace(tzinfo=timezone.utc)
        if value.tzinfo is None
        else value.astimezone(timezone.utc)
    )


class ClickHouseHook(BaseHook):
    """
    Interact with ClickHouse over its HTTP interface through clickhouse-connect.

    :param clickhouse_conn_id: The :ref:`clickhouse connection id <howto/connection:clickhouse>`.
    """

    conn_name_attr = "clickhouse_conn_id"
    default_conn_name = "clickhouse_default"
    conn_type = CONN_TYPE
    hook_name = "ClickHouse"

    def __init__(self, clickhouse_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clickhouse_conn_id = clickhouse_conn_id
        self._connection: Connection | None = None
        self._client: Client | None = None

    # Connection form (Airflow < 3.2 only; newer versions read get_provider_info's conn-fields)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        from k2_provider.get_provider_info import CLICKHOUSE_UI_FIELD_BEHAVIOUR as behaviour

        return {
            "hidden_fields": list(behaviour["hidden-fields"]),
            "relabeling": dict(behaviour["relabeling"]),
            "placeholders": dict(behaviour["placeholders"]),
        }

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        try:
            from wtforms import BooleanField, IntegerField
            from wtforms.validators import NumberRange, Optional
        except ImportError:  # the form libraries are not installed on Airflow 3 workers
            return {}
        return {
            "secure": BooleanField("Secure (HTTPS)", default=False),
            "connect_timeout": IntegerField(
                "Connect timeout (s)", validators=[Optional(), NumberRange(min=1)], default=10
            ),
            "send_receive_timeout": IntegerField(
                "Send/receive timeout (s)", validators=[Optional(), NumberRange(min=1)], default=300
            ),
        }

    # Connection and client

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = self.get_connection(self.clickhouse_conn_id)
        return self._connection

    def client_kwargs(self) -> dict[str, Any]:
        return client_kwargs_from_connection(self.connection)

    def get_conn(self) -> Client:
        """A clickhouse-connect client, made once per hook."""
        if self._client is None:
            import clickhouse_connect

            self._client = clickhouse_connect.get_client(**self.client_kwargs())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def test_connection(self) -> tuple[bool, str]:
        """The UI's "Test" button: one round trip to the server."""
        try:
            version = self.get_conn().server_version
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            self.close()
        return True, f"Connected to ClickHouse {version}"

    def settings_for_spark(self) -> ClickHouseSettings:
        """The connection as the offload job's environment contract (k2.runtime_env)."""
        from k2.runtime_env import ClickHouseSettings

        kwargs = self.client_kwargs()
        return ClickHouseSettings(
            host=kwargs["host"],
            port=kwargs["port"],
            user=kwargs["username"],
            password=kwargs["password"],
            database=kwargs.get("database") or "default",
            secure=kwargs["secure"],
        )

    # Queries

    def max_event_time(self, table: str, column: str) -> datetime | None:
        """max(column) of table as an aware UTC datetime, None when the table is empty."""
        sql = f"SELECT maxOrNull({quote_identifier(column)}) FROM {quote_identifier(table)}"
        value = self.get_conn().query(sql).first_row[0]
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"{table}.{column} is not a DateTime column (max returned {value!r})")
        return _to_utc(value)

    def watermark(self, table: str, column: str, lateness: timedelta) -> datetime | None:
        """Completeness watermark: max(column) - lateness. None when the table holds no rows.

        Every interval ending at or before the watermark holds all its rows, given
        rows arrive at most ``lateness`` after their event time.
        """
        latest = self.max_event_time(table, column)
        return None if latest is None else latest - lateness
