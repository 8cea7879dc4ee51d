"""What surrounds a training run while it trains: its event log (JSON lines, TensorBoard),
SIGTERM turned into a clean stop at a step boundary, out-of-memory turned into advice, a CPU
kernel's bf16 trap avoided (fp32), advice on what it does that its user may not want, its set-up's
lines held until nothing more is refused, and the fault-injection hook the reliability tests kill
runs with."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from .config import EveryRank, UserError


class EventLog:
    """Step and epoch events: one JSON object per line in `path` (appended to across resumes),
    and TensorBoard scalars in `tensorboard_dir` when the tensorboard package is installed."""

    def __init__(self, path: str | Path | None, tensorboard_dir: Path | None = None):
        self.file = open(path, "a") if path else None  # noqa: SIM115 (closed in __exit__)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional dependency
                pass
            else:
                self.tb = SummaryWriter(str(tensorboard_dir))

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()

    def write(self, **event) -> None:
        if self.file:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()
        if self.tb and event["event"] == "step":
            self.tb.add_scalar("step/train_loss", event["loss"], event["global_step"])
        elif self.tb and event["event"] == "epoch":
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                self.tb.add_scalar(f"epoch/{key}", event[key], event["epoch"])


def injected_fault(rank: int = 0) -> tuple[int, int] | None:
    """TRANSFERLAB_FAULT=kill:N, term:N or int:N sends SIGKILL/SIGTERM/SIGINT (Ctrl-C) to this
    process after step N.

    `kill:N@R` hits rank R only. A fault-injection hook for the reliability tests (kill -9,
    pre-emption and rank failure at an exact step).
    """
    spec = os.environ.get("TRANSFERLAB_FAULT")
    if not spec:
        return None
    spec, _, only = spec.partition("@")
    if only and int(only) != rank:
        return None
    kind, _, step = spec.partition(":")
    if kind == "int" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job ignores it
    return {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[kind], int(step)


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into a request to stop at the next step boundary (main thread only)."""
    flag = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["requested"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


_DEADLINE: list[float | None] = [None]


@contextlib.contextmanager
def deadline(at: float | None):
    """Training inside the block stops like on SIGTERM (state saved, Preempted) at the first
    step boundary past time.time() == `at`: how `transferlab auto` keeps its budget."""
    before, _DEADLINE[0] = _DEADLINE[0], at
    try:
        yield
    finally:
        _DEADLINE[0] = before


def past_deadline() -> bool:
    return _DEADLINE[0] is not None and time.time() > _DEADLINE[0]


@contextlib.contextmanager
def said_in_one_line(cfg, epoch: int):
    """An epoch's out-of-memory error, or a step too large for float32 (--lr 1e39: Adam's
    addcdiv_), as advice in one line; the last checkpoint on disk stays intact."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory: reduce --batch-size (now {cfg.batch_size})") from None
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or "out of memory" in str(err).lower():
            raise UserError(f"out of memory: reduce --batch-size (now {cfg.batch_size})") from None
        if "without overflow" in str(err):
            raise EveryRank(f"the optimizer's step at epoch {epoch} is too large for float32: try a lower --lr (now {cfg.lr}); checkpoints written before this step are intact") from None  # fmt: skip
        raise


def cpu_bf16_checked(cfg, model, prep, precision: str, note) -> str:
    """`precision`, or fp32 where --precision auto chose bf16 on a CPU and the model trains a
    convolution whose bf16 weight gradient the CPU kernels can make NaN (`models.bf16_grad_trap`;
    --precision bf16 asked for: kept, and said)."""
    from . import evaluate, models

    if precision == "bf16" and evaluate.device().type == "cpu" and not evaluate.bf16_supported():
        note("note: --precision bf16 on this CPU is emulated (it has no avx512_bf16 or amx_bf16): slower than fp32, which --precision auto picks here, and evaluate scores the run in fp32 here")  # fmt: skip
    if precision != "bf16" or evaluate.device().type != "cpu" or cfg.strategy == "linear-probe":
        return precision
    if not (conv := models.bf16_grad_trap(model, prep.input_size, prep.channels)):
        return precision
    why = (f"{cfg.model} at {prep.input_size} px runs a strided convolution on maps 1 pixel wide "
           f"({conv}), whose bf16 weight gradient this CPU's kernels can fill with NaN")  # fmt: skip
    if cfg.precision == "auto":
        note(f"note: precision fp32, not bf16: {why}")
        return "fp32"
    note(
        f"note: {why}; if the loss turns NaN, train with --precision fp32 or a larger --input-size"
    )
    return precision


def advice(loop) -> list[str]:
    """What a run about to train does that its user may not want: mirror digits (`train`'s
    default data), normalise BatchNorm over each torchrun process's share of a batch; and an
    option that did nothing once the data was known (--head-init match of a head kept whole)."""
    cfg, ds, d, said = loop.cfg, loop.ds, loop.dist, []
    if all(s.probe for s in loop.stages):
        return said
    if cfg.head_init == "match" and str(loop.source.get("head", "")).startswith("kept"):  # pass 51
        said.append("--head-init match did nothing: the data's classes are those its weights were trained on, so their head is kept whole")  # fmt: skip
    if cfg.flip and ds.symbols:
        said.append(f"--flip mirrors training images at random, and the images of {ds.spec} are greyscale and {ds.native_size} px, like digits or letters, which a mirror turns into others (or none): pass --no-flip (a recipe: flip: false; the API: flip=False)")  # fmt: skip
    if d.world > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in loop.model.modules()):  # fmt: skip
        b = min(cfg.batch_size, len(loop.labels["train"]))  # (a split smaller than a batch: one)
        said.append(f"each of the {d.world} processes normalises the BatchNorm layers over its share of the batch ({b // d.world}-{-(-b // d.world)} images), not over all {b}: the run does not equal one process on the same batch")  # fmt: skip
    return said


def held(make, log):
    """`make(log)` with the lines it logs said once it returned, but its notes (stderr) only
    when the caller calls the function returned beside it (after decoding its images): a
    refusal stays one line (a run's data notes came before its --weights, --out or an
    unreadable image refused; passes 47, 48)."""
    lines: list = []
    made = make(lambda *a, **k: lines.append((a, k)))
    for a, k in (line for line in lines if not line[1].get("note")):
        log(*a, **k)

    def notes() -> None:
        for a, k in (line for line in lines if line[1].get("note")):
            log(*a, **k)

    return made, notes
