"""ClickHouse connection -> clickhouse-connect kwargs, and the provider's connection-type declaration."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from airflow.sdk import Connection

from k2.runtime_env import CLICKHOUSE_PASSWORD, ClickHouseSettings
from k2_provider.get_provider_info import get_provider_info
from k2_provider.hooks.clickhouse import (
    ClickHouseHook,
    client_kwargs_from_connection,
    quote_identifier,
)


def _conn(extra: dict[str, Any] | str | None = None, **fields: Any) -> Connection:
    if isinstance(extra, dict):
        extra = json.dumps(extra)
    return Connection(conn_id="ch", conn_type="clickhouse", extra=extra, **fields)


def test_defaults_for_a_bare_connection() -> None:
    assert client_kwargs_from_connection(_conn()) == {
        "host": "localhost",
        "port": 8123,
        "username": "default",
        "password": "",
        "secure": False,
    }


def test_full_connection() -> None:
    conn = _conn(
        {
            "settings": {"max_execution_time": 60, "readonly": 1},
            "connect_timeout": "5",
            "send_receive_timeout": 120,
        },
        host="ch.example.com",
        port=9000,
        login="k2",
        password="s3cret",
        schema="k2",
    )
    assert client_kwargs_from_connection(conn) == {
        "host": "ch.example.com",
        "port": 9000,
        "username": "k2",
        "password": "s3cret",
        "database": "k2",
        "secure": False,
        "settings": {"max_execution_time": 60, "readonly": 1},
        "connect_timeout": 5,
        "send_receive_timeout": 120,
    }


@pytest.mark.parametrize("secure", [True, "true", "1", "yes"])
def test_secure_defaults_to_https_port(secure: Any) -> None:
    kwargs = client_kwargs_from_connection(_conn({"secure": secure}, host="ch"))
    assert (kwargs["secure"], kwargs["port"]) == (True, 8443)


def test_explicit_port_wins_over_secure_default() -> None:
    assert client_kwargs_from_connection(_conn({"secure": True}, port=443))["port"] == 443


def test_prefixed_extra_fields_from_older_forms() -> None:
    kwargs = client_kwargs_from_connection(_conn({"extra__clickhouse__secure": True}))
    assert kwargs["secure"] is True


def test_settings_may_be_a_json_string() -> None:
    kwargs = client_kwargs_from_connection(_conn({"settings": '{"max_threads": 2}'}))
    assert kwargs["settings"] == {"max_threads": 2}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"secure": "maybe"}, "'secure'"),
        ({"settings": [1, 2]}, "'settings' must be an object"),
        ({"settings": "{nope"}, "'settings' is not JSON"),
        ({"connect_timeout": "soon"}, "'connect_timeout'"),
        ({"send_receive_timeout": 0}, "must be positive"),
    ],
)
def test_bad_extra_is_explained(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        client_kwargs_from_connection(_conn(extra))


def test_hook_maps_its_connection_and_settings_for_spark() -> None:
    conn = _conn({"secure": True}, host="ch", login="k2", password="pw", schema="hot")
    with mock.patch.object(ClickHouseHook, "get_connection", return_value=conn) as get_connection:
        hook = ClickHouseHook(clickhouse_conn_id="ch")
        settings = hook.settings_for_spark()
    get_connection.assert_called_once_with("ch")
    assert settings == ClickHouseSettings(
        host="ch", port=8443, user="k2", password="pw", database="hot", secure=True
    )
    assert settings.to_env()[CLICKHOUSE_PASSWORD] == "pw"
    assert "pw" not in repr(settings)


def test_get_conn_passes_the_kwargs_to_clickhouse_connect() -> None:
    conn = _conn({"settings": {"max_threads": 2}}, host="ch", schema="hot")
    with (
        mock.patch.object(ClickHouseHook, "get_connection", return_value=conn),
        mock.patch("clickhouse_connect.get_client") as get_client,
    ):
        hook = ClickHouseHook()
        assert hook.get_conn() is hook.get_conn()  # made once
    get_client.assert_called_once_with(
        host="ch",
        port=8123,
        username="default",
        password="",
        database="hot",
        secure=False,
        settings={"max_threads": 2},
    )


def test_watermark_is_max_minus_lateness_and_none_when_empty() -> None:
    hook = ClickHouseHook()
    client = mock.Mock()
    hook._client = client
    client.query.return_value.first_row = (datetime(2026, 1, 1, 0, 10),)  # naive UTC, as returned
    assert hook.watermark("silver_trades", "event_time", timedelta(minutes=2)) == datetime(
        2026, 1, 1, 0, 8, tzinfo=timezone.utc
    )
    client.query.assert_called_with("SELECT maxOrNull(`event_time`) FROM `silver_trades`")
    client.query.return_value.first_row = (None,)
    assert hook.watermark("silver_trades", "event_time", timedelta(minutes=2)) is None


@pytest.mark.parametrize("name", ["a b", "t; DROP TABLE x", "`x`", "1abc", "", "db.table"])
def test_identifiers_are_validated_before_any_query(name: str) -> None:
    hook = ClickHouseHook()
    hook._client = mock.Mock()
    with pytest.raises(ValueError, match="plain SQL identifier"):
        hook.watermark(name, "event_time", timedelta(0))
    with pytest.raises(ValueError, match="plain SQL identifier"):
        hook.watermark("silver_trades", name, timedelta(0))
    hook._client.query.assert_not_called()
    assert quote_identifier("silver_trades") == "`silver_trades`"


def test_provider_info_declares_the_clickhouse_connection_type() -> None:
    info = get_provider_info()
    assert info["package-name"] == "k2-cold-tier"  # must equal the distribution name
    [conn_type] = info["connection-types"]
    assert conn_type["connection-type"] == "clickhouse"
    assert conn_type["hook-class-name"] == "k2_provider.hooks.clickhouse.ClickHouseHook"
    assert set(conn_type["conn-fields"]) == {"secure", "connect_timeout", "send_receive_timeout"}
    assert conn_type["conn-fields"]["secure"]["schema"]["type"] == ["boolean", "null"]
    behaviour = conn_type["ui-field-behaviour"]
    assert behaviour["relabeling"]["schema"] == "Database"
    assert {"hidden-fields", "relabeling", "placeholders"} <= behaviour.keys()
    assert ClickHouseHook.get_ui_field_behaviour()["relabeling"] == behaviour["relabeling"]


def test_provider_info_matches_airflow_runtime_schema() -> None:
    """The dict passes the schema providers_manager validates against, and the classes import."""
    import importlib

    from airflow.providers_manager import _create_provider_info_schema_validator

    info = get_provider_info()
    _create_provider_info_schema_validator().validate(info)
    module, _, cls = info["connection-types"][0]["hook-class-name"].rpartition(".")
    hook_class = getattr(importlib.import_module(module), cls)
    assert (hook_class.conn_type, hook_class.default_conn_name) == (
        "clickhouse",
        "clickhouse_default",
    )
    for kind in ("hooks", "sensors", "triggers", "operators"):
        for entry in info[kind]:
            for module in entry["python-modules"]:
                importlib.import_module(module)


def test_providers_manager_registers_the_connection_form() -> None:
    """What Airflow itself builds from the installed entry point (conn-fields, ui-field-behaviour)."""
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    manager = ProvidersManager()
    assert "k2-cold-tier" in manager.providers
    hook = ProvidersManagerTaskRuntime().hooks["clickhouse"]
    assert (
        hook is not None and hook.hook_class_name == "k2_provider.hooks.clickhouse.ClickHouseHook"
    )
    assert manager.field_behaviours["clickhouse"]["relabeling"]["schema"] == "Database"
    assert "extra__clickhouse__secure" in manager.connection_form_widgets
