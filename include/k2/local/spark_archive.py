"""`python -m k2.local.spark_archive`: make the driver JVM's class-data archive (AppCDS) of
the local stack's Spark jobs (k2.local.settings.SPARK_CLASS_ARCHIVE); run by `make setup`.

A job's driver JVM loads and verifies some 15,000 classes of Spark and Iceberg before it
reads a row; with the archive it maps them. Measured on a 2-core machine: a session that
creates an Iceberg table and counts it, 13.3 → 7.5 CPU-s; the warm-up job itself 20 → 14.
The archive belongs to this JVM and these jars: the JVM ignores it (and loads the classes as
before) when they change, and `make setup` makes it again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from k2.config import REPO_ROOT, SPARK_JARS_DIR
from k2.local.settings import LOOPBACK, SPARK_CLASS_ARCHIVE, SPARK_CLASS_ARCHIVE_PARTIAL, spark_environment
from k2.offload import job_jars, spark_submit_command

WARM_UP_JOB = REPO_ROOT / "spark_jobs" / "class_archive.py"


def make_archive(log=print) -> Path:
    """Run the warm-up job with -XX:ArchiveClassesAtExit; the archive replaces the old one only
    once complete (a job starting meanwhile maps the old one or none)."""
    jars = job_jars(SPARK_JARS_DIR)
    if not jars:
        raise SystemExit(f"no jars in {SPARK_JARS_DIR}: run the Maven step of `make setup` first")
    SPARK_CLASS_ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
    partial = SPARK_CLASS_ARCHIVE_PARTIAL
    partial.unlink(missing_ok=True)
    env = {**os.environ, **spark_environment(LOOPBACK, archive="dump"), "PYSPARK_PYTHON": sys.executable}
    argv = spark_submit_command([], master="local[2]", jars=jars, application=WARM_UP_JOB)
    log_file = SPARK_CLASS_ARCHIVE.parent / "archive.log"
    started = time.monotonic()
    with log_file.open("w") as out:
        result = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise SystemExit(f"the class-data archive was not made (exit {result.returncode}); see {log_file}")
    partial.replace(SPARK_CLASS_ARCHIVE)
    log(f"{SPARK_CLASS_ARCHIVE}: {SPARK_CLASS_ARCHIVE.stat().st_size / 2**20:.0f} MiB "
        f"in {time.monotonic() - started:.0f} s (log: {log_file})")
    return SPARK_CLASS_ARCHIVE


if __name__ == "__main__":
    make_archive()
