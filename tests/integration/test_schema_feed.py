"""The hot-tier data model and the feed simulator against real ClickHouse (through clickhouse-connect).

One hour of seed-1 trades fills bronze, the views fill silver and the six gold
widths; every candle is recomputed independently from silver rows in Python with
exact Decimal arithmetic. The same hour is then inserted again, into a second
database, in many small batches: the candles must not change.
"""

from __future__ import annotations

import decimal
import re
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from k2.feed import (
    BINANCE_TABLE,
    FEED_TABLES,
    KRAKEN_TABLE,
    FeedState,
    TradeGenerator,
    history_batches,
    insert_batch,
    resolve_assets,
    run_feed,
)
from k2.schema import (
    FINAL_VIEWS,
    GOLD_WIDTH_SECONDS,
    GOLD_WIDTHS,
    TABLE_NAMES,
    apply_schema,
    object_name,
    schema_statements,
    split_statements,
)

pytestmark = pytest.mark.integration

SEED = 1
# Not aligned to anything: the hour starts and ends inside minutes, hours and a day.
END = datetime(2026, 3, 2, 10, 17, 30, 250000, tzinfo=timezone.utc)
HISTORY = timedelta(hours=1)
END_MS = int(END.timestamp() * 1000)
START_MS = END_MS - int(HISTORY.total_seconds() * 1000)
SMALL_BATCH_ROWS = 1_000

FINAL_COLUMNS = [
    ("exchange", "LowCardinality(String)"),
    ("symbol", "LowCardinality(String)"),
    ("window_start", "DateTime64(3, 'UTC')"),
    ("window_end", "DateTime64(3, 'UTC')"),
    ("open", "Decimal(38, 18)"),
    ("high", "Decimal(38, 18)"),
    ("low", "Decimal(38, 18)"),
    ("close", "Decimal(38, 18)"),
    ("volume", "Decimal(38, 18)"),
    ("quote_volume", "Decimal(38, 18)"),
    ("trade_count", "UInt64"),
    ("vwap", "Decimal(38, 18)"),
]
CANDLE_QUERY = (
    "SELECT exchange, symbol, toUnixTimestamp64Milli(window_start), toUnixTimestamp64Milli(window_end), "
    "open, high, low, close, volume, quote_volume, trade_count, vwap "
    "FROM {view} ORDER BY exchange, symbol, window_start"
)
SCALE = Decimal(1).scaleb(-18)


def _other_database(stack, ch_client, suffix: str):
    """A client on a fresh database next to the module's one."""
    name = f"{ch_client.database}_{suffix}"
    ch_client.command(f"DROP DATABASE IF EXISTS {name}")
    ch_client.command(f"CREATE DATABASE {name}")
    return name, stack.clickhouse_client(database=name)


@pytest.fixture(scope="module")
def schema_names(ch_client) -> list[str]:
    return apply_schema(ch_client)


@pytest.fixture(scope="module")
def fed(ch_client, schema_names):
    started = time.monotonic()
    stats = run_feed(ch_client, history=HISTORY, rate=None, seed=SEED, end=END, progress=None)
    return stats, time.monotonic() - started


@pytest.fixture(scope="module")
def silver_rows(ch_client, fed) -> list[tuple]:
    return ch_client.query(
        "SELECT exchange, symbol, trade_id, toUnixTimestamp64Milli(event_time), price, quantity, "
        "quote_quantity FROM silver_trades"
    ).result_rows


# --------------------------------------------------------------------------- schema
def test_schema_file_is_portable_and_idempotent_by_construction() -> None:
    statements = schema_statements()
    names = [object_name(s) for s in statements]  # each is CREATE ... IF NOT EXISTS <name>
    assert len(names) == len(set(names)) == 9 + 2 + 6 * 2
    assert set(TABLE_NAMES) <= set(names)
    sql = "\n".join(statements)
    assert not re.search(r"\bFloat(32|64)?\b", sql, re.IGNORECASE), "money stays Decimal"
    assert not re.search(r"\bREFRESH\b|WHEN\s+NOT\s+MATCHED", sql, re.IGNORECASE), "24.3 syntax only"
    assert not re.search(r"\b\w+\.(bronze|silver|gold)_", sql), "no hard-coded database"
    assert split_statements("SELECT ';' -- a; comment\n; /* ; */ SELECT 'it''s', '\\\\1;'") == [
        "SELECT ';'",
        "SELECT 'it''s', '\\\\1;'",
    ]


