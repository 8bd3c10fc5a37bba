"""k2.intervals.parse_utc: the one parser of the times the project reads."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from k2.intervals import parse_utc

UTC = timezone.utc


@pytest.mark.parametrize(
    "text",
    ["2026-11-26T10:00:00Z", "2026-11-26T10:00:00+00:00", " 2026-11-26T11:00:00+01:00 ",
     "2026-11-26T05:00:00-05:00"],
)
def test_iso_text_with_a_zone_becomes_aware_utc(text: str) -> None:
    parsed = parse_utc(text)
    assert parsed == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(0)


def test_a_naive_time_is_refused_naming_what_it_is() -> None:
    with pytest.raises(ValueError, match="interval_start 2026-11-26T10:00:00 has no timezone"):
        parse_utc("2026-11-26T10:00:00", "interval_start")
    with pytest.raises(ValueError, match="has no timezone"):
        parse_utc(datetime(2026, 11, 26, 10))


def test_naive_is_utc_where_the_source_hands_over_naive_utc() -> None:
    assert parse_utc(datetime(2026, 11, 26, 10), naive_is_utc=True) == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_utc("2026-11-26 10:00:00", naive_is_utc=True).tzinfo is UTC


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00:00Z", ""])
def test_text_that_is_no_time_is_explained(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an ISO-8601 time"):
        parse_utc(bad, "start")


def test_a_value_of_another_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="start must be a datetime or ISO-8601 text, got int"):
        parse_utc(1700000000, "start")  # type: ignore[arg-type]
