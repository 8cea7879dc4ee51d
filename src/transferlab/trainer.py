"""fit(): one model, from config to a finished run folder. The loop is in plain sight."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import (
    batching,
    checkpoint,
    data,
    decoding,
    distributed,
    evaluate,
    finetune,
    lrfind,
    models,
    outputs,
    plots,
    runfolder,
)
from .config import Preempted, TrainConfig, UserError, make_config, to_dict


@dataclass
class Loop:
    """The objects one training run works with, bundled so the loop reads in plain sight."""

    model: nn.Module  # the bare model: state dicts, evaluation
    ddp: nn.Module  # what trains: the model, or DistributedDataParallel around it
    frozen: list[nn.Module]  # modules kept in eval mode (frozen BatchNorm)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    prep: dict  # preprocessing: size, channels, mean, std, interpolation
    augment: batching.Augment
    cfg: TrainConfig
    precision: str
    dist: distributed.Dist


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint (as plain types, `to_state`)."""

    epoch: int = 1  # the epoch being trained (1-based; epochs + 1 once done)
    step: int = 0  # batches done in this epoch (a mid-epoch resume skips them)
    global_step: int = 0  # batches done in the run
    totals: list = field(
        default_factory=lambda: [0.0, 0, 0]
    )  # this epoch's loss sum, correct, seen
    losses: list = field(
        default_factory=list
    )  # every step's loss (bitwise resume is checked on it)
    history: list = field(default_factory=list)  # one row per finished epoch
    stale: int = 0  # epochs since val last improved (early stopping)
    stopped_early: bool = False
    probed: bool = False  # the linear-probe stage is done
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
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})


BEST_NONE = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}


def fit(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    log_json: str | Path | None = None,
) -> dict:
    """Train (or fine-tune, when cfg.weights names a run) one model into the run folder `out`.

    `log_json` appends one JSON object per step and per epoch to that file. Launched by
    torchrun, every rank trains its share of each batch and only rank 0 writes.
    """
    out, d = Path(out), distributed.setup()
    quiet = quiet or not d.main
    log = (lambda *a: print(*a, flush=True)) if not quiet else (lambda *a: None)
    cfg = replace(cfg, data=data.canonical(cfg.data))  # the record holds from any cwd
    if log_json and d.main:
        outputs.check_log_file(log_json, out)
    # Everything is validated (out, data, model) before the disk changes; only rank 0 writes.
    if d.main and outputs.check_out(out, "run", resume, overwrite) == "resume":
        refuse_config_change(out, (outputs.read_mark(out) or {}).get("config"), cfg)
    ds, model, prep, source, precision = setup(cfg, out, log, d)
    if d.main:  # a run never writes into what it reads
        if source.get("parent"):
            outputs.refuse_overlap(out, [source["parent"]], "the run it starts from")
        if ds.spec.partition(":")[0] in data.PATH_KINDS:
            outputs.refuse_overlap(out, [ds.spec.partition(":")[2]], "the data folder")
    groups, frozen, augment = training_parts(model, cfg, prep)  # refuses a bad --freeze, pad
    with outputs.lock(out) if d.main else contextlib.nullcontext():
        if d.main:  # decided again under the lock: another process may have been faster
            action = outputs.check_out(out, "run", resume, overwrite)
            outputs.claim(out, "run", action, {"config": to_dict(cfg)})
        d.barrier()
        parts = (ds, model, prep, source, precision, groups, frozen, augment)
        return _train(cfg, out, resume, quiet, log_json, d, log, parts)