def test_apply_schema_is_idempotent(ch_client, schema_names) -> None:
    again = apply_schema(ch_client)
    assert again == schema_names
    assert set(TABLE_NAMES) <= set(schema_names)
    engines = dict(
        ch_client.query(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
        ).result_rows
    )
    assert set(engines) == set(schema_names)
    assert engines["bronze_trades_binance"] == engines["bronze_trades_kraken"] == "MergeTree"
    assert engines["silver_trades"] == "MergeTree"
    for width in GOLD_WIDTHS:
        assert engines[f"gold_ohlcv_{width}"] == "AggregatingMergeTree"
        assert engines[f"gold_ohlcv_{width}_mv"] == "MaterializedView"
        assert engines[f"gold_ohlcv_{width}_final"] == "View"


@pytest.mark.parametrize("view", sorted(FINAL_VIEWS.values()))
def test_final_views_expose_the_contract_columns(ch_client, schema_names, view: str) -> None:
    columns = [(r[0], r[1]) for r in ch_client.query(f"DESCRIBE TABLE {view}").result_rows]
    assert columns == FINAL_COLUMNS


def test_bronze_and_silver_columns(ch_client, schema_names) -> None:
    def describe(table: str) -> dict[str, tuple[str, str, str]]:
        return {r[0]: (r[1], r[2], r[3]) for r in ch_client.query(f"DESCRIBE TABLE {table}").result_rows}

    binance = describe("bronze_trades_binance")
    assert binance["price"][0] == binance["quantity"][0] == "Decimal(38, 18)"
    assert binance["is_buyer_maker"][0] == "Bool"
    assert binance["event_time"][:2] == ("DateTime64(3, 'UTC')", "DEFAULT")
    kraken = describe("bronze_trades_kraken")
    assert kraken["trade_time"][0] == "Decimal(20, 6)"
    assert kraken["event_time"][:2] == ("DateTime64(3, 'UTC')", "DEFAULT")
    silver = describe("silver_trades")
    assert list(silver) == [
        "exchange", "symbol", "trade_id", "event_time", "price", "quantity", "quote_quantity",
        "side", "source_sequence_number", "ingested_at",
    ]
    assert silver["quote_quantity"][0] == "Decimal(38, 18)"


# --------------------------------------------------------------------------- feed -> all tables
def test_feed_fills_every_table(ch_client, fed) -> None:
    stats, _ = fed
    counts = {t: ch_client.command(f"SELECT count() FROM {t}") for t in FEED_TABLES}
    assert counts == stats.rows
    assert all(n > 0 for n in counts.values())
    assert counts[BINANCE_TABLE] > 5 * counts[KRAKEN_TABLE]
    silver = ch_client.command("SELECT count() FROM silver_trades")
    assert silver == sum(counts.values())
    for view in FINAL_VIEWS.values():
        assert ch_client.command(f"SELECT count() FROM {view}") > 0, view
    lo, hi = ch_client.query(
        "SELECT toUnixTimestamp64Milli(min(event_time)), toUnixTimestamp64Milli(max(event_time)) "
        "FROM silver_trades"
    ).result_rows[0]
    assert START_MS <= lo and hi < END_MS


