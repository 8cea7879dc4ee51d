"""Model architectures: timm names passed through, the custom DCNN, and two typed records,
the architecture (name, stem, pooled stages) and the preprocessing a model expects (input
size, channels, mean, std, interpolation); both travel in the run folder's meta.json.

Every model follows timm's head contract (`forward_features`, `forward_head(pre_logits=)`,
`get_classifier`, `reset_classifier`). Whatever runs a model (training, prediction, features,
export) calls `logits()`: the body under autocast, the head in fp32, explicitly, outside it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

from .config import UserError

SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.5  # for models trained from scratch: maps [0, 1] to [-1, 1]
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resized (interpolation) to input_size square,
    with `channels` channels (1 gray, 3 RGB), scaled to [0, 1], then normalised by mean/std."""

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def make(cls, size, channels, mean, std, interpolation="bilinear") -> Preprocessing:
        """From loose values (timm's pretrained_cfg, a config); an interpolation PIL lacks
        (timm's "bicubic" variants, "random") falls back to bilinear."""
        interpolation = interpolation if interpolation in INTERPOLATIONS else "bilinear"
        floats = lambda vs: tuple(float(v) for v in vs)  # noqa: E731
        return cls(int(size), int(channels), floats(mean), floats(std), interpolation)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From meta.json (older runs also stored the architecture's choices there)."""
        return cls.make(d["input_size"], d["channels"], d["mean"], d["std"], d["interpolation"])

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class Architecture:
    """Which network: a timm name (or dcnn) and the choices transferlab makes on top of it."""

    name: str
    stem: str = "default"  # small: a 3x3 stride-1 first convolution and no max-pool
    pool_stages: int = 0  # the head also sees the pooled outputs of the last N feature stages
    mirror: bool = False  # the head sees the mean pooled features of the image and its mirror

    @classmethod
    def of_run(cls, meta: dict) -> Architecture:
        # older runs kept stem and pool_stages with the preprocessing
        a = meta.get("architecture") or meta["preprocessing"]
        stem, pools = a.get("stem", "default"), a.get("pool_stages", 0)
        return cls(meta["arch"], stem, pools, bool(a.get("mirror", False)))

    def build(self, num_classes: int, in_chans: int) -> nn.Module:
        """An untrained model of this architecture (`create`)."""
        return create(self.name, num_classes, in_chans, self.stem, self.pool_stages, self.mirror)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "stem": self.stem,
            "pool_stages": self.pool_stages,
            "mirror": self.mirror,
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
    arch: str,
    num_classes: int,
    in_chans: int,
    stem: str = "default",
    pool_stages: int = 0,
    mirror: bool = False,
) -> nn.Module:
    """An untrained model by name: `dcnn` or any timm architecture (`mirror`: see `logits`)."""
    if arch == "dcnn":
        model = DCNN(num_classes, in_chans)
    else:
        check_arch(arch)
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
    if pool_stages:
        add_stage_pools(model, arch, pool_stages)
    if mirror:
        model.mirror = True
    return small_stem(model) if stem == "small" else model


def for_run(meta: dict) -> nn.Module:
    """The untrained model a run folder's meta.json describes (its architecture, channels)."""
    a, prep = Architecture.of_run(meta), Preprocessing.from_dict(meta["preprocessing"])
    return a.build(meta["num_classes"], prep.channels)


def add_stage_pools(model: nn.Module, arch: str, n: int) -> nn.Module:
    """Feed the head the average-pooled outputs of the last `n` feature stages as well.

    Mid-level features carry layout and texture that the last stage abstracts away; scene
    recognition gains from them (Azizpour et al. 2015, "From generic to specific deep
    representations"). Stages come from timm's `feature_info` (a last stage that *is* the final
    feature map is skipped) and their outputs from timm's `forward_intermediates` (see
    `logits`); `model.pooled_stages` holds their feature_info indices. Only the classifier
    widens, so every pretrained tensor still loads, and `--head-init match` copies the source
    rows into the first columns (the rest start at zero: the start is the source head exactly).
    """
    info = getattr(model, "feature_info", None)
    if (
        not info
        or not hasattr(model, "forward_intermediates")
        or not getattr(model, "pretrained_cfg", {}).get("classifier")
    ):
        raise UserError(f"pool_stages needs a timm model with feature_info; {arch} has none")
    indices = list(range(len(info)))
    if info[-1]["num_chs"] == model.num_features:
        indices = indices[:-1]
    model.pooled_stages = tuple(indices[-n:])
    width = model.num_features + sum(info[i]["num_chs"] for i in model.pooled_stages)
    head = model.get_classifier()
    model.set_submodule(model.pretrained_cfg["classifier"], nn.Linear(width, head.out_features))
    return model


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


