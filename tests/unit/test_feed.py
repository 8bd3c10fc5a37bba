"""The feed simulator's generation logic, without a database."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pytest

from k2.feed import (
    ASSETS,
    BINANCE_SCHEMA,
    BINANCE_TABLE,
    DEFAULT_SYMBOLS,
    KRAKEN_SCHEMA,
    KRAKEN_TABLE,
    PRICE_SCALE,
    QTY_SCALE,
    QUOTE_SCALE,
    FeedBatch,
    FeedState,
    TradeGenerator,
    feed_tables,
    history_batches,
    insert_batch,
    resolve_assets,
    run_feed,
    units_to_decimal,
    window_bounds,
)

END = datetime(2026, 3, 2, 10, 17, 30, 250000, tzinfo=timezone.utc)
END_MS = int(END.timestamp() * 1000)
HOUR_MS = 3_600_000


def _hour(seed: int = 1, rate: float = 50.0, batch_rows: int = 20_000, hours: float = 1.0) -> FeedBatch:
    gen = TradeGenerator(seed, rate=rate)
    start = END_MS - int(hours * HOUR_MS)
    return FeedBatch.concat(list(history_batches(gen, start, END_MS, batch_rows)))


@pytest.fixture(scope="module")
def hour() -> FeedBatch:
    return _hour()


def _equal(a: FeedBatch, b: FeedBatch) -> bool:
    return all(
        np.array_equal(x[k], y[k])
        for x, y in ((a.binance, b.binance), (a.kraken, b.kraken))
        for k in x
    )


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_trades(hour: FeedBatch) -> None:
    assert _equal(hour, _hour(seed=1))


def test_batching_does_not_change_the_trades(hour: FeedBatch) -> None:
    """Insert batch size only groups minutes; it must not change what is generated."""
    assert _equal(hour, _hour(seed=1, batch_rows=1))
    assert _equal(hour, _hour(seed=1, batch_rows=10_000_000))


def test_other_seed_other_trades(hour: FeedBatch) -> None:
    other = _hour(seed=2)
    assert not np.array_equal(hour.binance["price_units"][:100], other.binance["price_units"][:100])


# --------------------------------------------------------------------------- ids, order, values
def test_trade_ids_strictly_increasing_per_symbol(hour: FeedBatch) -> None:
    for cols, key, time_key in (
        (hour.binance, "symbol_idx", "trade_time_ms"),
        (hour.kraken, "pair_idx", "trade_time_us"),
    ):
        for idx in np.unique(cols[key]):
            mask = cols[key] == idx
            ids = cols["trade_id"][mask].astype(np.int64)
            assert len(ids) > 10
            assert np.all(np.diff(ids) == 1), "ids per symbol are consecutive and increasing"
            assert np.all(np.diff(cols[time_key][mask]) >= 0), "ids follow event time"


def test_sequence_numbers_strictly_increasing_per_table(hour: FeedBatch) -> None:
    for cols in (hour.binance, hour.kraken):
        seq = cols["sequence_number"].astype(np.int64)
        assert seq[0] == 1
        assert np.all(np.diff(seq) == 1)


def test_ids_continue_across_batches_and_from_state() -> None:
    state = FeedState(
        next_binance_id={"BTC": 5_000_000_001},
        next_kraken_id={"BTC": 777},
        next_sequence={BINANCE_TABLE: 1_000, KRAKEN_TABLE: 2_000},
    )
    gen = TradeGenerator(3, symbols=["BTC"], rate=20, state=state)
    first = gen.generate(END_MS - 120_000, END_MS - 60_000)
    second = gen.generate(END_MS - 60_000, END_MS)
    both = FeedBatch.concat([first, second])
    assert both.binance["trade_id"][0] == 5_000_000_001
    assert both.kraken["trade_id"][0] == 777
    assert both.binance["sequence_number"][0] == 1_000
    assert both.kraken["sequence_number"][0] == 2_000
    assert np.all(np.diff(both.binance["trade_id"].astype(np.int64)) == 1)
    assert np.all(np.diff(both.kraken["sequence_number"].astype(np.int64)) == 1)
    assert state.next_binance_id["BTC"] == 5_000_000_001 + both.rows[BINANCE_TABLE]


def test_windows_must_move_forward() -> None:
    gen = TradeGenerator(1)
    gen.generate(END_MS - 60_000, END_MS)
    with pytest.raises(ValueError, match="increasing"):
        gen.generate(END_MS - 120_000, END_MS - 60_000)
    with pytest.raises(ValueError, match="empty window"):
        gen.generate(END_MS, END_MS)


def test_event_times_inside_the_window(hour: FeedBatch) -> None:
    start = END_MS - HOUR_MS
    b_ms = hour.binance["trade_time_ms"]
    k_ms = hour.kraken["trade_time_us"] // 1000
    for ms in (b_ms, k_ms):
        assert ms.min() >= start and ms.max() < END_MS
    assert hour.event_ms_range() == (min(b_ms.min(), k_ms.min()), max(b_ms.max(), k_ms.max()))


def test_prices_sizes_positive_and_exact(hour: FeedBatch) -> None:
    b, k = hour.binance, hour.kraken
    for arr in (b["price_units"], b["qty_units"], b["quote_units"], k["price_units"], k["volume_units"]):
        assert arr.min() > 0
    # Binance quote quantity is exactly price * quantity
    for i in range(0, len(b["trade_id"]), 997):
        price = units_to_decimal(b["price_units"][i], PRICE_SCALE)
        qty = units_to_decimal(b["qty_units"][i], QTY_SCALE)
        assert units_to_decimal(b["quote_units"][i], QUOTE_SCALE) == price * qty


def test_prices_realistic_and_on_the_tick_grid(hour: FeedBatch) -> None:
    levels = {"BTC": (60_000, 100_000), "ETH": (2_000, 4_500), "SOL": (80, 300),
              "DOGE": (0.05, 0.3), "XRP": (0.3, 1.2)}
    for idx, asset in enumerate(hour.assets):
        lo, hi = levels[asset.base]
        for cols, key, decimals in (
            (hour.binance, "symbol_idx", asset.binance_price_decimals),
            (hour.kraken, "pair_idx", asset.kraken_price_decimals),
        ):
            units = cols["price_units"][cols[key] == idx]
            prices = units / 10**PRICE_SCALE
            assert lo <= prices.min() and prices.max() <= hi, asset.base
            assert np.all(units % 10 ** (PRICE_SCALE - decimals) == 0), f"{asset.base} tick size"
            # a random walk: it moves, but by percent within an hour, not by multiples
            assert prices.max() / prices.min() < 1.2
            assert len(np.unique(units)) > 20


def test_both_exchanges_trade_around_the_same_price(hour: FeedBatch) -> None:
    btc = 0
    b = hour.binance["price_units"][hour.binance["symbol_idx"] == btc].mean()
    k = hour.kraken["price_units"][hour.kraken["pair_idx"] == btc].mean()
    assert abs(b / k - 1) < 0.01


def test_sizes_are_log_normal_ish(hour: FeedBatch) -> None:
    b = hour.binance
    notional = b["quote_units"] / 10**QUOTE_SCALE
    median, p99 = np.median(notional), np.percentile(notional, 99)
    assert 50 < median < 1_000
    assert p99 > 10 * median, "heavy right tail"


def test_sides_and_order_types_are_mixed(hour: FeedBatch) -> None:
    assert 0.4 < hour.binance["is_buyer_maker"].mean() < 0.6
    assert 0.4 < hour.kraken["side_buy"].mean() < 0.6
    assert 0.4 < hour.kraken["order_market"].mean() < 0.8


# --------------------------------------------------------------------------- rates and bursts
def test_binance_about_ten_times_busier_than_kraken(hour: FeedBatch) -> None:
    ratio = hour.rows[BINANCE_TABLE] / hour.rows[KRAKEN_TABLE]
    assert 7 < ratio < 14


def test_average_rate_matches_and_bursts_spike() -> None:
    rate, hours = 40.0, 3.0
    batch = _hour(seed=11, rate=rate, hours=hours)
    seconds = hours * 3600
    assert abs(batch.total_rows / seconds / rate - 1) < 0.25
    per_10s = np.bincount((batch.binance["trade_time_ms"] - (END_MS - int(seconds * 1000))) // 10_000)
    assert per_10s.max() > 2.5 * per_10s.mean(), "occasional bursts"
    assert np.median(per_10s) < 1.2 * per_10s.mean(), "but mostly calm"


def test_kraken_share_sets_the_exchanges_split() -> None:
    """The predecessor's day: ~5M Binance trades and ~26k Kraken trades (a share of 0.5 %)."""
    share = 26_000 / 5_026_000
    gen = TradeGenerator(5, rate=60.0, kraken_share=share)
    batch = FeedBatch.concat(list(history_batches(gen, END_MS - 2 * HOUR_MS, END_MS, 50_000)))
    kraken, total = len(batch.kraken["trade_id"]), batch.total_rows
    assert abs(kraken / total / share - 1) < 0.35, (kraken, total)
    with pytest.raises(ValueError, match="kraken_share must be within"):
        TradeGenerator(5, kraken_share=1.5)


