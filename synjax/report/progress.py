"""Progress bars that stay readable in a terminal and in a log file."""

from __future__ import annotations

import sys

import tqdm

# Seconds between bar updates when stderr is a file: a line every half minute
# instead of hundreds of carriage-return updates.
LOG_FILE_INTERVAL_S = 30.0
TERMINAL_INTERVAL_S = 0.1


def progress_bar(iterable=None, **kwargs) -> tqdm.tqdm:
    """`tqdm.tqdm` with an update interval suited to where stderr goes."""
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    kwargs.setdefault("mininterval", TERMINAL_INTERVAL_S if interactive else LOG_FILE_INTERVAL_S)
    return tqdm.tqdm(iterable, **kwargs)