# ----------------------------------------------------------------------------- forward

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def logits(
    model: nn.Module, x: torch.Tensor, precision: str = "fp32", pre_logits: bool = False
) -> torch.Tensor:
    """The model's logits (or, with `pre_logits`, the pooled features its classifier sees).

    The body runs under autocast at `precision`; the head (global pooling, the pooled stages,
    the classifier) runs in fp32 outside it: under bf16 the logits would otherwise carry 8
    significant bits, which rounds close classes together (measured on CUDA:
    benchmarks/bf16_accuracy.py). The head is a tiny share of the compute.

    A model with `mirror` (a linear probe's `--mirror-features`) pools the features of each
    image and of its mirror image and feeds the head their mean: twice the forward cost, and
    for a linear head the same as averaging the two views' logits, built into the model, so
    predict, serve, ensembles and ONNX export all see it (Tiny ImageNet, Lite1 probe at 240 px,
    5-fold out-of-fold top-1: 70.19% -> 70.92%).
    """
    if getattr(model, "mirror", False):  # two passes, not one of 2N: exports keep N dynamic
        both = [_logits(model, v, precision, pre_logits=True) for v in (x, x.flip(3))]
        feats = (both[0] + both[1]) / 2
        return feats if pre_logits else model.get_classifier()(feats)
    return _logits(model, x, precision, pre_logits)


def _logits(model: nn.Module, x: torch.Tensor, precision: str, pre_logits: bool) -> torch.Tensor:
    stages = getattr(model, "pooled_stages", ())
    dtype = AUTOCAST.get(precision)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        if stages:
            x, inner = model.forward_intermediates(x, indices=list(stages))
        else:
            x, inner = model.forward_features(x), []
    with torch.autocast(x.device.type, enabled=False):  # the head in fp32
        x = model.forward_head(x.float(), pre_logits=pre_logits or bool(stages))
        if not stages:
            return x
        x = torch.cat([x, *(t.float().mean((2, 3)) for t in inner)], 1)
        return x if pre_logits else model.get_classifier()(x)


def feature_layout(model: nn.Module) -> list:
    """What a model's pooled features are made of beyond its weights, for cache keys: the
    pooled stages, then "mirror" if it averages the mirror view (absent otherwise, so keys made
    before mirroring existed stay valid)."""
    pooled = list(getattr(model, "pooled_stages", ()))
    return [pooled, "mirror"] if getattr(model, "mirror", False) else [pooled]


class Forward(nn.Module):
    """`logits()` as a module, for what needs one: DistributedDataParallel, torch.compile and
    ONNX export. It owns no tensors of its own; state dicts are taken from the bare model."""

    def __init__(self, model: nn.Module, precision: str = "fp32", pre_logits: bool = False):
        super().__init__()
        self.model, self.precision, self.pre_logits = model, precision, pre_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits(self.model, x, self.precision, self.pre_logits)


