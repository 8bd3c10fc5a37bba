"""k2_dag_factory.default_args_from_env: the tests-only K2_RETRY_DELAY override."""

from __future__ import annotations

from datetime import timedelta

import pytest

from k2_dag_factory import DEFAULT_ARGS, RETRY_DELAY_ENV, default_args_from_env


def test_without_the_variable_the_defaults_stand(monkeypatch):
    monkeypatch.delenv(RETRY_DELAY_ENV, raising=False)
    assert default_args_from_env() == DEFAULT_ARGS


def test_the_variable_sets_the_first_retry_delay(monkeypatch):
    monkeypatch.setenv(RETRY_DELAY_ENV, "5")
    args = default_args_from_env()
    assert args["retry_delay"] == timedelta(seconds=5)
    assert args["retries"] == DEFAULT_ARGS["retries"]
    assert DEFAULT_ARGS["retry_delay"] == timedelta(minutes=1)  # not mutated


@pytest.mark.parametrize("raw", ["0", "-3", "soon"])
def test_a_bad_value_is_named(monkeypatch, raw):
    monkeypatch.setenv(RETRY_DELAY_ENV, raw)
    with pytest.raises(ValueError, match=RETRY_DELAY_ENV):
        default_args_from_env()
