"""Fine-tuning strategies as data: `plan(cfg, model)` says which stages run and what trains.

full           one stage: every parameter trains from the first step (the reference's
               "fine-tune"); with --freeze, what --freeze leaves trainable
linear-probe   one probe stage: the backbone is frozen, its pooled features are computed once
               (eval mode, so BatchNorm statistics cannot move) and only the head is fitted
lp-ft          a probe stage, then a training stage at --lr (Kumar et al. 2022: a fitted head
               keeps fine-tuning from distorting the pretrained features), every BatchNorm on
               the running statistics the probe was fitted on; the probe is epoch 0, kept
               unless a fine-tuned epoch beats it on val
head-first     one epoch of SGD on the head alone (the backbone and its BatchNorm frozen), then
               everything trains (fastai's `fine_tune(freeze_epochs=1)`; Keras' "train the top,
               then unfreeze"): the new head stops sending random gradients into the backbone
gradual        one stage per epoch: the head first, then each epoch unfreezes the next block
               group down (timm's coarse `group_matcher`) until everything trains (Howard &
               Ruder 2018)
layer-decay    one stage: everything trains; each block group's LR is --layer-decay times the
               one above it, the head at --lr (timm's `param_groups_layer_decay`, as in BEiT)

The trainer runs a plan without knowing these names. Frozen parameters get no gradient, and
the modules that hold only frozen parameters stay in eval mode, so their BatchNorm statistics
cannot move either. One optimizer serves the whole plan: it holds the parameters of the last
(widest) stage, and a parameter frozen in an earlier stage simply has no gradient there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import timm.models
import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from . import checkpoint, models
from .config import PROBE_IGNORES, TrainConfig, UserError, make_config


@dataclass(frozen=True)
class LRGroup:
    """Parameters that share a learning-rate multiplier and a weight decay."""

    names: tuple[str, ...]
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's --weight-decay


@dataclass(frozen=True)
class Stage:
    """A stretch of the run in which the same parameters train."""

    name: str  # what the log calls it
    epochs: int  # epochs of SGD in this stage (a probe stage has none)
    trains: frozenset[str]  # names of the parameters that train; the rest are frozen
    probe: bool = False  # the head is fitted on frozen features, by L-BFGS, not SGD
    lr_groups: tuple[LRGroup, ...] = ()  # () : one group, every trained parameter at --lr
    frozen_bn: str = "eval"  # modules with only frozen parameters: "eval" (statistics fixed);
    # "all": every BatchNorm's statistics fixed, trained or not (lp-ft: the probe's features)


def plan(cfg: TrainConfig, model: nn.Module) -> list[Stage]:
    """The stages cfg.strategy runs on `model`: adding a strategy is adding a branch here."""
    head = frozenset(n for n, _ in named_head_params(model))
    if cfg.strategy == "linear-probe":
        return [Stage("probe (the head, on frozen features)", 0, head, probe=True)]
    if cfg.strategy == "gradual":
        groups = block_groups(model)
        last = min(cfg.epochs, len(groups))  # stage k trains the top k groups
        return [
            Stage(
                f"gradual (the top {k} of {len(groups)} block groups)",
                1 if k < last else cfg.epochs - k + 1,
                frozenset(n for group in groups[-k:] for n in group),
            )
            for k in range(1, last + 1)
        ]
    trains = trainable(model, cfg.freeze, cfg.strategy)
    if cfg.strategy == "head-first":
        head_stage = Stage("head (the backbone frozen)", 1, head)
        rest = [Stage("train", cfg.epochs - 1, trains)] if cfg.epochs > 1 else []
        return [head_stage, *rest]
    if cfg.strategy == "layer-decay":
        groups = layer_decay_groups(model, trains, cfg.weight_decay, cfg.layer_decay)
        name = f"layer-decay ({len(block_groups(model))} block groups, LR x{cfg.layer_decay:g} per group down)"
        return [Stage(name, cfg.epochs, trains, lr_groups=groups)]
    if cfg.strategy == "lp-ft":  # the head fitted on eval-mode features meets those features:
        probe = Stage("probe (the head, on frozen features)", 0, head, probe=True)
        return [probe, Stage("fine-tune", cfg.epochs, trains, frozen_bn="all")]  # batch
    # statistics instead gave a loss of 70 (Lite0) to 19,000 (the DCNN) at its first step
    return [Stage("train", cfg.epochs, trains)]


def enter(model: nn.Module, stage: Stage) -> list[nn.Module]:
    """Set what trains in `stage`; returns the modules to keep in eval mode."""
    frozen = train_only(model, stage.trains)
    if stage.frozen_bn == "all":
        return frozen + [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
        ]
    return frozen if stage.frozen_bn == "eval" else []


def end_epoch(stages: list[Stage], index: int) -> int:
    """The last epoch (1-based, of the whole run) that stage `index` trains."""
    return sum(s.epochs for s in stages[: index + 1])


def optimizer_groups(model: nn.Module, stage: Stage, lr: float) -> list[dict]:
    """torch.optim param groups for a stage (the plan's last stage: the widest)."""
    params = dict(model.named_parameters())
    lr_groups = stage.lr_groups or (LRGroup(tuple(n for n in params if n in stage.trains)),)
    out = []
    for g in lr_groups:
        group = {"params": [params[n] for n in g.names], "lr": lr * g.lr_scale}
        group["lr_scale"] = g.lr_scale  # lr-find scales each group's LR by it
        if g.weight_decay is not None:
            group["weight_decay"] = g.weight_decay
        out.append(group)
    return out


def make_optimizer(cfg: TrainConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    return OPTIMIZERS[cfg.optimizer](groups, lr=lr, weight_decay=cfg.weight_decay)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step LR schedule over the whole run (every stage), with linear warm-up; plateau
    steps once per epoch on val loss."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.3, patience=1)
    cycles = max(1, cfg.snapshots)  # snapshot ensembles restart the cosine each cycle
    cycle = max(1, cfg.epochs // cycles * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        c = min(step // cycle, cycles - 1)
        begin = c * cycle + (warm if c == 0 else 0)  # the first cycle holds the warm-up
        t = (step - begin) / max(1, (c + 1) * cycle - begin)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- what trains


def named_head_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    head = {id(p) for p in model.get_classifier().parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in head]


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per block group, input side first, the head last (coarse group_matcher)."""
    if not hasattr(model, "group_matcher"):
        raise UserError(
            f"{type(model).__name__} has no group_matcher, which gradual, layer-decay and "
            "--freeze N need; use --strategy full, linear-probe or lp-ft, --freeze none or backbone"
        )
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


HEAD_ALONE = "for the head alone: strategy full with freeze backbone, or linear-probe without freeze"  # fmt: skip


def trainable(model: nn.Module, freeze: str, strategy: str = "full") -> frozenset[str]:
    """What --freeze leaves trainable: "none" (everything), "backbone" (the head) or N (all
    but the N lowest of timm's coarse block groups: stem, stages, ...). No gradient flows below
    the lowest trainable layer, so freezing early high-resolution stages saves their backward.
    With `strategy` lp-ft, head-first or layer-decay, N leaves more than the head (config
    refuses freeze backbone there: pass 59, freeze 4 of the DCNN's 5 groups slipped past)."""
    if freeze == "none":
        return frozenset(n for n, _ in model.named_parameters())
    if freeze == "backbone":
        return frozenset(n for n, _ in named_head_params(model))
    groups, n = block_groups(model), int(freeze)
    staged = strategy in ("lp-ft", "head-first", "layer-decay")  # (they train the head alone too)
    most = len(groups) - (2 if staged else 1)
    if n > most:
        whole = "freeze everything" if n >= len(groups) else f"leave strategy {strategy} only the head to train in every stage"  # fmt: skip
        fix = f"use at most {most}" if most > 0 else "freeze none"
        raise UserError(f"freeze {n} would {whole}: {type(model).__name__} has {len(groups)} block groups, the head last; {fix}, or " + ("freeze backbone" if n >= len(groups) and not staged else HEAD_ALONE))  # fmt: skip
    return frozenset(name for group in groups[n:] for name in group)


def train_only(model: nn.Module, names: set[str] | frozenset[str]) -> list[nn.Module]:
    """Make only the named parameters trainable; returns the modules to keep in eval mode.

    Those are the modules whose own parameters are all frozen (timm's BatchNormAct2d included:
    it has children, so "leaf modules" would miss it).
    """
    for name, p in model.named_parameters():
        p.requires_grad = name in names
    return [
        m
        for m in model.modules()
        if list(m.parameters(recurse=False))
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:  # frozen BatchNorm keeps its running statistics
        m.eval()


def layer_decay_groups(
    model: nn.Module, trains: frozenset[str], weight_decay: float, decay: float
) -> tuple[LRGroup, ...]:
    """timm's layer-decay groups (LR decay**depth from the top; no decay on 1-d parameters),
    by parameter name, restricted to what trains."""
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():  # timm reads requires_grad: ask it about `trains` alone
        saved = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad = n in trains
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=decay)
        for n, p in model.named_parameters():
            p.requires_grad = saved[n]
    return tuple(
        LRGroup(tuple(names[id(p)] for p in g["params"]), g["lr_scale"], g["weight_decay"])
        for g in groups
        if g["params"]
    )


# ----------------------------------------------------------------------------- fine-tune command


def finetune_config(run, overrides: dict, own: dict | None = None) -> TrainConfig:
    """A config that continues from a run: its data, arch and preprocessing unless overridden.
    `own`: the options a recipe step names itself, the ones refused where they have no effect
    (its defaults and --set are every step's: a probe step ignores their epochs, pass 61)."""
    meta = checkpoint.read_meta(run)
    for key in ("model", "weights"):
        if key in overrides:
            raise UserError(
                f"{key} does not apply to a fine-tune: it starts from {run} (its architecture and "
                "weights); train a new run for another model or weights"
            )
    base = replace(
        TrainConfig(),
        **{k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__},
    )
    if base.lr == "auto":  # the LR its range test found (not read where --lr replaces it)
        base = replace(base, lr=1e-3 if "lr" in overrides else _found_lr(run))
    lr = base.lr / 10  # a tenth of the parent's
    base = replace(base, weights=str(run), model=meta["arch"], lr=lr, limit=meta.get("limit"),
                   snapshots=TrainConfig.snapshots)  # (the parent's schedule, not asked) # fmt: skip
    if overrides.get("strategy", base.strategy) != "linear-probe":  # a probe's mirrored views
        base = replace(base, mirror_features=False)  # do not carry into training
    elif "strategy" not in overrides and (given := [k for k in (overrides if own is None else own) if k.replace("-", "_") in PROBE_IGNORES]):  # (inherited; told: make_config says it, pass 59)  # fmt: skip
        raise UserError(f"{run} is a linear probe, and a fine-tune keeps its strategy unless told: pass --strategy full (or lp-ft, head-first, ...) to train it with {given[0]}, or drop {given[0]}")  # fmt: skip
    return make_config(overrides, base, check_applies=True if own is None else own)


def _found_lr(run) -> float:
    """The LR a `--lr auto` run trained at: its range test's, in its lr_find.json (when that was
    gone or damaged, the fine-tune started at 1e-4 without a word)."""
    path = Path(run) / "lr_find.json"
    try:
        found = json.loads(path.read_text())
        lr = float(found.get("used_lr", found["suggested_lr"]))  # (where no minimum: the default)
        if math.isfinite(lr) and lr > 0:
            return lr
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise UserError(f"{run} trained with --lr auto, and {path}, which holds the LR its range test found, is missing or damaged: give the fine-tune an --lr")  # fmt: skip


def check_freeze(arch: str, freeze: str, strategy: str = "full") -> None:
    """`--freeze N` leaves something to train in `arch` (its blocks counted on the meta
    device, no memory): a recipe says so before step 1, not after the steps before it."""
    if not freeze.isdigit():
        return
    with torch.device("meta"):
        trainable(models.create(arch, 2, 3), freeze, strategy)
