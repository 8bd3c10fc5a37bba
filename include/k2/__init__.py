"""K2 cold-tier offload: the shared library behind the DAGs, the Spark job and the `k2` CLI."""
