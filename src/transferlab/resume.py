"""What a checkpoint holds, when one is written, and how a run continues from it (--resume).

A checkpoint is the whole training state (model, optimizer, scheduler, scaler, RNG, Progress,
config) as tensors and plain types, loadable with torch.load(weights_only=True). It is written
after every epoch and stage, every --checkpoint-every steps, and on SIGTERM; a resumed run is
bitwise the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint, data, guards
from .config import Preempted, TrainConfig, UserError, names_weights, to_dict
from .stops import RESUME, has_checkpoint

if TYPE_CHECKING:
    from .trainer import Loop

BEST_NONE = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint (as plain types, `to_state`)."""

    stage: int = 0  # the plan's stage being run (strategies.plan); len(plan) once done
    epoch: int = 1  # the epoch being trained (1-based, counted over the run; epochs + 1 once done)
    step: int = 0  # batches done in this epoch (a mid-epoch resume skips them)
    global_step: int = 0  # batches done in the run
    totals: list = field(default_factory=lambda: [0.0, 0, 0])  # epoch's loss sum, correct, seen
    lr: float = 0.0  # the LR the epoch's last step trained at (history.csv's lr: not the next's)
    losses: list = field(default_factory=list)  # every step's loss (bitwise resume checks it)
    history: list = field(default_factory=list)  # one row per finished epoch
    stale: int = 0  # epochs since val last improved (early stopping)
    stopped_early: bool = False
    seconds: float = 0.0  # training time so far, across resumes
    best: dict = field(default_factory=lambda: dict(BEST_NONE))  # the best epoch and its weights
    probe: dict | None = None  # the probe's chosen strength and score
    val_logits: torch.Tensor | None = None  # a pure probe scores val/test from its features
    test_logits: torch.Tensor | None = None

    def to_state(self) -> dict:
        """Plain types and tensors only: loadable with torch.load(weights_only=True)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: no tensor copies
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        state = dict(state)
        if "stage" not in state and state.get("probed"):  # checkpoints before plans: lp-ft
            state["stage"] = 1
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})


class Checkpoints:
    """Saves the training state (each epoch, every N steps, on SIGTERM) and writes the events.

    `after_step` runs for every step: it logs the step, fires an injected fault (tests), and at a
    boundary saves when due and stops every rank at the same step when SIGTERM arrived.
    """

    def __init__(self, out: Path, loop: Loop, progress: Progress, log_json, t_start: float):
        self.out, self.loop, self.progress, self.t_start = out, loop, progress, t_start
        main = loop.dist.main
        # faults are injected into fresh runs only (a resumed run must get past the step)
        self.fault = guards.injected_fault(loop.dist.rank) if progress.global_step == 0 else None
        self.events = guards.EventLog(
            log_json if main else None, out / "tensorboard" if main else None
        )

    def __enter__(self) -> Checkpoints:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.events)
        self.stop = self._stack.enter_context(guards.stop_on_sigterm())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def save(self) -> None:
        p, loop = self.progress, self.loop
        p.seconds = time.time() - self.t_start
        if loop.dist.main:
            path = self.out / "state"
            checkpoint.save_checkpoint(
                path, training_state(loop, p), p.global_step, loop.cfg.keep_last
            )

    def after_step(self, indices: list[int], boundary: bool = True) -> None:
        """Once per step, when its stats are read (trainer.read_steps). Only at a `boundary`
        (the last step read, which the model's state matches) does it save or stop."""
        p, cfg = self.progress, self.loop.cfg
        self.events.write(event="step", epoch=p.epoch, step=p.step, global_step=p.global_step,
                          loss=p.losses[-1], indices=indices)  # fmt: skip
        if self.fault and p.global_step == self.fault[1]:
            os.kill(os.getpid(), self.fault[0])  # test hook: die or be pre-empted right here
        if not boundary:
            return
        if cfg.checkpoint_every and p.global_step % cfg.checkpoint_every == 0:
            self.save()
        late = guards.past_deadline()
        if self.loop.dist.any(self.stop["requested"] or late):  # all ranks stop at one step
            self.save()
            raise Preempted(
                f"stopped {'at its deadline' if late else 'by SIGTERM'} at epoch {p.epoch} "
                f"step {p.step}; state saved in "
                f"{self.out / 'state'}: {RESUME}"
            )

    def check_stop(self, where: str) -> None:
        """Inside work that is not a training step (a probe's feature passes, minutes long):
        SIGTERM or the deadline stop the run there, without a state to save (the splits whose
        features are done stay in the feature cache). Single-process only: ranks would have to
        agree, as at step boundaries."""
        late = guards.past_deadline()
        if self.loop.dist.world == 1 and (self.stop["requested"] or late):
            raise Preempted(
                f"stopped {'at its deadline' if late else 'by SIGTERM'} during {where}; "
                f"{RESUME} (finished feature passes are cached)"
            )


def started_with(out) -> TrainConfig | None:
    """`train --out R --resume`: the config R was started with, under which the flags given
    again apply (every flag had to be retyped; those not were "changes")."""
    from .config import make_config
    from .outputs import read_mark

    saved = (read_mark(Path(out).expanduser()) or {}).get("config")
    try:
        return make_config(saved, check_applies=False) if isinstance(saved, dict) else None
    except UserError:  # from an older transferlab: compared as before
        return None


def finetune_config(source, overrides: dict, resuming=None) -> TrainConfig:
    """`finetune --from SRC`'s config; `resuming` R: R's own (the flags given again applied)
    when R started from SRC, as `train --out R --resume` takes them (the parent's epochs and
    a tenth of its LR, filled in again, were "changes" the user never typed)."""
    from .config import make_config
    from .strategies import finetune_config as new

    started = started_with(resuming) if resuming else None
    if source is None:  # `finetune --out R --resume`, as `train --out R --resume` is enough
        if started is None and resuming and (why := nothing_to_resume(Path(resuming).expanduser())):  # fmt: skip
            raise UserError(why)
        if started is None:
            raise UserError(f"finetune needs --from RUN, the run to start from{f' (nothing to resume in {resuming})' if resuming else ''}")  # fmt: skip
        if started.weights in (None, "none", "imagenet") or ":" in started.weights or Path(started.weights).is_file():  # fmt: skip
            raise UserError(f"{resuming} was not fine-tuned from a run: continue it with transferlab train --out {resuming} --resume")  # fmt: skip
        if not Path(started.weights).expanduser().exists():  # (kept as typed: from where it began)
            raise UserError(f"{resuming} was fine-tuned from {started.weights}, which is not found from here: resume from the folder it was started in, or give --from the run's path (if it moved: its new one; its weights must be the ones {resuming} started from)")  # fmt: skip
        source = started.weights
    if started is not None and not Path(source).expanduser().exists():  # (it said "weights file not found")  # fmt: skip
        raise UserError(f"run folder not found: {source} ({resuming} was fine-tuned from {started.weights}: if that run moved, give --from its new path)")  # fmt: skip
    if started is not None and Path(started.weights or "").resolve() == Path(source).resolve():
        return make_config(overrides, started)
    if started is not None and moved_parent(resuming, started.weights, source):
        return replace(make_config(overrides, started), weights=str(source))
    return new(source, overrides)


def nothing_to_resume(out: Path) -> str | None:
    """Why --resume has nothing to continue in `out` (it "started from scratch" over a soup), or
    None: a folder of another kind, a soup, a finished run whose state/ was deleted."""
    from .outputs import read_mark

    kind = (read_mark(out) or {}).get("kind", "run")
    if kind != "run":
        return f"--resume: {out} is a transferlab {kind} folder, not a run: nothing to resume"
    if (out / checkpoint.META).is_file() and not has_checkpoint(out):
        what = "a soup" if checkpoint.read_meta(out).get("strategy") == "soup" else "a finished run whose state/ is gone"  # fmt: skip
        return f"--resume: {out} holds {what}, with no checkpoint to continue from: nothing to resume; score it with transferlab evaluate {out}, or pass --overwrite instead of --resume to train anew there"  # fmt: skip
    try:  # (checked before the run says a line: pass 48)
        checkpoint.newest_checkpoint(out / "state", check_only=True)
    except UserError as err:
        done = f"; the run finished: score it with transferlab evaluate {out}" if (out / checkpoint.META).is_file() else "; to train it anew, pass --overwrite instead of --resume"  # fmt: skip
        return f"--resume: {err}{done}"
    return None


def moved_parent(out, then, now) -> bool:
    """A fine-tune's parent run moved: the run `out` started from (`then`) is not there any
    more, and the run `now` holds its weights (the sha256 `out` recorded when it began)."""
    want = _parent_sha256(out)
    return bool(want and then and now) and not Path(then).expanduser().exists() and holds_weights(now, want)  # fmt: skip


def holds_weights(run: str | Path, sha: str) -> bool:
    """Whether `run` is a finished run folder whose weights have the sha256 `sha` (a fine-tune's
    parent found again, moved or not: by its weights, not its path)."""
    try:
        return checkpoint.is_run(Path(run).expanduser()) and checkpoint.read_meta(Path(run).expanduser()).get("weights_sha256") == sha  # fmt: skip
    except (UserError, OSError, ValueError):
        return False


def _parent_sha256(out) -> str | None:
    """The sha256 of the weights the fine-tune `out` started from (its mark; None: not kept)."""
    from .outputs import read_mark

    return (read_mark(Path(out).expanduser()) or {}).get("parent_sha256")


def training_state(loop: Loop, progress: Progress) -> dict:
    """Everything resume needs, as tensors and plain types (weights-only loadable)."""
    return {
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "progress": progress.to_state(),
        "config": to_dict(loop.cfg),
        "processes": loop.dist.world,
    }


def restore(out: Path, loop: Loop, log) -> Progress | None:
    """Load the newest valid checkpoint into the training objects; None when there is none."""
    found = checkpoint.newest_checkpoint(out / "state", trust_pickle=loop.cfg.trust_pickle)
    if found is None:  # (fit resumes only where state/ holds a checkpoint, and says so if not)
        return None
    state, path = found
    refuse_config_change(out, state.get("config"), loop.cfg)
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    p = Progress.from_state(state["progress"])
    done = finished(loop.stages, p)  # (killed while writing its files: "epoch 4" of 3, pass 59)
    log(f"[{out.name}] resumed from {path.name}: " + ("its training had ended; what is left: scoring it and writing its files" if done else f"epoch {p.epoch}, step {p.step}"))  # fmt: skip
    if state.get("processes", loop.dist.world) != loop.dist.world and not done:  # (BatchNorm: shares differ)  # fmt: skip
        loop.notes.append(f"trained in {state['processes']} process(es) to step {p.global_step}, then in {loop.dist.world}")  # fmt: skip
        log(f"[{out.name}] note: it {loop.notes[-1]}: any BatchNorm layers normalised other shares of each batch before, so it may equal neither", note=True)  # fmt: skip
    return p


def finished(stages: list, p: Progress) -> bool:
    """Whether a run restored at `p` has nothing left to train (its last checkpoint is its end)."""
    from .strategies import end_epoch

    last = len(stages) - 1
    return p.stopped_early or p.stage > last or (p.stage == last and not stages[last].probe and p.epoch > end_epoch(stages, last))  # fmt: skip


# Options that change neither the maths nor the data, so a run may resume with new values.
SAFE_ON_RESUME = {"num_workers", "eval_batch_size", "checkpoint_every", "keep_last", "cache_dir",
                  "trust_pickle"}  # fmt: skip


def refuse_other_parent(out: Path, weights: str | None) -> None:
    """A fine-tune resumes from the weights it started from: a run found at its parent's path
    (typed relative, resumed from another folder; a new run trained where the parent was) is
    checked by the sha256 recorded when it began (it was taken as the parent without a word)."""
    want = _parent_sha256(out)
    if want and weights and Path(weights).expanduser().is_dir() and not holds_weights(weights, want):  # fmt: skip
        raise UserError(f"cannot resume {out}: {weights} holds other weights than the run it was fine-tuned from (sha256 {want[:12]}...): give --from the run it started from")  # fmt: skip


def refuse_config_change(out: Path, saved: dict | None, cfg: TrainConfig) -> None:
    """--resume continues the same run: a config that changed (but for SAFE_ON_RESUME) is refused."""
    if saved and moved_parent(out, saved.get("weights"), cfg.weights):  # the same parent, moved
        saved = {**saved, "weights": cfg.weights}
    changed = config_changes(saved, to_dict(cfg)) if saved else ""
    if changed:
        raise UserError(
            f"cannot resume {out}: its config differs ({changed}); resume with the options it "
            "was started with, or pass --overwrite instead of --resume to start over"
        )


def refuse_data_change(out: Path, ds) -> None:
    """--resume on data whose files changed (images added, removed, renamed) is refused: its
    splits would be carved anew, so images it trained on could be scored as val or test, and
    its place in the epoch would index other images (it resumed without a word)."""
    from .outputs import read_mark

    then = (read_mark(out) or {}).get("data_fingerprint")
    if then not in (None, ds.fingerprint):
        raise UserError(
            f"cannot resume {out}: the files of {ds.spec} changed since it began (fingerprint "
            f"{then} then, {ds.fingerprint} now), so its splits would be carved anew and images "
            "it trained on could be scored as val or test; resume on the data as they were, or "
            "pass --overwrite instead of --resume to start over"
        )


def config_changes(saved: dict, now: dict) -> str:
    """The keys whose values differ between a saved config and this one ("" when none)."""

    def norm(key, value):
        if key == "weights" and value is None and not names_weights(now.get("model", "")):
            return "none"  # (runs from before `none` was kept as the word: the same scratch)
        return data.canonical(value) if key == "data" and isinstance(value, str) else value

    safe = set(SAFE_ON_RESUME)
    if now.get("schedule") in ("constant", "plateau") and not now.get("snapshots"):
        safe.add("epochs")  # the LR does not depend on it: a run may be extended
    keys = sorted(k for k in saved.keys() | now.keys() if k not in safe)

    def say(value):  # 0.1 / 3 * 0.009 as 0.0003, not 0.00030000000000000003
        return f"{value:.6g}" if isinstance(value, float) else repr(value)

    diffs = [
        f"{k}: {say(saved.get(k))} -> {say(now.get(k))}"
        for k in keys
        if norm(k, saved.get(k)) != norm(k, now.get(k))
    ]
    return "; ".join(diffs)
