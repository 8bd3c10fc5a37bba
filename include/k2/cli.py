"""The `k2` command line: the local stack, the schema, the feed, verification, watermarks."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from typing import Optional

import typer

app = typer.Typer(
    help="K2 cold-tier offload: ClickHouse hot tier to Iceberg, orchestrated by Airflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
local_app = typer.Typer(help="The local stack (PostgreSQL, ClickHouse endpoint).", no_args_is_help=True)
schema_app = typer.Typer(help="The ClickHouse data model.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(schema_app, name="schema")

CLICKHOUSE_DATABASE = "k2"


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _stack():
    from k2.local.settings import LocalStack

    try:
        return LocalStack.from_env()
    except ValueError as exc:
        _fail(str(exc), 2)


def _duration(value: Optional[str]) -> Optional[timedelta]:
    if value is None:
        return None
    from k2.config import parse_duration

    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if duration <= timedelta(0):
        raise typer.BadParameter(f"{value!r} must be longer than zero")
    return duration


def _timestamp(value: Optional[str]) -> Optional[datetime]:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO-8601 time like 2026-11-26T10:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def clickhouse_client(stack=None):
    """A client for the k2 database of the local endpoint (created on first use)."""
    stack = stack or _stack()
    from k2.local.stack import require_up

    require_up(stack, ("clickhouse",))
    bootstrap = stack.clickhouse_client()
    bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {CLICKHOUSE_DATABASE}")
    bootstrap.close()
    return stack.clickhouse_client(database=CLICKHOUSE_DATABASE)


@local_app.command("up")
def local_up() -> None:
    """Start PostgreSQL and the ClickHouse endpoint on 127.0.0.1 (idempotent)."""
    from k2.local import stack as local_stack
    from k2.local.processes import StackError

    stack = _stack()
    try:
        local_stack.up(stack)
    except StackError as exc:
        _fail(str(exc))
    typer.echo(f"local stack up; data in {stack.home}")


@local_app.command("down")
def local_down() -> None:
    """Stop the local services; their data stays for the next `up`."""
    from k2.local import stack as local_stack
    from k2.local.processes import StackError

    try:
        local_stack.down(_stack())
    except StackError as exc:
        _fail(str(exc))


@local_app.command("status")
def local_status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each service with its address, pid and health. Exit 1 when any is not healthy."""
    from k2.local import stack as local_stack

    rows = local_stack.status(_stack())
    if as_json:
        typer.echo(json.dumps([{**row.__dict__, "state": row.state} for row in rows], indent=2))
    else:
        typer.echo(f"{'service':<12} {'address':<22} {'pid':>8}  state")
        for row in rows:
            typer.echo(f"{row.name:<12} {row.host + ':' + str(row.port):<22} {row.pid or '-':>8}  {row.state}")
    if any(row.state != "healthy" for row in rows):
        raise typer.Exit(1)


@schema_app.command("apply")
def schema_apply() -> None:
    """Create the bronze, silver and gold tables and their views (idempotent)."""
    from k2.local.processes import StackError
    from k2.schema import apply_schema

    try:
        client = clickhouse_client()
    except StackError as exc:
        _fail(str(exc))
    names = apply_schema(client)
    typer.echo(f"schema applied in database {CLICKHOUSE_DATABASE}: {len(names)} objects")


@app.command("feed")
def feed(
    history: Optional[str] = typer.Option(None, help="Write this much past data first, e.g. 6h, 90m."),
    rate: Optional[float] = typer.Option(None, help="Then keep feeding live at this many trades/s."),
    duration: Optional[str] = typer.Option(None, help="Stop the live feed after this long (default: Ctrl-C)."),
    seed: int = typer.Option(1, help="Random seed; the same seed and end time give the same trades."),
    end: Optional[str] = typer.Option(None, help="End of the history (ISO-8601, default now)."),
) -> None:
    """The market feed simulator: history as fast as possible, then live trades."""
    from k2.feed import run_feed
    from k2.local.processes import StackError

    history_span = _duration(history)
    live_duration = _duration(duration)
    if rate is not None and rate <= 0:
        raise typer.BadParameter(f"--rate must be positive, got {rate}")
    if history_span is None and rate is None:
        raise typer.BadParameter("give --history, --rate or both")
    try:
        client = clickhouse_client()
    except StackError as exc:
        _fail(str(exc))
    try:
        stats = run_feed(
            client, history=history_span, rate=rate, seed=seed, end=_timestamp(end), duration=live_duration
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        typer.echo("feed stopped")
        return
    typer.echo(f"feed done: {stats}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