def test_silver_normalizes_both_exchanges(ch_client, fed) -> None:
    symbols = {
        tuple(r) for r in ch_client.query("SELECT DISTINCT exchange, symbol FROM silver_trades").result_rows
    }
    expected = {(ex, sym) for a in resolve_assets(None) for ex, sym in a.silver_symbols.items()}
    assert symbols == expected
    assert ("kraken", "BTC-USD") in symbols and ("kraken", "DOGE-USD") in symbols

    # side: the taker's; binance is_buyer_maker=true means the taker sold
    binance_sells = ch_client.command(f"SELECT countIf(is_buyer_maker) FROM {BINANCE_TABLE}")
    kraken_sells = ch_client.command(f"SELECT countIf(side = 's') FROM {KRAKEN_TABLE}")
    silver_sells = dict(
        ch_client.query("SELECT exchange, countIf(side = 'sell') FROM silver_trades GROUP BY exchange").result_rows
    )
    assert silver_sells == {"binance": binance_sells, "kraken": kraken_sells}

    # kraken: quote_quantity = price * volume (exact here: the scales add up to < 18),
    # event_time = trade_time truncated to milliseconds; one silver row per bronze row
    bronze = {
        (trade_id, pair): (price, volume, trade_time, seq)
        for trade_id, pair, price, volume, trade_time, seq in ch_client.query(
            f"SELECT trade_id, pair, price, volume, trade_time, sequence_number FROM {KRAKEN_TABLE}"
        ).result_rows
    }
    pairs = {a.silver_symbols["kraken"]: a.kraken_pair for a in resolve_assets(None)}
    silver = ch_client.query(
        "SELECT trade_id, symbol, quote_quantity, toUnixTimestamp64Milli(event_time), source_sequence_number "
        "FROM silver_trades WHERE exchange = 'kraken'"
    ).result_rows
    assert len(silver) == len(bronze)
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        for trade_id, symbol, quote, event_ms, seq in silver:
            price, volume, trade_time, bronze_seq = bronze[(trade_id, pairs[symbol])]
            assert quote == (price * volume).quantize(SCALE, rounding=decimal.ROUND_DOWN)
            assert event_ms == int(trade_time * 1000)
            assert seq == bronze_seq


# --------------------------------------------------------------------------- gold == independent computation
def _candles_from_silver(rows: list[tuple], width_s: int) -> dict[tuple, tuple]:
    """Exact OHLCV per (exchange, symbol, window_start_ms) from silver rows, in plain Python."""
    width_ms = width_s * 1000
    groups: dict[tuple, list] = {}
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        for exchange, symbol, trade_id, ms, price, qty, quote in rows:
            key = (exchange, symbol, ms - ms % width_ms)
            g = groups.get(key)
            order = (ms, trade_id)
            if g is None:
                groups[key] = [order, price, price, price, order, price, qty, quote, 1]
                continue
            if order < g[0]:
                g[0], g[1] = order, price
            if price > g[2]:
                g[2] = price
            if price < g[3]:
                g[3] = price
            if order > g[4]:
                g[4], g[5] = order, price
            g[6] += qty
            g[7] += quote
            g[8] += 1
        return {
            key: (key[2] + width_ms, g[1], g[2], g[3], g[5], g[6], g[7], g[8],
                  (g[7] / g[6]).quantize(SCALE, rounding=decimal.ROUND_DOWN))
            for key, g in groups.items()
        }


def _gold(client, view: str) -> dict[tuple, tuple]:
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in client.query(CANDLE_QUERY.format(view=view)).result_rows}


@pytest.mark.parametrize("width", GOLD_WIDTHS)
def test_gold_candles_equal_an_independent_computation(ch_client, silver_rows, width: str) -> None:
    expected = _candles_from_silver(silver_rows, GOLD_WIDTH_SECONDS[width])
    actual = _gold(ch_client, f"gold_ohlcv_{width}_final")
    assert actual.keys() == expected.keys()
    for key, exp in expected.items():
        act = actual[key]
        # window_end, open, high, low, close, volume, quote_volume, trade_count: exact
        assert act[:8] == exp[:8], (width, key)
        for value in act[1:7]:
            assert isinstance(value, Decimal)
        # vwap: quote_volume / volume at scale 18 (ClickHouse truncates; allow one unit)
        assert abs(act[8] - exp[8]) <= SCALE, (width, key, act[8], exp[8])
    # every silver row is in exactly one candle of each width
    assert sum(v[7] for v in actual.values()) == len(silver_rows)


