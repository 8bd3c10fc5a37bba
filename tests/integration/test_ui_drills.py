"""Browser drills on the session's Airflow UI, in headless Chromium (tests/integration/browser.py):
an operator logs in, sees every DAG of the bundle and no import errors, and reads a DAG's
runbook in its docs. (The clear through the UI's Clear dialog is drilled on a failed run in
test_failure_email.py.)"""

from __future__ import annotations

import re

import pytest

from k2.config import load_tables
from k2_dag_factory import MAINTENANCE_DAG_ID, RETENTION_DAG_ID
from tests.integration.browser import browser_page, log_in

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_IDS = sorted([*(spec.dag_id for spec in load_tables().tables), RETENTION_DAG_ID, MAINTENANCE_DAG_ID])


def _ui(stack) -> str:
    return f"http://{stack.host}:{stack.airflow_port}"


def test_log_in_see_every_dag_no_import_errors_and_read_a_runbook(stack, airflow_running):
    for dag_id in DAG_IDS:
        airflow_running.wait_registered(dag_id)
    base = _ui(stack)
    with browser_page("ui_login_dags_docs") as page:
        log_in(page, base, "admin", stack.credentials["airflow_admin_password"])
        # Home: the components are healthy, and no "Dag Import Errors" badge is shown.
        for component in ("MetaDatabase", "Scheduler", "Triggerer", "Dag Processor"):
            page.get_by_text(component, exact=True).first.wait_for()
        assert page.get_by_text(re.compile("import error", re.I)).count() == 0

        page.goto(f"{base}/dags")
        page.locator(f"a[href$='/dags/{DAG_IDS[-1]}']").first.wait_for()
        listed = {href.rstrip("/").rsplit("/", 1)[-1]
                  for href in page.locator("a[href*='/dags/k2_']").evaluate_all("els => els.map(e => e.getAttribute('href'))")
                  if re.fullmatch(r"/dags/k2_\w+/?", href)}
        assert listed == set(DAG_IDS), sorted(set(DAG_IDS) ^ listed)

        # A DAG's docs: its runbook renders in the Dag Docs dialog.
        spec = load_tables().get("silver_trades")
        page.goto(f"{base}/dags/{spec.dag_id}")
        page.get_by_role("button", name="Dag Docs").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Dag Documentation").wait_for()
        dialog.get_by_text(f"Offload {spec.name} to Iceberg {spec.iceberg_table}").wait_for()
        page.keyboard.press("Escape")

        page.goto(f"{base}/dags/{MAINTENANCE_DAG_ID}")
        page.get_by_role("button", name="Dag Docs").click()
        page.get_by_role("dialog").get_by_text(re.compile("maintenance-failed")).first.wait_for()
