-- K2 hot tier: the ClickHouse data model (9 tables, their materialized views and
-- the *_final views the offload reads).
--
--   bronze_trades_binance ─┐ bronze_to_silver_binance_mv
--   bronze_trades_kraken  ─┴─► silver_trades ─► gold_ohlcv_<w>_mv ─► gold_ohlcv_<w> ─► gold_ohlcv_<w>_final
--                bronze_to_silver_kraken_mv          (w = 1m, 5m, 15m, 30m, 1h, 1d)
--
-- Rules for this file (k2.schema.apply_schema runs it statement by statement):
--   * no database name anywhere: objects go to the client's current database, and
--     ClickHouse stores the views' source/target tables qualified with it;
--   * every statement is IF NOT EXISTS, so applying the file twice is a no-op;
--   * statements are separated by semicolons (k2.schema.split_statements skips
--     comments and string literals);
--   * only SQL that ClickHouse 24.3 accepts (the production floor) - no refreshable
--     materialized views, no newer-only functions;
--   * money is exact: Decimal(38, 18) everywhere, never Float. Decimal128 arithmetic
--     in ClickHouse wraps around silently when the scaled result exceeds 38 digits
--     (price * volume has scale 36; a / b scales a up by 10^18), so products and
--     quotients are computed in Decimal256 and CAST back to Decimal(38, 18), which
--     truncates toward zero at the 18th decimal - deterministic on every server.
--   * all times are DateTime64(3, 'UTC'); bucket starts are integer arithmetic on
--     epoch milliseconds, so they never depend on a server or session time zone.
--
-- Engines, in short: bronze and silver are plain MergeTree (append-only facts whose
-- row set must stay stable, because the offload and `k2 verify` count and checksum
-- them per interval); gold is AggregatingMergeTree holding aggregate-function states
-- (so many insert batches per bucket merge into exact candles).

