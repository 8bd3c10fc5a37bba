"""The chDB-backed ClickHouse HTTP endpoint, driven by an unmodified clickhouse-connect client.

The endpoint runs as a real subprocess, exactly as `k2 local up` starts it.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import http.client
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

pytestmark = pytest.mark.integration

USER = "k2"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    password: str
    process: subprocess.Popen

    def client(self, **kwargs):
        return clickhouse_connect.get_client(
            host=self.host, port=self.port, username=self.user, password=self.password, **kwargs
        )

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(data_path: Path, port: int, password: str, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "k2.local.clickhouse_endpoint", "--host", "127.0.0.1",
         "--port", str(port), "--data-path", str(data_path), "--user", USER,
         "--log-file", str(log_file)],
        env={**os.environ, "K2_CLICKHOUSE_PASSWORD": password},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _start(data_path: Path, log_file: Path, password: str | None = None) -> Endpoint:
    """Start the endpoint as `k2 local up` does and wait for its ready line."""
    password = password or secrets.token_urlsafe(12)
    port = _free_port()
    process = _launch(data_path, port, password, log_file)
    deadline = time.monotonic() + 30
    line = ""
    while not line and time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline()
    if line != f"ready 127.0.0.1:{port}\n":
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"endpoint did not get ready: stdout {line!r}, stderr {err!r}")
    return Endpoint("127.0.0.1", port, USER, password, process)


def _stop(endpoint: Endpoint) -> int:
    endpoint.process.send_signal(signal.SIGTERM)
    code = endpoint.process.wait(timeout=30)
    endpoint.process.stdout.close()
    endpoint.process.stderr.close()
    return code


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ch_endpoint")
    server = _start(root / "data", root / "endpoint.log")
    yield server
    assert _stop(server) == 0


@pytest.fixture(scope="module")
def client(endpoint: Endpoint):
    client = endpoint.client()
    yield client
    client.close()


def _http(endpoint: Endpoint, path: str, data: bytes | None = None, headers: dict | None = None,
          auth: bool = True):
    request = urllib.request.Request(endpoint.url(path), data=data, headers=headers or {})
    if auth:
        token = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_ping_and_root_answer_ok(endpoint: Endpoint) -> None:
    assert _http(endpoint, "/ping", auth=False)[::2] == (200, b"Ok.\n")
    assert _http(endpoint, "/", auth=False)[::2] == (200, b"Ok.\n")
    # HEAD, as load balancers probe: headers only, and the connection stays usable
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=30)
    try:
        conn.request("HEAD", "/ping")
        head = conn.getresponse()
        assert (head.status, head.getheader("Content-Length"), head.read()) == (200, "4", b"")
        conn.request("GET", "/ping")
        assert conn.getresponse().read() == b"Ok.\n"
    finally:
        conn.close()


def test_server_identity_as_the_client_sees_it(client) -> None:
    assert client.server_version.split(".")[0].isdigit()
    assert client.command("SELECT timezone()") == "UTC"
    assert client.command("SELECT 1") == 1


def test_typed_round_trip_with_insert_and_insert_arrow(client) -> None:
    client.command("DROP TABLE IF EXISTS typed")
    client.command(
        "CREATE TABLE typed (ts DateTime64(3, 'UTC'), amount Decimal(38, 18), "
        "venue LowCardinality(String), qty Nullable(Int64), tags Array(String), id UInt64, "
        "ok Bool) ENGINE = MergeTree ORDER BY id"
    )
    when = dt.datetime(2024, 3, 1, 12, 30, 45, 123000, tzinfo=dt.timezone.utc)
    later = when + dt.timedelta(days=1)
    big, tiny = Decimal("12345678901234567890.123456789012345678"), Decimal("-1E-18")
    rows = [
        [when, big, "binance", None, ["a", "it's"], 2**64 - 1, True],
        [later, tiny, "kraken", -42, [], 0, False],
    ]
    summary = client.insert("typed", rows)
    assert summary.written_rows == 2

    arrow_table = client.query_arrow("SELECT * FROM typed ORDER BY id")
    client.command("TRUNCATE TABLE typed")
    client.insert_arrow("typed", arrow_table)

    result = client.query("SELECT * FROM typed ORDER BY id DESC")
    assert result.column_names == ("ts", "amount", "venue", "qty", "tags", "id", "ok")
    got = result.result_rows
    assert [r[0].replace(tzinfo=dt.timezone.utc) for r in got] == [when, later]
    assert [r[1:] for r in got] == [tuple(row[1:]) for row in rows]
    types = dict(zip(result.column_names, (t.name for t in result.column_types)))
    assert types["venue"] == "LowCardinality(String)"
    assert types["ts"] == "DateTime64(3, 'UTC')"


def test_a_million_rows_through_native_arrow_and_arrow_stream(client) -> None:
    expected = 999_999 * 1_000_000 // 2
    sql = "SELECT number AS n, toString(number) AS s FROM numbers(1000000)"
    assert sum(client.query("SELECT number FROM numbers(1000000)").result_columns[0]) == expected
    table = client.query_arrow(sql)
    assert table.num_rows == 1_000_000
    rows = total = 0
    with client.query_arrow_stream(sql) as stream:
        for batch in stream:
            rows += batch.num_rows
            total += sum(batch.column(0).to_pylist())
    assert (rows, total) == (1_000_000, expected)


def test_query_df(client) -> None:
    frame = client.query_df("SELECT number AS n FROM numbers(10)")
    assert frame["n"].sum() == 45


def test_command_ddl_and_summary(client) -> None:
    client.command("DROP TABLE IF EXISTS cmd")
    client.command("CREATE TABLE cmd (x UInt8) ENGINE = MergeTree ORDER BY x")
    summary = client.command("INSERT INTO cmd SELECT number FROM numbers(7)")
    assert summary.written_rows == 7
    assert client.command("SELECT count() FROM cmd") == 7
    assert client.command("SELECT 'a', 'b'") == ["a", "b"]
    assert client.command("EXISTS TABLE cmd") == 1


def test_server_side_parameters(client) -> None:
    nasty = "it's a \"quote\", a back\\slash and a\ttab"
    result = client.query(
        "SELECT {x:UInt64} + 1 AS x, {s:String} AS s, length({s:String}) AS n",
        parameters={"x": 41, "s": nasty},
    )
    assert result.result_rows == [(42, nasty, len(nasty))]


def test_settings_pass_through_and_unknown_settings_are_refused(client) -> None:
    probe = "SELECT getSetting('max_threads')"
    assert client.query(probe, settings={"max_threads": 3}).result_rows == [(3,)]
    assert client.command(probe, settings={"max_threads": 2}) == 2
    with pytest.raises(DatabaseError) as error:
        client.query("SELECT 1", settings={"no_such_setting_anywhere": 1})
    assert error.value.code == 115  # UNKNOWN_SETTING, as ClickHouse reports it


def test_session_keeps_its_own_settings(endpoint: Endpoint) -> None:
    session = endpoint.client()
    try:
        session.command("SET max_threads = 5")
        assert session.command("SELECT getSetting('max_threads')") == 5
        # A per-query setting applies to that query only
        probe = "SELECT getSetting('max_threads')"
        assert session.command(probe, settings={"max_threads": 1}) == 1
        assert session.command("SELECT getSetting('max_threads')") == 5
        session.command("CREATE TEMPORARY TABLE scratch (x UInt8)")
        session.command("INSERT INTO scratch VALUES (1), (2)")
        assert session.command("SELECT count() FROM scratch") == 2
        # The next request of a session may follow the moment a response is read, even a
        # stream the client stops reading at Arrow's end mark: the session must be free by then
        for _ in range(20):
            with session.query_arrow_stream("SELECT number FROM numbers(10)") as stream:
                assert sum(batch.num_rows for batch in stream) == 10
            assert session.command("SELECT 1") == 1
    finally:
        session.close()
    other = endpoint.client()
    try:
        assert other.command("SELECT getSetting('max_threads')") != 5
    finally:
        other.close()


def test_eight_concurrent_clients_insert_and_read(endpoint: Endpoint) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            own = endpoint.client()
            table = f"concurrent_{worker}"
            own.command(f"DROP TABLE IF EXISTS {table}")
            own.command(f"CREATE TABLE {table} (id UInt64, v String) "
                        "ENGINE = MergeTree ORDER BY id")
            for batch in range(5):
                rows = [[batch * 1000 + i, f"w{worker}"] for i in range(1000)]
                own.insert(table, rows, column_names=["id", "v"])
                assert own.command(f"SELECT count() FROM {table}") == (batch + 1) * 1000
            assert own.query(f"SELECT sum(id) FROM {table}").result_rows == [(sum(range(5000)),)]
            own.close()
        except BaseException as exc:  # collected and asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors


def test_bad_sql_is_reported_like_clickhouse_and_the_next_query_works(endpoint, client) -> None:
    with pytest.raises(DatabaseError) as error:
        client.query("SELEC 1")
    assert "Code: 62" in str(error.value) and "SYNTAX_ERROR" in str(error.value)
    assert error.value.code == 62
    status, headers, body = _http(endpoint, "/", data=b"SELECT * FROM no_such_table")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "60")
    assert body.startswith(b"Code: 60. DB::Exception:") and b"(UNKNOWN_TABLE)" in body
    assert client.command("SELECT 2") == 2


def test_get_is_read_only_and_multi_statements_are_refused(endpoint: Endpoint) -> None:
    status, headers, _ = _http(endpoint, "/?query=CREATE+TABLE+nope+(x+UInt8)+ENGINE=Memory")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "164")
    status, headers, _ = _http(endpoint, "/", data=b"SELECT 1; SELECT 2")
    assert headers["X-ClickHouse-Exception-Code"] == "62"
    assert _http(endpoint, "/?query=SELECT+21*2")[::2] == (200, b"42\n")


def test_wrong_password_is_refused(endpoint: Endpoint) -> None:
    with pytest.raises(DatabaseError) as error:
        clickhouse_connect.get_client(host=endpoint.host, port=endpoint.port,
                                      username=endpoint.user, password="not-the-password")
    assert "516" in str(error.value) and "Authentication failed" in str(error.value)
    status, headers, _ = _http(endpoint, "/?query=SELECT+1", auth=False)
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (403, "516")


@pytest.mark.parametrize("compress", [False, "lz4", "zstd", "gzip"])
def test_insert_and_query_with_each_compression(endpoint: Endpoint, compress) -> None:
    own = endpoint.client(compress=compress)
    table = f"compressed_{compress or 'none'}"
    own.command(f"DROP TABLE IF EXISTS {table}")
    own.command(f"CREATE TABLE {table} (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    own.insert(table, [[i, "x" * (i % 50)] for i in range(20_000)], column_names=["id", "s"])
    expected = [(20_000, sum(range(20_000)))]
    assert own.query(f"SELECT count(), sum(id) FROM {table}").result_rows == expected
    own.close()


def test_http_compressed_bodies_and_text_formats(endpoint: Endpoint) -> None:
    import gzip

    import lz4.frame
    import zstandard

    own = endpoint.client()
    own.command("CREATE TABLE raw_bodies (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    bodies = {
        "gzip": gzip.compress(b"INSERT INTO raw_bodies FORMAT TabSeparated\n1\tone\n2\ttwo\n"),
        # data on the statement's line: it starts after the blanks, as on the server
        "lz4": lz4.frame.compress(
            b'INSERT INTO raw_bodies FORMAT JSONEachRow {"id": 3, "s": "three"}'),
        "zstd": zstandard.ZstdCompressor().compress(b"INSERT INTO raw_bodies VALUES (4, 'fo''ur')"),
    }
    for encoding, body in bodies.items():
        status, headers, _ = _http(endpoint, "/", data=body, headers={"Content-Encoding": encoding})
        assert status == 200, encoding
        assert '"written_rows":"' in headers["X-ClickHouse-Summary"]
    assert own.query("SELECT id, s FROM raw_bodies ORDER BY id").result_rows == [
        (1, "one"), (2, "two"), (3, "three"), (4, "fo'ur")]
    # Response compression is negotiated as on the server: Accept-Encoding + enable_http_compression
    status, headers, body = _http(endpoint, "/?enable_http_compression=1", data=b"SELECT 'hello'",
                                  headers={"Accept-Encoding": "gzip"})
    assert (status, headers.get("Content-Encoding")) == (200, "gzip")
    assert gzip.decompress(body) == b"hello\n"
    own.close()


def test_broken_requests_never_take_the_server_down(endpoint: Endpoint, client) -> None:
    # Garbage under a compression header
    status, headers, _ = _http(endpoint, "/", data=b"definitely not lz4",
                               headers={"Content-Encoding": "lz4"})
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "618"
    # Garbage binary data for a Native insert
    client.command("CREATE TABLE IF NOT EXISTS garbage (x UInt64) ENGINE = MergeTree ORDER BY x")
    garbage = b"INSERT INTO garbage FORMAT Native\n\xff\xfe\x00\x01garbage"
    status, headers, _ = _http(endpoint, "/", data=garbage)
    assert status >= 400 and "X-ClickHouse-Exception-Code" in headers
    # A client that goes away in the middle of a large streamed result
    with socket.create_connection((endpoint.host, endpoint.port)) as sock:
        token = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode()
        query = b"SELECT number, toString(number) FROM numbers(50000000) FORMAT TabSeparated"
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + token.encode()
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(query) + query)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # An error after data was already streamed reaches the client as an error, not as short data:
    # in Native with ClickHouse's own message, in Arrow as a broken stream (as with the server).
    failing = "SELECT throwIf(number = 900000, 'boom') AS x FROM numbers(1000000)"
    with pytest.raises(DatabaseError, match="boom"):
        with client.query_column_block_stream(failing) as stream:
            for _ in stream:
                pass
    with pytest.raises(Exception):
        with client.query_arrow_stream(failing) as stream:
            for _ in stream:
                pass
    assert client.command("SELECT count() FROM garbage") == 0
    assert client.command("SELECT 3") == 3
    assert endpoint.process.poll() is None


def test_restart_on_the_same_data_path_keeps_rows(tmp_path: Path) -> None:
    first = _start(tmp_path / "data", tmp_path / "first.log")
    client = first.client()
    client.command("CREATE TABLE kept (id UInt64) ENGINE = MergeTree ORDER BY id")
    client.insert("kept", [[i] for i in range(1234)], column_names=["id"])
    client.close()
    assert _stop(first) == 0

    second = _start(tmp_path / "data", tmp_path / "second.log", password=first.password)
    try:
        again = second.client()
        assert again.command("SELECT count() FROM kept") == 1234
        again.close()
    finally:
        assert _stop(second) == 0
    assert first.password not in (tmp_path / "first.log").read_text()


def test_a_taken_port_fails_fast_with_a_message_naming_it(endpoint, tmp_path: Path) -> None:
    started = time.monotonic()
    process = _launch(tmp_path / "data", endpoint.port, "pw", tmp_path / "taken.log")
    out, err = process.communicate(timeout=20)
    assert process.returncode != 0
    assert time.monotonic() - started < 10
    assert out == ""
    assert f"{endpoint.port}" in err and "already in use" in err


# ------------------------------------------------------------------------------------------
# Fidelity to clickhouse-server's HTTP protocol beyond what clickhouse-connect uses by default

_MASK64 = (1 << 64) - 1


def _frames(body: bytes) -> list[tuple[int, int, bytes]]:
    """ClickHouse's block framing, read here independently of the endpoint's code: (method,
    decompressed size, data) per block, every CityHash128 checksum checked."""
    import lz4.block
    from clickhouse_cityhash.cityhash import CityHash128

    frames, pos = [], 0
    while pos < len(body):
        method, size, data_size = struct.unpack_from("<BII", body, pos + 16)
        block = body[pos + 16:pos + 16 + size]
        checksum = CityHash128(block)
        assert body[pos:pos + 16] == struct.pack("<QQ", checksum >> 64, checksum & _MASK64)
        assert method == 0x82  # LZ4, the server's default codec
        data = lz4.block.decompress(block[9:], uncompressed_size=data_size)
        frames.append((method, data_size, data))
        pos += 16 + size
    return frames


def test_compress_1_frames_results_and_errors_in_checksummed_lz4_blocks(endpoint) -> None:
    query = b"SELECT number FROM numbers(300000) FORMAT RowBinary"
    expected = b"".join(struct.pack("<Q", n) for n in range(300_000))
    status, headers, body = _http(endpoint, "/?compress=1", data=query)
    assert status == 200 and "Content-Encoding" not in headers
    frames = _frames(body)
    assert b"".join(data for _, _, data in frames) == expected
    assert len(frames) >= 3 and max(size for _, size, _ in frames) <= 1 << 20  # 1 MiB blocks
    # Under HTTP compression the framed stream is what gets gzipped, as on the server
    status, headers, body = _http(endpoint, "/?compress=1&enable_http_compression=1", data=query,
                                  headers={"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    assert b"".join(data for _, _, data in _frames(gzip.decompress(body))) == expected
    # An error of the query goes through the query's output: framed too
    status, headers, body = _http(endpoint, "/?compress=1", data=b"SELECT * FROM no_such_table")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "60")
    assert _frames(body)[0][2].startswith(b"Code: 60. DB::Exception:")


def test_decompress_1_reads_blocks_the_engine_itself_compressed(endpoint, client) -> None:
    """The column files of a MergeTree part are the same framing, written by the engine: a
    UInt64 column's file is RowBinary of that column, in ZSTD, NONE and LZ4 blocks."""
    client.command("DROP TABLE IF EXISTS framed_src")
    client.command(
        "CREATE TABLE framed_src (zstd UInt64 CODEC(ZSTD(1)), none UInt64 CODEC(NONE), "
        "lz4 UInt64 CODEC(LZ4)) ENGINE = MergeTree ORDER BY tuple() "
        "SETTINGS min_bytes_for_wide_part = 0, min_rows_for_wide_part = 0")
    client.command("INSERT INTO framed_src SELECT number, number * 2, number * 3 "
                   "FROM numbers(100000)")
    part = Path(client.command("SELECT path FROM system.parts WHERE table = 'framed_src' "
                               "AND database = currentDatabase() AND active"))
    files = {codec: (part / f"{codec}.bin").read_bytes() for codec in ("zstd", "none", "lz4")}
    assert {codec: data[16] for codec, data in files.items()} == {
        "zstd": 0x90, "none": 0x02, "lz4": 0x82}
    client.command("CREATE TABLE IF NOT EXISTS framed_dst (x UInt64) ENGINE = Memory")

    def insert(body: bytes, settings: str = ""):
        client.command("TRUNCATE TABLE framed_dst")
        query = "INSERT+INTO+framed_dst+FORMAT+RowBinary"
        return _http(endpoint, f"/?query={query}&decompress=1{settings}", data=body)

    total = sum(range(100_000))
    for factor, codec in enumerate(("zstd", "none", "lz4"), start=1):
        assert insert(files[codec])[0] == 200, codec
        assert client.query("SELECT count(), sum(x) FROM framed_dst").result_rows == [
            (100_000, factor * total)], codec
    # A flipped bit in a payload: the checksum catches it and nothing is inserted
    corrupt = bytearray(files["lz4"])
    corrupt[16 + 9 + 100] ^= 0x01
    status, headers, body = insert(bytes(corrupt))
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "40")
    assert b"Checksum doesn't match" in body and b"(CHECKSUM_DOESNT_MATCH)" in body
    assert client.command("SELECT count() FROM framed_dst") == 0
    # A broken checksum passes where the client turned checksumming off, as on the server
    unchecked = bytearray(files["lz4"])
    unchecked[0] ^= 0xFF
    setting = "&http_native_compression_disable_checksumming_on_decompress=1"
    assert insert(bytes(unchecked), setting)[0] == 200
    assert client.command("SELECT count() FROM framed_dst") == 100_000
    # One request, one method (allow_different_codecs = false); truncation is reported
    status, headers, body = insert(files["zstd"] + files["none"])
    assert headers["X-ClickHouse-Exception-Code"] == "271" and b"different methods" in body
    status, headers, _ = insert(files["lz4"][:-10])
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "33")


