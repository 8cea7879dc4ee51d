"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's lr_find).

Train for a few steps while the LR grows exponentially from `start` to `end`; record the
smoothed loss; stop once it explodes. The suggestion is the LR a tenth of the one at the
minimum of the smoothed loss (the rule of thumb from fastai), which sits on the steep, still
stable part of the curve. The model, the optimizer's parameters and the RNG state are restored
afterwards: a range test leaves no trace on the run that follows.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import batching, checkpoint, data, evaluate, guards, models, plots, strategies
from .bars import bar as progress_bar
from .config import TrainConfig, UserError


def range_test(
    model: nn.Module,
    make_optimizer,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    augment: batching.Augment,
    prep: models.Preprocessing,
    precision: str,
    frozen: list[nn.Module],
    seed: int = 0,
    steps: int = 100,
    start: float = 1e-7,
    end: float = 1.0,
    quiet: bool = True,
) -> tuple[list[float], list[float]]:
    """(lrs, smoothed losses) of an LR range test; `make_optimizer(lr)` builds the optimizer."""
    saved, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    optimizer = make_optimizer(start)
    mult = (end / start) ** (1 / max(1, steps - 1))
    dev, size = evaluate.device(), prep.input_size
    model.train()
    for m in frozen:
        m.eval()
    lrs, losses, avg, best = [], [], 0.0, math.inf
    bar = progress_bar(total=steps, desc="lr-find", disable=quiet, unit="step")
    epoch = 0
    try:
        while len(lrs) < steps:
            batches = batching.loader(images, labels, batch_size, seed, epoch, True)
            params = augment.params(len(labels), size, seed, epoch)
            for x, y, idx in batches:
                lr = start * mult ** len(lrs)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                x = augment(x.to(dev), {k: v[idx] for k, v in params.items()})
                x = batching.normalize(x, prep.mean, prep.std)
                loss = F.cross_entropy(models.logits(model, x, precision), y.to(dev))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                avg = 0.98 * avg + 0.02 * loss.item()
                smooth = avg / (1 - 0.98 ** (len(lrs) + 1))  # debiased running mean
                lrs.append(lr)
                losses.append(smooth)
                bar.update()
                if not math.isfinite(smooth) or smooth > 4 * best or len(lrs) >= steps:
                    return lrs, losses
                best = min(best, smooth)
            epoch += 1
        return lrs, losses
    finally:
        bar.close()
        model.load_state_dict(saved)
        torch.set_rng_state(rng)


def suggest(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the LR at the smoothed loss's minimum (fastai's `lr_min`)."""
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if not finite:
        raise ValueError("the range test produced no finite loss")
    return min(finite)[1] / 10


def find_lr(loop, out, quiet: bool, auto: bool = False) -> tuple[float, bool]:
    """The range test on the training split with the run's optimizer and augmentation; plots
    it into `out` (lr_find.png, lr_find.json) and returns the suggested LR (for --lr `auto`, the
    default where the loss had no minimum: pass 58, the range's end tenthed, 0.1, diverged) and
    whether it had none."""
    cfg, model = loop.cfg, loop.model
    widest = loop.stages[-1]
    lrs, losses = range_test(
        model,
        lambda lr: strategies.make_optimizer(
            cfg, strategies.optimizer_groups(model, widest, lr), lr
        ),
        loop.images["train"],
        loop.labels["train"],
        cfg.batch_size,
        loop.augment,
        loop.prep,
        loop.precision,
        loop.frozen,
        cfg.seed,
        quiet=quiet,
    )
    lr = suggest(lrs, losses)
    plots.lr_find(lrs, losses, lr, out / "lr_find.png", f"{cfg.model} on {cfg.data}")
    found = {"suggested_lr": lr, "lrs": lrs, "losses": losses} | _tested(cfg)
    if losses and min(losses) == losses[-1]:  # no minimum: the range's end, tenthed
        found["note"] = (
            f"the loss still fell at the end of the range (lr {lrs[-1]:.3g}), so {lr:.3g} is "
            f"a tenth of the range's end, not of a minimum: {len(loop.labels['train'])} "
            f"training images may be too few for the test; try a fixed --lr (--lr auto trains "
            f"at {TrainConfig.lr:.3g}, train's default LR, instead)"
        )
        if auto:
            found["used_lr"] = lr = TrainConfig.lr
        print(f"[{out.name}] note: {found['note']}", file=sys.stderr, flush=True)
    checkpoint.write_json(out / "lr_find.json", found)
    return lr, "note" in found


def _tested(cfg) -> dict:
    return {"model": cfg.model, "data": data.canonical(cfg.data)}


def check_earlier(out: Path, cfg) -> None:
    """An earlier range test in `out` is replaced only by one of the same model on the same data
    (one of another model or data was replaced without a word)."""
    try:
        was = json.loads((Path(out) / "lr_find.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(was, dict) and "model" in was and {k: was.get(k) for k in ("model", "data")} != _tested(cfg):  # fmt: skip
        raise UserError(f"{out} holds the range test of {was['model']} on {was.get('data')}: choose another --out for {cfg.model} on {cfg.data} (the same model and data replace it)")  # fmt: skip


def command(cfg, out: str | Path, quiet: bool = False) -> float:
    """`transferlab lr-find`: the range test alone, into `out` (lr_find.png, lr_find.json)."""
    from . import decoding, distributed, outputs
    from .trainer import logger, setup  # (trainer runs the range test of --lr auto: lazily)

    out, log = Path(out), logger(quiet)
    if cfg.strategy == "linear-probe":
        raise UserError("a linear probe is fitted by L2-regularised regression (--probe-l2), with no learning rate to find: lr-find tests the others (--strategy full, lp-ft, ...)")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # (each rank claimed the folder: one failed)
        raise UserError("lr-find runs in one process: run it without torchrun (train --lr auto under torchrun runs the range test itself)")  # fmt: skip
    # an earlier lr-find's plot is replaced (atomically) only when the new one is done
    outputs.check_out(out, "lr-find", resume=True)
    check_earlier(out, cfg)

    def train_only(line, note=False):  # it reads no val or test image: their notes are moot
        return None if re.search(r"\b(val|test) (image|score)", line) else log(line, note=note)

    loop, notes = guards.held(
        lambda said: setup(cfg, out, said, distributed.Dist(0, 1)), train_only
    )
    loop.frozen = strategies.enter(loop.model, loop.stages[-1])
    loop.images, loop.labels, _ = decoding.decode_splits(loop.ds, loop.prep, cfg, out.name, log, quiet, ("train",))  # fmt: skip
    notes()  # (once no image is unreadable; decoded before --out is made, as train's: pass 52)
    with outputs.lock(out):
        outputs.claim(out, "lr-find", outputs.check_out(out, "lr-find", resume=True))
        lr, guess = find_lr(loop, out, quiet)  # (a guess was said as a fit: pass 59)
    print(f"suggested lr {lr:.3g}{' (no minimum: a guess, see the note)' * guess}  (plot: {out / 'lr_find.png'})")  # fmt: skip
    return lr
