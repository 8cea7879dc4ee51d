"""An ensemble as one ONNX graph, and a run as a Hugging Face / timm folder.

The ensemble graph takes uint8 images (N, S, S, 3), NHWC, RGB, at one stated size S (by default
the largest member's input size); inside it each member converts to grayscale if it was trained
on grayscale (ITU-R 601 luma, as PIL's "L"), resizes to its own input size (ONNX Resize with
the member's interpolation, no antialiasing), normalises with its own mean/std, and the
members' probabilities are combined as the ensemble does; an ensemble built with `--tta flip`
averages each member's logits over the image and its mirror, as it predicts. Output:
probabilities (N, K) in the order of the ensemble's classes. Exported methods: soft, logit,
weighted, select, stacking and hard (a vote, as `combiners.combine_hard` scores it); fusion (a
head on member features) and ten-crop TTA are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import (
    checkpoint,
    combiners,
    decoding,
    ensembles,
    evaluate,
    export,
    members,
    models,
    outputs,
)
from .config import UserError
from .folds import load_as_run

EXPORTED = ("soft", "logit", "weighted", "select", "stacking", "hard")
LUMA = (0.299, 0.587, 0.114)


class EnsembleGraph(nn.Module):
    """uint8 NHWC RGB at `size` -> the ensemble's probabilities (N, K)."""

    def __init__(self, nets, preps, orders, method: str, params: dict, size: int, tta="none"):
        super().__init__()
        self.mirror = tta == "flip"  # each member's logits averaged with its mirror's
        self.members = nn.ModuleList(
            export.Packaged(n, p) for n, p in zip(nets, preps, strict=True)
        )
        self.preps, self.method, self.size = preps, method, size
        for i, order in enumerate(orders):
            self.register_buffer(f"order{i}", torch.as_tensor(order, dtype=torch.long))
        self.register_buffer("weights", torch.as_tensor(params["weights"], dtype=torch.float32))
        if method == "stacking":
            self.register_buffer("coef", torch.as_tensor(params["coef"], dtype=torch.float32))
            self.register_buffer("bias", torch.as_tensor(params["intercept"], dtype=torch.float32))
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        logps = []
        for i, (member, prep) in enumerate(zip(self.members, self.preps, strict=True)):
            xi = (x * self.luma).sum(1, keepdim=True) if prep.channels == 1 else x
            if prep.input_size != self.size:
                mode = "nearest" if prep.interpolation == "nearest" else prep.interpolation
                corners = None if mode == "nearest" else False
                xi = F.interpolate(
                    xi, size=(prep.input_size,) * 2, mode=mode, align_corners=corners
                )
            out = member(xi).float()
            if self.mirror:
                out = (out + member(xi.flip(3)).float()) / 2
            logps.append(F.log_softmax(out, dim=1)[:, getattr(self, f"order{i}")])
        logp = torch.stack(logps)  # (M, N, K)
        if self.method == "logit":
            return F.softmax(torch.einsum("m,mnk->nk", self.weights, logp), dim=1)
        if self.method == "stacking":
            m, n, k = logp.shape
            features = logp.clamp(min=-30.0).permute(1, 0, 2).reshape(n, m * k)
            return F.softmax(features @ self.coef.T + self.bias, dim=1)
        if self.method == "hard":  # as combiners.combine_hard: (M w-weighted votes + mean p)/(M+1)
            m, w = len(logp), self.weights / self.weights.sum()
            votes = torch.zeros_like(logp).scatter(2, logp.argmax(2, keepdim=True), 1.0)
            mean_p = torch.einsum("m,mnk->nk", w, logp.exp())
            return (torch.einsum("m,mnk->nk", m * w, votes) + mean_p) / (m + 1)
        return torch.einsum("m,mnk->nk", self.weights, logp.exp())  # soft, weighted, select


