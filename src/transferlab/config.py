"""Typed configuration: frozen dataclasses, YAML/CLI overrides, and the user-error type."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import importlib
import importlib.util
import math
import os
import signal
import threading
import types
import typing
from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line and exits 2."""

    def __init__(self, message: str):  # one line, even when it quotes a value with newlines
        super().__init__(one_line(str(message)))


class EveryRank(UserError):
    """A refusal each process of a torchrun job reaches alike: rank 0 says it, once."""


class UnreadableImages(UserError):
    """Images that cannot be decoded (`bad`: one line each, the file and why; `fix`: the mend)."""

    def __init__(self, message: str, bad: list[str], fix: str = "fix or remove them"):
        super().__init__(message)
        self.bad, self.fix = list(bad), fix

    def __reduce__(self):  # raised in a DataLoader worker, it travels pickled
        return type(self), (str(self), self.bad, self.fix)

    @classmethod
    def listed(cls, bad: list[str], fix: str = "fix or remove them") -> UnreadableImages:
        """The error that lists them, and says what mends them."""
        said = f"{len(bad)} unreadable image(s), {fix} or pass --skip-bad-images: "
        return cls(said + cls.some(bad), bad, fix)

    @staticmethod
    def some(bad: list[str], most: int = 20) -> str:
        """The first `most` joined, and how many more: a refusal of 10,000 stays readable."""
        return "; ".join(bad[:most]) + f"; and {len(bad) - most:,} more" * (len(bad) > most)

    @staticmethod
    def why(err: BaseException, path: str) -> str:
        """Why the image at `path` could not be decoded, in words (no exception class names)."""
        from PIL import Image, UnidentifiedImageError

        if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            return f"over {Image.MAX_IMAGE_PIXELS:,} pixels, the limit for one image: shrink it first"  # fmt: skip
        if isinstance(err, UnidentifiedImageError):  # (its message repeats the path)
            empty = isinstance(path, str) and os.path.isfile(path) and not os.path.getsize(path)
            return ("no image in its row" if path.endswith("-no-image") else "an empty file") if empty else "not an image Pillow reads: another format, or damaged"  # fmt: skip
        if isinstance(err, FileNotFoundError):
            return f"a broken link to {os.readlink(path)}" if os.path.islink(path) else "not found"
        if isinstance(err, (PermissionError, IsADirectoryError)):
            return "no permission to read it" if isinstance(err, PermissionError) else "a folder"
        if getattr(err, "errno", None) == errno.ELOOP:
            return "a link loop: its links lead to one another, never to a file"
        if "truncated" in str(err):  # (Pillow's "image file is truncated (12 bytes not processed)")
            return "truncated: the file ends early, as an interrupted copy or download leaves it"
        return f"damaged: {getattr(err, 'strerror', None) or err}"


def one_line(text: str) -> str:
    """Control characters (newlines, \\x1e, ...) escaped, so a message stays one printed line; a
    file name's byte that is not UTF-8 as `\\xff`, as `--json` writes it (it said `\\udcff`)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else repr(c)[1:-1] for c in text)  # fmt: skip


def few(items: list[str], most: int = 5) -> str:
    """The first `most`, and how many more (pass 56: ten classes read as five)."""
    return ", ".join(items[:most]) + f" (+{len(items) - most:,} more)" * (len(items) > most)


def names_weights(name: str) -> bool:
    """A model name that names pretrained weights: arch.tag, hf-hub:ORG/NAME, local-dir:PATH."""
    return str(name or "").startswith(("hf-hub:", "local-dir:")) or "." in str(name or "")


class Preempted(Exception):
    """Training stopped on SIGTERM after saving its state; the CLI exits 143."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training step stops the command as Ctrl-C does (`guards.stop_on_sigterm`)."""


