"""The project's ClickHouse hook: the official provider's hook plus what the offload needs.

The connection type ``clickhouse`` belongs to ``apache-airflow-providers-clickhousedb``
(its :class:`~airflow.providers.clickhousedb.hooks.clickhouse.ClickHouseHook`, clickhouse-connect
over HTTP, a ``DbApiHook`` that ``SQLExecuteQueryOperator`` uses). This provider registers no
connection type of its own: :class:`K2ClickHouseHook` subclasses the official hook and adds

- stricter reading of the connection's extra (a boolean written as ``"false"`` is false, a
  timeout must be a positive integer: a bad value fails naming the field), the HTTPS default
  port 8443 when ``secure`` is set, and the extra names of earlier releases of this project
  (``settings``, ``extra__clickhouse__<name>``);
- one cached clickhouse-connect client per hook (:attr:`client`);
- the completeness watermark of a table (:meth:`watermark`), and the connection as the Spark
  job's settings (:meth:`settings_for_spark`).

Connection fields: host, port, login, password, schema (the database), and the official
extra fields (``secure``, ``verify``, ``connect_timeout``, ``send_receive_timeout``,
``compress``, ``client_name``, ``session_settings``, ``client_kwargs``). ``settings`` (this
project's name before the official provider) is read as ``session_settings``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.clickhousedb.hooks.clickhouse import ClickHouseHook

from k2.offload import max_event_time
from k2.runtime_env import ClickHouseSettings

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from clickhouse_connect.driver.client import Client

HTTP_PORT = 8123
HTTPS_PORT = 8443
CONN_TYPE = ClickHouseHook.conn_type
LEGACY_SETTINGS = "settings"  # this project's extra before the official provider
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _extra_field(extra: dict[str, Any], name: str) -> Any:
    """An extra field, whether the form stored it plainly or with the legacy prefix."""
    if name in extra:
        return extra[name]
    return extra.get(f"extra__{CONN_TYPE}__{name}")


def _as_bool(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
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


def _as_settings(value: Any, field: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"clickhouse connection extra {field!r} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"clickhouse connection extra {field!r} must be an object of ClickHouse settings"
        )
    return dict(value)


def client_kwargs_from_connection(conn: Connection) -> dict[str, Any]:
    """The connection's own part of ``clickhouse_connect.get_client`` kwargs, validated.

    Pure (no server, no Airflow lookup): what :meth:`K2ClickHouseHook._get_client_kwargs`
    lays over the official hook's mapping.
    """
    extra = conn.extra_dejson or {}
    secure = _as_bool(_extra_field(extra, "secure"), "secure", False)
    kwargs: dict[str, Any] = {
        "host": conn.host or "localhost",
        "port": int(conn.port) if conn.port else (HTTPS_PORT if secure else HTTP_PORT),
        "username": conn.login or "default",
        "password": conn.password or "",
        "secure": secure,
        "verify": _as_bool(_extra_field(extra, "verify"), "verify", True),
    }
    if conn.schema:
        kwargs["database"] = conn.schema
    settings = {
        **_as_settings(_extra_field(extra, LEGACY_SETTINGS), LEGACY_SETTINGS),
        **_as_settings(_extra_field(extra, "session_settings"), "session_settings"),
    }
    if settings:
        kwargs["settings"] = settings
    for field in ("connect_timeout", "send_receive_timeout"):
        number = _as_int(_extra_field(extra, field), field)
        if number is not None:
            kwargs[field] = number
    return kwargs


class K2ClickHouseHook(ClickHouseHook):
    """The official ClickHouse hook with the offload's queries and a stricter connection reader.

    :param clickhouse_conn_id: the ``clickhouse`` connection (default ``clickhouse_default``).
    """

    def __init__(self, clickhouse_conn_id: str = ClickHouseHook.default_conn_name,
                 **kwargs: Any) -> None:
        super().__init__(clickhouse_conn_id=clickhouse_conn_id, **kwargs)
        self._connection: Connection | None = None
        self._client: Client | None = None
        # The official mapping looks the connection up on every call; a task's lookup goes
        # to the API server, so this hook's instance answers it from one lookup.
        self.get_connection = self._get_connection_once  # type: ignore[method-assign]

    def _get_connection_once(self, conn_id: str) -> Connection:
        if conn_id != self.get_conn_id():
            return type(self).get_connection(conn_id)
        return self.connection

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = type(self).get_connection(self.get_conn_id())
        return self._connection

    def _get_client_kwargs(self) -> dict[str, Any]:
        # The official mapping (client_name, compress, client_kwargs, session settings passed
        # to the constructor) with this project's validated reading of the connection on top.
        kwargs = super()._get_client_kwargs()
        own = client_kwargs_from_connection(self.connection)
        settings = {**own.pop("settings", {}), **self.session_settings}
        kwargs.update(own)
        kwargs.setdefault("database", "default")
        if settings:
            kwargs["settings"] = settings
        return kwargs

    @property
    def client(self) -> Client:
        """A clickhouse-connect client, made once per hook (closed by :meth:`close`)."""
        if self._client is None:
            self._client = self.get_client()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def settings_for_spark(self) -> ClickHouseSettings:
        """The connection as the offload job's environment contract (k2.runtime_env)."""
        kwargs = self._get_client_kwargs()
        return ClickHouseSettings(
            host=kwargs["host"],
            port=kwargs["port"],
            user=kwargs["username"],
            password=kwargs["password"],
            database=kwargs["database"],
            secure=kwargs["secure"],
        )

    def max_event_time(self, table: str, column: str) -> datetime | None:
        """max(column) of table as an aware UTC datetime, None when the table is empty."""
        return max_event_time(self.client, table, column)

    def watermark(self, table: str, column: str, lateness: timedelta) -> datetime | None:
        """Completeness watermark: max(column) - lateness. None when the table holds no rows.

        Every interval ending at or before the watermark holds all its rows, given
        rows arrive at most ``lateness`` after their event time.
        """
        latest = self.max_event_time(table, column)
        return None if latest is None else latest - lateness
