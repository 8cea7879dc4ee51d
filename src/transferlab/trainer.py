"""fit(): one model, from config to a finished run folder. The loop is in plain sight:

set up (data, model, weights) -> plan the stages (strategies.plan) -> for each stage: a probe,
or epochs of train_one_epoch, validate, checkpoint -> write the run folder (runfolder.write)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from . import (
    batching,
    checkpoint,
    data,
    decoding,
    distributed,
    evaluate,
    guards,
    leaks,
    lrfind,
    models,
    outputs,
    probe,
    runfolder,
    strategies,
    weights,
)
from .bars import bar
from .config import EveryRank, TrainConfig, UserError, to_dict
from .resume import (
    Checkpoints,
    Progress,
    has_checkpoint,
    nothing_to_resume,
    refuse_config_change,
    refuse_data_change,
    refuse_other_parent,
    restore,
)
from .shards import ShardImages


@dataclass
class Loop:
    """What one training run works with, bundled so the loop reads in plain sight."""

    cfg: TrainConfig
    dist: distributed.Dist
    model: nn.Module  # the bare model: state dicts, evaluation
    arch: models.Architecture  # timm name (or dcnn), stem, pooled stages
    prep: models.Preprocessing
    precision: str
    augment: batching.Augment
    stages: list = field(default_factory=list)  # strategies.plan: what trains, stage by stage
    ds: data.Dataset | None = None
    images: dict = field(default_factory=dict)  # split -> decoded uint8 (N, H, W, C)
    labels: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # where the weights came from (lineage)
    notes: list = field(default_factory=list)  # what its scores hold back (meta.json "notes")
    frozen: list = field(default_factory=list)  # modules kept in eval mode (frozen BatchNorm)
    ddp: nn.Module | None = None  # what trains: the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None


def fit(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    log_json: str | Path | None = None,
    data_notes: bool = True,
    say_test: bool = True,
) -> dict:
    """Train (or fine-tune, when cfg.weights names a run) one model into the run folder `out`.

    `log_json` appends one JSON object per step and per epoch (a probe: per L2 strength) to
    that file. Launched by torchrun, every rank trains its share of each batch and only rank 0
    writes. `data_notes`: False when the caller said what loading the data left out (auto, once
    for all its runs). `say_test`: False where the test score must not be shown yet (auto's
    candidates: test is scored once, by the study's choice; the run keeps its test predictions).
    """
    out, d = Path(out), distributed.setup()
    quiet = quiet or not d.main
    log = logger(quiet) if d.main else lambda *a, note=False: None  # rank 0 says each note once
    cfg = replace(cfg, data=data.canonical(cfg.data))  # the record holds from any cwd
    d.agreed(lambda: check_destination(cfg, out, resume, overwrite, log_json, d))  # before anything is loaded  # fmt: skip
    if resume and (out / checkpoint.META).is_file() and has_checkpoint(out) and (meta := checkpoint.read_meta(out)):  # fmt: skip
        log(f"[{out.name}] finished already: nothing to resume -> {out}")  # (its record kept)
        return meta
    said = log if data_notes else lambda *a, note=False: None if note else log(*a)
    loop, notes = d.agreed(lambda: guards.held(lambda log: setup(cfg, out, log, d, resume), said))  # data, model, weights, plan: validated, nothing written  # fmt: skip
    # decoded before the folder is claimed: an unreadable image leaves --out as it was (--overwrite had emptied it)
    loop.images, loop.labels, skipped = decoding.decode_splits(loop.ds, loop.prep, cfg, out.name, log, quiet)  # fmt: skip
    notes()  # (said once no image is unreadable: a refusal stays one line)
    loop.notes += skipped + leaks.part_of_test_notes(len(loop.labels["test"]), len(loop.ds.splits["test"]))  # fmt: skip
    mark = {"config": to_dict(cfg), "data_fingerprint": loop.ds.fingerprint, "parent_sha256": loop.source.get("parent_sha256")}  # fmt: skip
    with claimed(out, resume, overwrite, mark, d):
        resuming = start_training(loop, out, resume, log, quiet)
        progress = (restore(out, loop, log) if resuming else None) or Progress()
        for note in guards.advice(loop):  # (after every refusal: an error stays one line)
            log(f"[{out.name}] note: {note}", note=True)
        t_start, features = time.time() - progress.seconds, None
        train_images = on_device(loop.images["train"], cfg, out.name, log)
        with Checkpoints(out, loop, progress, log_json, t_start) as checkpoints:
            for index in range(progress.stage, len(loop.stages)):
                if progress.stopped_early:
                    break
                stage = loop.stages[index]
                loop.frozen = strategies.enter(loop.model, stage)
                log(f"   stage {index + 1}/{len(loop.stages)} {stage.name}: {models.describe(loop.model)}")  # fmt: skip
                if stage.probe:
                    final = index == len(loop.stages) - 1
                    features = probe.stage(loop, progress, final, log, quiet, checkpoints.check_stop)  # fmt: skip
                    for row in progress.history:  # each L2 strength fitted (lp-ft: the kept)
                        checkpoints.events.write(event="probe", **row)
                last = strategies.end_epoch(loop.stages, index)
                while progress.epoch <= last and not progress.stopped_early:
                    t0 = time.time()
                    batches, augment = epoch_batches(loop, train_images, progress, quiet)
                    with guards.said_in_one_line(cfg, progress.epoch):
                        train_one_epoch(loop, batches, augment, progress, checkpoints.after_step)
                    validate(loop, progress, time.time() - t0, out.name, log)
                    checkpoints.events.write(event="epoch", **progress.history[-1])
                    snapshot(loop, progress, out, time.time() - t_start, log)
                    checkpoints.save()
                progress.stage = index + 1
                if stage.probe:
                    checkpoints.save()
        loop.model.load_state_dict(progress.best["state"])
        if progress.best["epoch"] == 0 and len(loop.stages) > 1:  # lp-ft: its probe kept
            log(f"[{out.name}] note: no fine-tuned epoch beat the probe on val: the run keeps the "
                f"probe's head (epoch 0); a lower --lr (now {cfg.lr}) may let it", note=True)  # fmt: skip
        meta = runfolder.write(out, loop, progress, time.time() - t_start, features=features)
        m = meta["metrics"]
        test = f"test {m['test']['top1']:.2%}{evaluate.top5_text(m['test'], ' (top-5 {:.2%})')}  " if say_test else ""  # fmt: skip
        kept = f"l2 {progress.probe['l2']:g}" if cfg.strategy == "linear-probe" else f"best epoch {progress.best['epoch']}"  # fmt: skip
        log(f"[{out.name}] {kept}: val {m['val']['top1']:.2%}  {test}-> {out}")  # fmt: skip
        d.barrier()
        return meta


def logger(quiet: bool):
    """print, for a run's lines; `quiet` keeps only notes (`note=True`: what was left out of
    the data, on stderr), which a --quiet --skip-bad-images run dropped without a word."""

    def log(*a, note: bool = False):
        if not quiet or note:
            print(*a, flush=True, file=sys.stderr if quiet or note else sys.stdout)

    return log


def check_destination(cfg, out: Path, resume: bool, overwrite: bool, log_json, d) -> None:
    """--out, --log-json and --resume checked before anything is loaded (rank 0 decides)."""
    if not d.main:
        return
    if cfg.weights and Path(cfg.weights).expanduser().exists():  # fmt: skip
        start, *older = leaks.lineage([cfg.weights]) or [cfg.weights]
        outputs.refuse_overlap(out, [cfg.weights, start], "the run it starts from")
        outputs.refuse_overlap(out, older, "an ancestor of the run it starts from,")
    if log_json is not None:
        outputs.check_log_file(log_json, out)
        if cfg.data.partition(":")[0] in data.PATH_KINDS:  # (a file among the images)
            outputs.refuse_overlap(log_json, [cfg.data.partition(":")[2]], "the data folder", "--log-json")  # fmt: skip
    decoding.check_cache(cfg.cache_dir, out=out)
    elastic = "TORCHELASTIC_RESTART_COUNT" in os.environ  # torchrun --max-restarts: --resume
    if resume and not out.exists() and not elastic:  # from its first launch; else a typo
        raise UserError(f"--resume: {out} does not exist, so nothing in it can be resumed: check "
                        "the path, or leave out --resume to start a new run")  # fmt: skip
    if outputs.check_out(out, "run", resume, overwrite) == "resume":
        if why := nothing_to_resume(out):  # (it "started from scratch" over a soup)
            raise UserError(why)
        if has_checkpoint(out):  # (none: nothing was saved, and it begins as it is told now)
            refuse_other_parent(out, cfg.weights)  # (before the config: what differs is the run)
            refuse_config_change(out, (outputs.read_mark(out) or {}).get("config"), cfg)


@contextlib.contextmanager
def claimed(out: Path, resume: bool, overwrite: bool, mark: dict, d):
    """The run folder, locked and claimed (rank 0) with `mark` (config and data fingerprint, what
    a resume must match), decided again under the lock (another process may have been faster)."""
    with outputs.lock(out) if d.main else contextlib.nullcontext():
        if d.main:
            action = outputs.check_out(out, "run", resume, overwrite)
            outputs.claim(out, "run", action, mark if action != "resume" or not has_checkpoint(out) else None)  # fmt: skip
        d.barrier()
        yield


def setup(cfg: TrainConfig, out: Path, log, d: distributed.Dist, resume: bool = False) -> Loop:
    """Data, model (on the device, channels_last), preprocessing, lineage, precision, the plan.

    Everything a user can get wrong is refused here, before the run folder is touched.
    """
    weights.check_model(cfg)  # a typo in --model costs no data loading
    ds = data.load(cfg.data, cfg.val_fraction, cfg.limit, cfg.fold)
    if resume and d.main and has_checkpoint(out):  # (before any note: a refusal is one line)
        refuse_data_change(out, ds)
    if cfg.strategy != "linear-probe":  # (a probe's feature passes shard any split)
        distributed.check(d, cfg.batch_size, len(ds.splits["train"]))
    for note in ds.notes:  # all but the sizes say what was left out or is missing
        log(f"[{out.name}] {note}", note=not note.startswith(("splits: ", leaks.PART)))
    torch.manual_seed(cfg.seed)  # model init
    built = weights.build(cfg, ds.classes, ds.native_size, ds.native_channels, ds.names)
    model, prep, source = built.model, built.prep, built.source
    source["init_sha256"] = checkpoint.state_sha256(model.state_dict())  # lineage, for soups
    notes = leaks.new_run_notes(source, ds)
    for note in notes:  # a fine-tune's test images that its parent trained on
        log(f"[{out.name}] note: {note}", note=True)
    notes += leaks.part_notes(ds)  # --limit's: recorded, marked
    precision = evaluate.resolve_precision(cfg.precision)
    if precision == "fp16" and evaluate.device().type != "cuda":  # --help: fp16 is CUDA's
        log(f"[{out.name}] note: --precision fp16 on a CPU is emulated, slower than {'bf16 or ' * evaluate.bf16_supported()}fp32, and evaluate scores the run in fp32 here", note=True)  # fmt: skip
    precision = guards.cpu_bf16_checked(cfg, model, prep, precision, lambda m: log(f"[{out.name}] {m}", note=True))  # fmt: skip
    model.to(evaluate.device()).to(memory_format=torch.channels_last)
    origin = cfg.model if source["weights"] != "run" else f"from {source['parent']}"
    log(
        f"[{out.name}] {origin} on {ds.spec}: {len(ds.classes)} classes, "
        f"{models.count_params(model) / 1e6:.2f}M parameters, "
        f"input {prep.input_size}px x{prep.channels}, weights={source['weights']}"
        + (f" (head {source['head']})" if "head" in source else "")
        + f", precision={precision}"
        + (f", {d.world} processes" if d.world > 1 else "")
    )
    if d.main:  # a run never writes into its data
        outputs.refuse_writing_into_data(ds, out, cfg.cache_dir)
    pad = cfg.crop_pad if cfg.crop_pad >= 0 else prep.input_size // 8
    if cfg.crop == "pad" and pad >= prep.input_size:
        raise UserError(f"crop_pad ({pad}) must be smaller than the input size ({prep.input_size})")
    augment = batching.Augment(crop=cfg.crop, pad=pad, flip=cfg.flip)
    stages = strategies.plan(cfg, model)  # refuses a --freeze the model cannot take
    return Loop(cfg, d, model, built.arch, prep, precision, augment, stages, ds, source=source,
                notes=notes)  # fmt: skip


def start_training(loop: Loop, out: Path, resume: bool, log, quiet: bool) -> bool:
    """The optimizer (holding what the plan's widest, last stage trains), scheduler, scaler and
    the (DDP-wrapped, maybe compiled) training model; the LR found by a range test if asked
    where no checkpoint is resumed (an empty state/ had it train at 1e-3, pass 60); whether one is."""
    cfg, model, widest = loop.cfg, loop.model, loop.stages[-1]
    if (resuming := resume and has_checkpoint(out)) != resume:  # (said before a range test)
        log(f"[{out.name}] nothing to resume in {out / 'state'}: starting from scratch", note=True)
    loop.frozen = strategies.enter(model, widest)
    log(f"[{out.name}] strategy {cfg.strategy}: {len(loop.stages)} stage(s)")
    if cfg.lr == "auto" and not all(s.probe for s in loop.stages) and not resuming:
        lr = loop.dist.broadcast(lrfind.find_lr(loop, out, quiet, auto=True)[0] if loop.dist.main else None)  # fmt: skip
        log(f"[{out.name}] lr-find: lr {lr:.3g} (plot: {out / 'lr_find.png'})")
    else:  # a resumed run's optimizer state carries its learning rates
        lr = cfg.lr if cfg.lr != "auto" else 1e-3
    loop.optimizer = strategies.make_optimizer(cfg, strategies.optimizer_groups(model, widest, lr), lr)  # fmt: skip
    steps = len(batching.EpochSampler(len(loop.labels["train"]), cfg.batch_size, 0, 0, True, world=loop.dist.world))  # fmt: skip
    loop.scheduler = strategies.make_scheduler(cfg, loop.optimizer, steps)
    loop.scaler = torch.amp.GradScaler(evaluate.device().type, enabled=loop.precision == "fp16")
    changing = len({s.trains for s in loop.stages if not s.probe}) > 1  # DDP: unused params
    forward = models.Forward(model, loop.precision)
    loop.ddp = compiled(distributed.wrap(forward, loop.dist, some_frozen=changing), cfg, log)
    return resuming


def epoch_batches(loop: Loop, train_images, progress: Progress, quiet: bool):
    """The epoch's remaining batches (a progress bar over them) and its augmentation draws."""
    cfg, d, epoch = loop.cfg, loop.dist, progress.epoch
    batches = batching.loader(train_images, loop.labels["train"], cfg.batch_size, cfg.seed,
                              epoch, True, cfg.num_workers, progress.step, d.rank, d.world)  # fmt: skip
    shown = bar(
        batches,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=quiet,
        unit="batch",
        initial=progress.step,
        total=progress.step + len(batches),
    )
    n, size = len(loop.labels["train"]), loop.prep.input_size
    return shown, loop.augment.params(n, size, cfg.seed, epoch)


def host_sync_every(dev: torch.device) -> int:
    """Steps between reads of the training stats from the device: each step on the CPU (free
    there), every 32 on a GPU, where a read waits for all queued work (issue 20.2)."""
    return 32 if dev.type == "cuda" else 1


def train_one_epoch(loop: Loop, batches, aug_params: dict, progress: Progress, after_step) -> None:
    """Train on the remaining batches of an epoch; `progress` holds the running totals.

    Each step's loss and accuracy stay on the device until `read_steps` (every
    host_sync_every steps, before a due checkpoint and at the epoch's end)."""
    strategies.set_train_mode(loop.ddp, loop.frozen)
    dev, cfg = evaluate.device(), loop.cfg
    every, pending = host_sync_every(dev), []
    for x, y, idx in batches:
        with record_function("data"):  # (named ranges: benchmarks/profile_epoch.py)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)  # uint8
            x = loop.augment(x, {k: v[idx] for k, v in aug_params.items()})  # (B, H, W, C)
            x = batching.normalize(x, loop.prep.mean, loop.prep.std)  # (B, C, H, W) float
        with record_function("forward"):
            logits = loop.ddp(x)  # models.Forward: the body under autocast, the head in fp32
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loop.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loop.scaler.scale(loss).backward()
        with record_function("optimizer"):
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
            progress.lr = max(g["lr"] for g in loop.optimizer.param_groups)
            if cfg.schedule != "plateau":
                with warnings.catch_warnings():  # fp16: a step GradScaler skipped (inf) is its own
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # fmt: skip
                    loop.scheduler.step()
        with record_function("bookkeeping"):  # this rank's summed loss and correct, on device
            correct = (logits.argmax(1) == y).sum().double()
            pending.append((torch.stack([loss.detach().double() * len(y), correct]), len(y), idx))
            due = cfg.checkpoint_every and (
                (progress.global_step + len(pending)) % cfg.checkpoint_every == 0
            )
            if len(pending) >= every or due:
                read_steps(loop, pending, progress, batches, after_step)
    read_steps(loop, pending, progress, batches, after_step)


def non_finite(loop: Loop, progress: Progress, loss: float, which: str = "") -> EveryRank:
    """The line for a NaN or infinite loss, with the ways on: a lower LR, and fp32 where the
    run is in bf16/fp16, whose kernels can be the cause (`guards.cpu_bf16_checked` avoids the one
    known: a strided conv's weight gradient on 1x1 maps, on a Xeon with AMX)."""
    lr = loop.optimizer.defaults["lr"]
    also = "" if loop.precision == "fp32" else f", or --precision fp32 ({loop.precision} kernels"
    also += " can produce it where fp32 does not)" if also else ""
    return EveryRank(  # (summed over the ranks: each stops alike, rank 0 says it)
        f"non-finite {which}loss ({loss}) at epoch {progress.epoch} step {progress.step}; try a lower "
        f"--lr (now {lr:g}){also}; checkpoints written before this step are intact"
    )


def read_steps(loop: Loop, pending: list, progress: Progress, bar, after_step) -> None:
    """Read the pending steps' stats (one host sync), summed over ranks; count each step, and
    run `after_step` for each (the last is a boundary: the state matches it)."""
    if not pending:
        return
    stats, sizes, indices = zip(*pending, strict=True)
    local = torch.stack(stats).cpu().tolist()  # the host sync: (loss sum, correct) per step
    sums = loop.dist.all_sum([[ls, c, float(n)] for (ls, c), n in zip(local, sizes, strict=True)])
    batches = loop.dist.global_batches([i.tolist() for i in indices])  # (each rank: its share)
    for j, step in enumerate(sums):
        loss_sum, seen = step[0], step[2]
        if not math.isfinite(loss_sum):
            raise non_finite(loop, progress, loss_sum / seen)
        progress.totals = [t + v for t, v in zip(progress.totals, step, strict=True)]
        progress.losses.append(loss_sum / seen)
        progress.step += 1
        progress.global_step += 1
        after_step(batches[j], boundary=j == len(pending) - 1)
    pending.clear()
    total_loss, correct, seen = progress.totals
    bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.2%}")