def test_client_protocol_version_shapes_native_output(endpoint) -> None:
    query = (b"SELECT toDateTime(0, 'Asia/Tokyo') AS d, 'x' AS s, toDateTime(7, 'UTC') AS u "
             b"FORMAT Native")
    stamp, seven = b"\x00\x00\x00\x00", b"\x07\x00\x00\x00"

    def column(name: bytes, type_name: bytes, extra: bytes, data: bytes) -> bytes:
        return bytes([len(name)]) + name + bytes([len(type_name)]) + type_name + extra + data

    def expected(info: bytes, with_zone: bool, extra: bytes) -> bytes:
        zone, utc = ((b"DateTime('Asia/Tokyo')", b"DateTime('UTC')") if with_zone
                     else (b"DateTime", b"DateTime"))
        return (info + b"\x03\x01" + column(b"d", zone, extra, stamp)
                + column(b"s", b"String", extra, b"\x01x") + column(b"u", utc, extra, seven))

    block_info = b"\x01\x00\x02\xff\xff\xff\xff\x00"
    cases = {  # revision: what clickhouse-server writes for it (NativeWriter)
        "": expected(b"", False, b""),  # revision 0: no block info, no time zones
        "54405": expected(block_info, True, b""),  # clickhouse-connect's
        "54460": expected(block_info, True, b"\x00"),  # + "has custom serialization" = 0
    }
    for revision, native in cases.items():
        url = f"/?client_protocol_version={revision}" if revision else "/"
        assert _http(endpoint, url, data=query)[::2] == (200, native), revision
    status, headers, _ = _http(endpoint, "/?client_protocol_version=new", data=query)
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (400, "72")


