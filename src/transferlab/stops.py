"""What a stopped command says (Ctrl-C, SIGTERM, a torchrun job's process gone): how to continue
it. Torch-free, imported with the CLI: the words are ready when a signal lands while torch or
matplotlib is still being imported (importing them then, in the handler, ended in a second
traceback and exit 1)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

from .config import EveryRank, UserError

RESUME = "rerun with --resume to continue"  # a stop's advice (a recipe says its own)
AGAIN = "run the recipe again to continue (finished steps are skipped, this one resumes)"
META = "meta.json"  # (checkpoint.META: a finished run's record)
LATER: list[str] = []  # notes said once the command has refused nothing (`later`, `say_later`)
SAID: set[str] = set()


def has_checkpoint(out: Path) -> bool:
    """Whether the run folder `out` holds a training state to continue from (state/*.pt)."""
    return any((Path(out) / "state").glob("*.pt"))


def other_rank() -> bool:
    """A process of a torchrun job but rank 0: it leaves what each process says alike (argparse's
    usage and --help, a refusal all reach, the SIGTERM that ends the job when one failed) to
    rank 0 (it said "stopped by SIGTERM: rerun with --resume" under rank 0's refusal)."""
    return os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1"


def alike(make):
    """`make()`, which every process of a torchrun job does alike from the same arguments (a
    config): its refusal is an EveryRank, said once by rank 0."""
    try:
        return make()
    except UserError as err:
        raise (err if isinstance(err, EveryRank) else EveryRank(str(err))) from None


def said_by_rank_0():
    """stdout and stderr kept from the user in the other processes of a torchrun job."""
    if not other_rank():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def peer_stopped(err: Exception) -> str | None:
    """What a torchrun job's collective raised when another of its processes died (gloo's
    "Connection reset by peer", NCCL's), in a line's words; None for any other error."""
    if os.environ.get("WORLD_SIZE", "1") == "1" or not re.search(r"^Dist|/gloo/|NCCL", f"{type(err).__name__} {err}"):  # fmt: skip
        return None
    said = re.sub(r"^\[[^\]]*\] ", "", str(err).strip().splitlines()[0]).split(". ")[0]  # fmt: skip
    return f"another process of this torchrun job stopped ({said})"


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


def later(note: str) -> None:
    """A note read where the command has not yet checked all it refuses (its options, a member's
    weights): said by `say_later` once it has, once; a refusal stays one line."""
    if note not in LATER:
        LATER.append(note)


def say_later() -> None:
    for note in (n for n in LATER if n not in SAID):  # once a process (the API's calls)
        print(f"note: {note}", file=sys.stderr)
        SAID.add(note)
    LATER.clear()