def validate(loop: Loop, progress: Progress, seconds: float, name: str, log) -> None:
    """Score val, record the epoch, keep the best weights, decide on early stopping."""
    cfg = loop.cfg
    val = runfolder.predict_all(loop, loop.images["val"])
    if not np.isfinite(val).all():  # weights gone NaN under a finite train loss (--lr 50: no
        raise non_finite(loop, progress, float(val.sum()), "val ")  # best epoch, a traceback)
    val = evaluate.metrics(val, loop.labels["val"])
    lr = progress.lr or max(g["lr"] for g in loop.optimizer.param_groups)  # (older checkpoints)
    if cfg.schedule == "plateau":  # (its cut applies to the next epoch, not this row)
        loop.scheduler.step(val["loss"])
    loss_sum, correct, seen = progress.totals
    row = {
        "epoch": progress.epoch,
        "lr": lr,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_loss": val["loss"],
        "val_acc": val["top1"],
        "seconds": seconds,
    }
    progress.history.append(row)
    # a --fold run's val is its held-out fold, whose predictions are out-of-fold scores: it
    # keeps its last epoch, so nothing is chosen on the images that score it
    if cfg.fold != "none" or evaluate.improves(val, progress.best):
        progress.best = {
            "val_acc": val["top1"],
            "val_loss": val["loss"],
            "epoch": row["epoch"],
            "state": {k: v.detach().clone().cpu() for k, v in loop.model.state_dict().items()},
        }
        progress.stale = 0
    else:
        progress.stale += 1
    log(f"[{name}] epoch {row['epoch']:>3}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2%}  val loss {val['loss']:.4f}  val {val['top1']:.2%}  {seconds:.1f}s")  # fmt: skip
    if cfg.patience and progress.stale >= cfg.patience and row["epoch"] < cfg.epochs:
        log(f"[{name}] early stop: val (top-1, then loss) has not improved for {progress.stale} epoch(s), {cfg.epochs - row['epoch']} left unrun")  # fmt: skip
        progress.stopped_early = True
    progress.epoch, progress.step, progress.totals = row["epoch"] + 1, 0, [0.0, 0, 0]


