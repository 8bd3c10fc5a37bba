"""Responses in clickhouse-server's shape: headers, the encodings of the body (ClickHouse's block
framing for `compress=1`, then HTTP compression), streaming, and errors before or after data."""

from __future__ import annotations

import secrets
from http.server import BaseHTTPRequestHandler
from typing import Any

from .codecs import RESPONSE_ENCODERS, BlockEncoder
from .protocol import ClickHouseError, content_type_for, summary_header

READ_CHUNK = 1 << 20
SEND_CHUNK = 1 << 20  # a response goes out in writes of at most this (see Response._send)
KEEP_ALIVE_SECONDS = 30


class OutputPipeline:
    """The body's encodings in the server's order: the result is block-framed
    (CompressedWriteBuffer over the output), and that is HTTP-compressed."""

    def __init__(self, framed: bool, encoding: str | None, level: int) -> None:
        self.stages: list[Any] = [BlockEncoder()] if framed else []
        if encoding:
            self.stages.append(RESPONSE_ENCODERS[encoding](level))

    def encode(self, data: bytes) -> bytes:
        for stage in self.stages:
            data = stage.encode(data) if data else data
        return data

    def finish(self) -> bytes:
        tail = b""
        for stage in self.stages:
            tail = (stage.encode(tail) if tail else b"") + stage.finish()
        return tail

    def whole(self, data: bytes) -> bytes:
        return self.encode(data) + self.finish()


class Response:
    """One response in clickhouse-server's shape; knows whether its headers went out.

    Its last bytes are held back until `release()`, which the handler calls once the session is
    free again: a client may send its next request the moment it has read a whole response.
    """

    def __init__(self, handler: BaseHTTPRequestHandler, query_id: str) -> None:
        self._handler, self.query_id = handler, query_id
        self.server: Any = handler.server  # server.EndpointServer: engine, name, compression
        self.exception_tag = secrets.token_hex(8)
        self.started, self.status = False, 200
        self.framed = False  # compress=1: from the query's output on, errors included
        self.head_only = handler.command == "HEAD"
        self._chunked = False
        self._pipeline: OutputPipeline | None = None
        self._held = b""

    def pipeline(self, encoding: str | None) -> OutputPipeline:
        return OutputPipeline(self.framed, encoding, self.server.compression_level)

    def complete(self, body: bytes, fmt: str | None, summary: str, encoding: str | None) -> None:
        if body:
            body = self.pipeline(encoding).whole(body)
        headers = self._success_headers(fmt, summary, encoding if body else None)
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
        if self.head_only:
            return
        view = memoryview(data)
        for offset in range(0, len(view), SEND_CHUNK):
            self._handler.wfile.write(view[offset:offset + SEND_CHUNK])

    def open_stream(self, fmt: str, encoding: str | None) -> None:
        headers = self._success_headers(fmt, summary_header(), encoding)
        self._pipeline = self.pipeline(encoding)
        self._send_head(200, {**headers, "Transfer-Encoding": "chunked"})
        self._chunked = True

    def write(self, data: bytes) -> None:
        """Send one chunk, a chunk late: the last one (with an Arrow stream's end mark, after
        which a client stops reading) must wait for release()."""
        if self._pipeline is not None:
            data = self._pipeline.encode(data)
        if data:
            self._send(self._held)
            self._held = b"%x\r\n%s\r\n" % (len(data), data)

    def close_stream(self, hold: bool = True) -> None:
        tail = self._pipeline.finish() if self._pipeline is not None else b""
        self._held += (b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n"
        if not hold:
            self.release()
        self._chunked = False

    def fail(self, error: ClickHouseError) -> None:
        text = error.render(self.server.engine.version)
        self.status = error.http_status
        if not self.started:
            # As the server: once the query's output exists, the message goes through it, so
            # with compress=1 it is framed (clients tell by the method byte).
            body = self.pipeline(None).whole(text.encode())
            self._send_head(error.http_status, {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(error.code),
                "Content-Length": str(len(body)),
            })
            self._send(body)
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