def _train(cfg, out: Path, resume: bool, quiet: bool, log_json, d, log, parts) -> dict:
    """fit() once every input is validated and the run folder is claimed and locked."""
    ds, model, prep, source, precision, groups, frozen, augment = parts
    images, labels = decode_splits(ds, prep, cfg, out.name, log, quiet)
    log(f"[{out.name}] strategy {cfg.strategy}: {models.describe(model)}")
    resuming = resume and (out / "state").exists()
    if cfg.lr == "auto" and cfg.strategy != "linear-probe" and not resuming:
        lr = find_lr(
            model, cfg, groups, images, labels, prep, precision, frozen, augment, out, quiet
        )
        log(f"[{out.name}] lr-find: suggested lr {lr:.3g} (plot: {out / 'lr_find.png'})")
    else:  # a resumed run's optimizer state carries its learning rates
        lr = cfg.lr if cfg.lr != "auto" else 1e-3
    optimizer = make_optimizer(cfg, optimizer_params(model, cfg, groups, lr), lr)
    if cfg.strategy == "layer-decay":
        log(f"   layer-decay: {len(groups)} block groups, LR x{cfg.layer_decay:g} per group down")
    steps_per_epoch = len(batching.EpochSampler(len(labels["train"]), cfg.batch_size, 0, 0, True))
    loop = Loop(
        model,
        compiled(distributed.wrap(model, d, some_frozen=cfg.strategy == "gradual"), cfg, log),
        frozen,
        optimizer,
        make_scheduler(cfg, optimizer, steps_per_epoch),
        torch.amp.GradScaler(evaluate.device().type, enabled=precision == "fp16"),
        prep,
        augment,
        cfg,
        precision,
        d,
    )
    progress = (restore(out, loop, log) if resume else None) or Progress()
    t_start = time.time() - progress.seconds
    fault = injected_fault(d.rank) if progress.global_step == 0 else None  # fresh runs only
    tensorboard = out / "tensorboard" if d.main else None
    with stop_on_sigterm() as stop, EventLog(log_json if d.main else None, tensorboard) as events:

        def save() -> None:
            progress.seconds = time.time() - t_start
            if d.main:
                checkpoint.save_checkpoint(
                    out / "state",
                    training_state(loop, progress),
                    progress.global_step,
                    cfg.keep_last,
                )

        def after_step(indices: list[int]) -> None:  # a step boundary: log, save, pre-emption
            events.write(
                event="step",
                epoch=progress.epoch,
                step=progress.step,
                global_step=progress.global_step,
                loss=progress.losses[-1],
                indices=indices,
            )
            if cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0:
                save()
            if fault and progress.global_step == fault[1]:
                os.kill(os.getpid(), fault[0])  # test hook: die or be pre-empted right here
            if d.any(stop["requested"]):  # every rank stops at the same step
                save()
                raise Preempted(
                    f"stopped by SIGTERM at epoch {progress.epoch} step "
                    f"{progress.step}; state saved in {out / 'state'}: "
                    "rerun with --resume to continue"
                )

        probed = None  # the probe's features of every split, for the run's features/ cache
        if cfg.strategy in ("linear-probe", "lp-ft") and not progress.probed:
            probed = probe(loop, images, labels, progress, log, quiet)
            save()
        if cfg.strategy == "lp-ft" and progress.epoch <= cfg.epochs:
            log(f"   stage fine-tune: {models.describe(model)} (lr {lr:g})")

        train_images = on_device(images["train"], cfg, out.name, log)
        while progress.epoch <= cfg.epochs and not progress.stopped_early:
            epoch, t0 = progress.epoch, time.time()
            if cfg.strategy == "gradual":  # the stage is a pure function of the epoch
                loop.frozen = finetune.train_only(model, finetune.gradual_stage(groups, epoch))
                log(f"   stage {min(epoch, len(groups))}/{len(groups)}: {models.describe(model)}")
            batches = batching.loader(
                train_images,
                labels["train"],
                cfg.batch_size,
                cfg.seed,
                epoch,
                True,
                cfg.num_workers,
                progress.step,
                d.rank,
                d.world,
            )
            bar = tqdm(
                batches,
                desc=f"epoch {epoch}/{cfg.epochs}",
                disable=quiet,
                leave=False,
                unit="batch",
                initial=progress.step,
                total=progress.step + len(batches),
            )
            params = loop.augment.params(len(labels["train"]), prep["input_size"], cfg.seed, epoch)
            with out_of_memory_hint(cfg.batch_size):
                train_one_epoch(loop, bar, params, progress, after_step)
            end_epoch(loop, images, labels, progress, time.time() - t0, out.name, log)
            events.write(event="epoch", **progress.history[-1])
            if cfg.snapshots and epoch % (cfg.epochs // cfg.snapshots) == 0:
                k = epoch // (cfg.epochs // cfg.snapshots)
                snap = out / "snapshots" / f"snapshot-{k}"
                info = {"index": k, "of": cfg.snapshots, "epoch": epoch, "run": out.name}
                m = runfolder.write(
                    snap, loop, ds, images, labels, source, progress.history,
                    {"epoch": epoch}, time.time() - t_start, snapshot=info,
                )  # fmt: skip
                log(f"[{out.name}] snapshot {k}/{cfg.snapshots}: test "
                    f"{m['metrics']['test']['top1']:.2%} -> {snap}")  # fmt: skip
            save()

    best = progress.best
    model.load_state_dict(best["state"])
    meta = runfolder.write(
        out,
        loop,
        ds,
        images,
        labels,
        source,
        progress.history,
        best,
        time.time() - t_start,
        progress.probe,
        progress.val_logits,
        progress.test_logits,
        probed,
    )
    m = meta["metrics"]
    log(
        f"[{out.name}] best epoch {best['epoch']}: val {m['val']['top1']:.2%}  "
        f"test {m['test']['top1']:.2%} (top-5 {m['test']['top5']:.2%})  -> {out}"
    )
    d.barrier()
    return meta


def setup(cfg: TrainConfig, out: Path, log, d: distributed.Dist):
    """Data, model (on the device, channels_last), preprocessing, weights source, precision."""
    ds = data.load(cfg.data, cfg.val_fraction, cfg.limit)
    for note in ds.notes:
        log(f"[{out.name}] {note}")
    torch.manual_seed(cfg.seed)  # model init
    model, prep, source = models.build(
        cfg, ds.classes, ds.native_size, ds.native_channels, ds.names
    )
    source["init_sha256"] = checkpoint.state_sha256(model.state_dict())  # lineage, for soups
    precision = evaluate.resolve_precision(cfg.precision)
    model.to(evaluate.device()).to(memory_format=torch.channels_last)
    origin = cfg.model if source["weights"] != "run" else f"from {source['parent']}"
    log(
        f"[{out.name}] {origin} on {ds.spec}: {len(ds.classes)} classes, "
        f"{models.count_params(model) / 1e6:.2f}M parameters, "
        f"input {prep['input_size']}px x{prep['channels']}, weights={source['weights']}"
        + (f" (head {source['head']})" if "head" in source else "")
        + f", precision={precision}"
        + (f", {d.world} processes" if d.world > 1 else "")
    )
    return ds, model, prep, source, precision


def training_parts(model: nn.Module, cfg: TrainConfig, prep: dict):
    """(block groups, modules kept in eval mode, augmentation) for the strategy.

    Sets requires_grad: gradual starts with everything that trains by its last epoch (what
    the optimizer holds); the loop then freezes per epoch.
    """
    groups = finetune.block_groups(model) if cfg.strategy in ("gradual", "layer-decay") else None
    if cfg.strategy == "gradual":
        frozen = finetune.train_only(model, finetune.gradual_stage(groups, cfg.epochs))
    else:
        frozen = freeze(model, "backbone" if cfg.strategy == "linear-probe" else cfg.freeze)
    pad = cfg.crop_pad if cfg.crop_pad >= 0 else prep["input_size"] // 8
    if cfg.crop == "pad" and pad >= prep["input_size"]:
        raise UserError(
            f"crop_pad ({pad}) must be smaller than the input size ({prep['input_size']})"
        )
    return groups, frozen, batching.Augment(crop=cfg.crop, pad=pad, flip=cfg.flip)


def optimizer_params(model: nn.Module, cfg: TrainConfig, groups, lr: float) -> list:
    if cfg.strategy == "layer-decay":
        return finetune.layer_decay_groups(model, lr, cfg.weight_decay, cfg.layer_decay)
    return [p for p in model.parameters() if p.requires_grad]


def find_lr(model, cfg, groups, images, labels, prep, precision, frozen, augment, out, quiet):
    """Run the LR range test on the training split; plot it; return the suggested LR."""
    lrs, losses = lrfind.range_test(
        model,
        lambda lr: make_optimizer(cfg, optimizer_params(model, cfg, groups, lr), lr),
        images["train"],
        labels["train"],
        cfg.batch_size,
        augment,
        prep,
        precision,
        frozen,
        cfg.seed,
        quiet=quiet,
    )
    lr = lrfind.suggest(lrs, losses)
    plots.lr_find(lrs, losses, lr, out / "lr_find.png", f"{cfg.model} on {cfg.data}")
    checkpoint.write_json(out / "lr_find.json", {"suggested_lr": lr, "lrs": lrs, "losses": losses})
    return lr


def lr_find(cfg: TrainConfig, out: str | Path, quiet: bool = False) -> float:
    """`transferlab lr-find`: the range test alone, into `out` (lr_find.png, lr_find.json)."""
    out = Path(out)
    log = (lambda *a: print(*a, flush=True)) if not quiet else (lambda *a: None)
    # an earlier lr-find's plot is replaced (atomically) only when the new one is done
    outputs.check_out(out, "lr-find", resume=True)
    ds, model, prep, _, precision = setup(cfg, out, log, distributed.Dist(0, 1))
    groups, frozen, augment = training_parts(model, cfg, prep)
    with outputs.lock(out):
        outputs.claim(out, "lr-find", outputs.check_out(out, "lr-find", resume=True))
        images, labels = decode_splits(ds, prep, cfg, out.name, log, quiet)
        return find_lr(
            model, cfg, groups, images, labels, prep, precision, frozen, augment, out, quiet
        )


def probe(loop: Loop, images, labels, progress, log, quiet) -> dict | None:
    """The linear-probe stage: the head alone, on features computed once (returned per split).

    A pure probe also scores test from its features; lp-ft goes on to train, so it does not.
    """
    cfg, t0 = loop.cfg, time.time()
    only = cfg.strategy == "linear-probe"
    rows, best = finetune.linear_probe(
        loop.model,
        images if only else {s: images[s] for s in ("train", "val")},
        labels,
        loop.prep,
        loop.precision,
        cfg.probe_l2,
        log,
        quiet,
        cfg.eval_batch_size,
        decoding.resolve_cache(cfg.cache_dir),
    )
    progress.probed = True
    progress.probe = {
        "l2": best["l2"],
        "l2_setting": cfg.probe_l2,
        "val_acc": best["val_acc"],
        "seconds": round(time.time() - t0, 1),
    }
    if only:  # the probe is the whole run
        rows[0]["seconds"] += time.time() - t0 - sum(r["seconds"] for r in rows)  # features
        state = {k: v.detach().clone().cpu() for k, v in loop.model.state_dict().items()}
        progress.history = rows
        progress.val_logits = torch.from_numpy(best["val_logits"])  # cached features: no 2nd pass
        progress.test_logits = torch.from_numpy(best["test_logits"])
        progress.epoch = cfg.epochs + 1
        progress.best = {
            "val_acc": best["val_acc"],
            "val_loss": best["val_loss"],
            "epoch": best["epoch"],
            "state": state,
        }
    return best["features"] if only else None  # lp-ft goes on to change the backbone


def train_one_epoch(loop: Loop, batches, aug_params: dict, progress: Progress, after_step) -> None:
    """Train on the remaining batches of an epoch; `progress` holds the running totals."""
    set_train_mode(loop.ddp, loop.frozen)
    dev, cfg = evaluate.device(), loop.cfg
    for x, y, idx in batches:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)  # uint8 on the device
        x = loop.augment(x, {k: v[idx] for k, v in aug_params.items()})  # (B, H, W, C) uint8
        x = batching.normalize(x, loop.prep["mean"], loop.prep["std"])  # (B, C, H, W) float
        with evaluate.autocast(loop.precision):
            logits = loop.ddp(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise UserError(
                f"non-finite loss ({loss.item()}) at epoch {progress.epoch} step "
                f"{progress.step}; try a lower --lr (now {loop.optimizer.defaults['lr']:g}); "
                "checkpoints written before this step are intact"
            )
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        if cfg.schedule != "plateau":
            loop.scheduler.step()
        # summed loss, correct, seen over every rank's share of this batch
        step = loop.dist.all_sum(
            [loss.item() * len(y), float((logits.argmax(1) == y).sum()), float(len(y))]
        )
        progress.totals = [t + s for t, s in zip(progress.totals, step, strict=True)]
        progress.losses.append(step[0] / step[2])
        progress.step += 1
        progress.global_step += 1
        total_loss, correct, seen = progress.totals
        batches.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.2%}")
        after_step(idx.tolist())


