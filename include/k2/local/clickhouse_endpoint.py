"""A ClickHouse HTTP endpoint on loopback, served by chDB (the ClickHouse engine as a library).

No ClickHouse server binary can be installed here, so the local stack runs this instead. It
speaks the HTTP interface the way clickhouse-server does (its HTTPHandler.cpp is the model), so
an unmodified clickhouse-connect client, and with it all project code, works against it:

* the query is the `query` URL parameter, a newline, then the (decompressed) body; the other URL
  parameters are settings, except `param_<name>` (query parameters) and the transport parameters
  ClickHouse reserves;
* `INSERT ... FORMAT <fmt>` / `VALUES` with data after the statement streams the data into
  chDB's streaming inserter; bodies may be lz4, zstd, gzip, deflate, xz or bz2 compressed;
* results of reads stream with chunked encoding where the format allows it, compressed as
  negotiated by Accept-Encoding + enable_http_compression;
* errors carry ClickHouse's code, text and HTTP status; an error after data went out is written
  as the tagged `__exception__` block of clickhouse-server 25.11+;
* `session_id` keeps one chDB connection (its SET, USE, temporary tables) per session.

    K2_CLICKHOUSE_PASSWORD=... python -m k2.local.clickhouse_endpoint \\
        --host 127.0.0.1 --port 8123 --data-path DIR --user k2 [--log-file F]

stdout carries one line, "ready <host>:<port>", once connections are accepted.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import email.parser
import email.policy
import errno
import hmac
import json
import logging
import lzma
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("k2.clickhouse_endpoint")

PASSWORD_ENV = "K2_CLICKHOUSE_PASSWORD"
DEFAULT_MAX_QUERY_SIZE = 262_144  # ClickHouse's max_query_size: the statement must fit in it
READ_CHUNK = 1 << 20
SEND_CHUNK = 1 << 20  # a response goes out in writes of at most this (see Response._send)
SPOOL_IN_MEMORY = 32 << 20  # wait_end_of_query results beyond this go to a temporary file
KEEP_ALIVE_SECONDS = 30
DEFAULT_SESSION_TIMEOUT, MAX_SESSION_TIMEOUT = 60, 3600

# URL parameters the server consumes itself; every other one is a setting (HTTPHandler.cpp).
RESERVED_PARAMS = frozenset({
    "query", "database", "default_format", "compress", "decompress", "user", "password",
    "quota_key", "query_id", "stacktrace", "role", "buffer_size", "wait_end_of_query",
    "session_id", "session_timeout", "session_check", "client_protocol_version", "close_session",
})
# A multipart request describes its external tables in <name>_structure / _types / _format.
EXTERNAL_TABLE_SUFFIXES = ("_format", "_types", "_structure")
SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# The ClickHouse errors this module raises itself; chDB's own carry code and name in their text.
ERROR_NAMES = {
    48: "NOT_IMPLEMENTED", 62: "SYNTAX_ERROR", 115: "UNKNOWN_SETTING", 164: "READONLY",
    271: "CANNOT_DECOMPRESS", 354: "ZLIB_INFLATE_FAILED", 358: "INTO_OUTFILE_NOT_ALLOWED",
    372: "SESSION_NOT_FOUND", 373: "SESSION_IS_LOCKED", 374: "INVALID_SESSION_TIMEOUT",
    381: "HTTP_LENGTH_REQUIRED", 516: "AUTHENTICATION_FAILED", 561: "ZSTD_DECODER_FAILED",
    618: "LZ4_DECODER_FAILED", 1001: "STD_EXCEPTION",
}
CODES = {name: code for code, name in ERROR_NAMES.items()}

# exceptionCodeToHTTPStatus.cpp; every other error is a 500.
_STATUS_BY_ERROR = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(("UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED",
                     "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"), 403),
    **dict.fromkeys((
        "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_ESCAPE_SEQUENCE", "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER", "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
        "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6", "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN", "UNKNOWN_ELEMENT_IN_AST",
        "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST",
        "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"), 400),
    **dict.fromkeys((
        "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE",
        "UNKNOWN_STORAGE", "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
        "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
        "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"), 404),
    "QUERY_IS_TOO_LARGE": 413, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503, "HTTP_LENGTH_REQUIRED": 411, "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503, "UNSUPPORTED_MEDIA_TYPE": 415,
}
_ENGINE_ERROR = re.compile(r"Code: (\d+)\. DB::Exception: (.*?)(?: \(([A-Z][A-Z0-9_]+)\))?\s*\Z",
                           re.S)


class ClickHouseError(Exception):
    """An error as ClickHouse reports it: numeric code, symbolic name, message."""

    def __init__(self, name: str, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.name, self.message = name, message
        self.code = code if code is not None else CODES[name]

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chDB raises RuntimeError with ClickHouse's own "Code: N. DB::Exception: ... (NAME)"."""
        text = str(exc).strip()
        match = _ENGINE_ERROR.match(text[text.find("Code: "):] if "Code: " in text else text)
        if not match:
            return cls("STD_EXCEPTION", text or type(exc).__name__)
        return cls(match[3] or "UNKNOWN_EXCEPTION", match[2], int(match[1]))

    @property
    def http_status(self) -> int:
        return _STATUS_BY_ERROR.get(self.name, 500)

    def render(self, version: str) -> str:
        stop = "" if self.message.endswith(".") else "."
        return (f"Code: {self.code}. DB::Exception: {self.message}{stop} ({self.name}) "
                f"(version {version})\n")


