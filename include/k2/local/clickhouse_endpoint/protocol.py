"""ClickHouse's HTTP protocol as text: errors and their HTTP status, URL parameters, just enough
SQL lexing to find an INSERT's data and a result's format, and the framing of result formats."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

DEFAULT_MAX_QUERY_SIZE = 262_144  # ClickHouse's max_query_size: the statement must fit in it

# URL parameters the server consumes itself; every other one is a setting (HTTPHandler.cpp).
RESERVED_PARAMS = frozenset({
    "query", "database", "default_format", "compress", "decompress", "user", "password",
    "quota_key", "query_id", "stacktrace", "role", "buffer_size", "wait_end_of_query",
    "session_id", "session_timeout", "session_check", "client_protocol_version", "close_session",
})
# A multipart request describes its external tables in <name>_structure / _types / _format.
EXTERNAL_TABLE_SUFFIXES = ("_format", "_types", "_structure")
SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# The ClickHouse errors this package raises itself; chDB's own carry code and name in their text.
ERROR_NAMES = {
    33: "CANNOT_READ_ALL_DATA", 39: "TOO_LARGE_SIZE_COMPRESSED", 40: "CHECKSUM_DOESNT_MATCH",
    48: "NOT_IMPLEMENTED", 62: "SYNTAX_ERROR", 72: "CANNOT_PARSE_NUMBER", 115: "UNKNOWN_SETTING",
    164: "READONLY", 246: "CORRUPTED_DATA", 271: "CANNOT_DECOMPRESS", 354: "ZLIB_INFLATE_FAILED",
    358: "INTO_OUTFILE_NOT_ALLOWED", 372: "SESSION_NOT_FOUND", 373: "SESSION_IS_LOCKED",
    374: "INVALID_SESSION_TIMEOUT", 381: "HTTP_LENGTH_REQUIRED", 432: "UNKNOWN_CODEC",
    516: "AUTHENTICATION_FAILED", 561: "ZSTD_DECODER_FAILED", 618: "LZ4_DECODER_FAILED",
    1001: "STD_EXCEPTION",
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
# chDB's text: "Code: N. DB::Exception: <message>. (NAME)", some paths (the streaming insert)
# followed by the server's " (version X.Y.Z.W)", which the response adds once of its own.
_ENGINE_ERROR = re.compile(r"Code: (\d+)\. DB::Exception: (.*?)(?: \(([A-Z][A-Z0-9_]+)\))?"
                           r"(?: \(version [^()]*\))?\s*\Z", re.S)


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


def parse_url_params(query_string: str) -> dict[str, bytes]:
    """The URL's parameters with their values as the bytes sent: a query or a parameter value
    may hold bytes that are not UTF-8, and ClickHouse takes them as they are. Names are text;
    the first of a repeated name wins, as in Poco's HTMLForm.get."""
    params: dict[str, bytes] = {}
    for pair in query_string.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        key = unquote_to_bytes(name.replace("+", " ")).decode("utf-8", "replace")
        params.setdefault(key, unquote_to_bytes(value.replace("+", " ")))
    return params


def text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------
# Reading SQL just far enough to find where an INSERT's data starts and which format a result
# is in. A small lexer (strings, quoted names, comments, brackets) keeps words inside literals
# or column lists from being taken for clauses; chDB does the real parsing. As ClickHouse's
# Lexer, `$tag$ ... $tag$` is a heredoc only where it is closed; otherwise `$` is part of a
# name (`{$x$:String}` is a query parameter).

_TOKEN = re.compile(
    rb"""(?P<space>\s+)
    |(?P<comment>--[^\n]*|\#[!\s][^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z))
    |(?P<quoted>"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    |(?P<heredoc>\$(?P<tag>[^$]*)\$.*?\$(?P=tag)\$)
    |(?P<word>[A-Za-z_$\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
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

    statement: bytes  # without its FORMAT clause, as chDB's send_insert takes it
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
            return InlineInsert(sql[:token.start], "Values", token.end)
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
    return InlineInsert(sql[:keyword.start].rstrip() + settings, name.name, end)


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
    format_span: tuple[int, int] | None = None  # where `FORMAT <name>` stands in the text

    def without_format(self, sql: bytes) -> bytes:
        """The statement without its FORMAT clause and trailing `;`, to describe its result."""
        if self.format_span is not None:
            sql = sql[:self.format_span[0]] + sql[self.format_span[1]:]
        return sql.strip().rstrip(b";").rstrip()


def shape_of(sql: bytes) -> QueryShape:
    top: list[Token] = []  # the tokens outside brackets
    depth = 0
    for token in _tokens(sql):
        if token.text in _CLOSE:
            depth -= 1
        elif depth == 0:
            top.append(token)
        depth += token.text in _OPEN
    output_format, span = None, None
    for i in range(len(top) - 1):
        rest = top[i + 2:]
        if (top[i].word == "FORMAT" and top[i + 1].kind in ("word", "quoted")
                and (i == 0 or top[i - 1].text != b".")
                and (not rest or rest[0].word == "SETTINGS" or rest[0].text == b";")):
            output_format, span = top[i + 1].name, (top[i].start, top[i + 1].end)
    words = [token.word for token in top]
    outfile = any(a == "INTO" and b == "OUTFILE" for a, b in zip(words, words[1:]))
    first = words[0] if words else ""
    return QueryShape(first or ("(" if top else ""), output_format, outfile, span)


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# ------------------------------------------------------------------------------------------
# Output framing. chDB's streaming fetch returns each chunk as a complete output of its own,
# so only formats whose outputs concatenate are streamed; Arrow streams are re-framed.

CONCATENABLE_FORMATS = frozenset(name.lower() for name in (
    "Native", "RowBinary", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "Raw", "CSV",
    "JSONEachRow", "JSONLines", "NDJSON", "JSONCompactEachRow", "JSONStringsEachRow",
    "JSONCompactStringsEachRow", "CustomSeparated", "LineAsString", "ArrowStream",
))
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class ArrowStreamJoiner:
    """Makes one Arrow IPC stream of several: the first schema, every batch, one end mark."""

    def __init__(self) -> None:
        self._schema: bytes | None = None

    def feed(self, chunk: bytes, rows: int | None = None) -> bytes:
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
    def feed(self, chunk: bytes, rows: int | None = None) -> bytes:
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
