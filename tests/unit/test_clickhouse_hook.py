"""ClickHouse connection -> clickhouse-connect kwargs through the official provider's hook, and
the provider registering no connection type of its own."""

from __future__ import annotations

import importlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from airflow.sdk import Connection

from k2.config import quote_identifier
from k2.runtime_env import CLICKHOUSE_PASSWORD, ClickHouseSettings
from k2_provider.get_provider_info import get_provider_info
from k2_provider.hooks.clickhouse import K2ClickHouseHook, client_kwargs_from_connection


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
        "verify": True,
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
        "verify": True,
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


def test_official_session_settings_win_over_the_legacy_settings_extra() -> None:
    extra = {"settings": {"max_threads": 2, "readonly": 1}, "session_settings": {"max_threads": 4}}
    assert client_kwargs_from_connection(_conn(extra))["settings"] == {"max_threads": 4, "readonly": 1}


@pytest.mark.parametrize(("verify", "expected"), [("false", False), ("0", False), (None, True)])
def test_verify_is_read_as_a_boolean(verify: Any, expected: bool) -> None:
    # the official hook's bool("false") would be True: a string from a form or an env var
    extra = {} if verify is None else {"verify": verify}
    assert client_kwargs_from_connection(_conn(extra))["verify"] is expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"secure": "maybe"}, "'secure'"),
        ({"settings": [1, 2]}, "'settings' must be an object"),
        ({"session_settings": "{nope"}, "'session_settings' is not JSON"),
        ({"verify": "perhaps"}, "'verify'"),
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
    with mock.patch.object(K2ClickHouseHook, "get_connection", return_value=conn) as get_connection:
        hook = K2ClickHouseHook(clickhouse_conn_id="ch")
        settings = hook.settings_for_spark()
    get_connection.assert_called_once_with("ch")
    assert settings == ClickHouseSettings(
        host="ch", port=8443, user="k2", password="pw", database="hot", secure=True
    )
    assert settings.to_env()[CLICKHOUSE_PASSWORD] == "pw"
    assert "pw" not in repr(settings)


def test_client_passes_the_official_and_own_kwargs_to_clickhouse_connect() -> None:
    conn = _conn(
        {"settings": {"max_threads": 2}, "compress": False, "client_name": "k2"},
        host="ch", schema="hot",
    )
    with (
        mock.patch.object(K2ClickHouseHook, "get_connection", return_value=conn),
        mock.patch("clickhouse_connect.get_client") as get_client,
    ):
        hook = K2ClickHouseHook(session_settings={"readonly": 1})
        assert hook.client is hook.client  # made once
    get_client.assert_called_once()
    kwargs = get_client.call_args.kwargs
    assert kwargs.pop("client_name").startswith("apache-airflow/")  # the official hook's
    assert kwargs == {
        "host": "ch",
        "port": 8123,
        "username": "default",
        "password": "",
        "database": "hot",
        "secure": False,
        "verify": True,
        "compress": False,
        "settings": {"max_threads": 2, "readonly": 1},
    }


def test_get_conn_is_the_official_db_api_connection() -> None:
    from airflow.providers.clickhousedb.hooks.clickhouse import ClickHouseConnection

    conn = _conn(host="ch")
    with (
        mock.patch.object(K2ClickHouseHook, "get_connection", return_value=conn),
        mock.patch("clickhouse_connect.get_client"),
    ):
        assert isinstance(K2ClickHouseHook().get_conn(), ClickHouseConnection)


def test_watermark_is_max_minus_lateness_and_none_when_empty() -> None:
    hook = K2ClickHouseHook()
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
    hook = K2ClickHouseHook()
    hook._client = mock.Mock()
    with pytest.raises(ValueError, match="plain SQL identifier"):
        hook.watermark(name, "event_time", timedelta(0))
    with pytest.raises(ValueError, match="plain SQL identifier"):
        hook.watermark("silver_trades", name, timedelta(0))
    hook._client.query.assert_not_called()
    assert quote_identifier("silver_trades") == "`silver_trades`"


def test_provider_info_declares_no_connection_type() -> None:
    info = get_provider_info()
    assert info["package-name"] == "k2-cold-tier"  # must equal the distribution name
    assert "connection-types" not in info  # clickhouse is the official provider's


def test_provider_info_matches_airflow_runtime_schema() -> None:
    """The dict passes the schema providers_manager validates against, and the classes import."""
    import importlib

    from airflow.providers_manager import _create_provider_info_schema_validator

    info = get_provider_info()
    _create_provider_info_schema_validator().validate(info)
    for kind in ("hooks", "sensors", "triggers", "operators"):
        for entry in info[kind]:
            for module in entry["python-modules"]:
                importlib.import_module(module)


def test_providers_manager_has_one_clickhouse_type_the_official_one() -> None:
    """What Airflow itself builds from the installed entry points: one ``clickhouse`` type,
    the official provider's hook and form; this provider is registered without a type."""
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    manager = ProvidersManager()
    assert "k2-cold-tier" in manager.providers
    assert "apache-airflow-providers-clickhousedb" in manager.providers
    hook = ProvidersManagerTaskRuntime().hooks["clickhouse"]
    assert hook is not None
    assert hook.hook_class_name == "airflow.providers.clickhousedb.hooks.clickhouse.ClickHouseHook"
    assert hook.package_name == "apache-airflow-providers-clickhousedb"
    assert issubclass(K2ClickHouseHook, importlib.import_module(
        "airflow.providers.clickhousedb.hooks.clickhouse").ClickHouseHook)
    assert manager.field_behaviours["clickhouse"]["relabeling"]["schema"] == "Database"