# ------------------------------------------------------------------------------------------
# Reading SQL just far enough to find where an INSERT's data starts and which format a result
# is in. A small lexer (strings, quoted names, comments, brackets) keeps words inside literals
# or column lists from being taken for clauses; chDB does the real parsing.

_TOKEN = re.compile(
    rb"""(?P<space>\s+)
    |(?P<comment>--[^\n]*|\#[!\s][^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z))
    |(?P<quoted>"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    |(?P<heredoc>\$(?P<tag>[A-Za-z_]*)\$.*?(?:\$(?P=tag)\$|\Z))
    |(?P<word>[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
    |(?P<number>[0-9][0-9A-Za-z_.]*)
    |(?P<punct>.)""",
    re.S | re.X,
)
_OPEN, _CLOSE = (b"(", b"[", b"{"), (b")", b"]", b"}")


class Token(NamedTuple):
    kind: str
    text: bytes
    start: int
    end: int

    @property
    def word(self) -> str:
        return self.text.decode("utf-8", "replace").upper() if self.kind == "word" else ""

    @property
    def name(self) -> str:
        return self.text.decode("utf-8", "replace").strip('"`')


def _tokens(sql: bytes) -> Iterator[Token]:
    pos = 0
    while pos < len(sql):
        match = _TOKEN.match(sql, pos)
        assert match is not None  # the punct branch matches any byte
        pos = match.end()
        if match.lastgroup not in ("space", "comment"):
            yield Token(match.lastgroup or "punct", match[0], match.start(), pos)


@dataclass(frozen=True)
class InlineInsert:
    """An INSERT whose data follows the statement in the request."""

    statement: str  # without its FORMAT clause, as chDB's send_insert takes it
    input_format: str
    data_offset: int


def find_inline_insert(sql: bytes) -> InlineInsert | None:
    """Where the data of `INSERT ... FORMAT f <data>` or `INSERT ... VALUES <data>` starts."""
    tokens = _tokens(sql)
    first = next(tokens, None)
    if first is None or first.word != "INSERT":
        return None
    depth, expect_target, after_dot = 0, True, False
    for token in tokens:
        if token.kind == "punct":
            depth += (token.text in _OPEN) - (token.text in _CLOSE)
            after_dot = token.text == b"." and depth == 0
            continue
        if depth or after_dot:  # column lists, function arguments, the table of db.table
            after_dot = False
            continue
        if expect_target:  # INTO [TABLE|FUNCTION] <name>: a table may well be called `format`
            expect_target = token.word in ("INTO", "TABLE", "FUNCTION")
            continue
        if token.word in ("SELECT", "WITH", "FROM"):  # INSERT ... SELECT, FROM INFILE: no data
            return None
        if token.word == "VALUES":
            return InlineInsert(sql[:token.start].decode("utf-8", "replace"), "Values", token.end)
        if token.word == "FORMAT":
            return _format_clause(sql, tokens, token)
    return None


def _format_clause(sql: bytes, tokens: Iterator[Token], keyword: Token) -> InlineInsert | None:
    name = next(tokens, None)
    if name is None or name.kind not in ("word", "quoted"):
        return None
    end, settings = name.end, b""
    following = next(tokens, None)
    if following is not None and following.word == "SETTINGS":  # FORMAT f SETTINGS k = v, ...
        end = _end_of_settings(tokens, following.end)
        settings = b" " + sql[following.start:end]
    if sql[end:end + 1] == b";":
        raise ClickHouseError("SYNTAX_ERROR",
                              "You have excessive ';' symbol before data for INSERT")
    # Data starts after the first newline, if there is one, or after the blanks (as the server).
    while sql[end:end + 1] in (b" ", b"\t", b"\f"):
        end += 1
    end += sql[end:end + 1] == b"\r"
    end += sql[end:end + 1] == b"\n"
    statement = sql[:keyword.start].rstrip() + settings
    return InlineInsert(statement.decode("utf-8", "replace"), name.name, end)


def _end_of_settings(tokens: Iterator[Token], end: int) -> int:
    """Consume `name = value[, name = value ...]`; where the last value ends."""
    while True:
        setting, equals, value = next(tokens, None), next(tokens, None), next(tokens, None)
        if setting is None or equals is None or value is None:
            return end
        if value.text == b"-":
            value = next(tokens, value)
        depth = int(value.text in _OPEN)
        while depth and (inner := next(tokens, None)) is not None:
            value = inner
            depth += (inner.text in _OPEN) - (inner.text in _CLOSE)
        end = value.end
        comma = next(tokens, None)
        if comma is None or comma.text != b",":
            return end


@dataclass(frozen=True)
class QueryShape:
    first_word: str  # "" for an empty query
    output_format: str | None  # from a trailing FORMAT clause
    writes_outfile: bool


