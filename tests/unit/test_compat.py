"""The backport of apache/airflow#70368's fix (k2_provider.compat.deadline_clear): installed in
every Airflow process through the airflow.policy entry point, decoding a deadline's
interval as Airflow stores it since 3.3.0, and still needed by the pinned Airflow."""

from __future__ import annotations

import inspect
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from k2_provider.compat import deadline_clear


def test_the_pinned_airflow_still_needs_the_backport():
    """Fails once Airflow ships the fix: then delete k2_provider.compat.deadline_clear and
    its entry point (pyproject.toml)."""
    import importlib.util

    import airflow

    spec = importlib.util.find_spec(deadline_clear.MODULE)
    source = open(spec.origin).read()
    assert deadline_clear.BROKEN in source, (
        f"Airflow {airflow.__version__} no longer has the broken line of apache/airflow#70368 in "
        f"{deadline_clear.MODULE}: remove the backport k2_provider.compat.deadline_clear")


def test_a_new_airflow_process_gets_the_fixed_function():
    probe = (
        "import airflow\n"
        "from airflow.models import taskinstance as ti\n"
        "print(ti._recalculate_dagrun_queued_at_deadlines.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "k2_provider.compat.deadline_clear"


def test_the_interval_is_decoded_as_airflow_stores_it():
    from airflow.sdk.definitions.deadline import DeadlineReference
    from airflow.sdk.serde import serialize
    from airflow.serialization.encoders import encode_deadline_reference

    row = SimpleNamespace(reference=encode_deadline_reference(DeadlineReference.DAGRUN_QUEUED_AT),
                          interval=serialize(timedelta(minutes=30)), callback_def=None)
    assert isinstance(row.interval, dict)  # what timedelta(seconds=...) cannot take
    assert deadline_clear.deadline_interval(row) == timedelta(minutes=30)
    legacy = SimpleNamespace(reference=row.reference, interval=1800.0, callback_def=None)  # before 3.3.0
    assert deadline_clear.deadline_interval(legacy) == timedelta(minutes=30)


def test_pending_queued_at_deadlines_move_with_the_new_queued_at():
    from airflow.sdk.serde import serialize

    queued = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
    deadline = SimpleNamespace(id=1, deadline_time=queued - timedelta(hours=1))
    row = SimpleNamespace(reference={"reference_type": "DagRunQueuedAtDeadline"},
                          interval=serialize(timedelta(minutes=30)), callback_def=None)

    class Session:
        def execute(self, statement):
            self.statement = str(statement)
            return SimpleNamespace(all=lambda: [(deadline, row)])

    session = Session()
    dagrun = SimpleNamespace(id=7, dag_id="k2_offload_x", run_id="scheduled__1")
    deadline_clear.recalculate_queued_at_deadlines(dagrun, queued, session)
    assert deadline.deadline_time == queued + timedelta(minutes=30)
    assert "deadline.missed" in session.statement and "dagrun_id" in session.statement


def test_only_the_broken_function_is_replaced():
    def broken(dagrun, new_queued_at, session):  # the shape of Airflow 3.3.2's line
        deadline_alert = SimpleNamespace(interval=60)
        return timedelta(seconds=deadline_alert.interval)

    def fixed(dagrun, new_queued_at, session):
        return "upstream"

    module = SimpleNamespace(**{deadline_clear.FUNCTION: broken})
    assert deadline_clear.patch(module)
    assert getattr(module, deadline_clear.FUNCTION) is deadline_clear.recalculate_queued_at_deadlines
    assert not deadline_clear.patch(module)  # once
    module = SimpleNamespace(**{deadline_clear.FUNCTION: fixed})
    assert not deadline_clear.patch(module)  # an Airflow with the fix keeps its own function
    assert getattr(module, deadline_clear.FUNCTION) is fixed
    assert deadline_clear.BROKEN not in inspect.getsource(fixed)
