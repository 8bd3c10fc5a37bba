"""Market feed simulator: realistic Binance and Kraken trades inserted into the bronze tables.

Two layers:

* `TradeGenerator` - pure, deterministic generation (no database). For each
  time window it returns a `FeedBatch`: the bronze rows of both exchanges as
  numpy columns. Prices follow one geometric random walk per asset (both
  exchanges trade around the same mid, taker buys at the ask and sells at the
  bid), sizes are log-normal in notional, arrivals are Poisson with occasional
  bursts (rate spikes of 3-10x lasting seconds to a minute), Binance is ~10x
  busier than Kraken, trade ids increase per symbol and sequence numbers per
  table. The same seed, start state and windows give the same trades.
* `run_feed` - the driver: history mode (`history=6h`) back-fills the period
  up to `end` minute by minute as fast as ClickHouse takes it; live mode
  (`rate=`) inserts about every second with event times of about now. Ids and
  sequence numbers continue above what ClickHouse already holds, so restarts
  never repeat a trade.

Decimal columns are generated as int64 "units" at a fixed scale per column
(exact integers, no float rounding in what is stored) and turned into Arrow
decimal128 columns of the tables' exact types for a columnar `insert_arrow`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2.config import parse_duration

BINANCE_TABLE = "bronze_trades_binance"
KRAKEN_TABLE = "bronze_trades_kraken"
FEED_TABLES: tuple[str, ...] = (BINANCE_TABLE, KRAKEN_TABLE)
# The exchanges whose feed handlers the simulator plays, and the bronze table each fills.
EXCHANGE_TABLES: dict[str, str] = {"binance": BINANCE_TABLE, "kraken": KRAKEN_TABLE}

DEFAULT_RATE = 50.0  # trades/s over all symbols and both exchanges (history mode default)
DEFAULT_SYMBOLS: tuple[str, ...] = ("BTC", "ETH", "SOL", "DOGE", "XRP")
KRAKEN_SHARE = 1.0 / 11.0  # Binance ~10x busier than Kraken
HISTORY_WINDOW_MS = 60_000  # history is generated one minute of event time at a time
DEFAULT_BATCH_ROWS = 100_000  # history: rows gathered before one insert (bounded memory)
LIVE_TICK_S = 1.0
PROGRESS_EVERY_S = 3.0

# Bursts: per asset, a calm period ~ Exp(mean 8 min), then a burst ~ Exp(mean 20 s,
# clipped to 2-90 s) in which arrivals run 3-10x faster (and the price moves more).
BURST_EVERY_S = 480.0
BURST_MEAN_S = 20.0
BURST_MIN_S, BURST_MAX_S = 2.0, 90.0
BURST_MULT_LOW, BURST_MULT_HIGH = 3.0, 10.0
# Expected extra arrivals from bursts, so that the long-run average matches `rate`.
_BURST_EXTRA = (BURST_MEAN_S / BURST_EVERY_S) * ((BURST_MULT_LOW + BURST_MULT_HIGH) / 2 - 1)

SECONDS_PER_YEAR = 365.0 * 86400.0
MAX_NOTIONAL_USD = 5_000_000.0
NOTIONAL_SIGMA = 1.4  # log-normal spread of trade sizes (heavy right tail)

# Fixed scales of the generated int64 units (stored as Decimal(38, 18) / Decimal(20, 6)).
PRICE_SCALE = 8
QTY_SCALE = 8
QUOTE_SCALE = 10
KRAKEN_TIME_SCALE = 6


@dataclass(frozen=True)
class Asset:
    """One base asset, traded against USDT on Binance and USD on Kraken."""

    base: str
    start_price: float  # USD
    annual_vol: float  # annualised volatility of the random walk
    weight: float  # share of the trade flow
    median_notional: float  # USD per trade (median of the log-normal)
    binance_price_decimals: int
    binance_qty_decimals: int
    kraken_price_decimals: int
    kraken_volume_decimals: int = 8
    kraken_code: str | None = None  # Kraken's own asset code (XBT, XDG)
    binance_first_id: int = 1_000_000
    kraken_first_id: int = 100_000

    @property
    def binance_symbol(self) -> str:
        return f"{self.base}USDT"

    @property
    def kraken_pair(self) -> str:
        return f"{self.kraken_code or self.base}/USD"

    @property
    def silver_symbols(self) -> dict[str, str]:
        """exchange -> symbol in the silver convention ('BASE-QUOTE')."""
        return {"binance": f"{self.base}-USDT", "kraken": f"{self.base}-USD"}


ASSETS: dict[str, Asset] = {
    a.base: a
    for a in (
        Asset("BTC", 67_000.0, 0.60, 0.34, 400.0, 2, 5, 1, kraken_code="XBT",
              binance_first_id=3_900_000_000, kraken_first_id=82_000_000),
        Asset("ETH", 3_100.0, 0.75, 0.24, 300.0, 2, 4, 2,
              binance_first_id=1_800_000_000, kraken_first_id=61_000_000),
        Asset("SOL", 150.0, 1.00, 0.16, 200.0, 2, 3, 2,
              binance_first_id=820_000_000, kraken_first_id=14_000_000),
        Asset("DOGE", 0.12, 1.10, 0.10, 120.0, 5, 0, 7, kraken_code="XDG",
              binance_first_id=640_000_000, kraken_first_id=9_000_000),
        Asset("XRP", 0.55, 0.90, 0.10, 150.0, 4, 1, 5,
              binance_first_id=700_000_000, kraken_first_id=11_000_000),
        Asset("ADA", 0.45, 0.95, 0.04, 100.0, 4, 1, 6,
              binance_first_id=520_000_000, kraken_first_id=6_000_000),
        Asset("LTC", 80.0, 0.80, 0.04, 150.0, 2, 3, 2,
              binance_first_id=380_000_000, kraken_first_id=7_500_000),
    )
}

_HALF_SPREAD = 0.5e-4  # relative; the taker pays it

BINANCE_SCHEMA = pa.schema(
    [
        ("sequence_number", pa.uint64()),
        ("trade_id", pa.uint64()),
        ("symbol", pa.string()),
        ("price", pa.decimal128(38, 18)),
        ("quantity", pa.decimal128(38, 18)),
        ("quote_quantity", pa.decimal128(38, 18)),
        ("trade_time_ms", pa.uint64()),
        ("is_buyer_maker", pa.bool_()),
    ]
)
KRAKEN_SCHEMA = pa.schema(
    [
        ("sequence_number", pa.uint64()),
        ("trade_id", pa.uint64()),
        ("pair", pa.string()),
        ("price", pa.decimal128(38, 18)),
        ("volume", pa.decimal128(38, 18)),
        ("trade_time", pa.decimal128(20, 6)),
        ("side", pa.string()),
        ("order_type", pa.string()),
        ("misc", pa.string()),
    ]
)


# --------------------------------------------------------------------------- results
@dataclass
class FeedStats:
    """What a feed run inserted: rows per bronze table and wall-clock seconds."""

    rows: dict[str, int] = field(default_factory=lambda: {t: 0 for t in FEED_TABLES})
    seconds: float = 0.0
    first_event_ms: int | None = None
    last_event_ms: int | None = None
    interrupted: bool = False

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_second(self) -> float:
        return self.total_rows / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- batches
def _units_to_decimal(units: np.ndarray, scale: int, precision: int = 38, target_scale: int = 18) -> pa.Array:
    """int64 units at `scale` -> Arrow decimal128(precision, target_scale), exactly."""
    units = np.ascontiguousarray(units, dtype=np.int64)
    words = np.empty((len(units), 2), dtype=np.int64)
    words[:, 0] = units  # little-endian 128-bit two's complement: low word, then sign word
    words[:, 1] = np.where(units < 0, -1, 0)
    raw = pa.Array.from_buffers(pa.decimal128(precision, scale), len(units), [None, pa.py_buffer(words)])
    if scale == target_scale:
        return raw
    return raw.cast(pa.decimal128(precision, target_scale))


def units_to_decimal(units: int, scale: int) -> Decimal:
    """One int unit value at `scale` -> Decimal (for tests and messages)."""
    return Decimal(int(units)).scaleb(-scale)


@dataclass
class FeedBatch:
    """Bronze rows of both exchanges for one or more windows, as numpy columns.

    binance columns: sequence_number, trade_id, symbol_idx, price_units, qty_units,
      quote_units, trade_time_ms, is_buyer_maker
    kraken columns: sequence_number, trade_id, pair_idx, price_units, volume_units,
      trade_time_us, side_buy, order_market, misc_idx
    symbol_idx/pair_idx index `symbols` (the generator's assets, in order).
    """

    assets: tuple[Asset, ...]
    binance: dict[str, np.ndarray]
    kraken: dict[str, np.ndarray]

    @property
    def rows(self) -> dict[str, int]:
        return {BINANCE_TABLE: len(self.binance["trade_id"]), KRAKEN_TABLE: len(self.kraken["trade_id"])}

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def event_ms_range(self) -> tuple[int, int] | None:
        times = [self.binance["trade_time_ms"], self.kraken["trade_time_us"] // 1000]
        times = [t for t in times if len(t)]
        if not times:
            return None
        return int(min(t.min() for t in times)), int(max(t.max() for t in times))

    @classmethod
    def concat(cls, batches: Sequence[FeedBatch]) -> FeedBatch:
        if not batches:
            raise ValueError("nothing to concatenate")
        first = batches[0]
        return cls(
            assets=first.assets,
            binance={k: np.concatenate([b.binance[k] for b in batches]) for k in first.binance},
            kraken={k: np.concatenate([b.kraken[k] for b in batches]) for k in first.kraken},
        )

    def slice(self, start: int, stop: int) -> FeedBatch:
        """Rows [start, stop) of each table (row positions, per table)."""
        return FeedBatch(
            assets=self.assets,
            binance={k: v[start:stop] for k, v in self.binance.items()},
            kraken={k: v[start:stop] for k, v in self.kraken.items()},
        )

    def binance_arrow(self) -> pa.Table:
        b = self.binance
        names = pa.array([a.binance_symbol for a in self.assets], pa.string())
        return pa.Table.from_arrays(
            [
                pa.array(b["sequence_number"], pa.uint64()),
                pa.array(b["trade_id"], pa.uint64()),
                pc.take(names, pa.array(b["symbol_idx"], pa.int32())),
                _units_to_decimal(b["price_units"], PRICE_SCALE),
                _units_to_decimal(b["qty_units"], QTY_SCALE),
                _units_to_decimal(b["quote_units"], QUOTE_SCALE),
                pa.array(b["trade_time_ms"], pa.uint64()),
                pa.array(b["is_buyer_maker"], pa.bool_()),
            ],
            schema=BINANCE_SCHEMA,
        )

    def kraken_arrow(self) -> pa.Table:
        k = self.kraken
        pairs = pa.array([a.kraken_pair for a in self.assets], pa.string())
        sides = pa.array(["s", "b"], pa.string())
        order_types = pa.array(["l", "m"], pa.string())
        miscs = pa.array(MISC_VALUES, pa.string())
        return pa.Table.from_arrays(
            [
                pa.array(k["sequence_number"], pa.uint64()),
                pa.array(k["trade_id"], pa.uint64()),
                pc.take(pairs, pa.array(k["pair_idx"], pa.int32())),
                _units_to_decimal(k["price_units"], PRICE_SCALE),
                _units_to_decimal(k["volume_units"], QTY_SCALE),
                _units_to_decimal(k["trade_time_us"], KRAKEN_TIME_SCALE, precision=20, target_scale=6),
                pc.take(sides, pa.array(k["side_buy"].astype(np.int32))),
                pc.take(order_types, pa.array(k["order_market"].astype(np.int32))),
                pc.take(miscs, pa.array(k["misc_idx"], pa.int32())),
            ],
            schema=KRAKEN_SCHEMA,
        )

    def arrow_tables(self) -> dict[str, pa.Table]:
        return {BINANCE_TABLE: self.binance_arrow(), KRAKEN_TABLE: self.kraken_arrow()}


MISC_VALUES = ("",)  # Kraken's misc field is empty for ordinary trades

_BINANCE_KEYS = ("sequence_number", "trade_id", "symbol_idx", "price_units", "qty_units",
                 "quote_units", "trade_time_ms", "is_buyer_maker")
_KRAKEN_KEYS = ("sequence_number", "trade_id", "pair_idx", "price_units", "volume_units",
                "trade_time_us", "side_buy", "order_market", "misc_idx")
_DTYPES = {
    "sequence_number": np.uint64, "trade_id": np.uint64, "symbol_idx": np.int32, "pair_idx": np.int32,
    "price_units": np.int64, "qty_units": np.int64, "quote_units": np.int64, "volume_units": np.int64,
    "trade_time_ms": np.int64, "trade_time_us": np.int64, "is_buyer_maker": np.bool_,
    "side_buy": np.bool_, "order_market": np.bool_, "misc_idx": np.int32,
}


def _empty(keys: Iterable[str]) -> dict[str, np.ndarray]:
    return {k: np.empty(0, dtype=_DTYPES[k]) for k in keys}


# --------------------------------------------------------------------------- state
@dataclass
class FeedState:
    """Where a feed continues from: next ids per symbol, next sequence numbers, last prices."""

    next_binance_id: dict[str, int] = field(default_factory=dict)  # by base asset
    next_kraken_id: dict[str, int] = field(default_factory=dict)
    next_sequence: dict[str, int] = field(default_factory=lambda: {t: 1 for t in FEED_TABLES})
    last_price: dict[str, float] = field(default_factory=dict)  # by base asset

    @classmethod
    def from_clickhouse(cls, client: Any, assets: Sequence[Asset]) -> FeedState:
        """Continue above whatever the bronze tables already hold."""
        state = cls()
        by_binance = {a.binance_symbol: a.base for a in assets}
        by_kraken = {a.kraken_pair: a.base for a in assets}
        rows = client.query(
            f"SELECT symbol, max(trade_id), toFloat64(argMax(price, (event_time, trade_id))) "
            f"FROM {BINANCE_TABLE} GROUP BY symbol"
        ).result_rows
        for symbol, max_id, price in rows:
            if symbol in by_binance:
                state.next_binance_id[by_binance[symbol]] = int(max_id) + 1
                state.last_price[by_binance[symbol]] = float(price)
        rows = client.query(f"SELECT pair, max(trade_id) FROM {KRAKEN_TABLE} GROUP BY pair").result_rows
        for pair, max_id in rows:
            if pair in by_kraken:
                state.next_kraken_id[by_kraken[pair]] = int(max_id) + 1
        for table in FEED_TABLES:
            count, max_seq = client.query(f"SELECT count(), max(sequence_number) FROM {table}").result_rows[0]
            state.next_sequence[table] = int(max_seq) + 1 if int(count) else 1
        return state


@dataclass
class _AssetState:
    log_price: float
    last_ms: int | None = None
    next_burst_ms: int | None = None
    burst_end_ms: int = 0
    burst_mult: float = 1.0


# --------------------------------------------------------------------------- generator
def resolve_assets(symbols: Iterable[str] | None) -> tuple[Asset, ...]:
    """Base assets ('BTC'), Binance symbols ('BTCUSDT') or Kraken pairs ('XBT/USD') -> Assets."""
    if symbols is None:
        symbols = DEFAULT_SYMBOLS
    if isinstance(symbols, str):
        symbols = [s for s in symbols.replace(" ", "").split(",") if s]
    aliases: dict[str, Asset] = {}
    for asset in ASSETS.values():
        for name in (asset.base, asset.binance_symbol, asset.kraken_pair, asset.kraken_code,
                     *asset.silver_symbols.values()):
            if name:
                aliases[name.upper()] = asset
    resolved: list[Asset] = []
    for name in symbols:
        asset = aliases.get(str(name).upper())
        if asset is None:
            raise ValueError(f"unknown symbol {name!r}; known: {', '.join(ASSETS)}")
        if asset in resolved:
            raise ValueError(f"symbol {name!r} given twice ({asset.base})")
        resolved.append(asset)
    if not resolved:
        raise ValueError(f"symbols must name at least one of: {', '.join(ASSETS)}")
    return tuple(resolved)


class TradeGenerator:
    """Deterministic trade generator: same seed + state + windows -> same trades.

    `rate` is the long-run average of trades/s over all assets and both exchanges
    (bursts included). Windows passed to `generate` must be contiguous and increasing.
    """

    def __init__(
        self,
        seed: int,
        symbols: Iterable[str] | None = None,
        rate: float = DEFAULT_RATE,
        state: FeedState | None = None,
        kraken_share: float = KRAKEN_SHARE,
    ) -> None:
        _check_seed(seed)
        _check_rate(rate, "rate")
        if not 0.0 <= kraken_share <= 1.0:
            raise ValueError(f"kraken_share must be within [0, 1], got {kraken_share!r}")
        self.seed = seed
        self.rate = float(rate)
        self.assets = resolve_assets(symbols)
        self.state = state or FeedState()
        self._rng = np.random.default_rng(np.random.SeedSequence(seed))
        total_weight = sum(a.weight for a in self.assets)
        base_rate = self.rate / (1.0 + _BURST_EXTRA)
        # calm-period trades/s per asset and exchange
        self._lambda = {
            a.base: (base_rate * a.weight / total_weight * (1 - kraken_share),
                     base_rate * a.weight / total_weight * kraken_share)
            for a in self.assets
        }
        self._asset_state = {
            a.base: _AssetState(log_price=math.log(self.state.last_price.get(a.base, a.start_price)))
            for a in self.assets
        }
        for a in self.assets:
            self.state.next_binance_id.setdefault(a.base, a.binance_first_id)
            self.state.next_kraken_id.setdefault(a.base, a.kraken_first_id)
        self._cursor_ms: int | None = None

    # -- arrivals
    def _segments(self, st: _AssetState, t0: int, t1: int) -> list[tuple[int, int, float]]:
        """Split [t0, t1) into pieces of constant intensity multiplier (calm 1, bursts 3-10)."""
        rng = self._rng
        if st.next_burst_ms is None:
            st.next_burst_ms = t0 + int(rng.exponential(BURST_EVERY_S) * 1000)
        segments: list[tuple[int, int, float]] = []
        t = t0
        while t < t1:
            if st.burst_end_ms > t:
                end = min(st.burst_end_ms, t1)
                segments.append((t, end, st.burst_mult))
                t = end
                continue
            if st.next_burst_ms >= t1:
                segments.append((t, t1, 1.0))
                break
            start = max(st.next_burst_ms, t)
            if start > t:
                segments.append((t, start, 1.0))
            duration = float(np.clip(rng.exponential(BURST_MEAN_S), BURST_MIN_S, BURST_MAX_S))
            st.burst_end_ms = start + int(duration * 1000)
            st.burst_mult = float(rng.uniform(BURST_MULT_LOW, BURST_MULT_HIGH))
            st.next_burst_ms = st.burst_end_ms + int(rng.exponential(BURST_EVERY_S) * 1000)
            t = start
        return segments

    def _arrivals(self, segments: list[tuple[int, int, float]], lam: float) -> tuple[np.ndarray, np.ndarray]:
        """Sorted arrival times (ms) and their segment's multiplier."""
        rng = self._rng
        times, mults = [], []
        for s0, s1, mult in segments:
            n = int(rng.poisson(lam * mult * (s1 - s0) / 1000.0))
            if n:
                times.append(rng.integers(s0, s1, size=n, dtype=np.int64))
                mults.append(np.full(n, mult))
        if not times:
            return np.empty(0, np.int64), np.empty(0)
        t = np.concatenate(times)
        m = np.concatenate(mults)
        order = np.argsort(t, kind="stable")
        return t[order], m[order]

    # -- one window
    def generate(self, t0_ms: int, t1_ms: int) -> FeedBatch:
        """Trades with event times in [t0_ms, t1_ms) (epoch milliseconds, UTC)."""
        t0_ms, t1_ms = int(t0_ms), int(t1_ms)
        if t1_ms <= t0_ms:
            raise ValueError(f"empty window [{t0_ms}, {t1_ms})")
        if self._cursor_ms is not None and t0_ms < self._cursor_ms:
            raise ValueError(f"windows must be increasing: {t0_ms} is before the previous end {self._cursor_ms}")
        self._cursor_ms = t1_ms
        rng = self._rng
        b_parts: list[dict[str, np.ndarray]] = []
        k_parts: list[dict[str, np.ndarray]] = []
        for idx, asset in enumerate(self.assets):
            st = self._asset_state[asset.base]
            lam_b, lam_k = self._lambda[asset.base]
            segments = self._segments(st, t0_ms, t1_ms)
            tb, mb = self._arrivals(segments, lam_b)
            tk, mk = self._arrivals(segments, lam_k)
            nb, nk = len(tb), len(tk)
            if nb + nk == 0:
                continue
            # one mid-price path for the asset, sampled at every trade of both exchanges
            t_all = np.concatenate([tb, tk])
            m_all = np.concatenate([mb, mk])
            order = np.argsort(t_all, kind="stable")
            t_sorted = t_all[order]
            last = st.last_ms if st.last_ms is not None else t0_ms
            dt_s = np.diff(t_sorted, prepend=last).clip(min=0) / 1000.0
            sigma = asset.annual_vol / math.sqrt(SECONDS_PER_YEAR)
            # bursts are news: the price moves faster while they last
            steps = rng.standard_normal(len(t_sorted)) * sigma * np.sqrt(dt_s * np.sqrt(m_all[order]))
            log_path = st.log_price + np.cumsum(steps)
            st.log_price = float(log_path[-1])
            st.last_ms = int(t_sorted[-1])
            mid = np.empty_like(log_path)
            mid[order] = np.exp(log_path)
            mid_b, mid_k = mid[:nb], mid[nb:]
            if nb:
                b_parts.append(self._binance_rows(asset, idx, tb, mid_b))
            if nk:
                k_parts.append(self._kraken_rows(asset, idx, tk, mid_k))
        return FeedBatch(
            assets=self.assets,
            binance=self._assemble(b_parts, _BINANCE_KEYS, "trade_time_ms", BINANCE_TABLE),
            kraken=self._assemble(k_parts, _KRAKEN_KEYS, "trade_time_us", KRAKEN_TABLE),
        )

    def _sizes(self, n: int, asset: Asset, mid: np.ndarray) -> np.ndarray:
        notional = np.exp(self._rng.normal(math.log(asset.median_notional), NOTIONAL_SIGMA, n))
        return np.minimum(notional, MAX_NOTIONAL_USD) / mid  # base-asset quantity (float)

    def _quantized_trades(self, asset: Asset, mid: np.ndarray, price_decimals: int,
                          size_decimals: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Taker side (True: buy), price in ticks and size in lots of one trade per mid price,
        at the exchange's precision: a buy pays the half spread above mid, a sell gets it below."""
        n = len(mid)
        buy = self._rng.random(n) < 0.5
        px = mid * (1.0 + np.where(buy, _HALF_SPREAD, -_HALF_SPREAD))
        ticks = np.maximum(np.rint(px * 10.0**price_decimals).astype(np.int64), 1)
        lots = np.maximum(np.floor(self._sizes(n, asset, mid) * 10.0**size_decimals).astype(np.int64), 1)
        return buy, ticks, lots

    def _binance_rows(self, asset: Asset, idx: int, t: np.ndarray, mid: np.ndarray) -> dict[str, np.ndarray]:
        n = len(t)
        dp, dq = asset.binance_price_decimals, asset.binance_qty_decimals
        buy, ticks, lots = self._quantized_trades(asset, mid, dp, dq)
        first = self.state.next_binance_id[asset.base]
        self.state.next_binance_id[asset.base] = first + n
        return {
            "trade_id": np.arange(first, first + n, dtype=np.uint64),
            "symbol_idx": np.full(n, idx, np.int32),
            "price_units": ticks * 10 ** (PRICE_SCALE - dp),
            "qty_units": lots * 10 ** (QTY_SCALE - dq),
            "quote_units": ticks * lots * 10 ** (QUOTE_SCALE - dp - dq),  # exact price * qty
            "trade_time_ms": t,
            "is_buyer_maker": ~buy,  # the maker bought, so the taker sold
        }

    def _kraken_rows(self, asset: Asset, idx: int, t: np.ndarray, mid: np.ndarray) -> dict[str, np.ndarray]:
        rng = self._rng
        n = len(t)
        # Kraken stamps microseconds: ids follow the full timestamp
        micros = t * 1000 + rng.integers(0, 1000, size=n, dtype=np.int64)
        order = np.argsort(micros, kind="stable")
        micros, mid = micros[order], mid[order]
        dp, dv = asset.kraken_price_decimals, asset.kraken_volume_decimals
        buy, ticks, lots = self._quantized_trades(asset, mid, dp, dv)
        first = self.state.next_kraken_id[asset.base]
        self.state.next_kraken_id[asset.base] = first + n
        return {
            "trade_id": np.arange(first, first + n, dtype=np.uint64),
            "pair_idx": np.full(n, idx, np.int32),
            "price_units": ticks * 10 ** (PRICE_SCALE - dp),
            "volume_units": lots * 10 ** (QTY_SCALE - dv),
            "trade_time_us": micros,
            "side_buy": buy,
            "order_market": rng.random(n) < 0.6,
            "misc_idx": np.zeros(n, np.int32),
        }

    def _assemble(self, parts: list[dict[str, np.ndarray]], keys: Sequence[str], time_key: str,
                  table: str) -> dict[str, np.ndarray]:
        """Merge the assets' rows in event-time order and number them with sequence numbers."""
        if not parts:
            return _empty(keys)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in keys if k != "sequence_number"}
        order = np.argsort(cols[time_key], kind="stable")
        cols = {k: v[order].astype(_DTYPES[k], copy=False) for k, v in cols.items()}
        n = len(order)
        first = self.state.next_sequence[table]
        self.state.next_sequence[table] = first + n
        cols["sequence_number"] = np.arange(first, first + n, dtype=np.uint64)
        return {k: cols[k] for k in keys}


def window_bounds(start_ms: int, end_ms: int, step_ms: int = HISTORY_WINDOW_MS) -> Iterator[tuple[int, int]]:
    """[start, end) cut at multiples of step_ms (whole clock minutes by default)."""
    t = start_ms
    while t < end_ms:
        nxt = min((t // step_ms + 1) * step_ms, end_ms)
        yield t, nxt
        t = nxt


def history_batches(
    generator: TradeGenerator,
    start_ms: int,
    end_ms: int,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[FeedBatch]:
    """Generate [start_ms, end_ms) one minute at a time, yielding batches of >= batch_rows rows
    (the last may be smaller). Only one batch is held in memory."""
    pending: list[FeedBatch] = []
    pending_rows = 0
    for t0, t1 in window_bounds(start_ms, end_ms):
        batch = generator.generate(t0, t1)
        if batch.total_rows:
            pending.append(batch)
            pending_rows += batch.total_rows
        if pending_rows >= batch_rows:
            yield FeedBatch.concat(pending)
            pending, pending_rows = [], 0
    if pending:
        yield FeedBatch.concat(pending)


# --------------------------------------------------------------------------- database side
def insert_batch(client: Any, batch: FeedBatch, tables: Collection[str] = FEED_TABLES) -> dict[str, int]:
    """Insert a batch into the bronze tables (columnar Arrow inserts), those of `tables` only
    (the others' feed handlers are down). Returns rows per table inserted into."""
    inserted: dict[str, int] = {}
    for table, arrow_table in batch.arrow_tables().items():
        if table not in tables:
            continue
        if arrow_table.num_rows:
            client.insert_arrow(table, arrow_table)
        inserted[table] = arrow_table.num_rows
    return inserted


# --------------------------------------------------------------------------- validation
def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_rate(rate: Any, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ValueError(f"{name} must be a number of trades per second, got {rate!r}")
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{name} must be a positive, finite number of trades per second, got {rate!r}")


def _as_duration(value: Any, name: str) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if not isinstance(value, timedelta):
        raise ValueError(f"{name} must be a timedelta or a duration like 90s, 15m, 6h, got {value!r}")
    if value <= timedelta(0):
        raise ValueError(f"{name} must be a positive duration, got {value}")
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _epoch_ms(dt: datetime) -> int:
    """Aware datetime -> epoch milliseconds (integer arithmetic, truncating microseconds)."""
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _fmt_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def feed_tables(exchanges: Iterable[str] | None) -> tuple[str, ...]:
    """The bronze tables of those exchanges (all of them for None), or ValueError naming the
    unknown ones."""
    if exchanges is None:
        return FEED_TABLES
    names = [exchanges] if isinstance(exchanges, str) else list(exchanges)
    unknown = [name for name in names if name not in EXCHANGE_TABLES]
    if unknown or not names:
        raise ValueError(f"exchanges must be some of {sorted(EXCHANGE_TABLES)}, got {names!r}")
    return tuple(EXCHANGE_TABLES[name] for name in EXCHANGE_TABLES if name in names)


def validate_feed_args(
    history: Any, rate: Any, seed: Any, end: Any, duration: Any, batch_rows: Any
) -> tuple[timedelta | None, float | None, timedelta | None]:
    history_td = _as_duration(history, "history")
    duration_td = _as_duration(duration, "duration")
    if rate is not None:
        _check_rate(rate, "rate")
    _check_seed(seed)
    if history_td is None and rate is None:
        raise ValueError("nothing to do: give history (back-fill, e.g. 6h) and/or rate (live trades/s)")
    if duration_td is not None and rate is None:
        raise ValueError("duration limits live mode; it needs rate (trades/s)")
    if end is not None:
        if not isinstance(end, datetime):
            raise ValueError(f"end must be a datetime, got {end!r}")
        if end.tzinfo is None or end.utcoffset() is None:
            raise ValueError(f"end must be timezone-aware (UTC), got naive {end.isoformat()}")
        if history_td is None:
            raise ValueError("end only applies to history mode (give history as well)")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows <= 0:
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    return history_td, (float(rate) if rate is not None else None), duration_td


# --------------------------------------------------------------------------- driver
class _Progress:
    def __init__(self, label: str, progress: Callable[[str], None] | None, stats: FeedStats) -> None:
        self.label, self.progress, self.stats = label, progress, stats
        self.started = time.monotonic()
        self.last_print = self.started
        self.rows_at_start = stats.total_rows

    def rows(self) -> int:
        return self.stats.total_rows - self.rows_at_start

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is None or (not force and now - self.last_print < PROGRESS_EVERY_S):
            return
        self.last_print = now
        elapsed = max(now - self.started, 1e-9)
        s = self.stats
        upto = f", event time up to {_fmt_ms(s.last_event_ms)}Z" if s.last_event_ms else ""
        self.progress(
            f"feed {self.label}: {self.rows():,} rows "
            f"(binance {s.rows[BINANCE_TABLE]:,}, kraken {s.rows[KRAKEN_TABLE]:,}), "
            f"{self.rows() / elapsed:,.0f} rows/s{upto}"
        )


def _record(stats: FeedStats, batch: FeedBatch, inserted: dict[str, int]) -> None:
    for table, n in inserted.items():
        stats.rows[table] += n
    span = batch.event_ms_range()
    if span:
        lo, hi = span
        stats.first_event_ms = lo if stats.first_event_ms is None else min(stats.first_event_ms, lo)
        stats.last_event_ms = hi if stats.last_event_ms is None else max(stats.last_event_ms, hi)


def run_feed(
    client: Any,
    *,
    history: timedelta | str | None,
    rate: float | None,
    seed: int,
    symbols: Sequence[str] | str | None = DEFAULT_SYMBOLS,
    end: datetime | None = None,
    duration: timedelta | str | None = None,
    progress: Callable[[str], None] | None = print,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    exchanges: Sequence[str] | None = None,
    kraken_share: float = KRAKEN_SHARE,
    live: bool = True,
) -> FeedStats:
    """Insert simulated trades into the bronze tables (the views fill silver and gold).

    history   back-fill trades with event times in [end - history, end) as fast as
              possible, in batches of about `batch_rows` rows
    rate      average trades/s (all symbols, both exchanges). With history it also sets
              the back-fill's density (default 50/s); then live mode follows: a small
              batch about every second with event times of about now, until `duration`
              has passed or KeyboardInterrupt
    seed      makes the trades deterministic for the same (seed, end, history) on the
              same starting data (ids continue above what ClickHouse holds)
    symbols   base assets ('BTC', 'ETH', ...), Binance symbols or Kraken pairs
    end       history's end (aware datetime; default now, UTC)
    exchanges the exchanges whose trades are inserted (default both): the others' feed
              handlers are down, their bronze tables get nothing (K2FeedStopped's case)
    kraken_share  Kraken's share of the trades (default 1/11: Binance ~10x busier)
    live      False: the history only, `rate` setting its density
    """
    history_td, rate_f, duration_td = validate_feed_args(history, rate, seed, end, duration, batch_rows)
    tables = feed_tables(exchanges)
    assets = resolve_assets(symbols)
    started = time.monotonic()
    stats = FeedStats()
    state = FeedState.from_clickhouse(client, assets)
    generator = TradeGenerator(seed, [a.base for a in assets], rate_f or DEFAULT_RATE, state, kraken_share)
    live_from_ms: int | None = None

    try:
        if history_td is not None:
            end_ms = _epoch_ms(end) if end is not None else int(time.time() * 1000)
            start_ms = end_ms - int(history_td.total_seconds() * 1000)
            if progress:
                progress(
                    f"feed history: {history_td} of trades ({generator.rate:g}/s on average, seed {seed}) "
                    f"from {_fmt_ms(start_ms)}Z to {_fmt_ms(end_ms)}Z"
                )
            meter = _Progress("history", progress, stats)
            for batch in history_batches(generator, start_ms, end_ms, batch_rows):
                _record(stats, batch, insert_batch(client, batch, tables))
                meter.tick()
            meter.tick(force=True)
            live_from_ms = end_ms

        if rate_f is not None and live:
            _run_live(client, generator, stats, live_from_ms, duration_td, progress, tables)
    except KeyboardInterrupt:
        stats.interrupted = True
        if progress:
            progress("feed: interrupted")
    stats.seconds = time.monotonic() - started
    if progress:
        progress(
            f"feed done: {stats.total_rows:,} rows (binance {stats.rows[BINANCE_TABLE]:,}, "
            f"kraken {stats.rows[KRAKEN_TABLE]:,}) in {stats.seconds:.1f} s, "
            f"{stats.rows_per_second:,.0f} rows/s"
        )
    return stats


def _run_live(
    client: Any,
    generator: TradeGenerator,
    stats: FeedStats,
    from_ms: int | None,
    duration: timedelta | None,
    progress: Callable[[str], None] | None,
    tables: Collection[str] = FEED_TABLES,
) -> None:
    now_ms = int(time.time() * 1000)
    # Continue right after the history if it ended recently (or in the future); after an
    # explicit end in the past, live trades start now.
    cursor = from_ms if from_ms is not None and from_ms >= now_ms - 60_000 else now_ms
    deadline = time.monotonic() + duration.total_seconds() if duration else None
    if progress:
        until = f" for {duration}" if duration else " until interrupted"
        progress(f"feed live: {generator.rate:g} trades/s on average{until}")
    meter = _Progress("live", progress, stats)
    next_tick = time.monotonic()
    while True:
        now_mono = time.monotonic()
        if deadline is not None and now_mono >= deadline:
            break
        next_tick += LIVE_TICK_S
        sleep_for = next_tick - now_mono
        if deadline is not None:
            sleep_for = min(sleep_for, deadline - now_mono)
        if sleep_for > 0:
            time.sleep(sleep_for)
        else:
            next_tick = time.monotonic()  # fell behind: do not try to catch up ticks
        now_ms = int(time.time() * 1000)
        if now_ms <= cursor:
            continue
        batch = generator.generate(cursor, now_ms)
        cursor = now_ms
        if batch.total_rows:
            _record(stats, batch, insert_batch(client, batch, tables))
        meter.tick()
    meter.tick(force=True)