def on_device(images: np.ndarray, cfg: TrainConfig, name: str, log):
    """On CUDA, keep the uint8 training set on the GPU when it fits (augmented there too)."""
    if evaluate.device().type != "cuda" or cfg.num_workers:
        return images
    free, _ = torch.cuda.mem_get_info()
    if images.nbytes > free // 4:
        return images
    log(f"[{name}] training images resident on the GPU ({images.nbytes / 2**20:.0f} MiB)")
    return torch.from_numpy(np.ascontiguousarray(images)).to(evaluate.device())


def compiled(module: nn.Module, cfg: TrainConfig, log) -> nn.Module:
    """--compile: the training forward/backward through torch.compile (inductor); the bare model
    (state dicts, evaluation) stays uncompiled. Compiling takes minutes on a CPU: for long runs."""
    if not cfg.compile:
        return module
    log("   torch.compile: the first steps compile the model (seconds to minutes)")
    return torch.compile(module)


def end_epoch(loop: Loop, images, labels, progress, seconds, name, log) -> None:
    """Validate, record the epoch, keep the best weights, decide on early stopping."""
    cfg = loop.cfg
    val = evaluate.metrics(runfolder.predict_all(loop, images["val"]), labels["val"])
    if cfg.schedule == "plateau":
        loop.scheduler.step(val["loss"])
    loss_sum, correct, seen = progress.totals
    row = {
        "epoch": progress.epoch,
        "lr": max(g["lr"] for g in loop.optimizer.param_groups),
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_loss": val["loss"],
        "val_acc": val["top1"],
        "seconds": seconds,
    }
    progress.history.append(row)
    if evaluate.improves(val, progress.best):
        progress.best = {
            "val_acc": val["top1"],
            "val_loss": val["loss"],
            "epoch": row["epoch"],
            "state": {k: v.detach().clone().cpu() for k, v in loop.model.state_dict().items()},
        }
        progress.stale = 0
    else:
        progress.stale += 1
    log(
        f"[{name}] epoch {row['epoch']:>3}  loss {row['train_loss']:.4f}  "
        f"train {row['train_acc']:.2%}  val loss {val['loss']:.4f}  val {val['top1']:.2%}  "
        f"{seconds:.1f}s"
    )
    if cfg.patience and progress.stale >= cfg.patience:
        log(f"[{name}] early stop: val top-1 has not improved for {progress.stale} epochs")
        progress.stopped_early = True
    progress.epoch, progress.step, progress.totals = row["epoch"] + 1, 0, [0.0, 0, 0]


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
    }


