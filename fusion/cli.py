"""What every console script shares."""

from __future__ import annotations

import os
import sys
from typing import Callable

SIGPIPE_EXIT = 141  # what a tool killed by SIGPIPE returns (128 + 13), as `cat` does


def pipe_safe(run: Callable[[], int]) -> int:
    """Run a tool's body; when the reader of its output has gone (`fusion-data stats D | head`),
    return SIGPIPE_EXIT without a traceback, also none from the flush at interpreter exit."""
    try:
        try:
            return run()
        finally:
            sys.stdout.flush()  # a reader gone shows here, inside the handler, not at exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        return SIGPIPE_EXIT
