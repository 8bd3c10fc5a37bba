"""What covering values costs: the interval checksum over the unique key only (the
baseline, checksum version 1) against every column (version 2), on the same rows.

Two of the three implementations are timed on one bronze_trades_binance-shaped table:

- pyarrow + hashlib (k2 verify's Iceberg side, the offload audit's read-back of the
  driver's files): `k2.checksum.arrow_checksum`, streamed batch by batch;
- ClickHouse SQL (the hot side of verify, the offload's figures, the late check), here in
  chDB in process: `sumWithOverflow(<row hash>)` over the whole table.

    .venv/bin/python benchmarks/checksum.py [--rows 1000000] [--repeat 3]

Prints rows/s per path and the ratio all-columns / key-only (time), median of --repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal

import pyarrow as pa

from k2 import checksum as ck
from k2.config import load_tables

SPEC = load_tables().get("bronze_trades_binance")
CH_TYPES = {
    "sequence_number": "UInt64", "trade_id": "UInt64", "symbol": "LowCardinality(String)",
    "price": "Decimal(38, 18)", "quantity": "Decimal(38, 18)", "quote_quantity": "Decimal(38, 18)",
    "trade_time_ms": "UInt64", "is_buyer_maker": "Bool", "event_time": "DateTime64(3, 'UTC')",
    "ingested_at": "DateTime64(3, 'UTC')",
}
BATCH_ROWS = 65_536


def arrow_rows(n: int) -> pa.Table:
    """n trades as pyiceberg returns them (UInt64 as decimal(20,0), microsecond timestamps)."""
    import numpy as np

    rng = np.random.default_rng(7)
    start_ms = int(datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp() * 1000)
    ms = start_ms + np.sort(rng.integers(0, 900_000, n))
    prices = rng.integers(1_000_000, 100_000_000_000, n)  # 1.000000 .. 100000.000000
    quantities = rng.integers(1, 10_000_000, n)

    def decimals(units, scale_exp: int) -> pa.Array:
        return pa.array([Decimal(int(u)).scaleb(-scale_exp) for u in units], pa.decimal128(38, 18))

    ids = pa.array([Decimal(i) for i in range(1, n + 1)], pa.decimal128(20, 0))
    return pa.table({
        "sequence_number": ids,
        "trade_id": ids,
        "symbol": pa.array(np.array(["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT"])[rng.integers(0, 5, n)]),
        "price": decimals(prices, 6),
        "quantity": decimals(quantities, 8),
        "quote_quantity": decimals(prices // 100, 6),
        "trade_time_ms": pa.array([Decimal(int(v)) for v in ms], pa.decimal128(20, 0)),
        "is_buyer_maker": pa.array(rng.integers(0, 2, n).astype(bool)),
        "event_time": pa.array(ms * 1000, pa.timestamp("us", tz="UTC")),
        "ingested_at": pa.array((ms + 150) * 1000, pa.timestamp("us", tz="UTC")),
    })


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    walls, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"building {args.rows:,} rows ...", flush=True)
    table = arrow_rows(args.rows)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    keys = ck.arrow_row_columns(SPEC, table.schema, SPEC.unique_key)
    every = ck.arrow_row_columns(SPEC, table.schema)
    figures: dict[str, tuple[float, object]] = {
        "pyarrow, key only": timed(lambda: ck.arrow_checksum(batches, keys), args.repeat),
        "pyarrow, every column": timed(lambda: ck.arrow_checksum(batches, every), args.repeat),
    }

    from chdb.session import Session

    session = Session()
    try:
        columns = ", ".join(f"`{c}` {t}" for c, t in CH_TYPES.items())
        session.query(f"CREATE TABLE t ({columns}) ENGINE = MergeTree ORDER BY (symbol, trade_id)")
        _insert(session, table)
        key_sql = ck.clickhouse_row_hash_sql([(c, CH_TYPES[c]) for c in SPEC.unique_key])
        all_sql = ck.clickhouse_row_hash_sql(ck.clickhouse_row_columns(SPEC, CH_TYPES))
        for label, row_hash in (("ClickHouse SQL, key only", key_sql), ("ClickHouse SQL, every column", all_sql)):
            figures[label] = timed(
                lambda row_hash=row_hash: str(session.query(
                    f"SELECT count(), sumWithOverflow({row_hash}) FROM t", "CSV")).strip(),
                args.repeat)
    finally:
        session.close()

    print(f"\n{'path':32} {'wall s':>8} {'rows/s':>12}")
    for label, (wall, _) in figures.items():
        print(f"{label:32} {wall:8.2f} {args.rows / wall:12,.0f}")
    for engine in ("pyarrow", "ClickHouse SQL"):
        base, full = figures[f"{engine}, key only"][0], figures[f"{engine}, every column"][0]
        print(f"ratio {engine}: every column / key only = {full / base:.2f}x the time")
    a = figures["pyarrow, every column"][1]
    c = figures["ClickHouse SQL, every column"][1]
    agree = str(c) == f"{a.rows},{a.checksum}"  # type: ignore[attr-defined]
    print(f"pyarrow and ClickHouse agree on every column: {agree}")
    if not agree:
        raise SystemExit(f"pyarrow {a}; ClickHouse {c}")


def _insert(session, table: pa.Table) -> None:
    """The rows into chDB through a Parquet file (ClickHouse's own types on insert)."""
    import os
    import tempfile

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.parquet")
        pq.write_table(table, path)
        session.query(f"INSERT INTO t SELECT * FROM file('{path}', Parquet)")


if __name__ == "__main__":
    main()