def test_busier_assets_trade_more(hour: FeedBatch) -> None:
    counts = np.bincount(hour.binance["symbol_idx"], minlength=len(hour.assets))
    names = [a.base for a in hour.assets]
    assert counts[names.index("BTC")] > counts[names.index("DOGE")]


# --------------------------------------------------------------------------- arrow
def test_arrow_tables_have_the_bronze_types_and_exact_values(hour: FeedBatch) -> None:
    small = hour.slice(0, 50)
    b, k = small.binance_arrow(), small.kraken_arrow()
    assert b.schema == BINANCE_SCHEMA and k.schema == KRAKEN_SCHEMA
    assert b.num_rows == 50 and k.num_rows == 50
    row = b.slice(7, 1).to_pylist()[0]
    assert row["price"] == units_to_decimal(small.binance["price_units"][7], PRICE_SCALE)
    assert row["quote_quantity"] == row["price"] * row["quantity"]
    assert row["symbol"] == small.assets[small.binance["symbol_idx"][7]].binance_symbol
    assert row["is_buyer_maker"] == bool(small.binance["is_buyer_maker"][7])
    krow = k.slice(3, 1).to_pylist()[0]
    assert krow["trade_time"] == Decimal(int(small.kraken["trade_time_us"][3])).scaleb(-6)
    assert krow["side"] in ("b", "s") and krow["order_type"] in ("m", "l")
    assert krow["pair"] in {a.kraken_pair for a in small.assets}
    assert pa.types.is_decimal(k.schema.field("price").type)


