"""The Native format for a client that names its protocol version (`client_protocol_version`).

Over HTTP, clickhouse-server writes Native for the revision the client gives (NativeWriter):

* revision > 0: each block starts with its BlockInfo (is_overflows, bucket_num);
* revision < 54337: a top-level `DateTime('tz')` is named plain `DateTime`, which is also
  what revision 0, the default, gets;
* revision >= 54454: each column's type is followed by a "has custom serialization" byte;
* 0 < revision < 54405: LowCardinality is sent as its plain type (refused here);
* revision >= 54473: JSON and Dynamic data in their V2 serialization (refused here).

chDB always writes revision 0. This module turns that into the client's revision: it walks
each block column by column (the data lengths come from the types), adds what the revision
adds, and puts back the time zone of `DateTime` columns, which it gets from a DESCRIBE of the
statement. clickhouse-connect asks for revision 54405 once a probe shows the server honours
the parameter (it then reads block infos and `DateTime('UTC')`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from functools import lru_cache

from .protocol import ClickHouseError

REVISION_WITH_TIME_ZONE_IN_DATETIME = 54337
REVISION_WITH_LOW_CARDINALITY = 54405
REVISION_WITH_CUSTOM_SERIALIZATION = 54454
REVISION_WITH_V2_DYNAMIC_AND_JSON = 54473
MAX_REVISION = 0xFFFF_FFFF_FFFF_FFFF

# BlockInfo::write: field 1 is_overflows = false, field 2 bucket_num = -1, field 0 ends it.
BLOCK_INFO = b"\x01\x00\x02\xff\xff\xff\xff\x00"

_FIXED_WIDTH = {
    **dict.fromkeys(("UInt8", "Int8", "Bool", "Enum8", "Nothing"), 1),
    **dict.fromkeys(("UInt16", "Int16", "Date", "Enum16", "BFloat16"), 2),
    **dict.fromkeys(("UInt32", "Int32", "Float32", "Date32", "DateTime", "IPv4", "Decimal32",
                     "Time"), 4),
    **dict.fromkeys(("UInt64", "Int64", "Float64", "DateTime64", "Decimal64", "Time64"), 8),
    **dict.fromkeys(("UInt128", "Int128", "UUID", "IPv6", "Decimal128"), 16),
    **dict.fromkeys(("UInt256", "Int256", "Decimal256"), 32),
}
_GEO = {"Point": "Tuple(Float64, Float64)", "Ring": "Array(Point)", "LineString": "Array(Point)",
        "MultiLineString": "Array(LineString)", "Polygon": "Array(Ring)",
        "MultiPolygon": "Array(Polygon)"}
# A type not measured below (AggregateFunction, Variant, Dynamic, JSON, ...) ends the walk of
# its block: the rest goes out as chDB wrote it where it can (see NativeReviser._block).
_VERSIONED_DATA = ("Object", "JSON", "Dynamic")  # V1 vs V2 serialization by revision


class UnsupportedType(Exception):
    """A column whose data length cannot be worked out here."""


def parse_revision(value: str) -> int:
    """client_protocol_version is read as UInt64, as the server does."""
    if not value.isdigit() or int(value) > MAX_REVISION:
        raise ClickHouseError("CANNOT_PARSE_NUMBER",
                              f"Cannot parse client_protocol_version: '{value}'")
    return int(value)


# ------------------------------------------------------------------------------------------
# Type names

class TypeNode:
    __slots__ = ("name", "args")

    def __init__(self, name: str, args: list[str]) -> None:
        self.name, self.args = name, args

    def __repr__(self) -> str:
        return f"TypeNode({self.name!r}, {self.args!r})"


_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*")


@lru_cache(maxsize=1024)
def parse_type(text: str) -> TypeNode:
    match = _NAME.match(text)
    if not match:
        raise UnsupportedType(text)
    rest = text[match.end():]
    if not rest:
        return TypeNode(match[1], [])
    if not (rest.startswith("(") and rest.rstrip().endswith(")")):
        raise UnsupportedType(text)
    return TypeNode(match[1], split_arguments(rest.rstrip()[1:-1]))


def split_arguments(text: str) -> list[str]:
    """Split `a, b(c, d), 'e,f'` at the commas outside brackets and quotes."""
    args, depth, start, quote, i = [], 0, 0, "", 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'`\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    if text.strip():
        args.append(text[start:].strip())
    return args


def element_type(arg: str) -> str:
    """The type of a Tuple element, which may be named: `name Type`, `` `a b` Type``."""
    arg = arg.strip()
    if arg.startswith("`"):
        end = arg.find("`", 1)
        while end != -1 and arg[end + 1:end + 2] == "`":
            end = arg.find("`", end + 2)
        return arg[end + 1:].strip()
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*\s+(?=\S)", arg)
    return arg[match.end():] if match else arg


def mentions(type_name: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{name}\b", type_name) for name in names)


# ------------------------------------------------------------------------------------------
# Measuring column data

_U64 = struct.Struct("<Q")
# IndexesSerializationType: NeedGlobalDictionaryBit | NeedUpdateDictionary, HasAdditionalKeysBit
_GLOBAL_DICTIONARY_UPDATE, _HAS_ADDITIONAL_KEYS = 1 << 8 | 1 << 10, 1 << 9


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def write_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def skip_column(type_name: str, buf: bytes, pos: int, rows: int) -> int:
    """Where the Native data of `rows` values of `type_name` starting at `pos` ends.

    NativeWriter writes a column's serialization state prefixes first, for the whole type
    (a LowCardinality's key version, wherever it is nested), then the data."""
    if rows == 0:  # zero rows: no bytes at all, not even the prefixes
        return pos
    return _skip_data(type_name, buf, pos + 8 * _low_cardinality_count(type_name), rows)


@lru_cache(maxsize=1024)
def _low_cardinality_count(type_name: str) -> int:
    """How many LowCardinality the type holds (each writes an 8-byte prefix)."""
    node = parse_type(type_name)
    if node.name == "LowCardinality":
        return 1
    if node.name in ("Array", "Nullable", "Map", "Nested", "Tuple"):
        return sum(_low_cardinality_count(element_type(arg)) for arg in node.args)
    if node.name == "SimpleAggregateFunction":
        return _low_cardinality_count(node.args[-1])
    if node.name in _GEO:
        return _low_cardinality_count(_GEO[node.name])
    return 0


def _skip_data(type_name: str, buf: bytes, pos: int, rows: int) -> int:
    node = parse_type(type_name)
    name, args = node.name, node.args
    if rows == 0:
        return pos
    if name in _FIXED_WIDTH:
        return pos + rows * _FIXED_WIDTH[name]
    if name.startswith("Interval"):  # IntervalSecond, ...: Int64
        return pos + rows * 8
    if name == "Decimal":
        precision = int(args[0])
        width = 4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32
        return pos + rows * width
    if name == "String":
        return _skip_strings(buf, pos, rows)
    if name == "FixedString":
        return pos + rows * int(args[0])
    if name == "Nullable":
        return _skip_data(args[0], buf, pos + rows, rows)
    if name in ("Array", "Map", "Nested"):
        total = _U64.unpack_from(buf, pos + rows * 8 - 8)[0]
        inner = (args[0] if name == "Array" else f"Tuple({', '.join(args)})")
        return _skip_data(inner, buf, pos + rows * 8, total)
    if name == "Tuple":
        for arg in args:
            pos = _skip_data(element_type(arg), buf, pos, rows)
        return pos
    if name == "LowCardinality":
        return _skip_low_cardinality(args[0], buf, pos, rows)
    if name == "SimpleAggregateFunction":
        return _skip_data(args[-1], buf, pos, rows)
    if name in _GEO:
        return _skip_data(_GEO[name], buf, pos, rows)
    raise UnsupportedType(type_name)


def _skip_strings(buf: bytes, pos: int, rows: int) -> int:
    for _ in range(rows):
        size = buf[pos]
        if size < 0x80:
            pos += 1 + size
        else:
            size, pos = read_varint(buf, pos)
            pos += size
    if pos > len(buf):
        raise IndexError("string data runs past the block")
    return pos


def _skip_low_cardinality(inner: str, buf: bytes, pos: int, rows: int) -> int:
    """SerializationLowCardinality's data (its key version went with the prefixes): granules
    of (index type flags, [dictionary keys], indexes) until all rows are covered."""
    keys_type = inner
    node = parse_type(inner)
    if node.name == "Nullable":
        keys_type = node.args[0]
    done = 0
    while done < rows:
        flags = _U64.unpack_from(buf, pos)[0]
        pos += 8
        if flags & _GLOBAL_DICTIONARY_UPDATE == _GLOBAL_DICTIONARY_UPDATE:
            keys = _U64.unpack_from(buf, pos)[0]
            pos = _skip_data(keys_type, buf, pos + 8, keys)
        if flags & _HAS_ADDITIONAL_KEYS:
            keys = _U64.unpack_from(buf, pos)[0]
            pos = _skip_data(keys_type, buf, pos + 8, keys)
        count = _U64.unpack_from(buf, pos)[0]
        pos += 8 + count * (1 << (flags & 0xFF))
        done += count
        if count == 0:
            break
    return pos


# ------------------------------------------------------------------------------------------
# Rewriting

class NativeReviser:
    """Rewrites chDB's revision-0 Native output, one complete output (one or more whole
    blocks) at a time, for the client's revision. `describe` returns the full type names of
    the result's columns (None if unknown); it is called at most once, when a top-level
    `DateTime` may have lost its time zone."""

    def __init__(self, revision: int, describe: Callable[[], list[str] | None]) -> None:
        self.revision = revision
        self._describe = describe
        self._described: list[str] | None = None
        self._asked = False
        self._seen: list[str] | None = None  # chDB's type names, once a block was walked whole
        # Every header changes (custom serialization byte) or must be checked (LowCardinality
        # for old clients): no block can be copied before its last column.
        self._walk_all = not (REVISION_WITH_LOW_CARDINALITY <= revision
                              < REVISION_WITH_CUSTOM_SERIALIZATION)

    def feed(self, chunk: bytes, rows: int | None = None) -> bytes:
        """`rows`: how many rows the chunk holds, if known. With it, the last block's data
        after the last column that changes is copied without being walked."""
        if self.revision == 0 or not chunk:
            return chunk
        out = bytearray()
        pos = 0
        try:
            while pos < len(chunk):
                pos, block_rows = self._block(chunk, pos, out, rows)
                if rows is not None:
                    rows -= block_rows
        except UnsupportedType as exc:
            raise ClickHouseError(
                "NOT_IMPLEMENTED", f"client_protocol_version {self.revision}: this endpoint "
                f"cannot re-frame Native data of type {exc}; leave client_protocol_version out "
                "(revision 0) to read it") from None
        except (IndexError, ValueError, struct.error):
            raise ClickHouseError("STD_EXCEPTION", "Native output of the engine does not parse "
                                  "as its column types say") from None
        return bytes(out)

    def finish(self) -> bytes:
        return b""

    def _block(self, chunk: bytes, pos: int, out: bytearray,
               rows_left: int | None) -> tuple[int, int]:
        columns, pos = read_varint(chunk, pos)
        rows, pos = read_varint(chunk, pos)
        out += BLOCK_INFO + write_varint(columns) + write_varint(rows)
        last = rows_left is not None and rows == rows_left and rows > 0
        seen: list[str] = []
        for index in range(columns):
            pos, type_name = self._column_header(chunk, pos, index, out)
            seen.append(type_name)
            if index == columns - 1:  # every header known: later blocks of the result alike
                self._seen = seen
            if last and not self._changes_after(index, columns):
                out += chunk[pos:]
                return len(chunk), rows
            try:
                end = skip_column(type_name, chunk, pos, rows)
            except UnsupportedType:
                if last and not self._walk_all:
                    # Later headers stay as chDB wrote them: a DateTime there keeps no time
                    # zone (as at revision 0), which beats failing the query.
                    out += chunk[pos:]
                    return len(chunk), rows
                raise
            out += chunk[pos:end]
            pos = end
        return pos, rows

    def _changes_after(self, index: int, columns: int) -> bool:
        """Whether a header after column `index` changes: then this column must be walked."""
        if index == columns - 1:
            return False
        if self._walk_all:
            return True
        if self._seen is not None:
            return "DateTime" in self._seen[index + 1:]
        if self._described is None:
            return True
        return any(name.startswith("DateTime(") for name in self._described[index + 1:])

    def _column_header(self, chunk: bytes, pos: int, index: int,
                       out: bytearray) -> tuple[int, str]:
        """Copy one column's name and type, revised; return where its data starts."""
        start = pos
        size, pos = read_varint(chunk, pos)
        name_end = pos + size
        size, pos = read_varint(chunk, name_end)
        type_name = chunk[pos:pos + size].decode()
        end = pos + size
        self._check(type_name)
        new_type = type_name
        if type_name == "DateTime" and self.revision >= REVISION_WITH_TIME_ZONE_IN_DATETIME:
            described = self._full_types()
            if described and index < len(described) and described[index].startswith("DateTime("):
                new_type = described[index]
        if new_type == type_name:
            out += chunk[start:end]
        else:
            encoded = new_type.encode()
            out += chunk[start:name_end] + write_varint(len(encoded)) + encoded
        if self.revision >= REVISION_WITH_CUSTOM_SERIALIZATION:
            out.append(0)  # default serialization: chDB wrote no sparse columns at revision 0
        return end, type_name

    def _check(self, type_name: str) -> None:
        if self.revision < REVISION_WITH_LOW_CARDINALITY and "LowCardinality" in type_name:
            raise UnsupportedType(f"{type_name} (revision {self.revision} predates "
                                  "LowCardinality)")
        if (self.revision >= REVISION_WITH_V2_DYNAMIC_AND_JSON
                and mentions(type_name, _VERSIONED_DATA)):
            raise UnsupportedType(f"{type_name} (its serialization depends on the revision)")

    def _full_types(self) -> list[str] | None:
        if not self._asked:
            self._asked = True
            self._described = self._describe()
        return self._described