@contextlib.contextmanager
def sigterm_stops(wanted: bool = True):
    """SIGTERM raises Terminated in the block (a training session inside stops at a step)."""

    def stop(signum, frame):
        raise Terminated

    if not wanted or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def opt(default, help: str):
    """A config field with its one-line help (the CLI's --help text, from the field's metadata)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how one model is trained or fine-tuned."""

    data: str = opt(
        "digits",
        "dataset spec: digits | tiny-imagenet:PATH | folder:PATH (class folders, or train/ val/ test/ "
        "of them) | csv:FILE (file_name,label[,split]) | hf:NAME[:CONFIG] or hf:PATH (Hugging Face "
        "datasets: the Hub or its cache, save_to_disk, parquet; columns found by type or named: "
        ",image=COL,label=COL) | wds:DIR (WebDataset shards from `transferlab data shard`, decoded per"
        " batch, never cached) | synthetic:N[xSIZE] (random images, for smoke tests); splits the data "
        "have are used as given, a missing test is 20% of train, a missing val --val-fraction of train",
    )
    model: str = opt(
        "resnet50",
        "a timm architecture, or with its pretrained tag (resnet50.a1_in1k: those weights and "
        'their preprocessing), hf-hub:ORG/NAME, local-dir:PATH; or "dcnn"',
    )
    weights: str | None = opt(
        None,
        "not given: scratch, or the tag's weights for a tagged --model | imagenet (timm's "
        "default tag) | none (scratch, a tagged --model too) | a run folder | a .safetensors/.pt file",
    )
    head_init: str = opt("fresh", "fresh | match: start new classes from the source head's rows for classes it shares (by id or name)")  # fmt: skip
    input_size: int | None = opt(None, "None: the data's native size (scratch) or the weights' own")
    channels: int | None = opt(None, "1 (gray; RGB kernels summed) or 3 (gray repeated); None: 3 for timm models, the data's own for dcnn")  # fmt: skip
    stem: str = opt("default", "default | small: 3x3 stride-1 first conv, no max-pool (32-64 px inputs; pretrained kernel cropped)")  # fmt: skip
    epochs: int = opt(10, "maximum number of passes over the training split")
    batch_size: int = opt(64, "images per optimizer step")
    optimizer: str = opt("adamw", "adam | adamw | sgd")
    lr: float | str = opt(1e-3, "peak learning rate, or auto (an LR range test picks it first)")
    weight_decay: float = opt(0.05, "decoupled for adamw, L2 for adam/sgd")
    momentum: float = opt(0.9, "SGD momentum (optimizer sgd only)")
    schedule: str = opt("cosine", "cosine | plateau | constant")
    warmup_epochs: float = opt(0.0, "linear warm-up before the schedule (fraction of epochs allowed)")  # fmt: skip
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")
    flip: bool = opt(True, "random horizontal flip (pass --no-flip for digits and text: a mirrored one reads as another)")  # fmt: skip
    crop: str = opt("pad", "pad (random crop with padding) | rrc (random-resized-crop) | none")
    crop_pad: int = opt(-1, "padding in pixels for crop=pad; -1: input_size // 8")
    patience: int = opt(0, "early stopping: epochs without val improvement (0: off)")
    snapshots: int = opt(
        0,
        "snapshot ensemble: K cosine cycles with restarts, each cycle's end saved as a member run in OUT/snapshots/ (0: off)",
    )
    strategy: str = opt("full", "full | linear-probe | lp-ft | head-first | gradual | layer-decay")
    pool_stages: int = opt(0, "also feed the head the pooled outputs of the last N feature stages")
    mirror_features: bool = opt(
        False,
        "linear-probe: the head sees the mean features of each image and its mirror (twice the forward cost; the model keeps doing so wherever it predicts)",
    )
    layer_decay: float = opt(0.75, "layer-decay: each block group's LR is this times the group above")  # fmt: skip
    probe_l2: float | str = opt("auto", "linear probe's L2 (standardised features); auto: CV on train")  # fmt: skip
    freeze: str = opt(
        "none",
        "none | backbone (the head trains) | N (the N lowest block groups, stem first, stay frozen); frozen BatchNorm keeps its statistics",
    )
    val_fraction: float = opt(0.1, "share of train carved out as val when the data have none")
    limit: int | None = opt(None, "at most this many images per split (smoke tests)")
    fold: str = opt("none", "i/k: CV of train+val: fit k-1 folds, keep the last epoch, score i")
    seed: int = opt(0, "seeds init, sampler order and augmentation (splits are fixed)")
    precision: str = opt("auto", "auto (bf16 where the CPU or GPU has it natively: avx512_bf16, amx, CUDA; else fp32) | bf16 | fp16 (CUDA) | fp32")  # fmt: skip
    compile: bool = opt(False, "torch.compile the training model (for GPUs; no gain seen on CPU)")
    num_workers: int = opt(0, "DataLoader worker processes (0 is fastest on 2 cores)")
    eval_batch_size: int = opt(256, "images per forward pass when predicting")
    feature_engine: str = opt(
        "auto",
        "auto | torch | onnxruntime (fp32): what computes a frozen backbone's features (probes); "
        "auto: the faster here, timed, for fp32 runs (bf16 runs: torch, as evaluate scores them)",
    )
    checkpoint_every: int = opt(0, "also save the training state every N steps (0: each epoch)")
    keep_last: int = opt(2, "training-state checkpoints kept (newest first)")
    cache_dir: str | None = opt(
        None, "decoded-image cache; None: $TRANSFERLAB_CACHE or ~/.cache/transferlab; off"
    )
    skip_bad_images: bool = opt(False, "drop unreadable images (listed) instead of stopping")
    trust_pickle: bool = opt(False, "allow pickled objects in .pt files (can run code!)")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(name: str, value: object, hint: object) -> object:
    """Convert a YAML/CLI value to the annotated type, or raise UserError naming the key."""
    if hint == float | str:  # a number, or the word auto
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number or auto, got {value!r}") from None
        return _coerce(name, value, float)
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    base = next((a for a in hint.__args__ if a is not type(None)), str) if optional else hint
    if name == "weights" and str(value).lower() == "none":  # the word: scratch (None: as typed)
        return "none"
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{name} may not be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):  # fmt: skip
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{name} must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"{name} must be a finite number, got {value!r}")
        if number == 0 and isinstance(value, str) and set(value.lower().partition("e")[0]) & set("123456789"):  # fmt: skip
            raise UserError(f"{name} {value} is too small for a float: it reads as 0")  # (1e-400)
        if base is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)  # exactly (99999999999999999999 is not 1e20)
        if base is int:
            if number != int(number):
                raise UserError(f"{name} must be a whole number, got {value!r}")
            return int(number)
        return number
    if isinstance(value, (list, dict, tuple, set)):
        raise UserError(f"{name} must be a single value, got {type(value).__name__} {value!r}"[:200])  # fmt: skip
    return str(value)


