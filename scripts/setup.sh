#!/usr/bin/env bash
# `make setup`: installs everything the project needs, each step skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
TOOLS=$ROOT/.tools
STATSD_EXPORTER_VERSION=v0.28.0
# The S3-compatible object store of the scale-out stack (Apache-2.0; k2 local up --object-store).
VERSITYGW_VERSION=v1.8.0

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
# A stamp holds the hash of the inputs of a step; the step reruns only when they change.
inputs_hash() { cat "$@" | sha256sum | cut -d' ' -f1; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

command -v python3.11 >/dev/null || command -v python3 >/dev/null \
  || die "Python 3.11 is required (install python3.11)."
PYTHON=$(command -v python3.11 || command -v python3)
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "Python 3.11 is required; $PYTHON is $("$PYTHON" --version 2>&1)."
command -v java >/dev/null || die "Java 17 is required for Spark (install openjdk-17-jre-headless)."
command -v mvn >/dev/null || die "Maven is required to fetch the Spark jars (install maven)."
command -v go >/dev/null || die "Go is required to build statsd_exporter and versitygw (install golang >= 1.22)."

step "Python virtualenv and packages (.venv)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
want=$(inputs_hash requirements.txt pyproject.toml)
if stamp_ok "$VENV/.k2-installed" "$want"; then
  echo "up to date"
else
  "$VENV/bin/pip" install --quiet --upgrade pip
  # --no-compile: the next step compiles the tree in parallel, once
  "$VENV/bin/pip" install --quiet --no-compile -r requirements.txt
  "$VENV/bin/pip" install --quiet --no-deps -e .
  echo "$want" > "$VENV/.k2-installed"
fi

step "Byte-compiled Python (.pyc)"
# Where PYTHONDONTWRITEBYTECODE is set (CI images often set it) no import ever writes a .pyc,
# so every Airflow task, DAG parse, CLI call and Spark driver would compile its imports
# again: parsing dags/k2_offload.py takes 8.3 s uncompiled and 3.6 s compiled here.
# Reading .pyc files is unaffected by the variable. The project's own sources are
# recompiled on every run (a changed file's stale .pyc is ignored by Python, not used).
want=$(cat "$VENV/.k2-installed")
if stamp_ok "$VENV/.k2-compiled" "$want"; then
  echo "site-packages up to date"
else
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null \
    || die "byte-compiling $VENV/lib failed: run '$VENV/bin/python -m compileall -q $VENV/lib' to see the file"
  echo "$want" > "$VENV/.k2-compiled"
fi
"$VENV/bin/python" -m compileall -q -j 0 include plugins dags spark_jobs benchmarks tests >/dev/null \
  || die "byte-compiling the project failed: run '$VENV/bin/python -m compileall -q include plugins dags spark_jobs benchmarks tests' to see the file"

step "Spark jars (spark_jobs/jars) through Maven"
want=$(inputs_hash spark_jobs/pom.xml)
if stamp_ok spark_jobs/jars/.k2-installed "$want"; then
  echo "up to date"
else
  rm -rf spark_jobs/jars
  mvn --batch-mode --quiet -f spark_jobs/pom.xml dependency:copy-dependencies \
    -DoutputDirectory=jars -DincludeScope=runtime
  echo "$want" > spark_jobs/jars/.k2-installed
  ls spark_jobs/jars/*.jar
fi

step "Benchmark jars (spark_jobs/bench-jars) through Maven"
# The predecessor's JDBC driver for benchmarks/offload.py: never in jars/, which every job gets.
want=$(inputs_hash spark_jobs/pom.xml)
if stamp_ok spark_jobs/bench-jars/.k2-installed "$want"; then
  echo "up to date"
else
  rm -rf spark_jobs/bench-jars
  mvn --batch-mode --quiet -f spark_jobs/pom.xml -P predecessor-bench \
    dependency:copy-dependencies@bench-jars
  echo "$want" > spark_jobs/bench-jars/.k2-installed
  ls spark_jobs/bench-jars/*.jar
fi

step "Spark driver class-data archive (spark_jobs/cds) for the local stack"
# Every local job's driver JVM maps the classes of Spark and Iceberg from this archive
# instead of loading and verifying them again: ~40 % less CPU for a short job (docs/performance.md).
# Made once per JVM, Python packages and jars; a JVM that finds it stale ignores it.
want=$( { java -version 2>&1; cat "$VENV/.k2-installed"; ls -l spark_jobs/jars; cat spark_jobs/class_archive.py include/k2/local/spark_archive.py; } | sha256sum | cut -d' ' -f1)
if [ -f spark_jobs/cds/driver.jsa ] && stamp_ok spark_jobs/cds/.k2-installed "$want"; then
  echo "up to date"
else
  "$VENV/bin/python" -m k2.local.spark_archive
  echo "$want" > spark_jobs/cds/.k2-installed
fi

step "statsd_exporter $STATSD_EXPORTER_VERSION (.tools/bin) through go install"
# A `go install` build carries its module version in the binary (its --version is empty).
if [ -x "$TOOLS/bin/statsd_exporter" ] && go version -m "$TOOLS/bin/statsd_exporter" | grep -Eq "statsd_exporter[[:space:]]+$STATSD_EXPORTER_VERSION"; then
  echo "up to date"
else
  GOBIN="$TOOLS/bin" go install "github.com/prometheus/statsd_exporter@$STATSD_EXPORTER_VERSION"
fi

step "versitygw $VERSITYGW_VERSION, the S3 gateway (.tools/bin) through go install"
if [ -x "$TOOLS/bin/versitygw" ] && go version -m "$TOOLS/bin/versitygw" | grep -Eq "versitygw[[:space:]]+$VERSITYGW_VERSION"; then
  echo "up to date"
else
  GOBIN="$TOOLS/bin" go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi

step "Prometheus, promtool and Alertmanager (Debian packages)"
if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null; then
  echo "up to date"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
  # The packages enable system services; the project starts its own instances on loopback.
  pkill -x prometheus 2>/dev/null || true
  pkill -x prometheus-alertmanager 2>/dev/null || true
else
  die "prometheus, promtool and prometheus-alertmanager are missing: install the Debian packages 'prometheus' and 'prometheus-alertmanager' (needs root)."
fi

step "Redis, the Celery broker of the scale-out stack (Debian package)"
if command -v redis-server >/dev/null; then
  echo "up to date"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # The package enables a system service; the project starts its own instance on loopback.
  pkill -x redis-server 2>/dev/null || true
else
  die "redis-server is missing: install the Debian package 'redis-server' (needs root)."
fi

step "Chromium and ChromeDriver for the browser drills (Debian packages)"
# Playwright (requirements.txt) drives this browser: it never downloads one of its own.
if [ -x /usr/bin/chromium ]; then
  echo "up to date"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
else
  die "chromium is missing: install the Debian packages 'chromium' and 'chromium-driver' (needs root)."
fi

step "setup complete"
