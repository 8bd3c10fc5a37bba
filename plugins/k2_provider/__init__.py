"""The K2 provider: ClickHouse hook, watermark sensor and trigger, and the offload operators.

Registered with Airflow through the ``apache_airflow_provider`` entry point of the
``k2-cold-tier`` distribution (see :mod:`k2_provider.get_provider_info`).
"""

from __future__ import annotations

__all__ = ["__version__"]

# Keep in step with pyproject.toml's [project] version: providers_manager reports it.
__version__ = "0.1.0"