def shape_of(sql: bytes) -> QueryShape:
    top: list[Token] = []  # the tokens outside brackets
    depth = 0
    for token in _tokens(sql):
        if token.text in _CLOSE:
            depth -= 1
        elif depth == 0:
            top.append(token)
        depth += token.text in _OPEN
    output_format = None
    for i in range(len(top) - 1):
        rest = top[i + 2:]
        if (top[i].word == "FORMAT" and top[i + 1].kind in ("word", "quoted")
                and (i == 0 or top[i - 1].text != b".")
                and (not rest or rest[0].word == "SETTINGS" or rest[0].text == b";")):
            output_format = top[i + 1].name
    words = [token.word for token in top]
    outfile = any(a == "INTO" and b == "OUTFILE" for a, b in zip(words, words[1:]))
    first = words[0] if words else ""
    return QueryShape(first or ("(" if top else ""), output_format, outfile)


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# ------------------------------------------------------------------------------------------
# HTTP compression, both ways. A response is one frame, flushed per chunk, so that a streaming
# client decodes as data arrives (clickhouse-connect decodes lz4 with a single frame decoder).

class _ZlibEncoder:
    def __init__(self, wbits: int, level: int) -> None:
        self._z = zlib.compressobj(max(1, min(level, 9)), zlib.DEFLATED, wbits)

    def encode(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush()


class _Lz4Encoder:
    def __init__(self, _level: int) -> None:
        import lz4.frame

        self._c = lz4.frame.LZ4FrameCompressor(auto_flush=True)
        self._header = self._c.begin()

    def encode(self, data: bytes) -> bytes:
        out, self._header = self._header + self._c.compress(data), b""
        return out

    def finish(self) -> bytes:
        return self._header + self._c.flush()


class _ZstdEncoder:
    def __init__(self, level: int) -> None:
        import zstandard

        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def encode(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(self._flush_block)

    def finish(self) -> bytes:
        return self._c.flush()


# In clickhouse-server's order of preference (chooseHTTPCompressionMethod), less what is not
# installed here; answering uncompressed is always allowed.
_RESPONSE_ENCODERS: dict[str, Callable[[int], Any]] = {
    "zstd": _ZstdEncoder,
    "lz4": _Lz4Encoder,
    "gzip": lambda level: _ZlibEncoder(31, level),
    "deflate": lambda level: _ZlibEncoder(15, level),
}


def _new_zstd_decoder() -> Any:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _new_lz4_decoder() -> Any:
    import lz4.frame

    return lz4.frame.LZ4FrameDecompressor()


_BODY_DECODERS: dict[str, tuple[Callable[[], Any], str]] = {
    "gzip": (lambda: zlib.decompressobj(47), "ZLIB_INFLATE_FAILED"),  # 47: gzip or zlib header
    "x-gzip": (lambda: zlib.decompressobj(47), "ZLIB_INFLATE_FAILED"),
    "deflate": (lambda: zlib.decompressobj(15), "ZLIB_INFLATE_FAILED"),
    "zstd": (_new_zstd_decoder, "ZSTD_DECODER_FAILED"),
    "lz4": (_new_lz4_decoder, "LZ4_DECODER_FAILED"),
    "xz": (lzma.LZMADecompressor, "CANNOT_DECOMPRESS"),
    "bz2": (bz2.BZ2Decompressor, "CANNOT_DECOMPRESS"),
}


def decompress_chunks(chunks: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    """Decode a Content-Encoding'd body; clients send a frame per block, one after another."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity", "none"):
        yield from chunks
        return
    if encoding not in _BODY_DECODERS:
        raise ClickHouseError("NOT_IMPLEMENTED", f"Unsupported compression method '{encoding}': "
                              "this endpoint decodes gzip, deflate, zstd, lz4, xz and bz2")
    new_decoder, error = _BODY_DECODERS[encoding]
    decoder = None
    try:
        for data in chunks:
            while data:
                decoder = decoder or new_decoder()
                if out := decoder.decompress(data):
                    yield out
                data, decoder = (decoder.unused_data, None) if decoder.eof else (b"", decoder)
    except (ClickHouseError, OSError):  # OSError: the client, not the codec
        raise
    except Exception as exc:  # each codec has an error type of its own
        message = f"Cannot decompress the {encoding} request body: {exc}"
        raise ClickHouseError(error, message) from None
    if decoder is not None:
        raise ClickHouseError(error, f"Unexpected end of the {encoding} request body")


# ------------------------------------------------------------------------------------------
# Output framing. chDB's streaming fetch returns each chunk as a complete output of its own,
# so only formats whose outputs concatenate are streamed; Arrow streams are re-framed.

_CONCATENABLE_FORMATS = frozenset(name.lower() for name in (
    "Native", "RowBinary", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "Raw", "CSV",
    "JSONEachRow", "JSONLines", "NDJSON", "JSONCompactEachRow", "JSONStringsEachRow",
    "JSONCompactStringsEachRow", "CustomSeparated", "LineAsString", "ArrowStream",
))
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class ArrowStreamJoiner:
    """Makes one Arrow IPC stream of several: the first schema, every batch, one end mark."""

    def __init__(self) -> None:
        self._schema: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        if chunk.endswith(ARROW_EOS):
            chunk = chunk[:-len(ARROW_EOS)]
        # A schema message is [0xFFFFFFFF] <int32 metadata length> <metadata>, with no body.
        prefix = 8 if chunk[:4] == b"\xff\xff\xff\xff" else 4
        schema_end = prefix + int.from_bytes(chunk[prefix - 4:prefix], "little")
        if self._schema is None:
            self._schema = chunk[:schema_end]
            return chunk
        return chunk[schema_end:] if chunk[:schema_end] == self._schema else chunk

    def finish(self) -> bytes:
        return ARROW_EOS if self._schema is not None else b""


class PassThroughJoiner:
    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


def content_type_for(fmt: str) -> str:
    name = fmt.lower()
    if name.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if name.startswith("csv"):
        return f"text/csv; charset=UTF-8; header={'present' if 'withnames' in name else 'absent'}"
    if name.startswith(("json", "ndjson")):
        return "application/json; charset=UTF-8"
    if name.startswith(("native", "rowbinary", "arrow", "parquet", "orc", "avro", "protobuf",
                        "msgpack", "capnproto", "npy", "bson")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


def summary_header(**counts: float) -> str:
    keys = ("read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read",
            "result_rows", "result_bytes", "elapsed_ns")
    return json.dumps({key: str(int(counts.get(key, 0))) for key in keys}, separators=(",", ":"))


# ------------------------------------------------------------------------------------------
# The engine: one embedded chDB engine per process, a fresh connection per sessionless request
# and one connection per HTTP session. chDB runs the queries of different connections in
# parallel; one connection serves one request at a time (a session is locked while in use).

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
            conn = self._chdb.connect(self._path)
            try:
                yield Connection(conn, None)
            finally:
                conn.close()
            return
        entry = self._checkout(session)
        try:
            yield Connection(entry.conn, entry.state)
        finally:
            entry.last_used, entry.timeout = time.monotonic(), session.timeout
            entry.lock.release()
            if session.close:
                self._drop(session.session_id, entry)

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

    def query(self, sql: str, fmt: str = "TabSeparated",
              params: dict[str, str] | None = None) -> Any:
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

    def run_session_statement(self, sql: str, params: dict[str, str]) -> None:
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


# ------------------------------------------------------------------------------------------
# Request bodies: Content-Length or chunked (clickhouse-connect streams its inserts chunked).

class RequestBody:
    def __init__(self, rfile: Any, headers: Any) -> None:
        self._rfile = rfile
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = headers.get("Content-Length", "")
        self.missing_length = not self._chunked and not length.isdigit()
        self._remaining = int(length) if length.isdigit() else 0
        self.broken = False  # the connection's bytes are out of step with HTTP framing
        self._stream = self._read()

    def chunks(self) -> Iterator[bytes]:
        return self._stream

    def drain(self) -> None:
        """Read what the client still sends, so its request completes and keep-alive holds."""
        for _ in self._stream:
            pass

    def _read(self) -> Iterator[bytes]:
        try:
            yield from (self._read_chunked() if self._chunked else self._read_length())
        except BaseException:
            self.broken = True
            raise

    def _read_length(self) -> Iterator[bytes]:
        while self._remaining:
            data = self._rfile.read(min(self._remaining, READ_CHUNK))
            if not data:
                raise ConnectionResetError("the client closed the request body early")
            self._remaining -= len(data)
            yield data

    def _read_chunked(self) -> Iterator[bytes]:
        while size := int(self._rfile.readline(65537).split(b";")[0].strip() or b"0", 16):
            while size:
                data = self._rfile.read(min(size, READ_CHUNK))
                if not data:
                    raise ConnectionResetError("the client closed the request body early")
                size -= len(data)
                yield data
            self._rfile.readline(3)
        while self._rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
            pass


def read_head(chunks: Iterator[bytes], limit: int) -> bytes:
    """At least `limit` bytes of the body (or all of it): enough to hold the statement."""
    parts, size = [], 0
    while size < limit and (part := next(chunks, None)) is not None:
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """Form fields (query, param_*, settings) and files (external tables) of a form post."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", "", header="content-disposition"))
        payload = part.get_payload(decode=True) or b""
        if name and part.get_filename() is None:
            fields[name] = payload.decode("utf-8", "replace")
        elif name:
            files[name] = payload
    return fields, files


# ------------------------------------------------------------------------------------------
# Responses

class Response:
    """One response in clickhouse-server's shape; knows whether its headers went out.

    Its last bytes are held back until `release()`, which the handler calls once the session is
    free again: a client may send its next request the moment it has read a whole response.
    """

    def __init__(self, handler: ClickHouseHandler, query_id: str) -> None:
        self._handler, self.server, self.query_id = handler, handler.server, query_id
        self.exception_tag = secrets.token_hex(8)
        self.started, self.status = False, 200
        self._chunked = False
        self._encoder: Any = None
        self._held = b""

    def complete(self, body: bytes, fmt: str | None, summary: str, encoding: str | None) -> None:
        if encoding:
            encoder = _RESPONSE_ENCODERS[encoding](self.server.compression_level)
            body = encoder.encode(body) + encoder.finish()
        headers = self._success_headers(fmt, summary, encoding)
        self._send_head(200, {**headers, "Content-Length": str(len(body))})
        self._held = body

    def complete_from_file(self, spool: Any, fmt: str, summary: str, encoding: str | None) -> None:
        headers = self._success_headers(fmt, summary, encoding)
        self._send_head(200, {**headers, "Content-Length": str(spool.tell())})
        spool.seek(0)
        while data := spool.read(READ_CHUNK):
            self._send(self._held)
            self._held = data

    def release(self) -> None:
        self._send(self._held)
        self._held = b""

    def _send(self, data: bytes) -> None:
        """Write in pieces. The socket's timeout bounds one whole sendall, while
        clickhouse-server's send timeout bounds each send: a client that reads a large
        result steadily but slowly (a JDBC reader writing each row away) must not be cut
        off once the whole body has taken longer than the timeout."""
        view = memoryview(data)
        for offset in range(0, len(view), SEND_CHUNK):
            self._handler.wfile.write(view[offset:offset + SEND_CHUNK])

    def open_stream(self, fmt: str, encoding: str | None) -> None:
        headers = self._success_headers(fmt, summary_header(), encoding)
        if encoding:
            self._encoder = _RESPONSE_ENCODERS[encoding](self.server.compression_level)
        self._send_head(200, {**headers, "Transfer-Encoding": "chunked"})
        self._chunked = True

    def write(self, data: bytes) -> None:
        """Send one chunk, a chunk late: the last one (with an Arrow stream's end mark, after
        which a client stops reading) must wait for release()."""
        if self._encoder is not None:
            data = self._encoder.encode(data)
        if data:
            self._send(self._held)
            self._held = b"%x\r\n%s\r\n" % (len(data), data)

    def close_stream(self, hold: bool = True) -> None:
        tail = self._encoder.finish() if self._encoder is not None else b""
        self._held += (b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n"
        if not hold:
            self.release()
        self._chunked = False

    def fail(self, error: ClickHouseError) -> None:
        text = error.render(self.server.engine.version)
        self.status = error.http_status
        if not self.started:
            body = text.encode()
            self._send_head(error.http_status, {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(error.code),
                "Content-Length": str(len(body)),
            })
            self._handler.wfile.write(body)
            return
        if self._chunked:  # data went out already: the tagged block clients look for
            message, tag = text.rstrip("\n").encode(), self.exception_tag.encode()
            self.write(b"\r\n__exception__\r\n" + tag + b"\r\n" + message + b"\n"
                       + str(len(message)).encode() + b" " + tag + b"\r\n__exception__\r\n")
            self.close_stream(hold=False)
        self._handler.close_connection = True

    def _success_headers(self, fmt: str | None, summary: str,
                         encoding: str | None) -> dict[str, str]:
        headers = {"Content-Type": content_type_for(fmt or "TabSeparated"),
                   "X-ClickHouse-Summary": summary}
        if fmt:  # only a statement with a result names its format
            headers["X-ClickHouse-Format"] = fmt
            headers["X-ClickHouse-Timezone"] = self.server.engine.timezone
        if encoding:
            headers["Content-Encoding"] = encoding
        return headers

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        handler = self._handler
        handler.send_response(status)
        for name, value in {
            "X-ClickHouse-Query-Id": self.query_id,
            "X-ClickHouse-Server-Display-Name": self.server.display_name,
            "X-ClickHouse-Exception-Tag": self.exception_tag,
            "Keep-Alive": f"timeout={KEEP_ALIVE_SECONDS}",
            **headers,
        }.items():
            handler.send_header(name, value)
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.end_headers()
        self.started, self.status = True, status


# ------------------------------------------------------------------------------------------
# The HTTP handler

@dataclass
class QueryRequest:
    method: str
    user: str
    read_only: bool  # GET, or a readonly setting: only statements that read
    settings: dict[str, str]
    query_params: dict[str, str]
    database: str | None
    default_format: str
    wait_end_of_query: bool
    response_encoding: str | None
    session: SessionRequest | None
    external_tables: dict[str, bytes]
    external_params: dict[str, str]


class ClickHouseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "k2-chdb-endpoint"
    timeout = KEEP_ALIVE_SECONDS  # an idle keep-alive connection is closed after this
    server: EndpointServer

    def setup(self) -> None:
        super().setup()
        # Headers and body are separate writes; with Nagle, delayed ACKs would add 40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # each query is logged once, without its URL (which may hold a password)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if url.path in ("/ping", "/replicas_status") or (
                url.path == "/" and method == "GET" and "query" not in params):
            self._plain(200, b"Ok.\n")
        elif url.path == "/":
            with self.server.tracking_request():
                self._run_query(method, params)
        else:
            self._plain(404, f"There is no handle {url.path}\n\nUse / or /ping for health checks.\n"
                             "Send queries with POST or GET /?query=...\n".encode())

    def _plain(self, status: int, body: bytes) -> None:
        if self.command == "POST":
            with suppress(Exception):
                RequestBody(self.rfile, self.headers).drain()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _run_query(self, method: str, params: dict[str, str]) -> None:
        started = time.monotonic()
        query_id = (params.get("query_id") or self.headers.get("X-ClickHouse-Query-Id")
                    or str(uuid.uuid4()))
        response = Response(self, query_id)
        body = RequestBody(self.rfile, self.headers) if method == "POST" else None
        execution: QueryExecution | None = None
        try:
            if body is not None and body.missing_length:
                self.close_connection = True  # where this request ends is unknown
                raise ClickHouseError("HTTP_LENGTH_REQUIRED", "The Transfer-Encoding is not "
                                      "chunked and there is no Content-Length header for POST "
                                      "request")
            request = self._parse_request(method, params, body)
            chunks: Iterator[bytes] = iter(())
            if body is not None and not request.external_tables:
                chunks = decompress_chunks(body.chunks(), self.headers.get("Content-Encoding", ""))
            with self.server.engine.connection(request.session) as conn:
                execution = QueryExecution(conn, request, response, chunks, params.get("query", ""))
                execution.run()
            response.release()
        except ClickHouseError as error:
            self._fail(body, response, error)
        except RuntimeError as exc:  # an engine error on a path that did not convert it
            self._fail(body, response, ClickHouseError.from_engine(exc))
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            response.status = 499  # nginx's "client closed request", for the log only
            log.info("client went away: %s", exc)
        except Exception as exc:  # a bug costs one request, never the server
            log.exception("internal error")
            bug = ClickHouseError("STD_EXCEPTION", f"{type(exc).__name__}: {exc}")
            self._fail(body, response, bug)
        log.info("%s query_id=%s status=%d %.1f ms %s", method, query_id, response.status,
                 (time.monotonic() - started) * 1000, execution.loggable if execution else "")

    def _fail(self, body: RequestBody | None, response: Response, error: ClickHouseError) -> None:
        # As the server does: read the rest of the request before answering, so that a client
        # still sending its body gets the error instead of a broken pipe.
        with suppress(Exception):
            if body is not None and not response.started:
                body.drain()
        if body is not None and body.broken:
            self.close_connection = True
        try:
            response.fail(error)
        except OSError:
            self.close_connection = True

    def _parse_request(self, method: str, params: dict[str, str],
                       body: RequestBody | None) -> QueryRequest:
        user = self._authenticate(params)
        files: dict[str, bytes] = {}
        multipart = self.headers.get("Content-Type", "").startswith("multipart/form-data")
        if multipart and body is not None:
            fields, files = parse_multipart(self.headers["Content-Type"], b"".join(body.chunks()))
            params.update(fields)
        settings: dict[str, str] = {}
        query_params: dict[str, str] = {}
        external_params: dict[str, str] = {}
        for name, value in params.items():
            if name.startswith("param_"):
                query_params[name[len("param_"):]] = value
            elif multipart and name.endswith(EXTERNAL_TABLE_SUFFIXES):
                external_params[name] = value
            elif name and name not in RESERVED_PARAMS:
                settings[name] = value
        if params.get("compress") == "1" or params.get("decompress") == "1":
            raise ClickHouseError("NOT_IMPLEMENTED", "ClickHouse's own block compression "
                                  "(compress=1, decompress=1) is not available; use HTTP "
                                  "compression")
        session = None
        if params.get("session_id"):
            timeout = params.get("session_timeout", str(DEFAULT_SESSION_TIMEOUT))
            if not timeout.isdigit() or int(timeout) > MAX_SESSION_TIMEOUT:
                raise ClickHouseError("INVALID_SESSION_TIMEOUT",
                                      f"Invalid session timeout: '{timeout}'")
            session = SessionRequest(params["session_id"], float(timeout),
                                     params.get("session_check") == "1",
                                     params.get("close_session") == "1")
        # Enforced by statement class, not by SET readonly, which a session could never undo.
        read_only = method == "GET" or settings.pop("readonly", "0") not in ("0", "")
        compress = settings.get("enable_http_compression", "0").lower() in ("1", "true")
        accept = self.headers.get("Accept-Encoding", "")
        return QueryRequest(
            method=method, user=user, read_only=read_only, settings=settings,
            query_params=query_params,
            database=self.headers.get("X-ClickHouse-Database") or params.get("database") or None,
            default_format=(self.headers.get("X-ClickHouse-Format") or params.get("default_format")
                            or "TabSeparated"),
            wait_end_of_query=params.get("wait_end_of_query", "0").lower() in ("1", "true"),
            response_encoding=next((e for e in _RESPONSE_ENCODERS if e in accept), None)
            if compress else None,
            session=session, external_tables=files, external_params=external_params,
        )

    def _authenticate(self, params: dict[str, str]) -> str:
        header_user = self.headers.get("X-ClickHouse-User")
        header_key = self.headers.get("X-ClickHouse-Key")
        authorization = self.headers.get("Authorization")
        in_params = "user" in params or "password" in params
        if (bool(header_user or header_key) + bool(authorization) + in_params) > 1:
            raise ClickHouseError("AUTHENTICATION_FAILED", "Invalid authentication: it is not "
                                  "allowed to use more than one authentication method at once")
        user, password = "default", ""
        if header_user or header_key:
            user, password = header_user or "default", header_key or ""
        elif authorization:
            scheme, _, credentials = authorization.partition(" ")
            try:
                if scheme.lower() != "basic":
                    raise ValueError(scheme)
                decoded = base64.b64decode(credentials, validate=True).decode()
            except ValueError:
                raise ClickHouseError("AUTHENTICATION_FAILED", "Invalid authentication: only "
                                      "Basic credentials are supported here") from None
            user, _, password = decoded.partition(":")
        elif in_params:
            user, password = params.get("user") or "default", params.get("password", "")
        expected_user, expected_password = self.server.credentials
        same_user = hmac.compare_digest(user.encode(), expected_user.encode())
        same_password = hmac.compare_digest(password.encode(), expected_password.encode())
        if not (same_user and same_password):
            raise ClickHouseError("AUTHENTICATION_FAILED", f"{user}: Authentication failed: "
                                  "password is incorrect, or there is no user with such name")
        return user


class QueryExecution:
    """Runs one request's statement on a leased connection and writes the response."""

    def __init__(self, conn: Connection, request: QueryRequest, response: Response,
                 body: Iterator[bytes], url_query: str) -> None:
        self.conn, self.request, self.response = conn, request, response
        self.body, self.url_query = body, url_query
        self.loggable = ""  # the statement for the log; empty where it may hold secrets

    def run(self) -> None:
        limit = int(self.request.settings.get("max_query_size") or DEFAULT_MAX_QUERY_SIZE)
        head = (self.url_query.encode() + b"\n" if self.url_query else b"")
        head += read_head(self.body, limit)
        insert = find_inline_insert(head)
        if insert is not None:
            self.loggable = "" if self._classify(insert.statement)[2] else insert.statement[:300]
            if self.request.read_only:
                raise self._readonly_error()
            self.conn.apply(self.request.settings, self.request.database)
            self._insert(insert, head)
            return
        sql_bytes = head + b"".join(self.body)
        shape = shape_of(sql_bytes)
        sql = sql_bytes.decode("utf-8", "replace")
        statements, reads, has_secrets = self._classify(sql)
        self.loggable = "" if has_secrets else " ".join(sql.split())[:300]
        if not shape.first_word:
            raise ClickHouseError("SYNTAX_ERROR", "Empty query")
        if shape.writes_outfile:
            raise ClickHouseError("INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        if statements > 1:
            raise ClickHouseError("SYNTAX_ERROR", "Syntax error (Multi-statements are not allowed)")
        session_statement = shape.first_word in ("SET", "USE")
        if self.request.read_only and not (reads or session_statement):
            raise self._readonly_error()
        if session_statement:
            self.conn.run_session_statement(sql, self.request.query_params)
            self.response.complete(b"", None, summary_header(), None)
            return
        self.conn.apply(self.request.settings, self.request.database)
        self._create_external_tables()
        try:
            fmt = shape.output_format or self.request.default_format
            streamable = reads and fmt.lower() in _CONCATENABLE_FORMATS
            if not (streamable and self._stream(sql, fmt)):
                self._query(sql, fmt, reads)
        finally:
            self._drop_external_tables()

    def _classify(self, sql: str) -> tuple[int, bool, bool]:
        """(statement count, whether it only reads and returns rows, whether it may hold secrets)"""
        try:
            kind = self.conn.raw.classify_query(sql)
        except RuntimeError:  # unparsable: running it reports the error
            return 1, False, True
        return kind["statement_count"], kind["query_class"].name == "READ_ONLY", kind["has_secrets"]

    def _readonly_error(self) -> ClickHouseError:
        hint = " For queries over HTTP, method POST is required"
        return ClickHouseError("READONLY", f"{self.request.user}: Cannot execute query in readonly "
                               f"mode.{hint if self.request.method == 'GET' else ''}")

    def _insert(self, insert: InlineInsert, head: bytes) -> None:
        raw = self.conn.raw
        try:
            inserter = raw.send_insert(insert.statement, insert.input_format)
        except RuntimeError as exc:
            raise ClickHouseError.from_engine(exc) from None
        try:
            if len(head) > insert.data_offset:
                raw.insert_append(inserter, head[insert.data_offset:])
            for chunk in self.body:
                raw.insert_append(inserter, chunk)
            result = raw.insert_done(inserter)
        except BaseException as exc:
            with suppress(Exception):
                raw.insert_cancel(inserter)
            if isinstance(exc, RuntimeError):
                raise ClickHouseError.from_engine(exc) from None
            raise
        summary = summary_header(written_rows=result.rows_written(),
                                 written_bytes=result.bytes_written(),
                                 elapsed_ns=result.elapsed() * 1e9)
        self.response.complete(b"", None, summary, None)

    def _query(self, sql: str, fmt: str, reads: bool) -> None:
        result = self.conn.query(sql, fmt, self.request.query_params)
        data = result.bytes()
        summary = summary_header(
            read_rows=result.storage_rows_read(), read_bytes=result.storage_bytes_read(),
            written_rows=result.rows_written(), written_bytes=result.bytes_written(),
            result_rows=result.rows_read(), result_bytes=len(data),
            elapsed_ns=result.elapsed() * 1e9)
        encoding = self.request.response_encoding if data else None
        self.response.complete(data, fmt if reads else None, summary, encoding)

    def _stream(self, sql: str, fmt: str) -> bool:
        """Serve a read chunk by chunk; False if chDB cannot stream this statement."""
        raw = self.conn.raw
        try:
            handle = raw.send_query(sql, fmt, params=self.request.query_params)
        except RuntimeError as exc:
            if "Streaming query is not supported" in str(exc):
                return False
            raise ClickHouseError.from_engine(exc) from None
        joiner = ArrowStreamJoiner() if fmt.lower() == "arrowstream" else PassThroughJoiner()
        chunks = self._fetch_chunks(handle)
        finished = False
        try:
            first = next(chunks, b"")  # planning errors surface here, before any header
            framed = (joiner.feed(chunk) for chunk in _prepend(first, chunks))
            if self.request.wait_end_of_query:
                self._spool(framed, joiner, fmt)
            else:
                self.response.open_stream(fmt, self.request.response_encoding)
                for data in framed:
                    self.response.write(data)
                self.response.write(joiner.finish())
                self.response.close_stream()
            finished = True
        finally:
            if not finished:  # an error, or the client went away: stop the engine's work
                with suppress(Exception):
                    raw.streaming_cancel_query(handle)
        return True

    def _fetch_chunks(self, handle: Any) -> Iterator[bytes]:
        while True:
            try:
                result = self.conn.raw.streaming_fetch_result(handle)
            except RuntimeError as exc:
                raise ClickHouseError.from_engine(exc) from None
            data = result.bytes() if result is not None else b""
            if not data and (result is None or result.rows_read() == 0):
                return
            if data:
                yield data

    def _spool(self, framed: Iterator[bytes], joiner: Any, fmt: str) -> None:
        """wait_end_of_query: the whole result first, so that an error still gets its status;
        in memory up to a limit, then on disk, as clickhouse-server does."""
        encoding = self.request.response_encoding
        server = self.response.server
        encoder = _RESPONSE_ENCODERS[encoding](server.compression_level) if encoding else None
        result_bytes = 0
        with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, dir=server.temp_dir) as spool:
            for data in _chain(framed, joiner):
                result_bytes += len(data)
                spool.write(encoder.encode(data) if encoder else data)
            if encoder:
                spool.write(encoder.finish())
            summary = summary_header(result_bytes=result_bytes)
            self.response.complete_from_file(spool, fmt, summary, encoding)

    def _create_external_tables(self) -> None:
        params = self.request.external_params
        for name, data in self.request.external_tables.items():
            structure = params.get(f"{name}_structure")
            if not structure:
                types = [t.strip() for t in params.get(f"{name}_types", "String").split(",")]
                structure = ", ".join(f"_{i} {t}" for i, t in enumerate(types, 1))
            table = quote_identifier(name)
            self.conn.query(f"CREATE TEMPORARY TABLE {table} ({structure}) ENGINE = Memory")
            raw = self.conn.raw
            try:
                inserter = raw.send_insert(f"INSERT INTO {table}",
                                           params.get(f"{name}_format", "TabSeparated"))
                raw.insert_append(inserter, data)
                raw.insert_done(inserter)
            except RuntimeError as exc:
                raise ClickHouseError.from_engine(exc) from None

    def _drop_external_tables(self) -> None:
        for name in self.request.external_tables:
            self.conn.query(f"DROP TEMPORARY TABLE IF EXISTS {quote_identifier(name)}")


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _chain(framed: Iterator[bytes], joiner: Any) -> Iterator[bytes]:
    yield from framed
    yield joiner.finish()


# ------------------------------------------------------------------------------------------
# Server and command line

class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up a shutdown
    engine: Engine
    credentials: tuple[str, str]
    display_name = socket.gethostname()
    compression_level = 3  # clickhouse-server's http_zlib_compression_level default
    temp_dir: str | None = None

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, ClickHouseHandler)
        self._active = 0
        self._idle = threading.Condition()

    @contextmanager
    def tracking_request(self) -> Iterator[None]:
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("connection from %s dropped", client_address)
        else:
            log.exception("error serving a connection")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ClickHouse HTTP endpoint served by chDB")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-path", required=True, type=Path,
                        help="chDB data directory, kept across restarts")
    parser.add_argument("--user", default="default",
                        help=f"the one user; its password is read from ${PASSWORD_ENV}")
    parser.add_argument("--log-file", type=Path, help="log here instead of to stderr")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    handler = logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])

    # stdout carries the ready line only; whatever the engine prints goes to stderr instead.
    ready_line = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    try:
        server = EndpointServer((args.host, args.port))
    except OSError as exc:
        reason = ("is already in use" if exc.errno == errno.EADDRINUSE
                  else f"cannot be listened on: {exc.strerror}")
        print(f"clickhouse endpoint: port {args.host}:{args.port} {reason}", file=sys.stderr)
        return 1
    # A fixed server time zone keeps DateTime results independent of the developer's machine.
    os.environ["TZ"] = "UTC"
    time.tzset()
    args.data_path.mkdir(parents=True, exist_ok=True)
    server.temp_dir = str(args.data_path)
    server.credentials = (args.user, os.environ.get(PASSWORD_ENV, ""))
    try:
        server.engine = Engine(args.data_path.resolve())
    except Exception as exc:
        print(f"clickhouse endpoint: chDB cannot open {args.data_path}: {exc}", file=sys.stderr)
        server.server_close()
        return 1

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("ClickHouse %s (chDB) for user %s on %s:%d, data in %s", server.engine.version,
             args.user, args.host, args.port, args.data_path)
    print(f"ready {args.host}:{args.port}", file=ready_line, flush=True)
    ready_line.close()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if not server.wait_idle(timeout=15):
            log.warning("requests still running at shutdown")
        server.engine.close()  # the last connection: chDB shuts the engine down and flushes
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
