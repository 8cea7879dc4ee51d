"""fit(): one model, from config to a finished run folder. The loop is in plain sight."""

from __future__ import annotations

import csv
import io
import math
import platform
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__, checkpoint, data, evaluate, models, plots
from .config import TrainConfig, UserError, to_dict


def fit(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
        quiet: bool = False) -> dict:
    """Train (or fine-tune, when cfg.weights names a run) one model into the run folder `out`."""
    out = Path(out)
    _prepare_out(out, resume, overwrite)
    ds = data.load(cfg.data, cfg.val_fraction, cfg.limit)
    torch.manual_seed(cfg.seed)  # model init
    model, prep, source = models.build(cfg, ds.classes, ds.native_size, ds.native_channels)
    frozen = freeze(model, cfg.freeze)
    precision = evaluate.resolve_precision(cfg.precision)
    dev = evaluate.device()
    model.to(dev).to(memory_format=torch.channels_last)
    log = (lambda *a: print(*a, flush=True)) if not quiet else (lambda *a: None)
    log(f"[{out.name}] {cfg.model if source['weights'] != 'run' else 'from ' + source['parent']} "
        f"on {ds.spec}: {len(ds.classes)} classes, {models.describe(model)}, "
        f"input {prep['input_size']}px x{prep['channels']}, weights={source['weights']}, "
        f"precision={precision}")

    images = {s: data.decode(ds.splits[s], prep["input_size"], prep["channels"],
                             prep["interpolation"], desc=f"decode {s}", quiet=quiet)
              for s in ("train", "val", "test")}
    labels = {s: ds.splits[s].labels for s in images}
    log(f"[{out.name}] train {len(labels['train'])}, val {len(labels['val'])}, "
        f"test {len(labels['test'])} images")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    steps_per_epoch = len(data.EpochSampler(len(labels["train"]), cfg.batch_size, 0, 0, True))
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    history, best = [], {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}
    start_epoch, stale = 1, 0
    if resume and (out / checkpoint.STATE).is_file():
        state = checkpoint.load_state(out / checkpoint.STATE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history, best, stale = state["history"], state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        log(f"[{out.name}] resumed after epoch {state['epoch']}")

    t_start = time.time() - sum(r["seconds"] for r in history)
    pad = cfg.crop_pad if cfg.crop_pad >= 0 else prep["input_size"] // 8
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        loader = data.loader(images["train"], labels["train"], cfg.batch_size, cfg.seed, epoch,
                             shuffle=True, num_workers=cfg.num_workers)
        aug = data.augment_params(len(labels["train"]), cfg.seed, epoch, pad)
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=quiet, leave=False,
                   unit="batch")
        train_loss, train_acc = train_one_epoch(model, frozen, bar, optimizer, scheduler, prep,
                                                aug, pad, cfg, precision, epoch)
        val_logits = evaluate.predict(model, images["val"], prep, precision, cfg.eval_batch_size)
        val = evaluate.metrics(val_logits, labels["val"])
        if cfg.schedule == "plateau":
            scheduler.step(val["loss"])
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               "train_acc": train_acc, "val_loss": val["loss"], "val_acc": val["top1"],
               "seconds": time.time() - t0}
        history.append(row)
        improved = val["top1"] > best["val_acc"] or (
            val["top1"] == best["val_acc"] and val["loss"] < best["val_loss"])
        if improved:
            best = {"val_acc": val["top1"], "val_loss": val["loss"], "epoch": epoch,
                    "state": {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}}
        stale = 0 if improved else stale + 1
        log(f"[{out.name}] epoch {epoch:>3}  loss {train_loss:.4f}  train {train_acc:.2%}  "
            f"val loss {val['loss']:.4f}  val {val['top1']:.2%}  {row['seconds']:.1f}s")
        checkpoint.save_state(out / checkpoint.STATE, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
            "history": history, "best": best, "stale": stale})
        if cfg.patience and stale >= cfg.patience:
            log(f"[{out.name}] early stop: val top-1 has not improved for {stale} epochs")
            break

    model.load_state_dict(best["state"])
    meta = finish(out, model, cfg, ds, images, labels, prep, source, precision, history, best,
                  time.time() - t_start)
    m = meta["metrics"]
    log(f"[{out.name}] best epoch {best['epoch']}: val {m['val']['top1']:.2%}  "
        f"test {m['test']['top1']:.2%} (top-5 {m['test']['top5']:.2%})  -> {out}")
    return meta