def export_any(
    path: str | Path, fmt: str, out=None, overwrite: bool = False, input_size: int | None = None
) -> dict:
    """What `transferlab export` writes (and the API's `Model.export`): an ensemble as one ONNX
    graph (`input_size`: its input), a run in `fmt` (onnx, torchscript, safetensors, hf)."""
    if ensembles.is_ensemble(path):
        if fmt != "onnx":
            raise UserError(f"an ensemble exports as one ONNX graph, not {fmt}: --format onnx")
        return export_ensemble(path, out, overwrite, input_size)
    if input_size is not None:  # (0 too)
        raise UserError("--input-size applies to an ensemble; a run's graph takes its own size")
    if fmt == "hf":
        return export_hf(path, out, overwrite)
    return export.export(path, fmt, out, overwrite)


def export_ensemble(path: str | Path, out: str | Path | None, overwrite: bool = False,
                    size: int | None = None) -> dict:  # fmt: skip
    """ENS/export/ensemble.onnx (or `out`); checked with onnxruntime against the ensemble."""
    path = Path(path)
    if size is not None and not 8 <= size <= 4096:
        raise UserError(f"--input-size {size}: the graph's input is 8 to 4096 pixels square")
    info = ensembles.read(path)
    if info["method"] not in EXPORTED:
        raise UserError(
            f"a {info['method']} ensemble does not export: rebuild it with --method "
            f"{', '.join(EXPORTED[:-1])} or {EXPORTED[-1]}"
        )
    tta = info.get("tta", "none")
    if tta not in ("none", "flip"):
        raise UserError(
            f"ensemble {path} was built with --tta {tta}, which the exported graph does not do "
            "(it does none or flip): rebuild it with --tta flip or none"
        )
    metas = members.check_members(info, path)
    runs = [m["run"] for m in info["members"]]
    orders = members.check_classes(metas, runs)
    preps = [models.Preprocessing.from_dict(m["preprocessing"]) for m in metas]
    size = int(size or max(p.input_size for p in preps))
    target = export.out_path(out, path / "export" / "ensemble.onnx")
    if target.suffix.lower() != ".onnx":  # (as a run's export: A.ONNX)
        raise UserError(f"--out {target}: an ensemble exports to one .onnx file")
    export.check_out_file(target, path, overwrite, info["data"])
    nets = [
        evaluate.load_run_model(r, m).cpu().float().eval() for r, m in zip(runs, metas, strict=True)
    ]
    target.parent.mkdir(parents=True, exist_ok=True)  # the members' weights checked first
    params = ensembles.read_params(path, info)
    graph = EnsembleGraph(nets, preps, orders, info["method"], params, size, tta).eval()
    split, source = _sample(info, metas[0])
    rgb = decoding.decode(split, size, 3, _interpolation(preps, size), quiet=True)
    own = _own_probabilities(nets, metas, preps, orders, info, params, split)
    description = {
        "classes": info["classes"], "class_names": info["class_names"], "method": info["method"],
        "input": f"uint8 (N, {size}, {size}, 3) NHWC RGB: {export.AS_DECODED}, the shorter side resized to {size} "
                 f"with {_interpolation(preps, size)} interpolation, then the centre square "
                 "cropped; each member resizes and normalises inside the graph",
        "output": "probabilities (N, num_classes) in the order of `classes`",
        "members": [{"arch": m["arch"], **p.to_dict()} for m, p in zip(metas, preps, strict=True)],
    }  # fmt: skip
    got = export.onnx_file(graph, torch.from_numpy(rgb), target, json.dumps(description),
                           "probabilities", exclusive=not overwrite)  # fmt: skip
    with torch.no_grad():
        traced = graph(torch.from_numpy(rgb)).numpy()  # the graph in PyTorch: ONNX's fidelity
    exact = all(p.input_size == size and p.channels == 3 for p in preps)
    return {"path": str(target), "check": {"max_abs_prob_diff": float(np.abs(got - own).max()),
            "max_abs_graph_diff": float(np.abs(got - traced).max()), "images": source,
            "resize_matches": exact, "top1_agrees": int((got.argmax(1) == own.argmax(1)).sum()),
            "n": len(got), "largest_member": max(p.input_size for p in preps)}}  # fmt: skip


