"""`k2 run` (what `make run` calls): the command's own wiring, with the pipeline replaced by
a recorder (starting the real stack is test_demo's and the Airflow lane's work)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest


class RecordingPipeline:
    calls: list[tuple[str, dict]] = []

    def __init__(self, stack, log=print) -> None:
        self.end_date = None

    def start(self, **kwargs):
        RecordingPipeline.calls.append(("start", kwargs))
        return datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)

    def banner(self, start_date: datetime) -> str:
        return f"K2 pipeline is running from {start_date.isoformat()}"

    def stop(self) -> None:
        RecordingPipeline.calls.append(("stop", {}))


def test_run_starts_the_pipeline_without_an_end_date_and_stops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from k2 import cli
    from k2.local import pipeline

    RecordingPipeline.calls = []
    monkeypatch.setattr(pipeline, "Pipeline", RecordingPipeline)
    monkeypatch.setattr(pipeline, "wait_for_interrupt", lambda: None)
    result = CliRunner().invoke(cli.app, ["run", "--history", "2h", "--rate", "5"])
    assert result.exit_code == 0, result.output
    assert "K2 pipeline is running from 2026-12-06T09:00:00+00:00" in result.output
    (kind, kwargs), stop = RecordingPipeline.calls
    assert kind == "start" and stop == ("stop", {})
    assert kwargs["history"] == timedelta(hours=2) and kwargs["rate"] == 5.0
    assert not kwargs.get("bounded"), "make run runs live: its DAGs have no end date"
