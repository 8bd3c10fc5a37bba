-- The databases of the stack besides k2 (watermarks, ledger, Iceberg JDBC catalog).
CREATE DATABASE airflow;