def _interpolation(preps: list[models.Preprocessing], size: int) -> str:
    """The interpolation to resize to the graph's size: that of a member at that size."""
    return next((p.interpolation for p in preps if p.input_size == size), preps[0].interpolation)


def _sample(info: dict, first: dict, n: int = 16):
    """Up to n real test images of the ensemble's data (a split, a description)."""
    ds = load_as_run(first, info["data"])
    test = ds.splits["test"]
    return test.subset(
        np.arange(min(n, len(test)))
    ), f"{min(n, len(test))} test images of {info['data']}"


def _own_probabilities(nets, metas, preps, orders, info, params, split) -> np.ndarray:
    """transferlab's own ensemble on those images: each member through its own decoding."""
    logps = []
    for net, prep, order in zip(nets, preps, orders, strict=True):
        images = decoding.decode(
            split, prep.input_size, prep.channels, prep.interpolation, quiet=True
        )
        views = [images, images[:, :, ::-1]] if info.get("tta") == "flip" else [images]
        with torch.no_grad():
            packaged = export.Packaged(net, prep)
            logits = sum(packaged(export.to_unit(np.ascontiguousarray(v))) for v in views)
            logits = (logits / len(views)).numpy()
        logps.append(evaluate.log_softmax(logits)[:, order])
    return np.exp(combiners.combine(info["method"], np.stack(logps), params))


# ----------------------------------------------------------------------------- Hugging Face


def export_hf(run: str | Path, out: str | Path | None, overwrite: bool = False) -> dict:
    """RUN/export/hf/ (or `out`): config.json (architecture, label names, the run's
    preprocessing as pretrained_cfg) and model.safetensors, as timm.save_for_hf writes them,
    so `timm.create_model("local-dir:DIR", pretrained=True)` (or hf-hub: once pushed) rebuilds
    the model with its weights."""
    run = Path(run)
    meta = checkpoint.read_meta(run)
    arch = models.Architecture.of_run(meta)
    if arch.name == "dcnn" or arch.stem != "default" or arch.pool_stages or arch.mirror:
        raise UserError(
            f"--format hf writes a plain timm model; {run} is {arch.name}"
            + (" with a small stem" if arch.stem != "default" else "")
            + (" with pooled stages" if arch.pool_stages else "")
            + (" with mirrored features" if arch.mirror else "")
            + ": export it as onnx, torchscript or safetensors"
        )
    folder = Path(out).expanduser() if out else run / "export" / "hf"
    _check_folder(folder, run, overwrite)
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    model = (
        evaluate.load_run_model(run, meta).cpu().float().to(memory_format=torch.contiguous_format)
    )
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if not k.startswith("test_")}
    cfg |= {"tag": None, "hf_hub_id": None, "url": None, "file": None}  # not timm's weights
    cfg |= {"input_size": (prep.channels, prep.input_size, prep.input_size), "mean": prep.mean,
            "std": prep.std, "interpolation": prep.interpolation, "crop_pct": 1.0,
            "num_classes": meta["num_classes"]}  # fmt: skip
    if cfg.get("pool_size"):  # the final feature map at the run's size ((7, 7) is 224 px's)
        with torch.no_grad():
            shape = model.eval().forward_features(torch.zeros(1, *cfg["input_size"])).shape
        cfg["pool_size"] = tuple(shape[-2:])
    model.pretrained_cfg = cfg
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _held(folder):  # two exports into one folder at once mixed their files
            _check_folder(folder, run, overwrite)  # again: one may have finished meanwhile
            _save_hf(model, folder, meta, {"in_chans": prep.channels} if prep.channels != 3 else None)  # fmt: skip
    except Exception as err:  # a full disk: one line, and no new empty folder left behind
        if made and not isinstance(err, UserError):  # (not one another export writes in)
            with contextlib.suppress(OSError):
                folder.rmdir()
        code = checkpoint.write_errno(err, folder / "model.safetensors")
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(folder)) from err
    return {"path": str(folder), "check": None}


