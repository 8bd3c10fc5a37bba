"""The runbooks (docs/operations/runbooks.md) as something tests can run.

`runbook_sections()` reads every shell command of every section: each line of a ```bash
block (continuations joined, trailing comments dropped; the runbooks keep every command to
run in such blocks). The text before the first section is "First look".

`Drill` runs one section's commands, as written, in the state that section describes: a
test sets the state up, then calls `drill.run("<part of the command>")` for each step (the
runbook's placeholders, `T` and example dates replaced by the drill's values), and the
drill fails unless every command of its section ran. `drill.recovered(seconds)` checks a
measured time to recover against the bound the section quotes ("Time to recover: ...").

tests/unit/test_runbook_drills.py checks that every section with a command has a drill.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = REPO_ROOT / "docs" / "operations" / "runbooks.md"
FIRST_LOOK = "First look"
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
TTR = re.compile(r"Time to recover: under (\d+) min", re.I)


@dataclass(frozen=True)
class Command:
    section: str
    line: int
    text: str


@dataclass
class Section:
    name: str
    commands: list[Command] = field(default_factory=list)
    text: str = ""

    @property
    def ttr_minutes(self) -> float | None:
        found = TTR.search(self.text)
        return float(found.group(1)) if found else None


def runbook_sections(path: Path = RUNBOOK) -> dict[str, Section]:
    sections = {FIRST_LOOK: Section(FIRST_LOOK)}
    current = sections[FIRST_LOOK]
    in_block, shell, pending, start = False, False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("## ") and not in_block:
            current = sections.setdefault(line[3:].strip(), Section(line[3:].strip()))
            continue
        current.text += line + "\n"
        stripped = line.strip()
        if stripped.startswith("```"):
            if in_block:
                in_block = False
            else:
                in_block, shell = True, stripped in ("```bash", "```sh", "```shell")
            continue
        if in_block:
            if not shell:
                continue
            text = "" if stripped.startswith("#") else re.split(r"\s+#\s", stripped, maxsplit=1)[0].rstrip()
            if not pending:
                start = number
            pending += " " + text.rstrip("\\").strip()
            if text.endswith("\\"):
                continue
            command, pending = pending.strip(), ""
            if command:
                current.commands.append(Command(current.name, start, command))
    return sections


def _fill(text: str, table: str | None, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    if table is not None:
        text = re.sub(r"(?<=_)T\b|\bT\b", table, text)
    left = PLACEHOLDER.findall(text)
    assert not left, f"the drill gives no value for {left} in: {text}"
    return text


class Drill:
    """One runbook section, run command by command (see the module docstring).

    ``env_file``: the file the runbook's conventions source before `airflow` commands
    (`set -a; . .k2/airflow.env; set +a`); every command runs after it, in the repository,
    with `.k2/` meaning the stack's home. ``env``: extra environment (job-level stacks)."""

    def __init__(self, section: str, *, home: Path, table: str | None = None,
                 values: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 env_file: Path | None = None) -> None:
        sections = runbook_sections()
        assert section in sections, f"no section {section!r} in {RUNBOOK}: {sorted(sections)}"
        self.section = sections[section]
        self.home, self.table = home, table
        self.values = dict(values or {})
        # The commands run as an operator's shell would: not inside this pytest session.
        outside = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
        self.env = {**outside, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "K2_HOME": str(home), **(env or {})}
        self.env_file = env_file
        self.ran: set[Command] = set()
        self.began = time.monotonic()

    def command(self, contains: str) -> Command:
        """The section's command that is ``contains``, else the one containing it (one text;
        when the section repeats it, as a look and as a check, the first not run yet)."""
        matches = ([c for c in self.section.commands if c.text == contains]
                   or [c for c in self.section.commands if contains in c.text])
        assert matches and len({c.text for c in matches}) == 1, (
            f"{contains!r} names {len({c.text for c in matches})} commands of {self.section.name!r}: "
            f"{[c.text for c in self.section.commands]}")
        return next((c for c in matches if c not in self.ran), matches[0])

    def text(self, contains: str, **values: str) -> str:
        command = self.command(contains)
        text = _fill(command.text, self.table, {**self.values, **values})
        return text.replace(".k2/", f"{self.home}/")

    def run(self, contains: str, *, expect: int | tuple[int, ...] = 0, timeout: float = 600,
            **values: str) -> subprocess.CompletedProcess[str]:
        """Run the section's one command containing ``contains``; assert its exit status."""
        command = self.command(contains)
        text = self.text(contains, **values)
        script = text if self.env_file is None else f"set -a; . {self.env_file}; set +a; {text}"
        began = time.monotonic()
        result = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        self.ran.add(command)
        out = (result.stdout + result.stderr).strip()
        print(f"\n[runbook {self.section.name}] $ {text}  (exit {result.returncode}, "
              f"{time.monotonic() - began:.0f} s)\n" + "\n".join(out.splitlines()[-15:]))
        expected = (expect,) if isinstance(expect, int) else expect
        assert result.returncode in expected, (
            f"runbook {self.section.name!r} (docs line {command.line}): `{text}` exited "
            f"{result.returncode}, expected {expected}:\n{out[-3000:]}")
        return result

    def start(self, contains: str, **values: str) -> subprocess.Popen[str]:
        """Start the section's one long-running command (a feed, a service) in the background,
        as in a second terminal; the caller stops it."""
        command = self.command(contains)
        text = self.text(contains, **values)
        script = text if self.env_file is None else f"set -a; . {self.env_file}; set +a; exec {text}"
        print(f"\n[runbook {self.section.name}] $ {text} &")
        self.ran.add(command)
        return subprocess.Popen(["bash", "-c", script], cwd=REPO_ROOT, env=self.env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def recovered(self, seconds: float) -> None:
        """The measured time to recover is within what the section quotes."""
        bound = self.section.ttr_minutes
        assert bound is not None, f"runbook {self.section.name!r} quotes no 'Time to recover: under N min'"
        print(f"\n[runbook {self.section.name}] time to recover: {seconds:.0f} s (quoted: under {bound:.0f} min)")
        assert seconds <= bound * 60, (
            f"runbook {self.section.name!r}: recovered in {seconds:.0f} s, the runbook says under {bound:.0f} min")

    def finish(self) -> None:
        missing = [c for c in self.section.commands if c not in self.ran]
        assert not missing, (
            f"runbook {self.section.name!r}: the drill did not run " +
            "; ".join(f"line {c.line}: `{c.text}`" for c in missing))

    def __enter__(self) -> Drill:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.finish()
