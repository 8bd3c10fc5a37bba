"""Browser drills on the session's Airflow UI, in headless Chromium (tests/integration/browser.py):
an operator logs in, sees every DAG of the bundle and no import errors, and reads a DAG's
runbook in its docs; a newcomer opens every address `make run` prints; an operator starts a
backfill of two intervals from the Trigger dialog (bronze_trades_kraken, after
test_runbook_drills). The clear and the retry of a failed run through the UI's Clear dialog
are drilled on failed runs in test_failure_email.py."""

from __future__ import annotations

import re

import pytest

from k2.config import load_tables
from k2.intervals import INTERVAL
from k2_dag_factory import EXAMPLE_CONSUMER_DAG_ID, MAINTENANCE_DAG_ID, RETENTION_DAG_ID
from tests.integration.airflow_handle import airflow_sql, wait_until
from tests.integration.browser import browser_page, log_in

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_IDS = sorted([*(spec.dag_id for spec in load_tables().tables), RETENTION_DAG_ID, MAINTENANCE_DAG_ID,
                  EXAMPLE_CONSUMER_DAG_ID])


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


def test_every_address_make_run_prints_answers_in_the_browser(stack, airflow_running, start_date):
    """A newcomer's first hour: `make run` prints a banner of addresses (Pipeline.banner, on
    this session's stack). Each http address it prints opens in the browser with what the
    banner says is there, and the Airflow password is in the file the banner names."""
    import json
    from pathlib import Path

    from k2.local.pipeline import Pipeline

    banner = Pipeline(stack, log=lambda _line: None).banner(start_date)
    print(banner)
    shows = {  # what each page shows
        "Airflow UI": lambda page, _r: page.get_by_text("Sign in").first.wait_for(),
        "Prometheus": lambda page, _r: page.get_by_text("Prometheus").first.wait_for(),
        "alerts": lambda page, _r: page.get_by_text("Alerts").first.wait_for(),
        # Debian's Alertmanager has no web UI: the banner points at its API's alert list.
        "Alertmanager": lambda _p, response: json.loads(response.text()),
        "ClickHouse": lambda page, _r: page.get_by_text("Ok.").first.wait_for(),
    }
    opened = []
    with browser_page("ui_first_hour_addresses") as page:
        for line in banner.splitlines():
            label = re.match(r"\s+(Airflow UI|Prometheus|Alertmanager|ClickHouse)\s", line)
            words = line.split()
            for n, url in enumerate(words):
                if not url.startswith("http"):
                    continue
                what = "alerts" if words[n - 1] == "alerts:" else label.group(1)
                response = page.goto(url)
                assert response is not None and response.ok, f"{what} {url}: HTTP {response and response.status}"
                shows[what](page, response)
                opened.append(what)
                print(f"[first hour] {what:<12} {url}: HTTP {response.status}")
        assert sorted(opened) == sorted(shows), opened
        password_file = Path(re.search(r"password in (\S+passwords\.json)", banner).group(1))
        log_in(page, _ui(stack), "admin", json.loads(password_file.read_text())["admin"])
        page.get_by_text("Scheduler", exact=True).first.wait_for()


def _backfill_runs(stack, dag_id: str):
    """(id, [(data interval start, state)]) of the DAG's newest backfill, or None."""
    rows = airflow_sql(stack, "SELECT b.id, r.data_interval_start, r.state FROM backfill b "
                              "JOIN dag_run r ON r.backfill_id = b.id WHERE b.dag_id = %s "
                              "AND b.id = (SELECT max(id) FROM backfill WHERE dag_id = %s)", dag_id, dag_id)
    return (rows[0][0], [(start, state) for _, start, state in rows]) if rows else None


def test_a_backfill_of_two_intervals_started_from_the_ui(stack, hot_data, airflow_running):
    """The operator backfills two offloaded intervals of a table from the UI's Trigger dialog
    (Backfill, a date range of logical dates = interval starts, "All Runs" to re-offload
    completed ones). Airflow creates two backfill runs, they succeed, and both intervals
    verify clean: re-offloaded, one copy of each row. (bronze_trades_kraken, after
    test_runbook_drills.)"""
    from tests.integration.test_faults_airflow import _caught_up, _top_up, _verify_clean

    from k2.watermarks import WatermarkStore

    spec = load_tables().get("bronze_trades_kraken")
    data_end = _top_up(hot_data)  # every closed interval complete: the catch-up does not wait
    airflow_running.unpause(spec.dag_id)  # a paused DAG's backfill runs stay queued
    try:
        # Caught up first, so no scheduled run races the backfill for its intervals; how many
        # intervals earlier tests left depends on the clock, the catch-up makes it >= 2.
        _caught_up(stack, spec, data_end)
        done = sorted(entry.interval_start
                      for entry in WatermarkStore(stack.postgres_dsn("k2")).ledger_all(spec.name))
        assert len(done) >= 2, done
        first, second = done[-2], done[-1]
        with browser_page("ui_backfill") as page:
            log_in(page, _ui(stack), "admin", stack.credentials["airflow_admin_password"])
            page.goto(f"{_ui(stack)}/dags/{spec.dag_id}")
            page.get_by_role("button", name="Trigger Dag").click()
            dialog = page.get_by_role("dialog").first
            dialog.get_by_text("Backfill", exact=True).click()
            for n, moment in enumerate((first, second)):  # the pickers show UTC
                dialog.get_by_test_id("datetime-input").nth(n).click()
                picker = page.locator("[data-scope=popover][data-part=content][data-state=open]")
                picker.get_by_placeholder("YYYY/MM/DD").fill(f"{moment:%Y/%m/%d}")
                picker.get_by_placeholder("HH:mm").fill(f"{moment:%H:%M}")
                page.keyboard.press("Enter")
                page.keyboard.press("Escape")
                picker.wait_for(state="hidden")
            dialog.get_by_text(f"{first:%b %d, %Y %H:%M}").wait_for()
            dialog.get_by_text(f"{second:%b %d, %Y %H:%M}").wait_for()
            dialog.get_by_text("All Runs").click()
            run = dialog.get_by_role("button", name="Run Backfill")
            wait_until(run.is_enabled, 30, "the Run Backfill button enabled", 0.5)
            run.click()
            dialog.wait_for(state="hidden")
        backfill_id, runs = wait_until(lambda: _backfill_runs(stack, spec.dag_id), 60, "the UI's backfill created")
        assert sorted(start for start, _ in runs) == [first, second], runs
        wait_until(lambda: {state for _, state in _backfill_runs(stack, spec.dag_id)[1]} == {"success"}, 600,
                   f"backfill {backfill_id}'s runs successful", 3)
    finally:
        airflow_running.pause_quietly(spec.dag_id)
    _verify_clean(stack, hot_data, spec, first, second + INTERVAL, "UI backfill")
