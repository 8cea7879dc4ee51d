"""Why did it say that? Grad-CAM heatmaps (the maintained `grad-cam` package, extra `explain`)
over the image as the model saw it: resized to its input size, in its channels.

The target layer is the model's last feature stage (timm's `feature_info`; the DCNN's feature
stack), where the spatial map is coarsest and most class-specific; the target class
is the predicted one unless one is named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint, evaluate, export, models, outputs, plots
from .config import UnreadableImages, UserError, one_line


def target_layer(model: nn.Module) -> nn.Module:
    """The last feature stage of a timm model (the DCNN: its feature stack), else the last
    convolution."""
    info = getattr(model, "feature_info", None)
    if info:
        return model.get_submodule(info[-1]["module"])
    if isinstance(getattr(model, "features", None), nn.Module):
        return model.features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("Grad-CAM needs a convolutional model; this one has no Conv2d layer")
    return convs[-1]


def cams(model: nn.Module, prep: models.Preprocessing, images: np.ndarray,
         classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(heatmaps (N, H, W) in [0, 1], probabilities (N, K)) for uint8 images (N, H, W, C) at
    the model's input size; each map for classes[i], else the predicted class."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise UserError(
            "explain needs the grad-cam package: pip install 'transferlab[explain]'"
        ) from None
    model = model.cpu().float().eval().to(memory_format=torch.contiguous_format)
    packaged = export.Packaged(model, prep).eval()
    x = export.to_unit(images)
    with torch.no_grad():
        prob = torch.softmax(packaged(x), dim=1).numpy()
    chosen = prob.argmax(1) if classes is None else np.asarray(classes)
    with GradCAM(model=packaged, target_layers=[target_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in chosen])
    return maps, prob


def blank(model: nn.Module, prep: models.Preprocessing) -> str:
    """Why every map is blank, or "": a last feature map of 1x1 (a ResNet at 32 px, the DCNN at
    16) holds no where, and Grad-CAM drew a uniform tint as an explanation (pass 65)."""
    shapes: list[tuple] = []
    hook = target_layer(model).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))  # fmt: skip
    weight = next(model.parameters())
    with torch.no_grad():
        getattr(model.eval(), "forward_features", model)(weight.new_zeros(1, prep.channels, prep.input_size, prep.input_size))  # fmt: skip
    hook.remove()
    if not (shapes and len(shapes[0]) == 4 and shapes[0][2] * shapes[0][3] == 1):
        return ""
    return f"its last feature map is 1x1 at {prep.input_size} px, so Grad-CAM has nowhere to point and every map is blank: explain a run trained at a larger --input-size"  # fmt: skip


def overlay(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The heatmaps blended over the images: uint8 (N, H, W, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = images.astype(np.float32) / 255.0
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.stack([show_cam_on_image(im, m, use_rgb=True, image_weight=0.55)
                     for im, m in zip(rgb, maps, strict=True)])  # fmt: skip


def explain(run: str | Path, inputs: list[str], out: str | Path | None = None,
            target: str | None = None, quiet: bool = True) -> list[dict]:  # fmt: skip
    """Write OUT/NNN-<image>-gradcam.png per readable image (OUT: RUN/explain, numbered on
    after the overlays already there); returns one row per image: its file, the overlay, the
    predicted class and probability, the explained class. `target`: a class (its folder name or
    display name), or its index."""
    from . import predict

    run = Path(run)
    meta = checkpoint.read_meta(run)
    names = meta["class_names"]
    index = None
    if target is not None:
        lookup = {c: i for i, c in enumerate(meta["classes"])} | {n: i for i, n in enumerate(names)}
        lookup = {str(i): i for i in range(len(names))} | lookup  # a name wins over an index
        if target not in lookup:
            more = " ..." if len(names) > 8 else ""
            raise UserError(
                f"--class {target} is not a class of {run} ({', '.join(names[:8])}{more}) nor an "
                f"index 0..{len(names) - 1}"
            )
        index = lookup[target]
        if target.isdigit() and index != int(target) < len(names):  # (digits: class names too)
            print(f"note: --class {target} is the class named {target}; index {target} is {names[int(target)]}", file=sys.stderr)  # fmt: skip
        elif target not in {*meta["classes"], *names} and any(n.isdigit() for n in names):  # (65)
            print(f"note: no class is named {target}: --class {target} is index {target}, the class named {names[index]}", file=sys.stderr)  # fmt: skip
    files = predict.items(inputs)
    folder = Path(out).expanduser() if out else run / "explain"
    _check_folder(folder, run)
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    images, kept, bad = predict._decode(files, prep, quiet)
    if not kept:
        raise UserError("no readable images: " + UnreadableImages.some(bad))
    for line in bad:  # as predict says them (they were left out without a word)
        print(f"skipped: {one_line(line)}", file=sys.stderr)
    model = evaluate.load_run_model(run, meta)
    if why := blank(model, prep):
        print(f"note: {why}", file=sys.stderr)
    maps, prob = cams(model, prep, images, None if index is None else [index] * len(kept))
    blended = overlay(images, maps)
    folder.mkdir(parents=True, exist_ok=True)
    if not outputs.inside(folder, run / "explain"):  # (there: the run's marker says it)
        outputs.mark(folder, "explain")  # so predict and explain never take them for photos
    names_there = (p.name.split("-", 1)[0] for p in folder.glob("[0-9][0-9][0-9]*-gradcam.png"))
    taken = [int(n) for n in names_there if n.isdigit()]
    rows, start = [], max(taken, default=-1) + 1  # RUN/explain gathers: none is written over
    for i, (f, picture) in enumerate(zip(kept, blended, strict=True)):
        name = Path(f).stem if isinstance(f, str) else f"image-{i}"
        stem = "".join(c if c.isprintable() else "_" for c in name)  # (a newline in a name)
        if len(stem.encode()) > 200:  # a 240-byte name was "File name too long" after some
            head, tail = stem.encode()[:120], stem.encode()[-76:]  # overlays were written; its
            stem = f"{head.decode(errors='ignore')}~{tail.decode(errors='ignore')}"  # ends kept
        path = folder / f"{start + i:03d}-{stem}-gradcam.png"
        pred = int(prob[i].argmax())
        explained = pred if index is None else index
        title = f"pred {names[pred]} ({prob[i, pred]:.2f}); Grad-CAM of {names[explained]}"
        plots.save_image(picture, path, title)
        rows.append({"file": f if isinstance(f, str) else stem, "overlay": str(path),
                     "predicted": names[pred], "prob": float(prob[i, pred]),
                     "explained": names[explained]})  # fmt: skip
    return rows


def _check_folder(folder: Path, run: Path) -> None:
    """RUN/explain or an --out explain made (ours: overlays gather there), or a new or empty
    folder outside every run."""
    if (
        outputs.inside(folder, run / "explain")
        or (outputs.read_mark(folder) or {}).get("kind") == "explain"
    ):
        return
    if folder.exists() and not folder.is_dir():  # (an empty file was "not empty")
        raise UserError(f"--out {folder} is a file, not a folder; give a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"--out {folder} exists and is not empty; give a new or empty folder")
    outputs.check_creatable(folder, "explain folder")  # (one not in UTF-8 was made)
    found = outputs.enclosing(folder)
    if found:
        raise UserError(f"--out {folder} is inside the {found[1]} folder {found[0]}")