# Options that act only in some setups (key: condition on the final config, what it needs, or a function of the config saying which need failed): given elsewhere, silently ignored, so refused
# fmt: off
APPLIES = {
    "momentum": (lambda c: c.optimizer == "sgd", lambda c: "optimizer sgd" if c.strategy != "linear-probe" else "an optimizer: strategy full (or lp-ft, ...) with optimizer sgd (linear-probe fits its head by L-BFGS)"),
    "crop_pad": (lambda c: c.crop == "pad", "crop pad"),
    "probe_l2": (lambda c: c.strategy in ("linear-probe", "lp-ft"), "strategy linear-probe or lp-ft"),
    "layer_decay": (lambda c: c.strategy == "layer-decay", "strategy layer-decay"),
    "head_init": (lambda c: c.weights != "none" and (c.weights is not None or names_weights(c.model)),
                  "weights to start from (--weights, or a model name with a pretrained tag)"),
    "stem": (lambda c: c.model != "dcnn", "a timm model (dcnn has its own stem)"),
    "warmup_epochs": (lambda c: c.schedule != "plateau", "schedule cosine or constant"),
    "val_fraction": (lambda c: c.fold == "none" and not importlib.import_module(".folds", __package__).own_val(c.data),
                     lambda c: "fold none (with a fold, val is that fold)" if c.fold != "none" else
                     f"data with no val split of their own, and {c.data} has one (a folder's val/, shards, a CSV's split column)"),
    "patience": (lambda c: c.fold == "none" and c.strategy != "linear-probe",
                 lambda c: "fold none (a fold's val scores, never chooses)" if c.fold != "none" else "epochs to stop (linear-probe has none)"),
    "lr": (lambda c: c.lr != "auto" or c.strategy != "linear-probe",  # auto: a range test; a probe
           "epochs of training to find it for (linear-probe fits its head by L-BFGS)"),  # has none
    "feature_engine": (lambda c: c.strategy in ("linear-probe", "lp-ft"),
                       "strategy linear-probe or lp-ft (it computes a probe's features)"),
}
PROBE_IGNORES = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "crop", "crop_pad", "checkpoint_every")  # what a linear probe never uses: it fits its head by L-BFGS on features computed once
# fmt: on


