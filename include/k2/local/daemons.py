"""Background processes of the local stack: started detached, tracked by pid files."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

from k2.local.processes import StackError, ensure_port_free, read_pid, tail, terminate, wait_until
from k2.local.settings import LocalStack


def http_ok(url: str, expect: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read()
    except OSError:
        return False
    return expect is None or body.strip() == expect


@dataclass(frozen=True)
class Daemon:
    """A process `k2` starts in its own session, so it outlives the command that started it."""

    name: str
    argv: Callable[[LocalStack], list[str]]
    port: Callable[[LocalStack], int | None]
    healthy: Callable[[LocalStack], bool]
    env: Callable[[LocalStack], dict[str, str]] = field(default=lambda _stack: {})
    port_env_var: str = ""
    start_timeout: float = 60.0
    cwd: Callable[[Any], Path] | None = None  # default: the stack's home

    def pid_file(self, stack: LocalStack) -> Path:
        return stack.run_dir / f"{self.name}.pid"

    def log_file(self, stack: LocalStack) -> Path:
        return stack.log_dir / f"{self.name}.log"

    def pid(self, stack: LocalStack) -> int | None:
        return read_pid(self.pid_file(stack))

    def start(self, stack: LocalStack) -> bool:
        if self.pid(stack) is not None:
            return False
        port = self.port(stack)
        if port is not None:
            ensure_port_free(self.name, stack.host, port, self.port_env_var)
        stack.run_dir.mkdir(parents=True, exist_ok=True)
        stack.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file(stack)
        with open(log, "ab") as log_handle:
            process = subprocess.Popen(
                self.argv(stack),
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=log_handle,
                env={**os.environ, **self.env(stack)},
                cwd=self.cwd(stack) if self.cwd else stack.home,
                start_new_session=True,
            )
        self.pid_file(stack).write_text(f"{process.pid}\n")
        started = wait_until(lambda: process.poll() is not None or self.healthy(stack), self.start_timeout)
        if process.poll() is not None or not started:
            terminate(process.pid, timeout=5)
            self.pid_file(stack).unlink(missing_ok=True)
            raise StackError(f"{self.name}: did not start (log {log}):\n{tail(log)}")
        return True

    def stop(self, stack: LocalStack) -> bool:
        pid = self.pid(stack)
        if pid is None:
            self.pid_file(stack).unlink(missing_ok=True)
            return False
        # The whole session: Airflow components fork workers and task processes.
        try:
            os.killpg(pid, 15)
        except (ProcessLookupError, PermissionError):
            pass
        terminate(pid)
        try:
            os.killpg(pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.pid_file(stack).unlink(missing_ok=True)
        return True


class Startable(Protocol):
    name: str

    def start(self, target: Any) -> bool: ...

    def stop(self, target: Any) -> bool: ...

    def port(self, target: Any) -> int | None: ...


S = TypeVar("S", bound=Startable)


def start_all(items: Sequence[S], target: Any, log: Callable[[str], None],
              running: Callable[[S], str] = lambda item: "") -> list[S]:
    """Start each item not yet running, in order; all or nothing: when one fails, the ones this
    call started are stopped again (in reverse) and the error is raised. ``running(item)``
    adds to the line logged for an item that was already running."""
    started: list[S] = []
    try:
        for item in items:
            if item.start(target):
                started.append(item)
                log(f"started {item.name} on {target.host}:{item.port(target)}")
            else:
                log(f"{item.name} already running on {target.host}:{item.port(target)}{running(item)}")
    except BaseException:
        for item in reversed(started):
            try:
                item.stop(target)
            except StackError as exc:
                log(f"while rolling back: {exc}")
        raise
    return started
