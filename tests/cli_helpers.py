"""Running the ``fastsel`` command line in the test process: exit code, standard output and standard error."""
from __future__ import annotations

import contextlib
import io

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
