"""`k2 demo --until-caught-up`: the scripted `make run` on a short history, in a stack of
its own. It must catch every table up to the last closed interval and verify clean.

It keeps a stack and an Airflow of its own because what it tests is starting from
nothing. About 3.5 minutes in the suite, beside the Airflow lane: a stack and an Airflow
start, all 9 DAGs run a Spark job each. 15 minutes of history is exactly one 15-minute
interval per table: one run and one Spark job each, also when a 15-minute boundary passes
while it starts (its DAGs end at the interval closed at its start: K2_END_DATE). A healthy
first run sends no email at all."""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_port_env, stack_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

K2 = str(Path(sys.executable).with_name("k2"))


def test_demo_catches_up_and_verifies_clean():
    home = stack_home()
    env = {**os.environ, "K2_HOME": str(home), **free_port_env()}
    for key in ("K2_START_DATE", "K2_DAGS_PAUSED", "K2_DEADLINE"):  # set by other test modules' fixtures
        env.pop(key, None)
    try:
        result = subprocess.run(
            [K2, "demo", "--until-caught-up", "--history", "15m", "--timeout", "25m"],
            env=env, capture_output=True, text=True, timeout=1800,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "caught up" in output
        assert "no alert firing" in output, output[-3000:]
        # A healthy first run mails nobody: no alert fired and resolved on the way, no
        # deadline missed, no task failed (the stack's SMTP sink holds every email sent).
        sink = home / "mail"
        subjects = [m["Subject"] for m in mailbox.Maildir(sink, create=False)] if sink.exists() else []
        assert subjects == [], f"the healthy demo mailed: {subjects}"
        # Everything it started is stopped again.
        status = subprocess.run([K2, "local", "status", "--json"], env=env, capture_output=True, text=True)
        assert all(row["state"] == "stopped" for row in json.loads(status.stdout)), status.stdout
    finally:
        subprocess.run([K2, "local", "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