def restore(out: Path, loop: Loop, log) -> Progress | None:
    """Load the newest valid checkpoint into the training objects; None when there is none."""
    found = checkpoint.newest_checkpoint(out / "state", trust_pickle=loop.cfg.trust_pickle)
    if found is None:
        log(f"[{out.name}] nothing to resume in {out / 'state'}: starting from scratch")
        return None
    state, path = found
    refuse_config_change(out, state.get("config"), loop.cfg)
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    p = Progress.from_state(state["progress"])
    log(f"[{out.name}] resumed from {path.name}: epoch {p.epoch}, step {p.step}")
    return p


# Options that change neither the maths nor the data, so a run may resume with new values.
SAFE_ON_RESUME = {"num_workers", "eval_batch_size", "checkpoint_every", "keep_last", "cache_dir",
                  "trust_pickle"}  # fmt: skip


def refuse_config_change(out: Path, saved: dict | None, cfg: TrainConfig) -> None:
    """--resume continues the same run: a config that changed (but for SAFE_ON_RESUME) is refused."""
    changed = config_changes(saved, to_dict(cfg)) if saved else ""
    if changed:
        raise UserError(
            f"cannot resume {out}: its config differs ({changed}); resume with the options it "
            "was started with, or pass --overwrite instead of --resume to start over"
        )