-- ---------------------------------------------------------------------------
-- Bronze: exchange-native trades, exactly as the feed handlers receive them.
--
-- Engine MergeTree: an append-only log. Duplicates are prevented upstream (the
-- feed continues ids and sequence numbers above the stored max); a Replacing
-- engine would change the row set behind the offload's back when parts merge.
-- No TTL here: hot_retention (tables.yaml) must only drop what has been offloaded,
-- so retention is `k2 retention apply` (k2.retention: a partition is dropped only behind
-- the ledger, the watermark and a verification against Iceberg), not a TTL.
-- Daily partitions match the offload's day-by-day reads and make retention a
-- cheap DROP PARTITION; ORDER BY (symbol, event_time, trade_id) serves "one symbol
-- over a time range" and the 15-minute interval scans (event_time is the 2nd key
-- column and the partition key, so an interval read touches one partition).
-- event_time is a stored DEFAULT column derived from the exchange's own timestamp
-- so that every reader filters on the same DateTime64(3, 'UTC') value.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS bronze_trades_binance
(
    sequence_number  UInt64,                    -- per table, increasing across feed restarts
    trade_id         UInt64,                    -- Binance 't', increasing per symbol
    symbol           LowCardinality(String),    -- exchange-native, e.g. 'BTCUSDT'
    price            Decimal(38, 18),
    quantity         Decimal(38, 18),
    quote_quantity   Decimal(38, 18),
    trade_time_ms    UInt64,                    -- Binance 'T' (trade time, epoch ms)
    is_buyer_maker   Bool,                      -- Binance 'm': true means the taker sold
    event_time       DateTime64(3, 'UTC') DEFAULT fromUnixTimestamp64Milli(toInt64(trade_time_ms), 'UTC'),
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(event_time)
ORDER BY (symbol, event_time, trade_id);

CREATE TABLE IF NOT EXISTS bronze_trades_kraken
(
    sequence_number  UInt64,                    -- per table, increasing across feed restarts
    trade_id         UInt64,                    -- Kraken trade id, increasing per pair
    pair             LowCardinality(String),    -- exchange-native, e.g. 'XBT/USD'
    price            Decimal(38, 18),
    volume           Decimal(38, 18),
    trade_time       Decimal(20, 6),            -- Kraken's fractional epoch seconds
    side             LowCardinality(String),    -- 'b' | 's': the taker's side
    order_type       LowCardinality(String),    -- 'm' (market) | 'l' (limit)
    misc             String,
    -- millisecond precision, truncated (toInt64 of a Decimal truncates toward zero)
    event_time       DateTime64(3, 'UTC') DEFAULT fromUnixTimestamp64Milli(toInt64(trade_time * 1000), 'UTC'),
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(event_time)
ORDER BY (pair, event_time, trade_id);

-- ---------------------------------------------------------------------------
-- Silver: both exchanges in one shape and one symbol convention ('BASE-QUOTE').
--
-- Engine MergeTree, filled only by the two materialized views below (each bronze
-- insert block is transformed and appended in the same insert). Not
-- ReplacingMergeTree on the unique key (exchange, symbol, trade_id): the key is
-- unique by construction of bronze, the gold views see insert blocks and not
-- merged parts (so a Replacing engine would not de-duplicate the candles anyway),
-- and a row count that changes when a background merge runs would make the
-- offload's per-interval counts and checksums disagree with the hot tier.
-- Daily partitions and an event_time-leading order inside (exchange, symbol) for
-- the interval reads of the offload.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver_trades
(
    exchange                LowCardinality(String),   -- 'binance' | 'kraken'
    symbol                  LowCardinality(String),   -- 'BTC-USDT', 'BTC-USD', 'DOGE-USD', ...
    trade_id                UInt64,
    event_time              DateTime64(3, 'UTC'),
    price                   Decimal(38, 18),
    quantity                Decimal(38, 18),
    quote_quantity          Decimal(38, 18),
    side                    LowCardinality(String),   -- taker side: 'buy' | 'sell'
    source_sequence_number  UInt64,                   -- the bronze row's sequence_number
    ingested_at             DateTime64(3, 'UTC')      -- when the bronze row was inserted
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(event_time)
ORDER BY (exchange, symbol, event_time, trade_id);

-- Binance symbols are concatenated ('BTCUSDT', 'ETHBTC'): split off the longest
-- known quote asset ('USDCUSDT' -> USDC-USDT). Unknown quotes stay unsplit.
CREATE MATERIALIZED VIEW IF NOT EXISTS bronze_to_silver_binance_mv TO silver_trades AS
SELECT
    'binance' AS exchange,
    replaceRegexpOne(symbol,
        '^(.+?)(USDT|USDC|FDUSD|BUSD|TUSD|DAI|BTC|ETH|BNB|EUR|GBP|TRY|BRL|USD)$',
        '\\1-\\2') AS symbol,
    trade_id,
    event_time,
    price,
    quantity,
    quote_quantity,
    if(is_buyer_maker, 'sell', 'buy') AS side,
    sequence_number AS source_sequence_number,
    ingested_at
FROM bronze_trades_binance;

-- Kraken pairs are 'BASE/QUOTE' with Kraken's own asset codes (XBT, XDG) and the
-- legacy X/Z-prefixed forms (XXBT, ZUSD): map them to the common codes.
-- quote_quantity = price * volume, computed in Decimal256 (scale 36) and cast
-- back to scale 18.
CREATE MATERIALIZED VIEW IF NOT EXISTS bronze_to_silver_kraken_mv TO silver_trades AS
SELECT
    'kraken' AS exchange,
    concat(
        transform(splitByChar('/', pair)[1],
            ['XBT', 'XXBT', 'XDG', 'XXDG', 'XETH', 'XXRP', 'XLTC', 'XXLM', 'ZUSD', 'ZEUR', 'ZGBP', 'ZJPY', 'ZCAD'],
            ['BTC', 'BTC', 'DOGE', 'DOGE', 'ETH', 'XRP', 'LTC', 'XLM', 'USD', 'EUR', 'GBP', 'JPY', 'CAD'],
            splitByChar('/', pair)[1]),
        '-',
        transform(splitByChar('/', pair)[2],
            ['XBT', 'XXBT', 'XDG', 'XXDG', 'XETH', 'ZUSD', 'ZEUR', 'ZGBP', 'ZJPY', 'ZCAD'],
            ['BTC', 'BTC', 'DOGE', 'DOGE', 'ETH', 'USD', 'EUR', 'GBP', 'JPY', 'CAD'],
            splitByChar('/', pair)[2])) AS symbol,
    trade_id,
    event_time,
    price,
    volume AS quantity,
    CAST(toDecimal256(price, 18) * volume, 'Decimal(38, 18)') AS quote_quantity,
    if(side = 'b', 'buy', 'sell') AS side,
    sequence_number AS source_sequence_number,
    ingested_at
FROM bronze_trades_kraken;

-- ---------------------------------------------------------------------------
-- Gold: OHLCV candles per (exchange, symbol, window) in six widths.
--
-- Engine AggregatingMergeTree, fed by one materialized view per width FROM
-- silver_trades (bronze -> silver -> gold is a chain of MVs: one bronze insert
-- runs all of them). A view only sees its insert block, so one bucket gets many
-- partial rows (every feed batch, every late trade); they hold aggregate states,
-- not finished numbers, and merging states is exact in any order and grouping:
--   open/close  argMin/argMax of price by (event_time, trade_id) - AggregateFunction
--               states (the tie-break on trade_id makes them deterministic when
--               trades share a millisecond)
--   high/low    max/min, volume/quote_volume/trade_count sums - SimpleAggregateFunction
--               (the merged value is the state itself; cheaper than full states)
-- ORDER BY (exchange, symbol, window_start) is the candle's identity, so background
-- merges collapse partial rows of one bucket. The stored columns carry state names
-- (high_max, ...) so the *_final views can expose the plain names without an alias
-- shadowing a column. Monthly (minute widths) or yearly (1h, 1d) partitions keep
-- part counts small.
--
-- gold_ohlcv_<w>_final (a plain VIEW) merges the states at read time (GROUP BY, so
-- it is exact whether or not background merges have run) and exposes: exchange,
-- symbol, window_start, window_end (= window_start + width), open, high, low,
-- close, volume, quote_volume (Decimal(38, 18)), trade_count (UInt64) and vwap
-- (quote_volume / volume in Decimal256, truncated to scale 18). This is what the
-- offload reads. Filter it on window_start/window_end.
--
-- The gold DDL is the same for every width: gold_ohlcv.sql.tmpl, rendered per width
-- by include/k2/schema.py (GOLD_WIDTHS) after this file.
-- ---------------------------------------------------------------------------