# --------------------------------------------------------------------------- batching
def test_many_small_batches_give_the_same_candles(stack, ch_client, fed) -> None:
    name, client = _other_database(stack, ch_client, "small")
    try:
        apply_schema(client)
        generator = TradeGenerator(SEED, state=FeedState.from_clickhouse(client, resolve_assets(None)))
        inserts = 0
        for batch in history_batches(generator, START_MS, END_MS):
            longest = max(batch.rows.values())
            for start in range(0, longest, SMALL_BATCH_ROWS):
                insert_batch(client, batch.slice(start, start + SMALL_BATCH_ROWS))
                inserts += 1
        # every hour bucket got dozens of partial aggregate states (the big-batch run: a few)
        assert inserts >= 100

        # the same seed, end and history generated the very same bronze rows
        for table in FEED_TABLES:
            cols = ch_client.query(
                "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
                "AND name != 'ingested_at' ORDER BY position",
                parameters={"t": table},
            ).result_columns[0]
            digest = f"SELECT count(), sum(cityHash64({', '.join(cols)})) FROM {table}"
            assert client.query(digest).result_rows == ch_client.query(digest).result_rows, table

        for width in GOLD_WIDTHS:
            view = f"gold_ohlcv_{width}_final"
            assert _gold(client, view) == _gold(ch_client, view), width
    finally:
        client.close()
        ch_client.command(f"DROP DATABASE IF EXISTS {name}")


# --------------------------------------------------------------------------- restart + live
def test_restart_continues_ids_and_live_mode_writes_now(stack, ch_client) -> None:
    name, client = _other_database(stack, ch_client, "live")
    try:
        apply_schema(client)
        first = run_feed(client, history=timedelta(minutes=5), rate=None, seed=5, progress=None)
        before = dict(client.query(f"SELECT symbol, max(trade_id) FROM {BINANCE_TABLE} GROUP BY symbol").result_rows)
        max_seq = {t: client.command(f"SELECT max(sequence_number) FROM {t}") for t in FEED_TABLES}
        lines: list[str] = []
        started_ms = int(time.time() * 1000)
        live = run_feed(
            client, history=None, rate=200.0, seed=5, duration=timedelta(seconds=3), progress=lines.append
        )
        assert live.total_rows > 100 and not live.interrupted
        assert any("rows/s" in line for line in lines)
        assert 2.5 < live.seconds < 10
        # ids and sequence numbers continue above what was there (the same seed would repeat them)
        new = client.query(
            f"SELECT symbol, min(trade_id) FROM {BINANCE_TABLE} WHERE ingested_at >= "
            "fromUnixTimestamp64Milli({t:Int64}, 'UTC') GROUP BY symbol",
            parameters={"t": started_ms},
        ).result_rows
        assert new and all(min_id > before[symbol] for symbol, min_id in new)
        for table in FEED_TABLES:
            seqs = client.query(
                f"SELECT count(), uniqExact(sequence_number), min(sequence_number) FROM {table}"
            ).result_rows[0]
            assert seqs[0] == seqs[1] and seqs[2] == 1, table
        assert client.command(f"SELECT max(sequence_number) FROM {BINANCE_TABLE}") > max_seq[BINANCE_TABLE]
        # live event times are about now and reach silver and gold
        lag_ms = client.command(
            "SELECT toUnixTimestamp64Milli(now64(3)) - toUnixTimestamp64Milli(max(event_time)) FROM silver_trades"
        )
        assert -2_000 < lag_ms < 5_000
        total = client.command("SELECT count() FROM silver_trades")
        assert total == first.total_rows + live.total_rows
        assert client.command("SELECT sum(trade_count) FROM gold_ohlcv_1m_final") == total
        # small inserts about every second, not one big one (now64() is fixed per insert)
        inserts = client.command(
            f"SELECT uniqExact(ingested_at) FROM {BINANCE_TABLE} "
            "WHERE ingested_at >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')",
            parameters={"t": started_ms},
        )
        assert inserts >= 2
    finally:
        client.close()
        ch_client.command(f"DROP DATABASE IF EXISTS {name}")