def config_changes(saved: dict, now: dict) -> str:
    """The keys whose values differ between a saved config and this one ("" when none)."""

    def norm(key, value):
        return data.canonical(value) if key == "data" and isinstance(value, str) else value

    safe = set(SAFE_ON_RESUME)
    if now.get("schedule") in ("constant", "plateau") and not now.get("snapshots"):
        safe.add("epochs")  # the LR does not depend on it: a run may be extended
    keys = sorted(k for k in saved.keys() | now.keys() if k not in safe)
    diffs = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in keys
        if norm(k, saved.get(k)) != norm(k, now.get(k))
    ]
    return "; ".join(diffs)


def decode_splits(ds, prep, cfg, name, log, quiet) -> tuple[dict, dict]:
    """Decode every split at the model's size; bad images stop the run or, if asked, are dropped."""
    cache = decoding.resolve_cache(cfg.cache_dir)
    if cache and ds.splits["train"].paths is not None:
        log(f"[{name}] decoded-image cache: {cache}")
    images, labels = {}, {}
    for split in ("train", "val", "test"):
        arr, kept, bad = decoding.decode_checked(
            ds.splits[split],
            prep["input_size"],
            prep["channels"],
            prep["interpolation"],
            cfg.skip_bad_images,
            f"decode {split}",
            quiet,
            cache,
        )
        if bad:
            log(f"[{name}] skipped {len(bad)} unreadable {split} image(s): " + "; ".join(bad))
        images[split], labels[split] = arr, kept.labels
    log(
        f"[{name}] train {len(labels['train'])}, val {len(labels['val'])}, "
        f"test {len(labels['test'])} images"
    )
    return images, labels


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
    """TRANSFERLAB_FAULT=kill:N or term:N sends SIGKILL/SIGTERM to this process after step N.

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
    return {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind], int(step)


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


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int):
    """Turn an out-of-memory error into advice; the last checkpoint on disk stays intact."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory: reduce --batch-size (now {batch_size})") from None
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or "out of memory" in str(err).lower():
            raise UserError(f"out of memory: reduce --batch-size (now {batch_size})") from None
        raise


