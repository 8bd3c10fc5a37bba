"""Backport of the fix for apache/airflow#70368 (upstream pull request #70370).

Clearing a DAG run or task instance whose DAG has a deadline on the run's queued-at time
(``DeadlineReference.DAGRUN_QUEUED_AT``, as the offload DAGs have) fails on Airflow
3.3.0 - 3.3.2 with ``TypeError: unsupported type for timedelta seconds component: dict``:
``clear_task_instances`` recalculates the pending deadlines with
``timedelta(seconds=deadline_alert.interval)``, but since 3.3.0 that column holds the
serialized interval (JSON), not seconds. The UI's Clear and the REST API answer 500 and
``airflow tasks clear`` exits 1 - right after a failure, while the run's deadline is
still pending, which is when an operator clears.

The replacement decodes the interval as DAG run creation does (``decode_deadline_alert``,
a variable-backed interval resolved) and sets each pending queued-at deadline to the new
``queued_at`` plus that interval: the cleared run gets a full deadline again, and a run
that is late again is reported once more, by the one deadline row it has.

It is installed only when ``airflow.models.taskinstance`` still holds the broken line
(``BROKEN``); an Airflow with the fix keeps its own function.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
from datetime import datetime, timedelta
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

MODULE = "airflow.models.taskinstance"
FUNCTION = "_recalculate_dagrun_queued_at_deadlines"
BROKEN = "timedelta(seconds=deadline_alert.interval)"
MARK = "__k2_backport__"


def needs_backport(module: ModuleType) -> bool:
    """Whether `module`'s function is the broken one (and not replaced yet)."""
    function = getattr(module, FUNCTION, None)
    if function is None or getattr(function, MARK, False):
        return False
    try:
        return BROKEN in inspect.getsource(function)
    except (OSError, TypeError):  # no source to read: leave Airflow's own
        return False


def recalculate_queued_at_deadlines(dagrun: Any, new_queued_at: datetime, session: Any) -> None:
    """Airflow's function with the interval decoded (see the module doc)."""
    from sqlalchemy import false, select

    from airflow.models.deadline import Deadline, ReferenceModels
    from airflow.models.deadline_alert import DeadlineAlert as DeadlineAlertModel

    results = session.execute(
        select(Deadline, DeadlineAlertModel)
        .join(DeadlineAlertModel, Deadline.deadline_alert_id == DeadlineAlertModel.id)
        .where(
            Deadline.dagrun_id == dagrun.id,
            Deadline.missed == false(),
            DeadlineAlertModel.reference[ReferenceModels.REFERENCE_TYPE_FIELD].as_string()
            == ReferenceModels.DagRunQueuedAtDeadline.__name__,
        )
    ).all()
    for deadline, deadline_alert in results:
        new_deadline_time = new_queued_at + deadline_interval(deadline_alert)
        log.debug("Recalculating deadline %s for DagRun %s.%s: old=%s, new=%s", deadline.id, dagrun.dag_id,
                  dagrun.run_id, deadline.deadline_time, new_deadline_time)
        deadline.deadline_time = new_deadline_time
    # no flush or commit: the caller's transaction holds it, as in Airflow's own function


setattr(recalculate_queued_at_deadlines, MARK, True)


def deadline_interval(deadline_alert: Any) -> timedelta:
    """The interval of a deadline_alert row, decoded as DAG run creation decodes it."""
    from airflow.serialization.decoders import decode_deadline_alert
    from airflow.serialization.definitions.deadline import DeadlineAlertFields, SerializedVariableInterval
    from airflow.serialization.enums import DagAttributeTypes as DAT
    from airflow.serialization.enums import Encoding

    decoded = decode_deadline_alert({
        Encoding.TYPE: DAT.DEADLINE_ALERT,
        Encoding.VAR: {
            DeadlineAlertFields.REFERENCE: deadline_alert.reference,
            DeadlineAlertFields.INTERVAL: deadline_alert.interval,
            DeadlineAlertFields.CALLBACK: deadline_alert.callback_def,
        },
    })
    interval = decoded.interval
    return interval.resolve() if isinstance(interval, SerializedVariableInterval) else interval


def patch(module: ModuleType) -> bool:
    """Replace the broken function in `module`; whether it was replaced."""
    if not needs_backport(module):
        return False
    setattr(module, FUNCTION, recalculate_queued_at_deadlines)
    log.debug("k2: %s.%s replaced (apache/airflow#70368)", MODULE, FUNCTION)
    return True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the module right after Airflow imports it (it is not imported yet when
    Airflow's settings load this package's entry point, and importing it then would be
    too early)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch now when Airflow's module is loaded, else when it is."""
    module = sys.modules.get(MODULE)
    if module is not None:
        patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
