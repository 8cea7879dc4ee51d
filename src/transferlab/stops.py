"""What a stopped command says (Ctrl-C, SIGTERM): how to continue it. Torch-free, imported with
the CLI: the words are ready when a signal lands while torch or matplotlib is still being
imported (importing them then, in the handler, ended in a second traceback and exit 1)."""

from __future__ import annotations

from pathlib import Path

RESUME = "rerun with --resume to continue"  # a stop's advice (a recipe says its own)
AGAIN = "run the recipe again to continue (finished steps are skipped, this one resumes)"
META = "meta.json"  # (checkpoint.META: a finished run's record)


def has_checkpoint(out: Path) -> bool:
    """Whether the run folder `out` holds a training state to continue from (state/*.pt)."""
    return any((Path(out) / "state").glob("*.pt"))


def going_on(command: str, out: str | None) -> str:
    """After Ctrl-C or SIGTERM outside a step: how to continue what `command` stopped."""
    out = Path(out or "")
    if command in ("run", "demo"):
        return f"; {AGAIN}"
    unfinished = out.name and out.is_dir() and not (out / META).is_file()
    if command in ("train", "finetune") and unfinished:
        if not has_checkpoint(out):  # ("the state it saved last is in" none)
            return "; it stopped before its first checkpoint, so nothing was saved: rerun with --resume to start it from the beginning"  # fmt: skip
        return f"; the state it saved last is in {out / 'state'}: {RESUME}"
    if command == "auto" and unfinished:
        return f" (the study's finished candidates are kept in {out}): {RESUME}"
    return ""