def test_window_bounds_cut_at_whole_minutes() -> None:
    windows = list(window_bounds(90_500, 240_000))
    assert windows == [(90_500, 120_000), (120_000, 180_000), (180_000, 240_000)]
    assert list(window_bounds(5, 5)) == []


# --------------------------------------------------------------------------- symbols
def test_symbol_catalogue() -> None:
    assets = resolve_assets(None)
    assert [a.base for a in assets] == list(DEFAULT_SYMBOLS)
    btc = ASSETS["BTC"]
    assert (btc.binance_symbol, btc.kraken_pair) == ("BTCUSDT", "XBT/USD")
    assert ASSETS["DOGE"].kraken_pair == "XDG/USD"
    assert btc.silver_symbols == {"binance": "BTC-USDT", "kraken": "BTC-USD"}
    assert [a.base for a in resolve_assets(["btcusdt", "XDG/USD", "SOL"])] == ["BTC", "DOGE", "SOL"]
    assert [a.base for a in resolve_assets("ETH,XRP")] == ["ETH", "XRP"]
    with pytest.raises(ValueError, match="unknown symbol 'FOO'"):
        resolve_assets(["FOO"])
    with pytest.raises(ValueError, match="twice"):
        resolve_assets(["BTC", "XBT/USD"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_assets([])


# --------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"history": timedelta(0), "rate": None}, "history must be a positive duration"),
        ({"history": timedelta(hours=-1), "rate": None}, "history must be a positive duration"),
        ({"history": "6x", "rate": None}, "history: '6x' is not a duration"),
        ({"history": 6, "rate": None}, "history must be a timedelta"),
        ({"history": None, "rate": -5.0}, "rate must be a positive"),
        ({"history": None, "rate": 0}, "rate must be a positive"),
        ({"history": None, "rate": math.nan}, "rate must be a positive"),
        ({"history": None, "rate": "fast"}, "rate must be a number"),
        ({"history": None, "rate": None}, "nothing to do"),
        ({"history": "1h", "rate": None, "duration": "10s"}, "duration limits live mode"),
        ({"history": None, "rate": 5, "duration": timedelta(seconds=-1)}, "duration must be a positive"),
        ({"history": "1h", "rate": None, "end": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"history": None, "rate": 5, "end": END}, "end only applies to history"),
        ({"history": "1h", "rate": None, "seed": -1}, "seed must be a non-negative integer"),
        ({"history": "1h", "rate": None, "seed": 1.5}, "seed must be a non-negative integer"),
        ({"history": "1h", "rate": None, "symbols": ["NOPE"]}, "unknown symbol"),
        ({"history": "1h", "rate": None, "batch_rows": 0}, "batch_rows must be a positive integer"),
        ({"history": "1h", "rate": None, "exchanges": ["coinbase"]}, r"exchanges must be some of .*coinbase"),
        ({"history": "1h", "rate": None, "exchanges": []}, "exchanges must be some of"),
    ],
)
def test_run_feed_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    kwargs = {"seed": 1, **kwargs}
    # validation happens before the client is touched
    with pytest.raises(ValueError, match=message):
        run_feed(None, progress=None, **kwargs)


class _RecordingClient:
    def __init__(self) -> None:
        self.inserted: dict[str, int] = {}

    def insert_arrow(self, table: str, arrow_table: pa.Table) -> None:
        self.inserted[table] = arrow_table.num_rows


def test_one_exchange_down_its_table_gets_nothing(hour: FeedBatch) -> None:
    client = _RecordingClient()
    inserted = insert_batch(client, hour, feed_tables(["kraken"]))
    assert client.inserted == inserted == {KRAKEN_TABLE: len(hour.kraken["trade_id"])} and inserted[KRAKEN_TABLE] > 0
    both = _RecordingClient()
    insert_batch(both, hour)
    assert set(both.inserted) == {BINANCE_TABLE, KRAKEN_TABLE}
    assert feed_tables("binance") == (BINANCE_TABLE,) and feed_tables(None) == (BINANCE_TABLE, KRAKEN_TABLE)


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rate must be a positive"):
        TradeGenerator(1, rate=0)
    with pytest.raises(ValueError, match="seed"):
        TradeGenerator(-3)
