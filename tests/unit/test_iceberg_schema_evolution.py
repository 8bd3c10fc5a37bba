"""k2.iceberg.schema_evolution: which ClickHouse schema changes the offload applies to Iceberg."""

from __future__ import annotations

import pytest

from k2 import iceberg as ib


def _iceberg(*columns: tuple[str, str]):
    return ib.spark_struct([ib.SourceColumn(n, t) for n, t in columns])


def _clickhouse(*columns: tuple[str, str]):
    return [ib.SourceColumn(n, t) for n, t in columns]


def test_same_schema_changes_nothing():
    cols = (("id", "UInt64"), ("note", "Nullable(String)"))
    plan = ib.schema_evolution(_clickhouse(*cols), _iceberg(*cols))
    assert (plan.changes, plan.refused) == ([], [])


def test_new_columns_are_added_as_optional():
    plan = ib.schema_evolution(
        _clickhouse(("id", "UInt64"), ("venue", "Nullable(String)"), ("lot", "Int32")),
        _iceberg(("id", "UInt64")),
    )
    assert plan.refused == []
    assert plan.statements("t") == ["ALTER TABLE t ADD COLUMNS (`venue` string)",
                                    "ALTER TABLE t ADD COLUMNS (`lot` int)"]  # no NOT NULL


@pytest.mark.parametrize("old, new, spark_type", [
    ("Int32", "Int64", "bigint"),
    ("Float32", "Float64", "double"),
    ("Decimal(18, 6)", "Decimal(38, 6)", "decimal(38,6)"),
])
def test_safe_promotions(old, new, spark_type):
    plan = ib.schema_evolution(_clickhouse(("x", new)), _iceberg(("x", old)))
    assert plan.refused == []
    assert plan.statements("t") == [f"ALTER TABLE t ALTER COLUMN `x` TYPE {spark_type}"]


@pytest.mark.parametrize("old, new", [
    ("String", "Int64"),             # incompatible
    ("Int64", "Int32"),              # narrowing
    ("Float64", "Float32"),          # narrowing
    ("Decimal(38, 6)", "Decimal(18, 6)"),  # precision narrowing
    ("Decimal(18, 6)", "Decimal(38, 8)"),  # scale change
    ("Decimal(38, 18)", "Float64"),
])
def test_unsafe_changes_are_refused_naming_the_column(old, new):
    plan = ib.schema_evolution(_clickhouse(("id", "UInt64"), ("x", new), ("y", "Nullable(String)")),
                               _iceberg(("id", "UInt64"), ("x", old)))
    assert len(plan.refused) == 1 and "column 'x'" in plan.refused[0]
    assert "not a safe Iceberg type promotion" in plan.refused[0]


def test_required_becomes_nullable_drops_not_null():
    plan = ib.schema_evolution(_clickhouse(("x", "Nullable(Int64)")), _iceberg(("x", "Int64")))
    assert plan.statements("t") == ["ALTER TABLE t ALTER COLUMN `x` DROP NOT NULL"]


def test_required_iceberg_only_column_is_refused():
    plan = ib.schema_evolution(_clickhouse(("id", "UInt64")), _iceberg(("id", "UInt64"), ("gone", "Int64")))
    assert plan.refused == ["required column 'gone' exists only in Iceberg"]