def freeze(model: nn.Module, what: str) -> list[nn.Module]:
    """Freeze parameters; returns the frozen modules, whose BatchNorm stays in eval mode.

    what: "none", "backbone" (only the classifier trains) or a count N: the N lowest of timm's
    coarse block groups (stem, stages, ...) stay frozen. No gradient flows below the lowest
    trainable layer, so freezing the high-resolution early stages also saves their backward pass.
    """
    if what == "none":
        return []
    if what == "backbone":
        head = {id(p) for p in model.get_classifier().parameters()}
        return finetune.train_only(model, {n for n, p in model.named_parameters() if id(p) in head})
    groups, n = finetune.block_groups(model), int(what)
    if n >= len(groups):
        raise UserError(
            f"freeze {n} would freeze everything: {type(model).__name__} has {len(groups)} "
            f"block groups, the head last; use at most {len(groups) - 1}, or freeze backbone"
        )
    return finetune.train_only(model, {name for group in groups[n:] for name in group})


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:  # frozen BatchNorm keeps its running statistics
        m.eval()


def make_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    return OPTIMIZERS[cfg.optimizer](params, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step LR schedule with linear warm-up (plateau steps per epoch on val loss)."""
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


def finetune_config(run: str | Path, overrides: dict) -> TrainConfig:
    """A config that continues from a run: its data, arch and preprocessing unless overridden."""
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
    lr = (base.lr if base.lr != "auto" else 1e-3) / 10  # a tenth of the parent's
    base = replace(base, weights=str(run), model=meta["arch"], lr=lr, limit=meta.get("limit"))
    return make_config(overrides, base)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
