"""Unit tests see tables.yaml as written: the integration fixtures set the override
variables (start date, deadline) for the whole session, which must not leak in here."""

from __future__ import annotations

import pytest

from k2.config import OVERRIDE_ENV


@pytest.fixture(autouse=True)
def _no_config_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in OVERRIDE_ENV.values():
        monkeypatch.delenv(variable, raising=False)