def test_clickhouse_connect_reads_native_at_its_protocol_version(client) -> None:
    """clickhouse-connect probes the parameter and then reads block infos and time zones; the
    DateTime comes last, after columns whose data the endpoint must walk to reach its header
    (nested LowCardinality put their key versions before the column's data)."""
    assert client.protocol_version == 54405
    result = client.query(
        "SELECT toString(number) AS s, "
        "[toString(number), NULL]::Array(LowCardinality(Nullable(String))) AS arr, "
        "toLowCardinality(if(number % 3 = 0, NULL, toString(number % 5))) AS lc, "
        "map('k', toString(number % 7))::Map(String, LowCardinality(String)) AS m, "
        "tuple(toUInt8(number % 9), 'z')::Tuple(a UInt8, b LowCardinality(String)) AS t, "
        "toDecimal128(number, 18) / 7 AS dec, toDateTime(number * 3600, 'Asia/Tokyo') AS d "
        "FROM numbers(5000) SETTINGS max_block_size = 1000")
    assert result.column_types[-1].name == "DateTime('Asia/Tokyo')"
    tokyo = dt.timezone(dt.timedelta(hours=9))
    for i, row in enumerate(result.result_rows):
        assert row[:5] == (str(i), [str(i), None], None if i % 3 == 0 else str(i % 5),
                           {"k": str(i % 7)}, {"a": i % 9, "b": "z"}), i
        assert row[6] == dt.datetime.fromtimestamp(i * 3600, tokyo), i
    assert len(result.result_rows) == 5000
    # A column the endpoint cannot measure (Dynamic) ends the walk of its block: the rest goes
    # out as chDB wrote it, readable, the DateTime after it without its zone (as at revision 0)
    opaque = client.query("SELECT number::Dynamic AS dyn, toDateTime(number, 'Asia/Tokyo') AS d "
                          "FROM numbers(3000) SETTINGS max_block_size = 1000")
    assert [t.name for t in opaque.column_types] == ["Dynamic", "DateTime"]
    assert [row[0] for row in opaque.result_rows] == list(range(3000))
    # `$x$` is a name here, not a heredoc: the FORMAT clause after it still counts
    assert client.query("SELECT {$x$:String} AS v", parameters={"$x$": "user_1"}).first_row == (
        "user_1",)


