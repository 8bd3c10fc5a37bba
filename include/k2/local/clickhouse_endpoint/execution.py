"""One request's statement on a leased connection: inserts with inline data, session
statements, reads streamed chunk by chunk, and everything else in one piece."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from .native import NativeReviser
from .protocol import (
    CONCATENABLE_FORMATS,
    DEFAULT_MAX_QUERY_SIZE,
    ArrowStreamJoiner,
    ClickHouseError,
    InlineInsert,
    PassThroughJoiner,
    QueryShape,
    find_inline_insert,
    quote_identifier,
    shape_of,
    summary_header,
    text,
)
from .responses import Response
from .sessions import Connection, Engine, SessionRequest

SPOOL_IN_MEMORY = 32 << 20  # wait_end_of_query results beyond this go to a temporary file


@dataclass
class QueryRequest:
    method: str
    user: str
    read_only: bool  # GET or HEAD, or a readonly setting: only statements that read
    query: bytes  # the `query` URL parameter, as received
    settings: dict[str, str]
    query_params: dict[str, str]
    database: str | None
    default_format: str
    wait_end_of_query: bool
    response_encoding: str | None
    session: SessionRequest | None
    external_tables: dict[str, bytes]
    external_params: dict[str, str]
    compress: bool = False  # compress=1: the response is block-framed
    decompress: bool = False  # decompress=1: the body is block-framed
    revision: int = 0  # client_protocol_version


def read_head(chunks: Iterator[bytes], limit: int) -> bytes:
    """At least `limit` bytes of the body (or all of it): enough to hold the statement."""
    parts, size = [], 0
    while size < limit and (part := next(chunks, None)) is not None:
        parts.append(part)
        size += len(part)
    return b"".join(parts)


class QueryExecution:
    """Runs one request's statement on a leased connection and writes the response."""

    def __init__(self, engine: Engine, conn: Connection, request: QueryRequest,
                 response: Response, body: Iterator[bytes]) -> None:
        self.engine, self.conn, self.request, self.response = engine, conn, request, response
        self.body = body
        self.loggable = ""  # the statement for the log; empty where it may hold secrets

    def run(self) -> None:
        limit = int(self.request.settings.get("max_query_size") or DEFAULT_MAX_QUERY_SIZE)
        head = self.request.query + b"\n" if self.request.query else b""
        head += read_head(self.body, limit)
        insert = find_inline_insert(head)
        if insert is not None:
            secret = self._classify(insert.statement)[2]
            self.loggable = "" if secret else text(insert.statement)[:300]
            if self.request.read_only:
                raise self._readonly_error()
            self.conn.apply(self.request.settings, self.request.database)
            self._insert(insert, head)
            return
        sql = head + b"".join(self.body)  # to the engine as received: bytes, UTF-8 or not
        shape = shape_of(sql)
        statements, reads, has_secrets = self._classify(sql)
        self.loggable = "" if has_secrets else " ".join(text(sql).split())[:300]
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
            streamable = (reads and fmt.lower() in CONCATENABLE_FORMATS
                          and not self.response.head_only)
            if not (streamable and self._stream(sql, shape, fmt)):
                self._query(sql, shape, fmt, reads)
        finally:
            self._drop_external_tables()

    def _classify(self, sql: bytes) -> tuple[int, bool, bool]:
        """(statement count, whether it only reads and returns rows, whether it may hold secrets)"""
        try:
            kind = self.conn.raw.classify_query(sql)
        except RuntimeError:  # unparsable: running it reports the error
            return 1, False, True
        return kind["statement_count"], kind["query_class"].name == "READ_ONLY", kind["has_secrets"]

    def _readonly_error(self) -> ClickHouseError:
        hint = " For queries over HTTP, method POST is required"
        return ClickHouseError("READONLY", f"{self.request.user}: Cannot execute query in readonly "
                               f"mode.{hint if self.request.method != 'POST' else ''}")

    def _insert(self, insert: InlineInsert, head: bytes) -> None:
        if self.request.query_params and insert.input_format.lower() == "values":
            # VALUES may hold {name:Type} parameters, which only a whole statement takes
            # (the streaming inserter has no parameters): as the server, substitute them.
            result = self.conn.query(head + b"".join(self.body), "TabSeparated",
                                     self.request.query_params)
            self.response.complete(b"", None, self._write_summary(result), None)
            return
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
        self.response.complete(b"", None, self._write_summary(result), None)

    @staticmethod
    def _write_summary(result: Any) -> str:
        return summary_header(written_rows=result.rows_written(),
                              written_bytes=result.bytes_written(),
                              elapsed_ns=result.elapsed() * 1e9)

    def _joiner(self, sql: bytes, shape: QueryShape, fmt: str, streaming: bool) -> Any:
        name = fmt.lower()
        if name == "arrowstream":
            return ArrowStreamJoiner()
        if name == "native" and self.request.revision:
            return NativeReviser(self.request.revision,
                                 lambda: self._describe(sql, shape, streaming))
        return PassThroughJoiner()

    def _describe(self, sql: bytes, shape: QueryShape, streaming: bool) -> list[str] | None:
        """The result's full column types (DateTime('tz') where chDB's Native says DateTime),
        from a DESCRIBE of the statement; None where the statement cannot be described. While
        a stream holds the request's connection, a fresh one asks (no temporary tables)."""
        statement = b"DESCRIBE TABLE (" + shape.without_format(sql) + b")"
        params = self.request.query_params
        try:
            if streaming:
                with self.engine.fresh_connection() as side:
                    side.apply(self.request.settings,
                               self.request.database or self.conn.current_database)
                    answer = side.query(statement, "JSONCompactEachRow", params).bytes()
            else:
                answer = self.conn.query(statement, "JSONCompactEachRow", params).bytes()
        except ClickHouseError:
            return None
        return [json.loads(line)[1] for line in answer.decode().splitlines()]

    def _query(self, sql: bytes, shape: QueryShape, fmt: str, reads: bool) -> None:
        result = self.conn.query(sql, fmt, self.request.query_params)
        data = result.bytes()
        if reads and data:
            joiner = self._joiner(sql, shape, fmt, streaming=False)
            if isinstance(joiner, NativeReviser):
                data = joiner.feed(data, result.rows_read())
        summary = summary_header(
            read_rows=result.storage_rows_read(), read_bytes=result.storage_bytes_read(),
            written_rows=result.rows_written(), written_bytes=result.bytes_written(),
            result_rows=result.rows_read(), result_bytes=len(data),
            elapsed_ns=result.elapsed() * 1e9)
        encoding = self.request.response_encoding if data else None
        self.response.complete(data, fmt if reads else None, summary, encoding)

    def _stream(self, sql: bytes, shape: QueryShape, fmt: str) -> bool:
        """Serve a read chunk by chunk; False if chDB cannot stream this statement."""
        raw = self.conn.raw
        try:
            handle = raw.send_query(sql, fmt, params=self.request.query_params)
        except RuntimeError as exc:
            if "Streaming query is not supported" in str(exc):
                return False
            raise ClickHouseError.from_engine(exc) from None
        joiner = self._joiner(sql, shape, fmt, streaming=True)
        chunks = self._fetch_chunks(handle)
        finished = False
        try:
            first = next(chunks, None)  # planning errors surface here, before any header
            framed = (joiner.feed(data, rows) for data, rows in _prepend(first, chunks))
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

    def _fetch_chunks(self, handle: Any) -> Iterator[tuple[bytes, int]]:
        while True:
            try:
                result = self.conn.raw.streaming_fetch_result(handle)
            except RuntimeError as exc:
                raise ClickHouseError.from_engine(exc) from None
            data = result.bytes() if result is not None else b""
            rows = result.rows_read() if result is not None else 0
            if not data and rows == 0:
                return
            if data:
                yield data, rows

    def _spool(self, framed: Iterator[bytes], joiner: Any, fmt: str) -> None:
        """wait_end_of_query: the whole result first, so that an error still gets its status;
        in memory up to a limit, then on disk, as clickhouse-server does."""
        encoding = self.request.response_encoding
        server = self.response.server
        pipeline = self.response.pipeline(encoding)
        result_bytes = 0
        with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, dir=server.temp_dir) as spool:
            for data in _chain(framed, joiner):
                result_bytes += len(data)
                spool.write(pipeline.encode(data))
            spool.write(pipeline.finish())
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


def _prepend(first: tuple[bytes, int] | None,
             rest: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    if first is not None:
        yield first
    yield from rest


def _chain(framed: Iterator[bytes], joiner: Any) -> Iterator[bytes]:
    yield from framed
    yield joiner.finish()
