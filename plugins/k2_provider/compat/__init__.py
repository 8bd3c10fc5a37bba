"""Version-guarded backports of Airflow fixes the pinned Airflow does not ship yet.

Loaded in every Airflow process (scheduler, API server, CLI, workers) through the
``airflow.policy`` entry point of this package (pyproject.toml), which Airflow's settings
load at start-up. Each backport checks that the code it replaces is the broken one, and
does nothing otherwise: with an Airflow that has the fix, the backport stands aside, and
tests/unit/test_compat.py fails to say that it can be deleted.
"""

from k2_provider.compat import deadline_clear

deadline_clear.install()
