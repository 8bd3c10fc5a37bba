"""Every `k2` and `airflow` command in the operations docs still parses: the subcommand exists
and every option it names is one the CLI has (`k2` through its Click command tree, `airflow`
through Airflow's own argument parser; nothing runs). A runbook that names a flag the CLI no
longer has fails here, with the file, the line and the command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "docs" / "operations" / "runbooks.md", REPO_ROOT / "README.md",
        REPO_ROOT / "docs" / "operations" / "monitoring.md"]
PLACEHOLDER = re.compile(r"<[^<>]*>")
INLINE = re.compile(r"`((?:\.venv/bin/)?(?:k2|airflow) [^`]+)`")


def shell_commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line, argv) of every k2/airflow command in the file's bash blocks and inline code."""
    found: list[tuple[int, list[str]]] = []
    lines = path.read_text().splitlines()
    in_block, pending, start = False, "", 0
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") and not in_block
            continue
        if in_block:
            text = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not pending:
                start = number
            pending += " " + text.rstrip("\\")
            if text.endswith("\\"):
                continue
            command, pending = pending.strip(), ""
            if re.match(r"(\.venv/bin/)?(k2|airflow) ", command):
                found.append((start, _argv(command)))
        else:
            for match in INLINE.finditer(line):
                found.append((number, _argv(match.group(1))))
    return found


TIME_WORDS = re.compile(r"start|end|interval|date|watermark|now|first|last|time", re.I)


def _placeholder(match: re.Match) -> str:
    """A value of the kind a <placeholder> stands for: a time, a count, or a name."""
    text = match.group(0)
    if TIME_WORDS.search(text):
        return "2026-01-01T10:00:00Z"
    return "4" if re.search(r"slots|count|number|\bn\b", text, re.I) else "x"


def _argv(command: str) -> list[str]:
    argv = shlex.split(PLACEHOLDER.sub(_placeholder, command.split(" | ", 1)[0]))
    argv[0] = Path(argv[0]).name
    return argv


def _check_k2(argv: list[str]) -> None:
    from typer.main import get_command

    from k2.cli import app

    command = get_command(app)
    args, path = argv[1:], ["k2"]
    ctx = command.make_context("k2", list(args), resilient_parsing=True)
    while hasattr(command, "get_command"):  # a group (Typer carries its own Click)
        name, args = args[0], args[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"`{' '.join(path)}` has no command {name!r}"
        path.append(name)
        command = sub
        ctx = command.make_context(name, list(args), parent=ctx, resilient_parsing=True)
    known = {opt for param in command.params for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", [])}
    known.add("--help")
    for arg in args:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in known, f"`{' '.join(path)}` has no option {arg}"


def _check_airflow(argv: list[str]) -> None:
    from airflow.cli import cli_parser

    parser = cli_parser.get_parser()
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"`airflow` refuses {' '.join(argv[1:])!r} (exit {exc.code})") from None


COMMANDS = [(path, line, argv) for path in DOCS for line, argv in shell_commands(path)]


def test_the_docs_hold_commands_to_check():
    assert len(COMMANDS) > 40
    assert any(argv[:2] == ["k2", "reoffload"] for _, _, argv in COMMANDS)
    assert any(argv[:3] == ["airflow", "tasks", "clear"] for _, _, argv in COMMANDS)


@pytest.mark.parametrize("path, line, argv", COMMANDS,
                         ids=[f"{p.name}:{n}" for p, n, _ in COMMANDS])
def test_a_documented_command_parses(path, line, argv, capsys):
    check = _check_k2 if argv[0] == "k2" else _check_airflow
    try:
        check(argv)
    except AssertionError as exc:
        raise AssertionError(f"{path.relative_to(REPO_ROOT)}:{line}: {' '.join(argv)}: {exc}") from None


def test_a_flag_the_cli_does_not_have_is_found():
    with pytest.raises(AssertionError, match="no option --frobnicate"):
        _check_k2(["k2", "verify", "--table", "T", "--frobnicate"])
    with pytest.raises(AssertionError, match="no command 'bogus'"):
        _check_k2(["k2", "watermark", "bogus"])
    with pytest.raises(AssertionError, match="refuses"):
        _check_airflow(["airflow", "tasks", "clear", "k2_offload_T", "--no-such-flag"])
