"""The executors' own partitioning of the native write (spark_jobs/offload_to_iceberg.py):
Iceberg's transforms evaluated on Arrow data, the values Iceberg's DataFiles builder
parses and the directory names, against the spec's definitions computed here with
datetime arithmetic."""

from __future__ import annotations

import importlib.util
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

JOB = Path(__file__).resolve().parents[2] / "spark_jobs" / "offload_to_iceberg.py"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def job():
    module_spec = importlib.util.spec_from_file_location("offload_to_iceberg_native", JOB)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


TIMES = [
    datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc),
    datetime(2026, 12, 1, 23, 59, 59, 999999, tzinfo=timezone.utc),
    datetime(2026, 12, 2, 0, 0, tzinfo=timezone.utc),
    datetime(1969, 12, 31, 23, 30, tzinfo=timezone.utc),  # before the epoch: floored, not truncated
]


def _iceberg(transform: str, value: datetime) -> int:
    """Iceberg's spec: whole days / hours / months / years since 1970-01-01 (floored)."""
    if transform == "day":
        return (value.date() - EPOCH.date()).days
    if transform == "hour":
        return int((value - EPOCH).total_seconds() // 3600)
    if transform == "month":
        return (value.year - 1970) * 12 + value.month - 1
    return value.year - 1970


@pytest.mark.parametrize("transform", ["day", "hour", "month", "year"])
def test_time_transforms_follow_the_iceberg_spec(job, transform):
    column = pa.array(TIMES, pa.timestamp("us", tz="UTC"))
    assert job.partition_column(column, transform).to_pylist() == [_iceberg(transform, t) for t in TIMES]


def test_date_columns_and_millisecond_timestamps(job):
    days = pa.array([date(2026, 12, 1), date(1969, 12, 31)], pa.date32())
    assert job.partition_column(days, "day").to_pylist() == [20788, -1]
    assert job.partition_column(days, "month").to_pylist() == [683, -1]
    millis = pa.array(TIMES[:1], pa.timestamp("ms", tz="UTC"))
    assert job.partition_column(millis, "day").to_pylist() == [_iceberg("day", TIMES[0])]


def test_a_batch_splits_into_one_part_per_partition_value(job):
    batch = pa.record_batch(
        [pa.array(TIMES, pa.timestamp("us", tz="UTC")), pa.array(["BTC", "ETH", "BTC", "BTC"]),
         pa.array([1, 2, 3, 4], pa.int64())],
        names=["event_time", "symbol", "trade_id"])
    fields = [{"name": "event_time_day", "source": "event_time", "transform": "day"},
              {"name": "symbol", "source": "symbol", "transform": "identity"}]
    parts = {key: part.column("trade_id").to_pylist() for key, part in job.partition_split(batch, fields)}
    assert parts == {(20788, "BTC"): [1], (20788, "ETH"): [2], (20789, "BTC"): [3], (-1, "BTC"): [4]}
    # one value per field: the batch itself, unsplit
    [(key, whole)] = list(job.partition_split(batch.slice(0, 1), fields))
    assert key == (20788, "BTC") and whole.num_rows == 1
    # no partition fields: one part
    assert [k for k, _ in job.partition_split(batch, [])] == [()]


def test_values_as_iceberg_parses_them_and_directory_names(job):
    day = {"transform": "day"}
    assert job.partition_value(day, 20788) == "2026-12-01"  # a date for DateType
    assert job.partition_value({"transform": "month"}, 683) == "683"  # an int for IntegerType
    assert job.partition_value({"transform": "identity"}, "BTC/USD") == "BTC/USD"
    assert job.partition_value({"transform": "identity"}, True) == "true"
    assert job.partition_value(day, None) is None
    assert job.partition_path_value({"transform": "month"}, 683) == "2026-12"
    assert job.partition_path_value({"transform": "month"}, -1) == "1969-12"
    assert job.partition_path_value({"transform": "year"}, 56) == "2026"
    assert job.partition_path_value({"transform": "hour"}, _iceberg("hour", TIMES[0])) == "2026-12-01-10"
    assert job.partition_path_value(day, None) == "null"


def test_the_audit_reads_back_a_file_whose_partition_value_needs_escaping(job, tmp_path):
    """Kraken's pair partition holds values such as ETH/USD: the writer names the folder
    pair=ETH%2FUSD, and the driver's read-back (the audit) must open that folder as named,
    not decode it to pair=ETH/USD."""
    import pyarrow.fs as pafs

    from k2 import checksum as ck

    schema = pa.schema([
        pa.field("pair", pa.string(), metadata={b"PARQUET:field_id": b"1"}),
        pa.field("trade_id", pa.int64(), metadata={b"PARQUET:field_id": b"2"}),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), metadata={b"PARQUET:field_id": b"3"}),
    ])
    start_us = int((TIMES[0] - EPOCH).total_seconds() * 1_000_000)
    batch = pa.RecordBatch.from_pylist(
        [{"pair": "ETH/USD", "trade_id": i, "event_time": TIMES[0].replace(second=i)} for i in range(5)],
        schema=schema)
    location = f"file:{tmp_path}"
    plan = {"partition": [{"name": "pair", "source": "pair", "transform": "identity"}],
            "file_prefix": "test", "data_location": location, "codec": "zstd", "codec_level": None}
    fs, base = pafs.FileSystem.from_uri(job.arrow_uri(location))
    file = job._PartitionFile(fs, base, plan, ("ETH/USD",), 0, 0)
    file.add(batch)
    written = file.close()
    assert "/pair=ETH%2FUSD/" in written["path"]
    keys = [("pair", ck.Kind.STRING), ("trade_id", ck.Kind.INTEGER), ("event_time", ck.Kind.TIMESTAMP)]
    figures = job._file_checksum(written["path"], {1: "pair", 2: "trade_id", 3: "event_time"},
                                 "event_time", keys, start_us, start_us + 900_000_000, 900_000_000)
    assert figures == {0: ck.arrow_checksum([batch], keys)}
    # rows outside [start, end) are not counted; a column the file lacks is refused
    later = job._file_checksum(written["path"], {1: "pair", 2: "trade_id", 3: "event_time"},
                               "event_time", keys, start_us + 2_000_000, start_us + 900_000_000, 900_000_000)
    assert later == {0: ck.arrow_checksum([batch.slice(2)], keys)}
    assert job._file_checksum(written["path"], {1: "pair", 9: "missing"}, "pair", keys,
                              start_us, start_us + 1, 1) is None
