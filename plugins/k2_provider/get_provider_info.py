"""What Airflow's providers manager learns about this provider (entry point `apache_airflow_provider`).

No connection type is declared here: ``clickhouse`` is the official
``apache-airflow-providers-clickhousedb``'s, whose hook this provider's hook subclasses
(k2_provider.hooks.clickhouse); ``spark`` and ``postgres`` are their providers'.
"""

from __future__ import annotations

from typing import Any

from k2_provider import __version__

# Must equal the distribution name (pyproject [project] name): providers_manager compares them.
PACKAGE_NAME = "k2-cold-tier"


def get_provider_info() -> dict[str, Any]:
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
    }
