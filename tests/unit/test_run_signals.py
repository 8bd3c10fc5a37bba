"""`k2 run` stops on SIGINT and SIGTERM, also when started from a script that runs it in the
background (such a shell starts it with SIGINT ignored, and Python then never raises
KeyboardInterrupt)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

PROBE = (
    "from k2.local.pipeline import wait_for_interrupt\n"
    "wait_for_interrupt(ready=lambda: print('waiting', flush=True))\n"
    "print('stopped', flush=True)\n"
)


def _ignore_sigint() -> None:  # what a non-interactive shell does for a background job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_wait_ends_on_the_signal_even_with_sigint_ignored_at_start(signum):
    proc = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        deadline = time.monotonic() + 30
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "stopped"
