"""transferlab export: ONNX checked with onnxruntime, TorchScript, safetensors; metadata travels."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab import checkpoint, export
from transferlab.cli import main


def test_onnx_matches_pytorch_and_carries_its_preprocessing(trained_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    result = export.export(trained_run, "onnx", tmp_path / "m.onnx")
    assert result["check"]["max_abs_logit_diff"] <= 1e-4
    assert "test images" in result["check"]["images"]  # real images, not random ones
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    info = json.loads(props["transferlab"])
    meta = checkpoint.read_meta(trained_run)
    assert info["preprocessing"] == meta["preprocessing"] and info["classes"] == meta["classes"]


def test_onnx_runs_with_onnxruntime_alone_on_any_batch_size(trained_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    export.export(trained_run, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    size = checkpoint.read_meta(trained_run)["preprocessing"]["input_size"]
    for n in (1, 5):
        x = np.random.default_rng(n).random((n, 3, size, size), dtype=np.float32)
        assert session.run(None, {"image": x})[0].shape == (n, 4)


def test_torchscript_and_safetensors(trained_run, tmp_path):
    result = export.export(trained_run, "torchscript", tmp_path / "m.pt")
    assert result["check"]["max_abs_logit_diff"] <= 1e-4
    extra = {"transferlab.json": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["transferlab.json"])["arch"] == "test_resnet"
    export.export(trained_run, "safetensors", tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert "preprocessing" in json.loads(f.metadata()["transferlab"])


def test_a_safetensors_export_followed_as_it_describes_itself_gives_the_run_s_logits(
    trained_run, tmp_path
):
    """Its metadata said "normalisation is inside the model": the weights alone, fed [0, 1]
    images as told, gave other logits than the ONNX and TorchScript files."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from transferlab import models

    export.export(trained_run, "safetensors", tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["transferlab"])
    assert (
        "inside the model" not in info["input"]
        and "this file holds the weights alone" in info["input"]
    )
    model = models.Architecture(**info["architecture"]).build(len(info["classes"]), 3).eval()
    model.load_state_dict(load_file(tmp_path / "m.safetensors"))
    prep = info["preprocessing"]
    x = torch.rand(2, 3, prep["input_size"], prep["input_size"])
    mean, std = (torch.tensor(prep[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    export.export(trained_run, "torchscript", tmp_path / "m.pt")
    with torch.no_grad():
        want = torch.jit.load(str(tmp_path / "m.pt"))(x)
        assert torch.allclose(models.logits(model, (x - mean) / std), want, atol=1e-4)
    meta = checkpoint.read_meta(trained_run)  # options timm alone lacks: said where they matter
    mirrored = meta | {"architecture": meta["architecture"] | {"mirror": True}}
    assert "timm.create_model('test_resnet') alone predicts otherwise" in export.describe(
        mirrored, "safetensors")["input"]  # fmt: skip
    assert "normalisation is inside the model" in export.describe(mirrored, "onnx")["input"]
    for fmt in ("onnx", "safetensors"):  # what predict does first: a phone's photo fed as stored
        assert "turned as its EXIF orientation says" in export.describe(meta, fmt)["input"]


def test_cli_export_and_its_errors(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--format", "safetensors"]) == 0
    assert (trained_run / "export" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_refused_export_leaves_the_disk_as_it_was(trained_run, tmp_path, capsys):
    """`--out newdir/` wrote a file named newdir; a run with missing weights got an empty
    export/ folder before the refusal; TorchScript printed torch's deprecation warnings."""
    assert main(["export", str(trained_run), "--format", "onnx", "--out", f"{tmp_path}/new/"]) == 2
    assert "is a folder; give a file name such as" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0  # fmt: skip
    capsys.readouterr()  # pass 51 (F3): "pass --overwrite", then its extension refused
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(tmp_path / "m.onnx")]) == 2  # fmt: skip
    assert "has the extension of another format than .pt or .pth or .torchscript" in capsys.readouterr().err  # fmt: skip
    for fmt, name in export.FORMATS.items():  # pass 50: an existing folder was told model.onnx
        for out in (tmp_path, f"{tmp_path}/"):
            assert main(["export", str(trained_run), "--format", fmt, "--out", str(out)]) == 2
            assert capsys.readouterr().err.endswith(f"give a file name such as {tmp_path / name}\n")  # fmt: skip
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(trained_run / "meta.json", half)
    for fmt in ("onnx", "torchscript"):
        assert main(["export", str(half), "--format", fmt]) == 2
    assert sorted(p.name for p in half.iterdir()) == ["meta.json"]
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        export.export(trained_run, "torchscript", tmp_path / "m.pt")
    assert not [w for w in said if issubclass(w.category, FutureWarning)]


def test_an_earlier_export_is_replaced_only_when_asked(trained_run, tmp_path, capsys):
    """A second `export RUN` replaced RUN/export/model.* without --overwrite (while an existing
    --out FILE was refused): an export is the user's, ready to ship."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".transferlab.lock", "export"))
    target = run / "export" / "model.safetensors"
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    first = target.stat().st_ino
    assert main(["export", str(run), "--format", "safetensors"]) == 2
    assert "already exists (an earlier export): pass --overwrite" in capsys.readouterr().err
    assert target.stat().st_ino == first
    assert main(["export", str(run), "--format", "safetensors", "--overwrite"]) == 0
    assert target.stat().st_ino != first


def test_overwrite_replaces_only_an_earlier_export_never_a_users_file_or_the_data(
    trained_run, folder_data, tmp_path, capsys
):
    """Hostile pass 15: `export --out myphoto.png` said "pass --overwrite", which then
    replaced the photo with a TorchScript archive; `--out DATA/red/0.png --overwrite` replaced
    a training image with an ONNX file."""
    photo = tmp_path / "myphoto.png"
    shutil.copy(folder_data / "train" / "a" / "0.png", photo)
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    for fmt, target in (("torchscript", photo), ("safetensors", photo), ("onnx", notes)):
        for extra in ([], ["--overwrite"]):
            argv = ["export", str(trained_run), "--format", fmt, "--out", str(target), *extra]
            assert main(argv) == 2
            assert "transferlab did not export; it is left as it is" in capsys.readouterr().err
    assert photo.read_bytes() == (folder_data / "train" / "a" / "0.png").read_bytes()
    assert notes.read_text() == "my notes"
    image = folder_data / "train" / "a" / "1.png"
    before = image.read_bytes()
    for target in (image, folder_data / "x.onnx"):  # the run's own data
        argv = ["export", str(trained_run), "--format", "onnx", "--out", str(target), "--overwrite"]
        assert main(argv) == 2 and "overlaps the data folder" in capsys.readouterr().err
    assert image.read_bytes() == before and not (folder_data / "x.onnx").exists()
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("safetensors", "m.st")):
        target = tmp_path / name  # an earlier export of each format: replaced when asked
        assert main(["export", str(trained_run), "--format", fmt, "--out", str(target)]) == 0
        assert export.is_export(target)
        assert main(["export", str(trained_run), "--format", fmt, "--out", str(target)]) == 2
        again = ["export", str(trained_run), "--format", fmt, "--out", str(target), "--overwrite"]
        assert main(again) == 0


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_an_export_never_replaces_a_file_written_meanwhile_unless_asked(
    trained_run, tmp_path, monkeypatch, fmt
):
    """Two exports of different runs to one new file at once: both said `-> FILE`, exit 0, and
    the file held the later one's model (checked absent, then replaced, without --overwrite)."""
    from transferlab import evaluate
    from transferlab.config import UserError

    other = Path(export.export(trained_run, fmt, tmp_path / "other" / f"m.{fmt}")["path"])
    target, load = tmp_path / f"m.{fmt}", evaluate.load_run_model

    def other_export_meanwhile(*a, **k):  # the other command writes while this one loads
        shutil.copyfile(other, target)
        return load(*a, **k)

    monkeypatch.setattr(evaluate, "load_run_model", other_export_meanwhile)
    with pytest.raises(UserError, match="written by another command meanwhile .*--overwrite"):
        export.export(trained_run, fmt, target)
    assert target.read_bytes() == other.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "other"])  # no temp
    assert export.export(trained_run, fmt, target, overwrite=True)["path"] == str(target)
    assert export.is_export(target)
