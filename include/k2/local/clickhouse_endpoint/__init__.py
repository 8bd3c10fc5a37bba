"""A ClickHouse HTTP endpoint on loopback, served by chDB (the ClickHouse engine as a library).

No ClickHouse server binary can be installed here, so the local stack runs this instead. It
speaks the HTTP interface the way clickhouse-server does (its HTTPHandler.cpp is the model), so
unmodified clients (clickhouse-connect, and with it all project code; the official JDBC driver
with its default settings) work against it:

* the query is the `query` URL parameter, a newline, then the (decompressed) body, passed to
  the engine as the bytes received; the other URL parameters are settings, except
  `param_<name>` (query parameters, also inside `INSERT ... VALUES`) and the transport
  parameters ClickHouse reserves;
* `INSERT ... FORMAT <fmt>` / `VALUES` with data after the statement streams the data into
  chDB's streaming inserter; bodies may be lz4, zstd, gzip, deflate, xz or bz2 compressed
  (Content-Encoding), and/or in ClickHouse's own block framing (`decompress=1`);
* results of reads stream with chunked encoding where the format allows it, compressed as
  negotiated by Accept-Encoding + enable_http_compression, and/or block-framed (`compress=1`);
* Native results follow `client_protocol_version` (block infos, DateTime time zones);
* errors carry ClickHouse's code, name, text and HTTP status; an error after data went out is
  written as the tagged `__exception__` block of clickhouse-server 25.11+;
* `session_id` keeps one chDB connection (its SET, USE, temporary tables) per session.

    K2_CLICKHOUSE_PASSWORD=... python -m k2.local.clickhouse_endpoint \\
        --host 127.0.0.1 --port 8123 --data-path DIR --user k2 [--log-file F]

stdout carries one line, "ready <host>:<port>", once connections are accepted. What it
implements and what a stand-in cannot have: docs/clickhouse-endpoint.md.

Modules: `protocol` (errors, URL parameters, SQL lexing, result framing), `codecs` (HTTP
compression and ClickHouse's block framing), `native` (Native for a client's protocol
revision), `sessions` (the engine and its connections), `execution` (one statement),
`responses` (response shape and encodings), `server` (HTTP handler, server, command line).
"""

from .codecs import (
    BlockEncoder,
    block_checksum,
    compress_block,
    decompress_blocks,
    decompress_chunks,
)
from .execution import QueryExecution, QueryRequest, read_head
from .native import NativeReviser, parse_revision
from .protocol import (
    ARROW_EOS,
    CODES,
    DEFAULT_MAX_QUERY_SIZE,
    ERROR_NAMES,
    RESERVED_PARAMS,
    ArrowStreamJoiner,
    ClickHouseError,
    InlineInsert,
    PassThroughJoiner,
    QueryShape,
    content_type_for,
    find_inline_insert,
    parse_url_params,
    quote_identifier,
    quote_string,
    shape_of,
    summary_header,
)
from .responses import Response
from .server import (
    PASSWORD_ENV,
    ClickHouseHandler,
    EndpointServer,
    RequestBody,
    log,
    main,
    parse_multipart,
)
from .sessions import Connection, Engine, SessionRequest, SessionState

__all__ = [
    "ARROW_EOS", "CODES", "DEFAULT_MAX_QUERY_SIZE", "ERROR_NAMES", "PASSWORD_ENV",
    "RESERVED_PARAMS", "ArrowStreamJoiner", "BlockEncoder", "ClickHouseError",
    "ClickHouseHandler", "Connection", "EndpointServer", "Engine", "InlineInsert",
    "NativeReviser", "PassThroughJoiner", "QueryExecution", "QueryRequest", "QueryShape",
    "RequestBody", "Response", "SessionRequest", "SessionState", "block_checksum",
    "compress_block", "content_type_for", "decompress_blocks", "decompress_chunks",
    "find_inline_insert", "log", "main", "parse_multipart", "parse_revision",
    "parse_url_params", "quote_identifier", "quote_string", "read_head", "shape_of",
    "summary_header",
]
