"""What Airflow's providers manager learns about this provider (entry point `apache_airflow_provider`).

Airflow >= 3.2 reads the connection form declaratively from here (`conn-fields`,
`ui-field-behaviour`) without importing the hook, and skips the hook's deprecated
`get_connection_form_widgets()` / `get_ui_field_behaviour()` when these are present.
"""

from __future__ import annotations

from typing import Any

# Must equal the distribution name (pyproject [project] name): providers_manager compares them.
PACKAGE_NAME = "k2-cold-tier"
CLICKHOUSE_CONN_TYPE = "clickhouse"

# Extra fields of a clickhouse connection. `settings` (a JSON object of ClickHouse settings)
# has no form widget: it is set in the Extra JSON.
CLICKHOUSE_CONN_FIELDS: dict[str, dict[str, Any]] = {
    "secure": {
        "label": "Secure (HTTPS)",
        "schema": {"type": ["boolean", "null"], "default": False},
        "description": "Use HTTPS; the default port becomes 8443.",
    },
    "connect_timeout": {
        "label": "Connect timeout (s)",
        "schema": {"type": ["integer", "null"], "default": 10},
    },
    "send_receive_timeout": {
        "label": "Send/receive timeout (s)",
        "schema": {"type": ["integer", "null"], "default": 300},
    },
}

CLICKHOUSE_UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": [],
    "relabeling": {"schema": "Database", "login": "Username"},
    "placeholders": {
        "host": "clickhouse.example.com",
        "port": "8123 (8443 when secure)",
        "schema": "default",
        "login": "default",
        "extra": '{"secure": false, "settings": {"max_execution_time": 300}}',
    },
}


def get_provider_info() -> dict[str, Any]:
    from k2_provider import __version__

    return {
        "package-name": PACKAGE_NAME,
        "name": "K2 cold-tier offload",
        "description": "ClickHouse hot tier to Apache Iceberg cold tier: hook, watermark sensor and "
        "trigger, Spark offload and watermark-commit operators.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "ClickHouse",
                "external-doc-url": "https://clickhouse.com/docs/integrations/python",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "ClickHouse",
                "python-modules": ["k2_provider.hooks.clickhouse"],
            }
        ],
        "sensors": [
            {
                "integration-name": "ClickHouse",
                "python-modules": ["k2_provider.sensors.clickhouse_watermark"],
            }
        ],
        "triggers": [
            {
                "integration-name": "ClickHouse",
                "python-modules": ["k2_provider.triggers.clickhouse_watermark"],
            }
        ],
        "operators": [
            {
                "integration-name": "ClickHouse",
                "python-modules": [
                    "k2_provider.operators.offload",
                    "k2_provider.operators.watermark_commit",
                ],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "k2_provider.hooks.clickhouse.ClickHouseHook",
                "hook-name": "ClickHouse",
                "connection-type": CLICKHOUSE_CONN_TYPE,
                "conn-fields": CLICKHOUSE_CONN_FIELDS,
                "ui-field-behaviour": CLICKHOUSE_UI_FIELD_BEHAVIOUR,
            }
        ],
    }
