"""Export a trained run for use without transferlab: ONNX, TorchScript or safetensors.

The ONNX and TorchScript models take float32 images (N, C, H, W) with values in [0, 1], already
resized to the run's input size, and return logits: normalisation is inside the graph. The
preprocessing (size, channels, interpolation, mean, std) and the class names travel with the
file: ONNX metadata `transferlab`, TorchScript extra file `transferlab.json`, safetensors
metadata. ONNX is checked against PyTorch with onnxruntime on real images of the run's test
split before the command returns.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint, data, decoding, evaluate, models, outputs
from .config import UserError
from .folds import load_as_run

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors": "model.safetensors"}
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".torchscript"), "safetensors": (".safetensors", ".st")}  # fmt: skip


class Packaged(nn.Module):
    """The run's model with its normalisation in front: [0, 1] images in, logits out."""

    def __init__(self, model: nn.Module, prep: models.Preprocessing):
        super().__init__()
        self.model = model
        c = prep.channels
        self.register_buffer("mean", torch.tensor(prep.mean).float().expand(c).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std).float().expand(c).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return models.logits(self.model, (x - self.mean) / self.std)


# what `decoding.sane` does, in an export's own description of its input (it said the resize alone: a
# phone's photo fed as stored scored otherwise than predict and serve scored it)
AS_DECODED = ("each image first turned as its EXIF orientation says (PIL's ImageOps.exif_transpose), "
              "16-bit values divided by 257, transparency flattened onto white")  # fmt: skip


def describe(meta: dict, fmt: str = "onnx") -> dict:
    """What an exported file holds and takes, written into it. A safetensors file holds the
    weights alone: its normalisation and any architecture option timm lacks are said (it read
    "normalisation is inside the model", and following it gave other logits)."""
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    arch = models.Architecture.of_run(meta)
    normalised = "normalisation is inside the model"
    if fmt == "safetensors":
        normalised = (f"then normalise it, (x - mean) / std per channel with mean {list(prep.mean)} "
                      f"and std {list(prep.std)}: this file holds the weights alone")  # fmt: skip
    elif fmt == "hf":  # (config.json's pretrained_cfg holds them, for timm's own transforms)
        normalised = f"then normalise it with pretrained_cfg's mean {list(prep.mean)} and std {list(prep.std)}"  # fmt: skip
    extras = [f"stem {arch.stem}" * (arch.stem != "default"),
              f"pool_stages {arch.pool_stages}" * bool(arch.pool_stages),
              "mirror (the head sees the mean pooled features of each image and its mirror)"
              * arch.mirror]  # fmt: skip
    built = ""
    if fmt == "safetensors" and any(extras):
        built = (f"; built by transferlab.models.create with {', '.join(filter(None, extras))}: "
                 f"timm.create_model('{arch.name}') alone predicts otherwise")  # fmt: skip
    return {
        "arch": meta["arch"],
        "architecture": arch.to_dict(),
        "classes": meta["classes"],
        "class_names": meta["class_names"],
        "preprocessing": prep.to_dict(),
        "input": f"float32 (N, {prep.channels}, {prep.input_size}, {prep.input_size}), "
        f"values in [0, 1] ({'grayscale' if prep.channels == 1 else 'RGB'}): {AS_DECODED}, the shorter side "
        f"resized to {prep.input_size} with {prep.interpolation} interpolation, then the centre "
        f"square cropped (as transferlab predict does); {normalised}{built}",
        "output": "logits (N, num_classes) in the order of `classes`",
    }