@contextlib.contextmanager
def _held(folder: Path):
    """An flock on the folder itself (no lock file among the exported ones); the kernel drops
    it when the holder exits, kill -9 too. Where flock is missing (Windows): no guard."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another export is writing into {folder} now; wait for it to "
                            "finish or choose another --out") from None  # fmt: skip
        yield
    finally:
        os.close(fd)


def _save_hf(model, folder: Path, meta: dict, model_args: dict | None) -> None:
    """timm.save_for_hf into a temp folder inside `folder`, then file by file into it,
    config.json last (its mark says an export is whole); temp folders an export killed (kill -9)
    left are removed."""
    import timm.models

    for left in folder.glob(f"{TEMP}*"):  # not one being written now: minutes old
        if _temp(left) and time.time() - left.stat().st_mtime > 120:
            shutil.rmtree(left, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=TEMP) as tmp:
        timm.models.save_for_hf(model, tmp, model_config={"label_names": meta["class_names"]},
                                model_args=model_args, safe_serialization=True)  # fmt: skip
        config = Path(tmp) / "config.json"  # marked: only an export of ours is ever replaced
        said = {"input": export.describe(meta, "hf")["input"]}  # (what predict does first too)
        checkpoint.write_text(config, json.dumps(json.loads(config.read_text()) | MARK | said, indent=2))  # fmt: skip
        for file in sorted(Path(tmp).iterdir(), key=lambda f: f == config):  # 0600: as umask
            os.chmod(file, 0o666 & ~checkpoint.UMASK)
            os.replace(file, folder / file.name)


HF_FILES = {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"}
TEMP = ".hf-"  # the temp folder an export writes in (`_save_hf`)
MARK = {"exported_by": "transferlab"}  # in config.json (timm reads the keys it knows)


def _ours(folder: Path) -> bool:
    """`folder` holds an hf export transferlab wrote (its config.json carries MARK)."""
    try:
        return json.loads((folder / "config.json").read_text()).items() >= MARK.items()
    except (OSError, ValueError, AttributeError):
        return False


def _temp(path: Path) -> bool:
    """A temp folder of an export (written now, or left by one killed): named so, holding
    only files an export writes (a user's .hf-notes/ of other files was deleted)."""
    if not path.name.startswith(TEMP) or not path.is_dir() or path.is_symlink():
        return False
    return all(f.name in HF_FILES and f.is_file() and not f.is_symlink() for f in path.iterdir())


def _check_folder(folder: Path, run: Path, overwrite: bool) -> None:
    """A new or empty folder, or one holding only an earlier hf export (replaced with
    --overwrite); anything else in it is never touched."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; --format hf writes a folder")
    if not folder.exists() and folder.suffix.lower() in {".bin", *(s for v in export.SUFFIXES.values() for s in v)}:  # fmt: skip
        raise UserError(f"--out {folder} is named as a model file, and --format hf writes a folder (config.json and model.safetensors in it): name the folder, as {folder.with_suffix('')}")  # fmt: skip
    own = run / "export" / "hf"
    if outputs.inside(folder, run) and folder.resolve() != own.resolve():
        raise UserError(f"--out {folder} is inside the run {run}: leave it out ({own}) or pick "
                        "a folder outside the run")  # fmt: skip
    found = {p.name for p in folder.iterdir() if not _temp(p)} if folder.is_dir() else set()
    if found - HF_FILES:
        raise UserError(
            f"{folder} holds other files ({', '.join(sorted(found - HF_FILES)[:3])}); "
            "--format hf writes into a new or empty folder"
        )
    own_export = outputs.inside(folder, run / "export")
    if found and not own_export and not _ours(folder):  # a model of the user's, say: never
        raise UserError(  # replaced, --overwrite or not
            f"{folder} holds {', '.join(sorted(found))} that transferlab did not write; "
            "--format hf writes into a new or empty folder, or over an export of its own"
        )
    if found and not overwrite:
        raise UserError(f"{folder} holds an earlier export: pass --overwrite to replace it")
    export.check_out_file(folder / "config.json", run, overwrite=True, checked=True)
