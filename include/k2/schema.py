"""The hot-tier data model applied through a clickhouse-connect client: `sql/schema.sql`
(bronze, silver) and `sql/gold_ohlcv.sql.tmpl` rendered once per candle width.

The DDL names no database, so everything lands in the client's current database;
every statement is `IF NOT EXISTS`, so `apply_schema` is idempotent.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template
from typing import Any

SQL_DIR = Path(__file__).resolve().parent / "sql"
SCHEMA_FILE = SQL_DIR / "schema.sql"
GOLD_TEMPLATE_FILE = SQL_DIR / "gold_ohlcv.sql.tmpl"

BRONZE_TABLES: tuple[str, ...] = ("bronze_trades_binance", "bronze_trades_kraken")
SILVER_TABLE = "silver_trades"
GOLD_WIDTHS: tuple[str, ...] = ("1m", "5m", "15m", "30m", "1h", "1d")
# width -> bucket size in seconds
GOLD_WIDTH_SECONDS: dict[str, int] = {
    "1m": 60,
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "1d": 86400,
}
GOLD_TABLES: tuple[str, ...] = tuple(f"gold_ohlcv_{w}" for w in GOLD_WIDTHS)
# The 9 tables (in dependency order: sources before the tables their views fill).
TABLE_NAMES: tuple[str, ...] = (*BRONZE_TABLES, SILVER_TABLE, *GOLD_TABLES)
# What the offload reads for each gold table.
FINAL_VIEWS: dict[str, str] = {t: f"{t}_final" for t in GOLD_TABLES}

_CREATE = re.compile(
    r"^\s*CREATE\s+(?:MATERIALIZED\s+VIEW|VIEW|TABLE)\s+IF\s+NOT\s+EXISTS\s+"
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)\b",
    re.IGNORECASE,
)


def split_statements(sql: str) -> list[str]:
    """Split a SQL script into statements on `;`, ignoring `--`/`/* */` comments and quotes.

    Comments are dropped from the returned statements; string literals and quoted
    identifiers (with backslash or doubled-quote escapes) are kept verbatim.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end  # keep the newline
            continue
        if ch == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise ValueError("unterminated /* comment in SQL script")
            current.append(" ")
            i = end + 2
            continue
        if ch in ("'", '"', "`"):
            j = i + 1
            while True:
                if j >= n:
                    raise ValueError(f"unterminated {ch} quote in SQL script")
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # doubled quote escape
                        j += 2
                        continue
                    break
                j += 1
            current.append(sql[i : j + 1])
            i = j + 1
            continue
        if ch == ";":
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    tail = "".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


def _interval_sql(seconds: int) -> str:
    for unit, size in (("DAY", 86400), ("HOUR", 3600), ("MINUTE", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    raise ValueError(f"candle width of {seconds} s is not whole minutes")


def gold_sql(width: str) -> str:
    """The DDL of one candle width. Widths of an hour or more get yearly partitions,
    shorter ones monthly, so every table keeps few parts."""
    seconds = GOLD_WIDTH_SECONDS[width]
    return Template(GOLD_TEMPLATE_FILE.read_text()).substitute(
        width=width,
        bucket_ms=seconds * 1000,
        interval=_interval_sql(seconds),
        partition="toYear" if seconds >= 3600 else "toYYYYMM",
    )


def schema_statements(path: Path | str | None = None) -> list[str]:
    """The DDL statements in order: schema.sql (or `path`), then every gold width."""
    statements = split_statements(Path(path or SCHEMA_FILE).read_text())
    if path is None:
        for width in GOLD_WIDTHS:
            statements += split_statements(gold_sql(width))
    return statements


def object_name(statement: str) -> str:
    """The name a `CREATE ... IF NOT EXISTS name` statement creates."""
    match = _CREATE.match(statement)
    if not match:
        raise ValueError(
            "schema.sql may only hold CREATE TABLE/VIEW/MATERIALIZED VIEW IF NOT EXISTS "
            f"statements; got: {statement[:80]!r}"
        )
    return match["name"]


def apply_schema(client: Any, path: Path | str | None = None) -> list[str]:
    """Create the hot-tier tables and views in the client's current database.

    Idempotent: every statement is IF NOT EXISTS. Returns the names of the objects
    (tables, materialized views, views) in the order they were created.
    """
    names: list[str] = []
    for statement in schema_statements(path):
        name = object_name(statement)
        client.command(statement)
        names.append(name)
    return names
