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


def closed(command: str, quiet: bool) -> str:
    """What is lost where the standard output or error is closed (>&-, 2>&-): printed into
    nothing (a traceback of a bar's, said nowhere, with exit 1), or ""; a quiet train or
    finetune prints nothing on stdout (pass 66)."""
    if sys.stderr is None:
        return "its standard error is closed (2>&-): its errors and notes would be lost; send it to a file, or to /dev/null"  # fmt: skip
    if sys.stdout is None and not (quiet and command in ("train", "finetune")):
        return "its standard output is closed (>&-): what it prints would be lost; send it to a file, or to /dev/null"  # fmt: skip
    return ""
