"""What every console script shares: one-line errors, argument helpers, pipe safety."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

SIGPIPE_EXIT = 141  # what a tool killed by SIGPIPE returns (128 + 13), as `cat` does


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type=`: an integer >= `low`, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def default_workers() -> int:
    """The default of a --workers flag: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


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