def train_one_epoch(model, frozen, batches, optimizer, scheduler, prep, aug, pad, cfg,
                    precision, epoch) -> tuple[float, float]:
    """One pass over the training batches; returns (mean loss, accuracy) on augmented data."""
    set_train_mode(model, frozen)
    dev = evaluate.device()
    flips, dy, dx = aug
    total_loss, correct, seen = 0.0, 0, 0
    for step, (x, y, idx) in enumerate(batches):
        x = data.augment(x, flips[idx], dy[idx], dx[idx], pad, cfg.flip)
        x = data.normalize(x, prep["mean"], prep["std"]).to(dev)
        y = y.to(dev)
        with evaluate.autocast(precision):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss ({loss.item()}) at epoch {epoch} step {step}; "
                            f"try a lower --lr (now {cfg.lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.schedule != "plateau":
            scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.2%}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


def freeze(model: nn.Module, what: str) -> list[nn.Module]:
    """Freeze parameters; returns the frozen modules, whose BatchNorm stays in eval mode."""
    if what == "none":
        return []
    head = model.get_classifier()
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_params
    head_modules = {id(m) for m in head.modules()}
    return [m for m in model.modules() if id(m) not in head_modules and not list(m.children())]


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:  # frozen BatchNorm keeps its running statistics
        m.eval()


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step LR schedule with linear warm-up (plateau steps per epoch on val loss)."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.3, patience=1)
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def finish(out, model, cfg, ds, images, labels, prep, source, precision, history, best,
           seconds) -> dict:
    """Write weights, logits, history, curves and meta.json (last: it marks the run complete)."""
    arch = cfg.model if source["weights"] != "run" else checkpoint.read_meta(source["parent"])["arch"]
    checkpoint.save_weights(out, model, arch, ds.classes)
    results = {}
    for split in ("val", "test"):
        logits = evaluate.predict(model, images[split], prep, precision, cfg.eval_batch_size)
        checkpoint.save_logits(out, split, logits, labels[split])
        results[split] = evaluate.metrics(logits, labels[split])
    best_row = next(r for r in history if r["epoch"] == best["epoch"])
    results["train"] = {"top1": best_row["train_acc"], "loss": best_row["train_loss"],
                        "n": len(labels["train"]), "note": "augmented, during training"}
    write_history(out / "history.csv", history)
    plots.curves(history, out / "curves.png", f"{out.name}: {arch} on {ds.spec}")
    meta = {
        "format": 1, "arch": arch, "num_classes": len(ds.classes), "classes": ds.classes,
        "class_names": ds.names, "preprocessing": prep, "source": source, "data": ds.spec,
        "val_fraction": cfg.val_fraction, "limit": cfg.limit, "config": to_dict(cfg),
        "seed": cfg.seed, "precision": precision, "eval_batch_size": cfg.eval_batch_size,
        "params": models.count_params(model),
        "trainable_params": models.count_params(model, trainable=True),
        "epochs_run": len(history), "best_epoch": best["epoch"], "seconds": round(seconds, 1),
        "metrics": results, "versions": versions(),
    }
    checkpoint.write_json(out / checkpoint.META, meta)
    return meta


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    checkpoint.write_text(path, buf.getvalue())


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise UserError(f"run folder {out} already exists: pass --resume to continue it "
                            "or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


def versions() -> dict:
    return {"transferlab": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "git": git_sha()}


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def finetune_config(run: str | Path, overrides: dict) -> TrainConfig:
    """A config that continues from a run: its data, arch and preprocessing unless overridden."""
    from .config import make_config

    meta = checkpoint.read_meta(run)
    base = replace(TrainConfig(), **{k: v for k, v in meta["config"].items()
                                     if k in TrainConfig.__dataclass_fields__})
    base = replace(base, weights=str(run), model=meta["arch"], lr=base.lr / 10, limit=meta.get("limit"))
    return make_config(overrides, base)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