def make_config(
    overrides: dict, base: TrainConfig | None = None, check_applies: bool | typing.Iterable = True
) -> TrainConfig:
    """Overrides applied; unknown keys, wrong types and an option given where it does not act
    (APPLIES; `check_applies`: the keys to check, when not all: a recipe step's own) refused."""
    base = base or TrainConfig()
    names = field_names(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    clean = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown config key '{key}'{hint}")
        clean[key] = _coerce(key, value, hints[key])
    cfg = dataclasses.replace(base, **clean)
    validate(cfg)
    defaults = TrainConfig()
    given = clean if check_applies is True else {k.replace("-", "_") for k in check_applies or ()}  # fmt: skip
    checked = [k for k in clean if k in given and clean[k] != getattr(defaults, k)]  # (a default does nothing anyway)  # fmt: skip
    for key in sorted(checked, key=lambda k: k not in APPLIES):  # (its own words first)
        if key in APPLIES and not APPLIES[key][0](cfg):
            needs = APPLIES[key][1](cfg) if callable(APPLIES[key][1]) else APPLIES[key][1]
            raise UserError(f"{key} has no effect here: it needs {needs}; drop it or change that")
        if key in PROBE_IGNORES and cfg.strategy == "linear-probe":
            raise UserError(f"{key} has no effect with strategy linear-probe: it fits its head by L-BFGS on features computed once (no epochs, optimizer or augmentation); drop it or choose another strategy")  # fmt: skip
    return cfg


CHOICES = {
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "plateau", "constant"),
    "crop": ("pad", "rrc", "none"),
    "head_init": ("fresh", "match"),
    "stem": ("default", "small"),
    "strategy": ("full", "linear-probe", "lp-ft", "head-first", "gradual", "layer-decay"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "feature_engine": ("auto", "torch", "onnxruntime"),
}


def validate(cfg: TrainConfig) -> None:
    """Check ranges and choices so mistakes fail before any work starts."""
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            folded = {a.lower(): a for a in allowed}  # adamW -> adamw, not adam
            close = difflib.get_close_matches(str(value).lower(), list(folded), n=1)
            hint = f" (did you mean {folded[close[0]]}?)" if close else ""
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{hint}")
    if cfg.freeze not in ("none", "backbone") and not (
        cfg.freeze.isdigit() and int(cfg.freeze) > 0
    ):
        raise UserError(
            f"freeze must be none, backbone or a number of block groups (1, 2, ...), got {cfg.freeze!r}"
            + (" (nothing frozen: freeze none)" if cfg.freeze.strip("0") == "" else "")
        )
    if cfg.freeze != "none" and cfg.strategy in ("linear-probe", "gradual"):
        raise UserError(
            f"freeze {cfg.freeze} does not combine with strategy {cfg.strategy}, which decides "
            "itself what is frozen; use strategy full, lp-ft, head-first or layer-decay with freeze"
        )
    if cfg.freeze == "backbone" and cfg.strategy in ("lp-ft", "head-first", "layer-decay"):
        raise UserError(f"freeze backbone leaves strategy {cfg.strategy} only the head to train in every stage: freeze N to fine-tune the top of the backbone, or, for the head alone, strategy full with freeze backbone or linear-probe without freeze")  # fmt: skip
    if cfg.strategy in ("head-first", "gradual") and cfg.epochs < 2:  # (bit-identical, both)
        raise UserError(f"strategy {cfg.strategy} trains the head alone in its first epoch: with epochs {cfg.epochs} the backbone never trains; give epochs 2 or more, or use strategy linear-probe for the head alone")  # fmt: skip
    if cfg.fold != "none" and not _is_fold(cfg.fold):
        raise UserError(f"fold must be none or i/k with 1 <= i <= k and k >= 2, got {cfg.fold!r}")
    if cfg.feature_engine == "onnxruntime" and not all(
        importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")
    ):
        raise UserError(
            "feature_engine onnxruntime needs the onnx, onnxscript and onnxruntime packages: "
            "pip install 'transferlab[export]'"
        )
    if cfg.mirror_features and cfg.strategy != "linear-probe":
        raise UserError(f"mirror_features averages a frozen backbone's features over each image and its mirror: it needs strategy linear-probe, not {cfg.strategy}")  # fmt: skip
    if cfg.feature_engine == "onnxruntime" and cfg.precision in ("bf16", "fp16"):  # (ran fp32)
        raise UserError(f"feature_engine onnxruntime computes in fp32, not precision {cfg.precision}: drop one of them (auto picks the faster engine for fp32 runs)")  # fmt: skip
    if not 0 <= cfg.pool_stages <= 4:
        raise UserError(f"pool_stages must be between 0 and 4, got {cfg.pool_stages}")
    if cfg.channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3, got {cfg.channels}")
    for key, (low, high, why) in RANGES.items():
        value = getattr(cfg, key)
        if value is None or value == "auto":
            continue
        if not (math.isfinite(value) and _within(value, low, high)):
            raise UserError(f"{key} must be {_range_text(low, high)}{why}, got {value}")
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(
            f"warmup_epochs ({cfg.warmup_epochs:g}) must not exceed epochs ({cfg.epochs})"
        )
    if cfg.input_size is not None and cfg.crop == "pad" and cfg.crop_pad >= cfg.input_size:
        raise UserError(
            f"crop_pad ({cfg.crop_pad}) must be smaller than input_size ({cfg.input_size})"
        )
    if cfg.snapshots:  # (what they need first: a probe was told to divide epochs, pass 61)
        if cfg.schedule != "cosine" or cfg.patience or cfg.strategy == "linear-probe":
            raise UserError(
                "snapshots need the cosine schedule, no early stopping (patience 0) and a "
                "strategy that trains the network (not linear-probe)"
            )
        if cfg.snapshots < 2 or cfg.epochs % cfg.snapshots:
            raise UserError(
                f"snapshots must be at least 2 and divide epochs ({cfg.epochs}), got {cfg.snapshots}"
            )


# Numeric ranges, checked for every config however it was made (CLI, recipe, Python API):
# (low, high, why); a bound in a tuple is exclusive.
RANGES = {
    "epochs": (1, 100_000, ""),
    "batch_size": (2, 65_536, " (BatchNorm cannot train on one image per batch)"),
    "eval_batch_size": (1, 65_536, ""),
    "lr": ((0,), (3.4e38,), " (float32's largest)"),
    "probe_l2": ((0,), 1e6, ""),
    "weight_decay": (0, 10, ""),
    "momentum": (0, (1,), ""),
    "warmup_epochs": (0, 100_000, ""),
    "label_smoothing": (0, (1,), ""),
    "crop_pad": (-1, 1024, " (-1: input_size // 8)"),
    "patience": (0, 100_000, " (0: off)"),
    "snapshots": (0, 1000, " (0: off)"),
    "layer_decay": ((0,), 1, ""),
    "val_fraction": ((0,), (0.9,), ""),
    "limit": (1, 10**9, " (or none)"),
    "seed": (0, 2**32 - 1, ""),
    "num_workers": (0, 64, ""),
    "checkpoint_every": (0, 10**9, " (0: each epoch)"),
    "keep_last": (1, 1000, ""),
    "input_size": (8, 1024, ""),
}


def _is_fold(text: str) -> bool:
    i, _, k = text.partition("/")
    return i.isdigit() and k.isdigit() and 1 <= int(i) <= int(k) and int(k) >= 2


def _within(value: float, low, high) -> bool:
    return (value > low[0] if isinstance(low, tuple) else value >= low) and (value < high[0] if isinstance(high, tuple) else value <= high)  # fmt: skip


def _range_text(low, high) -> str:
    def num(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    left = f"> {num(low[0])}" if isinstance(low, tuple) else f">= {num(low)}"
    right = f"< {num(high[0])}" if isinstance(high, tuple) else f"<= {num(high)}"
    return f"{left} and {right}"


def field_help(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's one-line help (its metadata): the CLI's --help text."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def to_dict(cfg: object) -> dict:
    return dataclasses.asdict(cfg)


def parse_set(pairs: list[str]) -> dict:
    """Parse CLI `--set key=value` pairs into a dict (values stay strings; coerced later)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, value = (part.strip() for part in pair.split("=", 1))
        if value[:1] in ("'", '"') and not (len(value) > 1 and value[-1] == value[0]):  # out='o
            raise UserError(f"--set {pair}: its quote {value[0]} is not closed")
        if len(value) > 1 and value[0] == value[-1] in "'\"":  # lr='1e-3': as YAML reads it
            value = value[1:-1]
        if key in out and out[key] != value:  # the last one won, silently
            raise UserError(f"--set {key} is given twice, {out[key]} and {value}: give it once")
        out[key] = value
    return out
