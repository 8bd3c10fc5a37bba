"""Compression, both ways: HTTP's Content-Encoding, and ClickHouse's own block framing.

ClickHouse's framing (`compress=1` for a response, `decompress=1` for a request body; the
official JDBC driver asks for the former by default) is the native protocol's, as
CompressedWriteBuffer writes and CompressedReadBuffer reads it. Each block is

    16 bytes  CityHash128 (v1.0.2) of the next 9 + n bytes, as two little-endian UInt64
     1 byte   method: 0x82 LZ4, 0x90 ZSTD, 0x02 none
     4 bytes  UInt32 LE, compressed size including these 9 header bytes (9 + n)
     4 bytes  UInt32 LE, decompressed size
     n bytes  payload: an LZ4 block, a ZSTD frame, or the data itself

The server compresses responses with LZ4, the default codec, in blocks of at most 1 MiB of
data (DBMS_DEFAULT_BUFFER_SIZE), and reads requests with allow_different_codecs = false.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from .protocol import ClickHouseError

# ------------------------------------------------------------------------------------------
# HTTP compression. A response is one frame, flushed per chunk, so that a streaming client
# decodes as data arrives (clickhouse-connect decodes lz4 with a single frame decoder).


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
RESPONSE_ENCODERS: dict[str, Callable[[int], Any]] = {
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
# ClickHouse's block framing

METHOD_NONE, METHOD_LZ4, METHOD_ZSTD = 0x02, 0x82, 0x90
CHECKSUM_SIZE, HEADER_SIZE = 16, 9
BLOCK_DATA_SIZE = 1 << 20  # DBMS_DEFAULT_BUFFER_SIZE: CompressedWriteBuffer's block
MAX_COMPRESSED_SIZE = 0x40000000  # DBMS_MAX_COMPRESSED_SIZE
_MASK64 = (1 << 64) - 1
_HEADER = struct.Struct("<BII")


def block_checksum(block: bytes | memoryview) -> bytes:
    """CityHash128 v1.0.2 of a block (method byte onwards), as ClickHouse stores it: the
    uint128's first then second half, each little-endian. clickhouse-cityhash returns the
    pair as one integer, first half high."""
    from clickhouse_cityhash.cityhash import CityHash128

    value = CityHash128(bytes(block))
    return struct.pack("<QQ", value >> 64, value & _MASK64)


def compress_block(data: bytes | memoryview, method: int = METHOD_LZ4) -> bytes:
    """One framed block of `data` (at most BLOCK_DATA_SIZE bytes, as the server writes)."""
    if method == METHOD_LZ4:
        import lz4.block

        payload = lz4.block.compress(data, store_size=False)
    elif method == METHOD_ZSTD:
        import zstandard

        payload = zstandard.ZstdCompressor(level=1).compress(data)
    elif method == METHOD_NONE:
        payload = bytes(data)
    else:
        raise ValueError(f"no compression method 0x{method:02x}")
    block = _HEADER.pack(method, HEADER_SIZE + len(payload), len(data)) + payload
    return block_checksum(block) + block


class BlockEncoder:
    """Frames response data as CompressedWriteBuffer does: LZ4 blocks of up to 1 MiB. Each
    write goes out as whole blocks, so that a streamed result reaches the client as it comes."""

    def encode(self, data: bytes) -> bytes:
        view = memoryview(data)
        return b"".join(compress_block(view[offset:offset + BLOCK_DATA_SIZE])
                        for offset in range(0, len(view), BLOCK_DATA_SIZE))

    def finish(self) -> bytes:
        return b""


def decompress_blocks(chunks: Iterator[bytes], verify_checksums: bool = True) -> Iterator[bytes]:
    """The data of a framed request body (`decompress=1`), block by block, with the checks
    and the errors of CompressedReadBufferBase."""
    buffer = bytearray()
    method: int | None = None
    chunks = iter(chunks)
    exhausted = False

    def fill(size: int) -> bool:
        nonlocal exhausted
        while len(buffer) < size and not exhausted:
            part = next(chunks, None)
            if part is None:
                exhausted = True
            else:
                buffer.extend(part)
        return len(buffer) >= size

    while fill(1):
        if not fill(CHECKSUM_SIZE + HEADER_SIZE):
            raise _short_read(len(buffer), CHECKSUM_SIZE + HEADER_SIZE)
        block_method, size, data_size = _HEADER.unpack_from(buffer, CHECKSUM_SIZE)
        if block_method not in (METHOD_NONE, METHOD_LZ4, METHOD_ZSTD):
            raise ClickHouseError("UNKNOWN_CODEC", f"Unknown codec family code: {block_method} "
                                  "(this endpoint reads 130 LZ4, 144 ZSTD and 2 NONE)")
        if method is not None and block_method != method:
            raise ClickHouseError("CANNOT_DECOMPRESS", "Data compressed with different methods, "
                                  f"given method byte 0x{block_method:02x}, previous method byte "
                                  f"0x{method:02x}")
        method = block_method
        if size > MAX_COMPRESSED_SIZE:
            raise ClickHouseError("TOO_LARGE_SIZE_COMPRESSED", "Too large "
                                  f"size_compressed_without_checksum: {size}. Most likely "
                                  "corrupted data.")
        if size < HEADER_SIZE:
            raise ClickHouseError("CORRUPTED_DATA", "Can't decompress data: the compressed data "
                                  f"size ({size}, this should include header size) is less than "
                                  f"the header size ({HEADER_SIZE})")
        if not fill(CHECKSUM_SIZE + size):
            raise _short_read(len(buffer) - CHECKSUM_SIZE - HEADER_SIZE, size - HEADER_SIZE)
        block = memoryview(buffer)[CHECKSUM_SIZE:CHECKSUM_SIZE + size]
        try:
            if verify_checksums:
                _verify(bytes(buffer[:CHECKSUM_SIZE]), block)
            data = _decompress(block_method, block[HEADER_SIZE:], data_size)
        finally:
            block.release()
        del buffer[:CHECKSUM_SIZE + size]
        if data:
            yield data


def _verify(expected: bytes, block: memoryview) -> None:
    actual = block_checksum(block)
    if actual != expected:
        halves = (expected[:8], expected[8:]), (actual[:8], actual[8:])
        reference, computed = ("".join(f"{int.from_bytes(h, 'little'):016x}" for h in pair)
                               for pair in halves)
        raise ClickHouseError("CHECKSUM_DOESNT_MATCH", "Checksum doesn't match: corrupted data. "
                              f"Reference: {reference}. Actual: {computed}. Size of compressed "
                              f"block: {len(block)}")


def _decompress(method: int, payload: memoryview, size: int) -> bytes:
    try:
        if method == METHOD_NONE:
            data = bytes(payload)
        elif method == METHOD_LZ4:
            import lz4.block

            data = lz4.block.decompress(payload, uncompressed_size=size)
        else:
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(bytes(payload), max_output_size=size)
    except Exception as exc:  # lz4.block.LZ4BlockError, zstandard.ZstdError
        name = "LZ4" if method == METHOD_LZ4 else "ZSTD"
        raise ClickHouseError("CANNOT_DECOMPRESS",
                              f"Cannot decompress {name}-encoded data: {exc}") from None
    if len(data) != size:
        raise ClickHouseError("CANNOT_DECOMPRESS", f"Cannot decompress: the block holds "
                              f"{len(data)} bytes, its header says {size}")
    return data


def _short_read(got: int, expected: int) -> ClickHouseError:
    return ClickHouseError("CANNOT_READ_ALL_DATA", f"Cannot read all data. Bytes read: {got}. "
                           f"Bytes expected: {expected}.")
