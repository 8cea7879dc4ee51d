"""Grad-CAM (the grad-cam package) through `transferlab explain`: it points where the evidence
is, and the command writes one overlay per image without touching anything else."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from transferlab import explain, models, predict
from transferlab.cli import main
from transferlab.config import UserError

pytest.importorskip("pytorch_grad_cam")


class RedGreen(nn.Module):
    """Class 0 = how red the image is, class 1 = how green: a 1x1 convolution, pooled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = self.conv.weight[1, 1] = 1.0

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))


def test_gradcam_points_where_the_evidence_for_each_class_is():
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[0, :6, :6, 0] = 255  # red, top-left
    image[0, 10:, 10:, 1] = 255  # green, bottom-right
    prep = models.Preprocessing.make(16, 3, (0, 0, 0), (1, 1, 1))
    red, _ = explain.cams(RedGreen(), prep, image, classes=[0])
    green, _ = explain.cams(RedGreen(), prep, image, classes=[1])
    assert red.shape == (1, 16, 16) and 0 <= red.min() and red.max() <= 1
    assert red[0, :6, :6].mean() > 0.9 and red[0, 10:, 10:].mean() < 0.1
    assert green[0, 10:, 10:].mean() > 0.9 and green[0, :6, :6].mean() < 0.1


def test_a_feature_map_of_1x1_is_said_to_leave_every_map_blank(trained_run, folder_data, capsys):
    """Pass 65: a ResNet at 16 px (1x1 at its last stage) wrote all-zero maps as explanations,
    without a word."""
    assert explain.blank(RedGreen(), models.Preprocessing.make(16, 3, (0, 0, 0), (1, 1, 1))) == ""
    said = explain.blank(RedGreen(), models.Preprocessing.make(1, 3, (0, 0, 0), (1, 1, 1)))
    assert said.startswith("its last feature map is 1x1 at 1 px, so Grad-CAM has nowhere to point and every map is blank")  # fmt: skip
    image = str(next((folder_data / "test" / "a").iterdir()))  # test_resnet at 24 px: 1x1
    maps, _ = explain.cams(models.create("test_resnet", 4, 3), models.Preprocessing.make(24, 3, (0, 0, 0), (1, 1, 1)), np.zeros((1, 24, 24, 3), np.uint8))  # fmt: skip
    assert maps.max() == 0  # (what it drew)
    explain.explain(trained_run, [image])
    assert "note: its last feature map is 1x1 at 24 px" in capsys.readouterr().err


