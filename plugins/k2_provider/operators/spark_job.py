"""The base of the provider's Spark operators: SparkSubmitOperator running one of the k2
Spark jobs (spark_jobs/), with the job's jars, its connection settings in the environment
only, and every result line of its output kept."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.log import mask_secret

from k2.config import SPARK_JARS_DIR
from k2.iceberg import spark_conf
from k2.offload import job_jars
from k2.runtime_env import SECRET_VARIABLES, IcebergSettings

if TYPE_CHECKING:
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
    from airflow.sdk import Context

DEFAULT_JARS_DIR = SPARK_JARS_DIR


class K2SparkJobOperator(SparkSubmitOperator):
    """SparkSubmitOperator for a k2 Spark job whose output carries ``result_marker`` lines.

    Subclasses build the job's arguments at execute time and call :meth:`submit`.
    """

    result_marker: str = ""

    def __init__(self, *, jars: str | None = None, jars_dir: str | os.PathLike[str] = DEFAULT_JARS_DIR,
                 **kwargs: Any) -> None:
        super().__init__(jars=jars, **kwargs)
        self.jars_dir = str(jars_dir)
        self._result_lines: list[str] = []

    def _default_jars(self) -> str | None:
        jars = job_jars(self.jars_dir)
        if not jars:
            self.log.warning(
                "no jars in %s; run `make setup` (mvn dependency:copy-dependencies)", self.jars_dir
            )
        return ",".join(jars) or None

    def _get_hook(self) -> SparkSubmitHook:
        """The spark-submit hook, keeping every result line of the job's output.

        The hook itself keeps only a short tail of the output, which a long batch's result
        lines may overflow.
        """
        hook = super()._get_hook()
        process_log = hook._process_spark_submit_log
        lines = self._result_lines
        marker = self.result_marker

        def keep_results(itr: Iterator[Any]) -> None:
            def tee() -> Iterator[Any]:
                for line in itr:
                    if marker and marker in str(line):
                        lines.append(str(line).strip())
                    yield line

            process_log(tee())

        hook._process_spark_submit_log = keep_results  # type: ignore[method-assign]
        return hook

    def use_settings(self, env: Mapping[str, str], iceberg: IcebergSettings) -> None:
        """The job's connection settings: in spark-submit's environment only (secrets masked).

        Set only at execute time: rendered template fields were recorded before execute()
        (and are not re-recorded), so the values never reach the UI; the hook hands them to
        spark-submit through its environment (client mode) and does not log them.
        """
        for name in SECRET_VARIABLES:
            if env.get(name):
                mask_secret(env[name], name)
        self.env_vars = {**(self.env_vars or {}), **env}
        self.conf = {**spark_conf(iceberg), **(self.conf or {})}
        if not self.jars:
            self.jars = self._default_jars()

    def submit(self, context: Context, arguments: list[str]) -> list[str]:
        """Run the job with `arguments`; its result lines (else the hook's output tail)."""
        self.application_args = arguments
        self._hook = None  # built by SparkSubmitOperator.execute from the arguments above
        self._result_lines.clear()
        SparkSubmitOperator.execute(self, context)
        return list(self._result_lines) or list(getattr(self._hook, "_last_submit_log_lines", None) or [])