def sample_images(meta: dict, n: int = 16) -> tuple[np.ndarray, str]:
    """Up to n real test images at the run's preprocessing (random ones if the data are gone)."""
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    try:
        ds = load_as_run(meta)
        split = ds.splits["test"].subset(np.arange(min(n, len(ds.splits["test"]))))
        images = decoding.decode(
            split, prep.input_size, prep.channels, prep.interpolation, quiet=True
        )
        return images, f"{len(images)} test images of {meta['data']}"
    except UserError:
        rng = np.random.default_rng(0)
        shape = (n, prep.input_size, prep.input_size, prep.channels)
        return rng.integers(0, 256, shape, dtype=np.uint8), f"{n} random images (data not found)"


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def export(
    run: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False
) -> dict:
    """Write the run's model in `fmt`; returns {path, check} (check: ONNX vs PyTorch).

    The default file is RUN/export/model.*; an explicit `out` may not lie inside a run or
    ensemble folder (other than RUN/export/). An existing file, an earlier export there too, is
    replaced only with `overwrite`.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (known: {', '.join(FORMATS)}, hf)")
    run = Path(run)
    meta = checkpoint.read_meta(run)
    path = out_path(out, run / "export" / FORMATS[fmt])
    check_out_file(path, run, True, meta["data"])  # (a user's file: said first, as left as it is)
    if path.suffix.lower() not in SUFFIXES[fmt]:  # (x.txt, or none: onnx without a word)
        other = any(path.suffix.lower() in v for v in SUFFIXES.values())
        how = "has the extension of another format than" if other else "does not end in"
        raise UserError(f"--out {path} {how} {' or '.join(SUFFIXES[fmt])}: name it *{SUFFIXES[fmt][0]}")  # fmt: skip
    check_out_file(path, run, overwrite, meta["data"])  # (an earlier export: after the extension)
    lineage = {"run": str(run.resolve())} if fmt == "safetensors" else {}  # as --weights FILE
    info = json.dumps(describe(meta, fmt) | lineage)  # (a copy: its run's leaks are counted)
    model = evaluate.load_run_model(run, meta).cpu().float().eval()  # its weights checked
    model = model.to(memory_format=torch.contiguous_format)
    path.parent.mkdir(parents=True, exist_ok=True)  # only then: a refusal leaves no folder
    if fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with checkpoint.atomic_path(path, not overwrite) as tmp:  # never half a file
            save_file(state, str(tmp), metadata={"transferlab": info})
        return {"path": str(path), "check": None}
    packaged = Packaged(model, models.Preprocessing.from_dict(meta["preprocessing"])).eval()
    images, source = sample_images(meta)
    x = to_unit(images)
    with torch.no_grad():
        reference = packaged(x).numpy()
    if fmt == "torchscript":  # deprecated in torch, still what C++ and mobile load: no warning
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(packaged, x[:1])
            buffer = io.BytesIO()  # (written to a file, a full disk aborted the process in C++)
            torch.jit.save(traced, buffer, _extra_files={"transferlab.json": info})
            with checkpoint.atomic_path(path, not overwrite) as tmp:  # (another export to
                tmp.write_bytes(buffer.getvalue())  # the same file at once: refused)
            got = torch.jit.load(str(path))(x).numpy()
    else:
        got = onnx_file(packaged, x, path, info, "logits", exclusive=not overwrite)
    diff = float(np.abs(got - reference).max())
    return {"path": str(path), "check": {"max_abs_logit_diff": diff, "images": source}}


def out_path(out: str | Path | None, default: Path) -> Path:
    """--out as a file path (`default` without one); `DIR/` names a folder, as an existing
    folder is: refused naming a file of the format's, not written as a file called DIR."""
    if out and (str(out).endswith(("/", os.sep)) or Path(out).expanduser().is_dir()):
        raise UserError(f"--out {out} is a folder; give a file name such as {Path(out) / default.name}")  # fmt: skip
    return Path(out).expanduser() if out else default


def check_out_file(
    path: Path, run: Path, overwrite: bool, data_spec: str | None = None, checked: bool = False
) -> None:
    """Refuse a target that would write into a run or ensemble or the data it was trained on,
    over a file unasked, or over a file that is not an earlier transferlab export at all
    (`checked`: the caller found it is one, as an hf export's folder)."""
    ours = outputs.inside(path, run / "export")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as {path / 'model.onnx'}")
    if not ours:
        found = outputs.enclosing(path)
        if found:
            raise UserError(
                f"--out {path} is inside the {found[1]} folder {found[0]}; "
                f"export next to it, or into {run / 'export'}"
            )
    if data_spec and (root := data.data_root(data_spec)):
        outputs.refuse_overlap(path, [root], "the data folder")
    if path.exists() and not checked and not is_export(path):  # a photo, the user's notes
        raise UserError(
            f"{path} is a file that transferlab did not export; it is left as it is (--overwrite "
            "replaces only an earlier export): choose another --out"
        )
    if path.exists() and not overwrite:
        raise UserError(
            f"{path} already exists (an earlier export): pass --overwrite to replace it"
        )
    if path.parent.is_dir():
        outputs.check_file_writable(path, "--out")
    else:
        outputs.check_creatable(path.parent, "export folder")


def is_export(path: Path) -> bool:
    """Whether a file is one transferlab exported: its "transferlab" metadata (safetensors
    header, TorchScript extra file, ONNX metadata_props) read without loading any weights."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8 and 0 < (n := int.from_bytes(head, "little")) < 100_000_000:
                try:  # safetensors: an 8-byte length, then a JSON header
                    return "transferlab" in json.loads(f.read(n)).get("__metadata__", {})
                except (ValueError, AttributeError):
                    pass
        if zipfile.is_zipfile(path):  # TorchScript: a zip archive with extra/transferlab.json
            with zipfile.ZipFile(path) as z:
                return any(name.endswith("/extra/transferlab.json") for name in z.namelist())
        onnx = onnx_packages()[0]
        proto = onnx.load(str(path), load_external_data=False)
        return any(p.key == "transferlab" for p in proto.metadata_props)
    except Exception:  # unreadable, or not a model at all (protobuf says so in many ways)
        return False


def onnx_packages():
    """(onnx, onnxruntime), or the one line that says how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(
            "ONNX export needs the onnx, onnxscript and onnxruntime packages: "
            "pip install 'transferlab[export]'"
        ) from None
    return onnx, onnxruntime


def onnx_proto(module: nn.Module, x: torch.Tensor, output: str):
    """`module` as an ONNX ModelProto (torch.onnx, dynamo; input "image", batch size dynamic)."""
    import contextlib
    import io

    onnx_packages()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (x,),
            dynamo=True,
            input_names=["image"],
            output_names=[output],
            dynamic_shapes=({0: batch},),
        )
    return program.model_proto


def onnx_file(
    module: nn.Module, x: torch.Tensor, path: Path, info: str, output: str, exclusive: bool
) -> np.ndarray:
    """`module` as ONNX at `path` (batch size dynamic; `info` in the metadata under
    "transferlab"; `exclusive`: see `checkpoint.atomic_path`); returns onnxruntime's outputs
    for `x`."""
    onnx, onnxruntime = onnx_packages()
    proto = onnx_proto(module, x, output)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "transferlab", info
    with checkpoint.atomic_path(path, exclusive) as tmp:
        onnx.save(proto, str(tmp))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]