def snapshot(loop: Loop, progress: Progress, out: Path, seconds: float, log) -> None:
    """--snapshots K: the end of each cosine cycle is written as a member run of its own."""
    cfg, epoch = loop.cfg, progress.epoch - 1  # the epoch just finished
    if not cfg.snapshots or epoch % (cfg.epochs // cfg.snapshots):
        return
    k = epoch // (cfg.epochs // cfg.snapshots)
    snap = out / "snapshots" / f"snapshot-{k}"
    info = {"index": k, "of": cfg.snapshots, "epoch": epoch, "run": out.name}
    m = runfolder.write(snap, loop, progress, seconds, epoch=epoch, snapshot=info)
    log(f"[{out.name}] snapshot {k}/{cfg.snapshots}: test {m['metrics']['test']['top1']:.2%} -> {snap}")  # fmt: skip


def on_device(images: np.ndarray, cfg: TrainConfig, name: str, log):
    """On CUDA, keep the uint8 training set on the GPU when it fits (augmented there too);
    WebDataset shards are decoded there, a batch at a time (nvJPEG, issue 20.4)."""
    if evaluate.device().type != "cuda" or cfg.num_workers:
        return images
    if isinstance(images, ShardImages):
        log(f"[{name}] train shards decoded on the GPU, a batch at a time (nvJPEG)")
        images.device = evaluate.device()
        return images
    if not isinstance(images, np.ndarray):
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