def test_explain_writes_an_overlay_per_image_for_the_predicted_or_named_class(
    trained_run, folder_data, tmp_path, capsys
):
    files = [str(p) for p in sorted((folder_data / "test" / "a").iterdir())[:3]]
    rows = explain.explain(trained_run, files)
    want, _ = predict.predict(trained_run, files, top_k=1, quiet=True)
    assert [r["predicted"] for r in rows] == [w["predictions"][0]["name"] for w in want]
    for r in rows:
        assert r["explained"] == r["predicted"] and Image.open(r["overlay"]).size[0] > 100
    assert main(["explain", str(trained_run), files[0], "--class", "d", "--out",
                 str(tmp_path / "cam")]) == 0  # fmt: skip
    assert "Grad-CAM of d -> " in capsys.readouterr().out
    assert len(list((tmp_path / "cam").glob("*-gradcam.png"))) == 1
    shutil.copy(files[0], tmp_path / "new\nline.png")  # a name with a newline: not in its overlay's
    made = explain.explain(trained_run, [str(tmp_path / "new\nline.png")], tmp_path / "cam1")
    assert Path(made[0]["overlay"]).name == "000-new_line-gradcam.png"
    long = [tmp_path / f"{'é' * 120}.png", *(tmp_path / f"{'é' * 110}-{x * 10}.png" for x in "XY")]
    for f in long:  # 244 bytes: its overlay's name was too long (exit 2); both ends are kept
        shutil.copy(files[0], f)  # (the ends of two long names tell them apart)
    made = explain.explain(trained_run, [files[0], *map(str, long)], tmp_path / "cam-long")
    assert [Path(r["overlay"]).name for r in made[1:]] == [f"{i:03d}-{'é' * 60}~{end}-gradcam.png" for i, end in ((1, "é" * 38), (2, "é" * 32 + "-" + "X" * 10), (3, "é" * 32 + "-" + "Y" * 10))]  # fmt: skip
    (tmp_path / "fake.png").write_bytes(b"not an image")  # was left out without a word
    explain.explain(trained_run, [files[0], str(tmp_path / "fake.png")], tmp_path / "cam2")
    assert "skipped: " in capsys.readouterr().err
    with pytest.raises(UserError, match="--class zebra is not a class .*\\(a, b, c, d\\) nor an"):
        explain.explain(trained_run, files, target="zebra")
    again = explain.explain(trained_run, files[:1], target="1")  # by index; the first kept
    assert again[0]["explained"] == "b"  # and RUN/explain gathers: the first overlays stay
    assert again[0]["overlay"] not in [r["overlay"] for r in rows]
    digits = shutil.copytree(trained_run, tmp_path / "digits", ignore=shutil.ignore_patterns("*.lock"))  # fmt: skip
    meta = json.loads((digits / "meta.json").read_text())
    (digits / "meta.json").write_text(json.dumps({**meta, "class_names": ["a", "2", "c", "d"]}))
    capsys.readouterr()  # a class named 2 is not index 2: it was taken without a word
    assert explain.explain(digits, files[:1], target="2")[0]["explained"] == "2"
    assert "note: --class 2 is the class named 2; index 2 is c" in capsys.readouterr().err
    assert explain.explain(digits, files[:1], target="3")[0]["explained"] == "d"  # pass 65: no
    assert "note: no class is named 3: --class 3 is index 3, the class named d" in capsys.readouterr().err  # fmt: skip
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        explain.explain(trained_run, files, out=tmp_path / "mine")
    (tmp_path / "afile").touch()  # an empty file was "exists and is not empty" (pass 36, F1)
    with pytest.raises(UserError, match="afile is a file, not a folder; give a new or empty folder"):  # fmt: skip
        explain.explain(trained_run, files, out=tmp_path / "afile")
    photos = tmp_path / "photos"  # overlays written among the photos they explain: never
    photos.mkdir()  # taken for photos by the next predict or explain of that folder
    for f in files[:2]:
        shutil.copy(f, photos)
    explain.explain(trained_run, [str(photos)], out=photos / "cams")
    assert predict.image_files([str(photos)]) == [str(p) for p in sorted(photos.glob("*.png"))]
    more = explain.explain(trained_run, [str(photos)], out=photos / "cams")  # gathers there
    assert [Path(r["overlay"]).name[:3] for r in more] == ["002", "003"]


def test_the_target_layer_is_the_one_that_makes_the_final_feature_map():
    import timm

    cases = [(timm.create_model("test_resnet", num_classes=3), 3), (models.create("dcnn", 3, 1), 1)]
    for model, channels in cases:
        seen = []
        explain.target_layer(model).register_forward_hook(lambda m, i, o, s=seen: s.append(o.shape))
        final = model.forward_features(torch.rand(1, channels, 64, 64)).shape
        assert seen[-1][-2:] == final[-2:]  # the coarsest map: the one the head pools


def test_explain_prints_one_line_per_image_whatever_a_class_is_called(
    trained_run, monkeypatch, capsys
):
    """Hostile pass 29: a class named with a newline split explain's line in two (evaluate
    and predict escaped it)."""
    row = {"file": "x.png", "predicted": "new\nline", "prob": 0.5, "explained": "a", "overlay": "o.png"}  # fmt: skip
    monkeypatch.setattr(explain, "explain", lambda *a, **k: [row])
    assert main(["explain", str(trained_run), "x.png"]) == 0
    assert capsys.readouterr().out == "x.png: new\\nline (0.50); Grad-CAM of a -> o.png\n"
