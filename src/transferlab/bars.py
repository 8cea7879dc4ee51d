"""Progress bars: tqdm's, gone when done in a terminal or a notebook; ended by a newline where
stderr is a file (a log), so the line after a bar starts a line of its own instead of following
the bar's last carriage return."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(*args, **kwargs) -> tqdm:
    """`tqdm(*args, **kwargs)`, leaving its last state on a line of its own in a log file."""
    file = kwargs.get("file") or sys.stderr
    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    logged = not notebook and not (hasattr(file, "isatty") and file.isatty())
    return tqdm(*args, **kwargs, leave=logged)
