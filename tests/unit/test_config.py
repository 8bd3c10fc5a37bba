"""tables.yaml validation: every error names the table and the key that is wrong."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.config import DEFAULT_TABLES_FILE, ConfigError, load_tables

DEFAULTS = {
    "start_date": "2026-01-01T00:00:00Z",
    "allowed_lateness": "2m",
    "hot_retention": "7d",
    "deadline": "30m",
}


def _table(name: str = "bronze_trades_x", **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "clickhouse_table": name,
        "event_time_column": "event_time",
        "unique_key": ["symbol", "trade_id"],
        "iceberg_table": f"cold.{name}",
        "partition_by": ["day(event_time)", "symbol"],
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def _write(tmp_path: Path, *tables: dict[str, Any], defaults: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults or DEFAULTS, "tables": list(tables)}))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_tables(path)
    return str(err.value)


def test_project_config_is_valid() -> None:
    config = load_tables(DEFAULT_TABLES_FILE)
    assert len(config.tables) == 9
    gold = config.get("gold_ohlcv_5m")
    assert gold.source == "gold_ohlcv_5m_final"
    assert gold.completeness is not None
    assert (gold.completeness.table, gold.completeness.column) == ("silver_trades", "event_time")
    assert config.get("bronze_trades_binance").allowed_lateness == timedelta(minutes=2)


def test_valid_minimal_entry(tmp_path: Path) -> None:
    spec = load_tables(_write(tmp_path, _table())).tables[0]
    assert spec.dag_id == "k2_offload_bronze_trades_x"
    assert spec.completeness is not None and spec.completeness.table == "bronze_trades_x"
    assert spec.start_date.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"event_time_column": "event time"}, "event_time_column"),
        ({"unique_key": ["symbol", "trade-id"]}, "unique_key"),
        ({"read_from": "x; DROP TABLE y"}, "read_from"),
        ({"iceberg_table": "bronze_trades_x"}, "iceberg_table"),
        (
            {"completeness": {"table": "silver_trades", "column": "max(event_time)"}},
            "completeness.column",
        ),
    ],
    ids=["column", "unique_key", "read_from", "iceberg_not_namespaced", "completeness"],
)
def test_bad_identifier_names_table_and_key(
    tmp_path: Path, overrides: dict[str, Any], key: str
) -> None:
    message = _error(_write(tmp_path, _table(**overrides)))
    assert "table 'bronze_trades_x'" in message
    assert f"key '{key}" in message


def test_bad_table_name_is_named(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, _table("bronze-trades")))
    assert "table 'bronze-trades', key 'clickhouse_table'" in message


@pytest.mark.parametrize("key", ["allowed_lateness", "hot_retention", "deadline"])
def test_bad_duration_names_table_and_key(tmp_path: Path, key: str) -> None:
    message = _error(_write(tmp_path, _table(**{key: "5 minutes"})))
    assert f"table 'bronze_trades_x', key '{key}'" in message
    assert "90s, 15m, 6h or 7d" in message


def test_bad_default_duration_names_every_table(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, _table(), defaults={**DEFAULTS, "deadline": "soon"}))
    assert "table 'bronze_trades_x', key 'deadline'" in message


def test_unknown_key_names_table_and_key(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, _table(), _table("silver_trades", colour="red")))
    assert "table 'silver_trades', key 'colour'" in message
    assert "bronze_trades_x" not in message.split("\n", 1)[1]  # the good table is not blamed


def test_missing_key_names_table_and_key(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, _table(event_time_column=None)))
    assert "table 'bronze_trades_x', key 'event_time_column'" in message
    assert "required" in message.lower()


@pytest.mark.parametrize(
    "transform", ["days(event_time)", "bucket(0, symbol)", "day(event time)", "truncate(x)"]
)
def test_bad_partition_transform_names_table_and_key(tmp_path: Path, transform: str) -> None:
    message = _error(_write(tmp_path, _table(partition_by=["symbol", transform])))
    assert "table 'bronze_trades_x', key 'partition_by'" in message
    assert repr(transform) in message


def test_max_intervals_per_job_defaults_and_overrides(tmp_path: Path) -> None:
    config = load_tables(_write(tmp_path, _table(), _table("silver_trades", max_intervals_per_job=4)))
    assert [t.max_intervals_per_job for t in config.tables] == [16, 4]
    assert {t.max_intervals_per_job for t in load_tables(DEFAULT_TABLES_FILE).tables} == {16}


@pytest.mark.parametrize("value", [0, -1, 97, "8", 2.5, True])
def test_bad_max_intervals_per_job_names_table_and_key(tmp_path: Path, value: Any) -> None:
    message = _error(_write(tmp_path, _table(max_intervals_per_job=value)))
    assert "table 'bronze_trades_x', key 'max_intervals_per_job'" in message


def test_duplicate_table(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, _table(), _table(), _table("silver_trades")))
    assert "listed twice" in message and "bronze_trades_x" in message
    assert "silver_trades" not in message


def test_naive_start_date_is_refused(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, _table(start_date="2026-01-01T00:00:00")))
    assert "table 'bronze_trades_x', key 'start_date'" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump({"tables": [_table()], "extras": 1}))
    assert "unknown top-level keys ['extras']" in _error(path)


def test_unsafe_yaml_is_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "tables.yaml"
    path.write_text("tables: !!python/object/apply:os.system ['true']\n")
    assert "cannot read" in _error(path)


def test_environment_overrides_every_table_or_some(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, _table("bronze_a"), _table("bronze_b"), _table("bronze_c"))
    monkeypatch.setenv("K2_START_DATE", "2026-12-01T00:00:00Z")
    assert {s.start_date.isoformat() for s in load_tables(path).tables} == {"2026-12-01T00:00:00+00:00"}

    monkeypatch.setenv("K2_START_DATE", "2026-12-01T00:00:00Z, bronze_b=2026-11-30T18:00:00+00:00")
    monkeypatch.setenv("K2_DEADLINE", "bronze_c=3m")
    specs = {s.name: s for s in load_tables(path).tables}
    assert specs["bronze_a"].start_date.isoformat() == "2026-12-01T00:00:00+00:00"
    assert specs["bronze_b"].start_date.isoformat() == "2026-11-30T18:00:00+00:00"
    assert specs["bronze_c"].deadline == timedelta(minutes=3)
    assert specs["bronze_a"].deadline == timedelta(minutes=30)  # the file's


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bronze_z=2026-12-01T00:00:00Z", r"K2_START_DATE names tables that .* does not list: \['bronze_z'\]"),
        ("2026-12-01T00:00:00Z,2026-11-01T00:00:00Z", "at most one bare value"),
        ("bronze_a=", "item 'bronze_a='"),
        ("bronze_a=2026-12-01T00:00:00Z,bronze_a=2026-11-01T00:00:00Z", "item 'bronze_a=2026-11-01T00:00:00Z'"),
        ("bronze_a=yesterday", r"table 'bronze_a', key 'start_date'"),
    ],
)
def test_bad_environment_override_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("K2_START_DATE", value)
    assert re.search(message, _error(_write(tmp_path, _table("bronze_a")))), value
