"""The engine: one embedded chDB engine per process, a fresh connection per sessionless request
and one connection per HTTP session. chDB runs the queries of different connections in
parallel; one connection serves one request at a time (a session is locked while in use)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import SETTING_NAME, ClickHouseError, quote_identifier, quote_string

DEFAULT_SESSION_TIMEOUT, MAX_SESSION_TIMEOUT = 60, 3600


@dataclass
class SessionState:
    """A session's connection beyond the session's own SET/USE: URL settings and `database`
    belong to one query. They are swapped lazily, since clients send the same ones each time."""

    overrides: dict[str, str] = field(default_factory=dict)  # URL settings now applied
    own_values: dict[str, str] = field(default_factory=dict)  # the session's own, as SQL
    database: str = "default"  # the connection's current database
    own_database: str = "default"


@dataclass
class _Session:
    conn: Any
    timeout: float
    state: SessionState = field(default_factory=SessionState)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SessionRequest:
    session_id: str
    timeout: float
    check: bool
    close: bool


class Engine:
    def __init__(self, data_path: Path) -> None:
        from chdb import _chdb  # the engine itself: streaming query and insert, query params

        self._chdb = _chdb
        self._path = str(data_path)
        # Open for the server's lifetime: the engine shuts down (and flushes) with its last
        # connection, and per-request connections must not restart it.
        self._anchor = _chdb.connect(self._path)
        answer = self._anchor.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = answer.decode().strip().split("\t")
        self._sessions: dict[str, _Session] = {}
        self._registry = threading.Lock()

    @contextmanager
    def connection(self, session: SessionRequest | None) -> Iterator[Connection]:
        if session is None:
            with self.fresh_connection() as conn:
                yield conn
            return
        entry = self._checkout(session)
        try:
            yield Connection(entry.conn, entry.state)
        finally:
            entry.last_used, entry.timeout = time.monotonic(), session.timeout
            entry.lock.release()
            if session.close:
                self._drop(session.session_id, entry)

    @contextmanager
    def fresh_connection(self) -> Iterator[Connection]:
        """A connection of no session: for a sessionless request, or a side question (the
        result types of a statement whose stream holds the request's connection)."""
        conn = self._chdb.connect(self._path)
        try:
            yield Connection(conn, None)
        finally:
            conn.close()

    def _checkout(self, session: SessionRequest) -> _Session:
        with self._registry:
            self._expire_idle_sessions()
            entry = self._sessions.get(session.session_id)
            if entry is None:
                if session.check:
                    raise ClickHouseError("SESSION_NOT_FOUND",
                                          f"Session {session.session_id} not found")
                entry = _Session(self._chdb.connect(self._path), session.timeout)
                self._sessions[session.session_id] = entry
            if not entry.lock.acquire(blocking=False):
                raise ClickHouseError("SESSION_IS_LOCKED", f"Session {session.session_id} is "
                                      "locked by a concurrent client")
            return entry

    def _expire_idle_sessions(self) -> None:
        now = time.monotonic()
        for session_id, entry in list(self._sessions.items()):
            if now - entry.last_used > entry.timeout and entry.lock.acquire(blocking=False):
                del self._sessions[session_id]
                entry.conn.close()

    def _drop(self, session_id: str, entry: _Session) -> None:
        with self._registry:
            if self._sessions.get(session_id) is entry and entry.lock.acquire(blocking=False):
                del self._sessions[session_id]
                entry.conn.close()

    def close(self) -> None:
        with self._registry:
            for entry in self._sessions.values():
                with suppress(Exception):
                    entry.conn.close()
            self._sessions.clear()
        self._anchor.close()


class Connection:
    """A chDB connection leased to one request, with its session's state if it has one."""

    def __init__(self, conn: Any, state: SessionState | None) -> None:
        self.raw, self.state = conn, state

    @property
    def current_database(self) -> str | None:
        return self.state.database if self.state is not None else None

    def query(self, sql: str | bytes, fmt: str = "TabSeparated",
              params: dict[str, str] | None = None) -> Any:
        """Run a statement; `sql` as bytes reaches the engine as received, UTF-8 or not."""
        try:
            return self.raw.query(sql, fmt, params=params or {})
        except RuntimeError as exc:
            raise ClickHouseError.from_engine(exc) from None

    def apply(self, settings: dict[str, str], database: str | None) -> None:
        """Give the connection this request's URL settings and database, none of earlier ones."""
        for name in settings:
            if not SETTING_NAME.match(name):
                raise ClickHouseError("UNKNOWN_SETTING", f"Unknown setting '{name}'")
        state = self.state
        if state is None:  # a fresh connection
            if settings:
                assignments = (f"{k} = {quote_string(v)}" for k, v in settings.items())
                self.query("SET " + ", ".join(assignments))
            if database:
                self.query(f"USE {quote_identifier(database)}")
            return
        self._remember_own_values([name for name in settings if name not in state.own_values])
        assignments = [f"{name} = {state.own_values[name]}" for name in state.overrides
                       if name not in settings and name in state.own_values]
        assignments += [f"{name} = {quote_string(value)}" for name, value in settings.items()
                        if state.overrides.get(name) != value]
        previous, state.overrides = state.overrides, dict(settings)
        if assignments:
            try:
                self.query("SET " + ", ".join(assignments))
            except ClickHouseError:
                state.overrides = {**previous, **settings}  # maybe applied: undo them next time
                raise
        target = database or state.own_database
        if target != state.database:
            self.query(f"USE {quote_identifier(target)}")
            state.database = target

    def run_session_statement(self, sql: bytes, params: dict[str, str]) -> None:
        """A SET or USE of the session itself: it must stick, untouched by URL overrides."""
        if self.state is None:
            self.query(sql, params=params)
            return
        self.apply({}, None)
        try:
            self.query(sql, params=params)
        finally:
            self.state.own_values.clear()
            current = self.query("SELECT currentDatabase()").bytes().decode().strip()
            self.state.own_database = self.state.database = current

    def _remember_own_values(self, names: list[str]) -> None:
        if not names or self.state is None:
            return
        in_list = ", ".join(quote_string(name) for name in names)
        answer = self.query("SELECT name, value, changed FROM system.settings "
                            f"WHERE name IN ({in_list})", "JSONEachRow").bytes()
        for row in map(json.loads, answer.decode().splitlines()):
            own = quote_string(row["value"]) if row["changed"] else "DEFAULT"
            self.state.own_values[row["name"]] = own
