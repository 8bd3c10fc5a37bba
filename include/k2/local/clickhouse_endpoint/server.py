"""The HTTP side: request bodies, parsing a request the way HTTPHandler.cpp does, the handler,
the threaded server and the command line."""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import errno
import hmac
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .codecs import RESPONSE_ENCODERS, decompress_blocks, decompress_chunks
from .execution import QueryExecution, QueryRequest
from .native import parse_revision
from .protocol import (
    EXTERNAL_TABLE_SUFFIXES,
    RESERVED_PARAMS,
    ClickHouseError,
    parse_url_params,
    text,
)
from .responses import KEEP_ALIVE_SECONDS, READ_CHUNK, Response
from .sessions import DEFAULT_SESSION_TIMEOUT, MAX_SESSION_TIMEOUT, Engine, SessionRequest

log = logging.getLogger("k2.clickhouse_endpoint")

PASSWORD_ENV = "K2_CLICKHOUSE_PASSWORD"


def _flag(value: str | None) -> bool:
    """A boolean URL parameter, as Poco's getParsed<bool> reads it."""
    return (value or "").strip().lower() in ("1", "true")


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


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Form fields (query, param_*, settings) and files (external tables) of a form post."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, bytes] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", "", header="content-disposition"))
        payload = part.get_payload(decode=True) or b""
        if name and part.get_filename() is None:
            fields[name] = payload
        elif name:
            files[name] = payload
    return fields, files


# ------------------------------------------------------------------------------------------
# The HTTP handler

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

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # each query is logged once, without its URL (which may hold a password)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        params = parse_url_params(url.query)
        if url.path in ("/ping", "/replicas_status") or (
                url.path == "/" and method != "POST" and "query" not in params):
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
        if self.command != "HEAD":
            self.wfile.write(body)

    def _run_query(self, method: str, params: dict[str, bytes]) -> None:
        started = time.monotonic()
        query_id = (text(params.get("query_id", b"")) or self.headers.get("X-ClickHouse-Query-Id")
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
                if request.decompress:
                    verify = not _flag(request.settings.get(
                        "http_native_compression_disable_checksumming_on_decompress"))
                    chunks = decompress_blocks(chunks, verify)
            engine = self.server.engine
            with engine.connection(request.session) as conn:
                # From here on the server writes through the query's output: with compress=1,
                # an error message is framed like the data.
                response.framed = request.compress
                execution = QueryExecution(engine, conn, request, response, chunks)
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

    def _parse_request(self, method: str, raw: dict[str, bytes],
                       body: RequestBody | None) -> QueryRequest:
        user = self._authenticate({name: text(raw[name]) for name in ("user", "password")
                                   if name in raw})
        files: dict[str, bytes] = {}
        multipart = self.headers.get("Content-Type", "").startswith("multipart/form-data")
        if multipart and body is not None:
            fields, files = parse_multipart(self.headers["Content-Type"], b"".join(body.chunks()))
            raw = {**raw, **fields}
        params = {name: text(value) for name, value in raw.items()}
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
        session = None
        if params.get("session_id"):
            timeout = params.get("session_timeout", str(DEFAULT_SESSION_TIMEOUT))
            if not timeout.isdigit() or int(timeout) > MAX_SESSION_TIMEOUT:
                raise ClickHouseError("INVALID_SESSION_TIMEOUT",
                                      f"Invalid session timeout: '{timeout}'")
            session = SessionRequest(params["session_id"], float(timeout),
                                     params.get("session_check") == "1",
                                     params.get("close_session") == "1")
        revision = 0
        if "client_protocol_version" in params:
            revision = parse_revision(params["client_protocol_version"])
        # Enforced by statement class, not by SET readonly, which a session could never undo.
        read_only = method != "POST" or settings.pop("readonly", "0") not in ("0", "")
        compress = _flag(settings.get("enable_http_compression", "0"))
        accept = self.headers.get("Accept-Encoding", "")
        return QueryRequest(
            method=method, user=user, read_only=read_only, query=raw.get("query", b""),
            settings=settings, query_params=query_params,
            database=self.headers.get("X-ClickHouse-Database") or params.get("database") or None,
            default_format=(self.headers.get("X-ClickHouse-Format") or params.get("default_format")
                            or "TabSeparated"),
            wait_end_of_query=_flag(params.get("wait_end_of_query")),
            response_encoding=next((e for e in RESPONSE_ENCODERS if e in accept), None)
            if compress else None,
            session=session, external_tables=files, external_params=external_params,
            # Multipart bodies are form data, never framed (the server reads them raw too).
            compress=_flag(params.get("compress")),
            decompress=_flag(params.get("decompress")) and not multipart,
            revision=revision,
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


# ------------------------------------------------------------------------------------------
# Server and command line

class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up a shutdown
    # clickhouse-server's listen_backlog; socketserver's 5 drops the SYNs of a burst of new
    # connections, each then retried a second later by the client's TCP
    request_queue_size = 4096
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
