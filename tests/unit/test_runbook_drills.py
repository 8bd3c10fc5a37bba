"""Every runbook section has a drill, and the drill harness (tests/runbooks.py) fails when
it should: a command left unrun, a placeholder without a value, a time to recover over the
quoted bound."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import runbooks
from tests.runbooks import FIRST_LOOK, Drill, runbook_sections

REPO_ROOT = Path(__file__).resolve().parents[2]
DRILL_CALL = re.compile(r"""(?:Drill|_drill)\(\s*(?:stack,\s*)?(FIRST_LOOK|"[^"]+")""")
# The seed's five topics: each quotes a time to recover that its drill measures.
TTR_SECTIONS = ("Offload failure", "High lag", "Performance degradation", "Watermark recovery",
                "Scheduler recovery")


def _drilled() -> dict[str, list[str]]:
    """Section -> the test modules that open a drill of it."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO_ROOT / "tests" / "integration").glob("test_*.py")):
        for name in DRILL_CALL.findall(path.read_text()):
            section = FIRST_LOOK if name == "FIRST_LOOK" else name.strip('"')
            found.setdefault(section, []).append(path.name)
    return found


def test_every_runbook_section_has_commands_and_a_drill():
    sections = runbook_sections()
    assert len(sections) >= 15, sorted(sections)
    drilled = _drilled()
    unknown = set(drilled) - set(sections)
    assert not unknown, f"drills of sections the runbook does not have: {unknown}"
    without_commands = [name for name, section in sections.items() if not section.commands]
    assert not without_commands, f"runbook sections with no command to run: {without_commands}"
    undrilled = [name for name in sections if name not in drilled]
    assert not undrilled, f"runbook sections no test drills: {undrilled}"


def test_the_seed_topics_quote_a_time_to_recover_their_drills_measure():
    sections = runbook_sections()
    for name in TTR_SECTIONS:
        assert sections[name].ttr_minutes, f"{name!r} quotes no 'Time to recover: under N min'"
        modules = _drilled()[name]
        assert any(".recovered(" in (REPO_ROOT / "tests" / "integration" / m).read_text() for m in modules), (
            name, modules)


SAMPLE = """# Runbook

```bash
k2 health
```

## Broken thing

Time to recover: under 2 min (measured).

```bash
k2 verify --table T --from <start> \\
    --to <end>     # a comment
airflow dags unpause k2_offload_T
```

Prose with `k2 inline --not-a-block` is not a command to run.

```sql
SELECT 1;
```
"""


def test_sections_hold_the_bash_blocks_commands(tmp_path):
    path = tmp_path / "runbooks.md"
    path.write_text(SAMPLE)
    sections = runbook_sections(path)
    assert [c.text for c in sections[FIRST_LOOK].commands] == ["k2 health"]
    assert [c.text for c in sections["Broken thing"].commands] == [
        "k2 verify --table T --from <start> --to <end>", "airflow dags unpause k2_offload_T"]
    assert sections["Broken thing"].ttr_minutes == 2


def _drill(tmp_path, monkeypatch, **values) -> Drill:
    path = tmp_path / "runbooks.md"
    path.write_text(SAMPLE)
    original = runbooks.runbook_sections
    monkeypatch.setattr(runbooks, "runbook_sections", lambda: original(path))
    return Drill("Broken thing", home=tmp_path, table="silver_trades", values=values)


def test_a_drill_fills_the_table_and_placeholders_and_fails_on_a_missing_value(tmp_path, monkeypatch):
    drill = _drill(tmp_path, monkeypatch, **{"<start>": "2026-01-01T10:00:00Z"})
    assert drill.text("unpause") == "airflow dags unpause k2_offload_silver_trades"
    with pytest.raises(AssertionError, match=r"no value for \['<end>'\]"):
        drill.text("k2 verify")
    assert drill.text("k2 verify", **{"<end>": "2026-01-01T10:15:00Z"}) == (
        "k2 verify --table silver_trades --from 2026-01-01T10:00:00Z --to 2026-01-01T10:15:00Z")


def test_a_drill_that_leaves_a_command_unrun_fails(tmp_path, monkeypatch):
    drill = _drill(tmp_path, monkeypatch)
    drill.ran.add(drill.command("unpause"))
    with pytest.raises(AssertionError, match=r"did not run line \d+: `k2 verify"):
        drill.finish()
    drill.ran.add(drill.command("k2 verify"))
    drill.finish()


def test_a_recovery_slower_than_quoted_fails(tmp_path, monkeypatch):
    drill = _drill(tmp_path, monkeypatch)
    drill.recovered(119)
    with pytest.raises(AssertionError, match="recovered in 121 s, the runbook says under 2 min"):
        drill.recovered(121)


def test_a_command_is_run_with_its_exit_status_checked(tmp_path, monkeypatch):
    path = tmp_path / "runbooks.md"
    path.write_text("# R\n\n## S\n\n```bash\ntest -d .k2/x\n```\n")
    original = runbooks.runbook_sections
    monkeypatch.setattr(runbooks, "runbook_sections", lambda: original(path))
    (tmp_path / "x").mkdir()
    drill = Drill("S", home=tmp_path)
    assert drill.run("test -d").returncode == 0  # `.k2/` is the stack's home
    (tmp_path / "x").rmdir()
    with pytest.raises(AssertionError, match="exited 1, expected"):
        drill.run("test -d")
