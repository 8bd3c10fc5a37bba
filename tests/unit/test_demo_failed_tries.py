"""k2.local.pipeline._last_error: the error a failed try's Airflow 3 log (JSON lines) ends with."""

from __future__ import annotations

import json

from k2.local.pipeline import _last_error


def _log(tmp_path, *events) -> object:
    path = tmp_path / "attempt=1.log"
    path.write_text("\n".join(json.dumps(e) if isinstance(e, dict) else e for e in events) + "\n")
    return path


def test_the_last_error_with_its_exception(tmp_path):
    path = _log(
        tmp_path,
        {"timestamp": "t", "level": "info", "event": "starting"},
        {"timestamp": "t", "level": "error", "event": "first problem"},
        "not json: a line printed by spark-submit",
        {"timestamp": "t", "level": "error", "event": "Task failed with exception",
         "error_detail": [{"exc_type": "CheckViolation", "exc_value": "ledger write refused", "frames": []}]},
        {"timestamp": "t", "level": "info", "event": "done"},
    )
    assert _last_error(path) == "Task failed with exception: CheckViolation: ledger write refused"


def test_a_structlog_exception_key_and_the_absent_cases(tmp_path):
    path = _log(tmp_path, {"timestamp": "t", "level": "critical", "event": "boom",
                           "exception": [{"exc_type": "OSError", "exc_value": "disk full"}]})
    assert _last_error(path) == "boom: OSError: disk full"
    assert _last_error(_log(tmp_path, {"level": "info", "event": "fine"})) == "no error line in the log"
    assert _last_error(tmp_path / "missing.log") == "log not found"
