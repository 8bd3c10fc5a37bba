"""The tests' one handle on the session's Airflow: metadata queries, pausing, runs, the REST
API and CLI; and the one way tests wait for a state (:func:`poll`, :func:`wait_until`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from k2.local.settings import LocalStack

T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, interval: float = 1.0) -> T:
    """Call ``check`` until it returns something truthy or ``timeout`` seconds pass; its last
    value either way (the caller asserts, with the state it found)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """:func:`poll`, failing the test with ``what`` when the deadline passes."""
    value = poll(check, timeout, interval)
    assert value, f"{what} within {timeout:.0f} s"
    return value


def airflow_sql(stack: LocalStack, sql: str, *params: Any) -> list[tuple]:
    """Rows of a query on the session Airflow's metadata database."""
    with psycopg.connect(stack.postgres_dsn("airflow")) as conn:
        return conn.execute(sql, params).fetchall()


class AirflowHandle:
    """The running Airflow of the test session, with the few operations tests need."""

    def __init__(self, stack: LocalStack, env: dict[str, str]) -> None:
        self.stack = stack
        self.env = env

    def sql(self, sql: str, *params: Any) -> list[tuple]:
        return airflow_sql(self.stack, sql, *params)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("airflow")), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        assert result.returncode == 0, f"airflow {' '.join(args)}:\n{result.stderr[-3000:]}"
        return result

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """Airflow's REST API as the admin user (token from the simple auth manager)."""
        base = f"http://{self.stack.host}:{self.stack.airflow_port}"

        def call(url: str, payload: dict | None, token: str | None = None) -> dict:
            request = urllib.request.Request(
                url, method=method if token else "POST",
                data=None if payload is None else json.dumps(payload).encode(),
                headers={"Content-Type": "application/json",
                         **({"Authorization": f"Bearer {token}"} if token else {})},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")

        password = self.stack.credentials["airflow_admin_password"]
        token = call(f"{base}/auth/token", {"username": "admin", "password": password})["access_token"]
        return call(f"{base}/api/v2{path}", body, token)

    # DAGs

    def is_paused(self, dag_id: str) -> bool | None:
        """None: the dag-processor has not registered the DAG yet."""
        rows = self.sql("SELECT is_paused FROM dag WHERE dag_id = %s", dag_id)
        return None if not rows else bool(rows[0][0])

    def wait_registered(self, dag_id: str, timeout: float = 600) -> None:
        """The dag-processor has written the DAG (registration takes minutes on a loaded machine)."""
        wait_until(lambda: self.is_paused(dag_id) is not None, timeout, f"{dag_id} registered", 2)

    def set_paused(self, dag_id: str, paused: bool, timeout: float = 600) -> None:
        """Pause or unpause through the REST API, checked in the database: once the DAG is
        registered (an unpause racing its registration, created paused, may not stick)."""
        self.wait_registered(dag_id, timeout)
        deadline = time.monotonic() + 120
        while self.is_paused(dag_id) is not paused:
            assert time.monotonic() < deadline, f"{dag_id}: is_paused did not become {paused}"
            self.api("PATCH", f"/dags/{dag_id}", {"is_paused": paused})
            time.sleep(1)

    def unpause(self, dag_id: str, timeout: float = 600) -> None:
        self.set_paused(dag_id, False, timeout)

    def pause_quietly(self, dag_id: str) -> None:
        """Pause in a test's cleanup: never hides the test's own failure."""
        try:
            self.set_paused(dag_id, True)
        except Exception as exc:
            print(f"\ncould not pause {dag_id}: {exc}")

    # Runs

    def trigger(self, dag_id: str, run_id: str, start: datetime, end: datetime, *, nth: int = 1) -> str:
        """A manual run for an explicit data interval, as the UI's "Trigger" with a date does."""
        # Logical dates are unique per DAG and the scheduled run of this interval holds
        # `start`; the nth manual run of the same interval takes the nth second after it.
        self.api("POST", f"/dags/{dag_id}/dagRuns", {
            "dag_run_id": run_id,
            "logical_date": (start + timedelta(seconds=nth)).isoformat(),
            "data_interval_start": start.isoformat(),
            "data_interval_end": end.isoformat(),
        })
        return run_id

    def run_state(self, dag_id: str, interval_start: datetime) -> str | None:
        rows = self.sql(
            "SELECT state FROM dag_run WHERE dag_id = %s AND data_interval_start = %s "
            "ORDER BY id DESC LIMIT 1", dag_id, interval_start,
        )
        return rows[0][0] if rows else None

    def run_state_by_id(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        """Wait until that run has finished; returns its final state."""
        def finished() -> str | None:
            rows = self.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", dag_id, run_id)
            state = rows[0][0] if rows else None
            return state if state in ("success", "failed") else None

        return wait_until(finished, timeout, f"{dag_id} run {run_id} finished", 3)

    def wait_for_run(self, dag_id: str, interval_start: datetime, timeout: float = 600) -> str:
        """Wait until the run of that interval has finished; returns its final state."""
        def finished() -> str | None:
            state = self.run_state(dag_id, interval_start)
            return state if state in ("success", "failed") else None

        return wait_until(finished, timeout, f"{dag_id} run of {interval_start} finished", 3)