def fold_batchnorm(model: nn.Module, input_size: int, channels: int = 3) -> nn.Module:
    """A copy of an eval-mode model with every BatchNorm that normalises a convolution's output
    folded into that convolution's weight and bias (timm's BatchNormAct2d keeps its activation),
    for frozen forward passes: EfficientNet-Lite's features 1.3-1.4x faster in bf16 on a 2-core
    EPYC with AVX512-BF16 (a norm pass less per convolution, and no fp32 round trip of the
    activations under autocast). The pairs are found by tracing one forward; the copy is
    checked against the model in fp32 on random images and the model itself is returned where
    they differ (a convolution's output used elsewhere too) or nothing folds.
    """
    import copy

    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    folded = copy.deepcopy(model).eval()
    convs, pairs = {}, []

    def conv_out(m, args, out):
        convs[id(out)] = m

    def bn_in(m, args, out):
        if id(args[0]) in convs and m.track_running_stats and m.running_var is not None:
            pairs.append((convs[id(args[0])], m))

    hooks = [
        m.register_forward_hook(conv_out if isinstance(m, nn.Conv2d) else bn_in)
        for m in folded.modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    dev = next(model.parameters()).device
    seeded = torch.Generator().manual_seed(0)  # the same decision at training and at scoring
    x = torch.rand(2, channels, input_size, input_size, generator=seeded).to(dev)
    with torch.no_grad():
        reference = logits(model.eval(), x, pre_logits=True)
        logits(folded, x, pre_logits=True)
    for h in hooks:
        h.remove()
    names = {m: n for n, m in folded.named_modules()}
    with torch.no_grad():
        for conv, bn in pairs:
            scale = (bn.running_var + bn.eps).rsqrt()
            scale = scale * bn.weight if bn.weight is not None else scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            shift = bn.bias if bn.bias is not None else torch.zeros_like(scale)
            conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
            after = [getattr(bn, a) for a in ("drop", "act") if hasattr(bn, a)]  # BatchNormAct2d
            folded.set_submodule(names[bn], nn.Sequential(*after) if after else nn.Identity())
        got = logits(folded, x, pre_logits=True)
    if not reference.isfinite().all():  # weights gone NaN (a diverged run): nothing to fold
        return model  # (allclose raised on a NaN tolerance: a traceback)
    close = torch.allclose(got, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    return folded if pairs and close else model


def bf16_grad_trap(model: nn.Module, input_size: int, channels: int = 3) -> str:
    """The first convolution whose bf16 weight gradient the CPU's kernels (oneDNN, torch 2.14)
    can fill with NaN, at this input size: not grouped, strided, wider than 1x1, on maps with a
    side of 1 pixel (resnet50 under 20 px: layer4.0.conv2, whose taps that see only padding
    got NaN where they are 0; fp32, depthwise and larger maps are exact:
    `python benchmarks/bf16_conv_trap.py`); "" if none. Found by one eval-mode forward pass
    through `logits` (a head that sees pooled stages needs them)."""
    hit: list[str] = []

    def check(name):
        def hook(m, args, out):
            if min(args[0].shape[-2:]) == 1 and not hit:
                hit.append(name)

        return hook

    suspects = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
                and m.groups == 1 and max(m.stride) > 1 and max(m.kernel_size) > 1]  # fmt: skip
    hooks = [m.register_forward_hook(check(n)) for n, m in suspects]
    was, device = model.training, next(model.parameters()).device
    try:
        with torch.no_grad():
            logits(model.eval(), torch.zeros(1, channels, input_size, input_size, device=device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return hit[0] if hit else ""


def check_arch(name: str) -> None:
    """`dcnn`, a timm architecture, or one with a pretrained tag (`resnet50.a1_in1k`); hub and
    local-dir names are checked when their config is read."""
    if name == "dcnn" or name.startswith(("hf-hub:", "local-dir:")):
        return
    arch, tag = timm.models.split_model_name_tag(name)
    if arch in timm.list_models():
        if (tag or name.endswith(".")) and name not in timm.list_pretrained(name):
            tags = [n.partition(".")[2] for n in timm.list_pretrained(arch + ".*")]
            raise UserError(
                f"{arch} has no pretrained tag '{tag}' (timm knows: {', '.join(tags) or 'none'})"
            )
        return
    known = ["dcnn", *timm.list_models()]  # all lower case: ResNet50 and DCNN find theirs
    close = difflib.get_close_matches(arch.lower(), known, n=3, cutoff=0.6)
    if tag and close[:1] == [arch.lower()] and name.lower() in timm.list_pretrained(name.lower()):
        close[0] = name.lower()  # its tag kept (TF_...LITE0.IN1K: the tag was dropped)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown model '{name}'{hint}; see `transferlab models` or use 'dcnn'")


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


def describe(model: nn.Module) -> str:
    total, train = count_params(model), count_params(model, trainable=True)
    return f"{_count(total)} parameters, {_count(train)} trainable"


def _count(n: int) -> str:
    """1.18M, 2.57k, 120: a head of a few thousand parameters is not "0.00M"."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.2f}k" if n >= 1e3 else str(n)