def test_the_query_reaches_the_engine_as_the_bytes_sent(endpoint) -> None:
    assert _http(endpoint, "/", data=b"SELECT hex('\xff\xfe'), length('\xff\xfe')")[::2] == (
        200, b"FFFE\t2\n")
    assert _http(endpoint, "/?query=SELECT+hex(%27%FF%27)")[::2] == (200, b"FF\n")


def test_query_parameters_in_insert_values(endpoint, client) -> None:
    client.command("CREATE TABLE IF NOT EXISTS params_values (id UInt64, s String) "
                   "ENGINE = MergeTree ORDER BY id")
    client.command("TRUNCATE TABLE params_values")
    client.command("INSERT INTO params_values VALUES ({id:UInt64}, {s:String}), (2, 'two')",
                   parameters={"id": 1, "s": "it's {one}"})
    status, _, _ = _http(endpoint, "/?param_id=3&param_s=thr%C3%A9e",
                         data=b"INSERT INTO params_values VALUES\n({id:UInt64}, {s:String})")
    assert status == 200
    assert client.query("SELECT id, s FROM params_values ORDER BY id").result_rows == [
        (1, "it's {one}"), (2, "two"), (3, "thrée")]


def test_insert_errors_carry_clickhouse_status_and_exception_name(endpoint, client) -> None:
    """Errors of the streaming inserter come with the engine's own " (version ...)"; the
    answer is ClickHouse's: the status of the exception, its name, one version suffix."""
    client.command("CREATE TABLE IF NOT EXISTS insert_errors (id UInt64, s String) "
                   "ENGINE = MergeTree ORDER BY id")
    bad = {
        b"INSERT INTO insert_errors FORMAT TabSeparated\nnot-a-number\tx\n":
            (400, "27", b"(CANNOT_PARSE_INPUT_ASSERTION_FAILED)"),
        b"INSERT INTO insert_errors VALUES (1, 'a', 3)": (400, "62", b"(SYNTAX_ERROR)"),
    }
    for sql, (want_status, code, name) in bad.items():
        status, headers, body = _http(endpoint, "/", data=sql)
        assert (status, headers["X-ClickHouse-Exception-Code"]) == (want_status, code), sql
        assert body.count(name) == 1 and body.count(b"(version ") == 1, body
    assert client.command("SELECT count() FROM insert_errors") == 0


def test_a_burst_of_new_connections_is_queued_not_dropped(endpoint: Endpoint) -> None:
    """Like clickhouse-server's listen_backlog: while the server is not accepting (stopped
    here), the kernel completes the handshakes of a burst of clients. With socketserver's
    default backlog of 5, the others' SYNs are dropped and retried only a second later."""
    burst: list[socket.socket] = []
    endpoint.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(32):
            # A queued handshake completes at once; a dropped SYN is retried after 1 s.
            burst.append(socket.create_connection((endpoint.host, endpoint.port), timeout=0.9))
    finally:
        endpoint.process.send_signal(signal.SIGCONT)
    token = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode()
    for number, sock in enumerate(burst):
        with sock:
            sock.settimeout(30)
            query = b"SELECT %d" % number
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                         b"Basic " + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(query)
                         + query)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and b"\r\n%d\n\r\n" % number in answer
