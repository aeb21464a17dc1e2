"""Running the ``fastsel`` command line: in the test process (exit code, standard output and standard error), and
in a child process killed at a chosen moment."""
from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import time
from typing import Callable

from fastsel.cli.app import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``fastsel ARGV`` (argparse's SystemExit counted as its code)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
    return int(rc), out.getvalue(), err.getvalue()


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float = 300, poll: float = 0.01) -> int:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (checked every ``poll`` seconds for ``timeout`` seconds) and
    return its exit code: ``-signal.SIGKILL`` when it was killed, its own code when it ended first."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(poll)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode
