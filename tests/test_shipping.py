"""An ensemble as one ONNX graph checked with onnxruntime against transferlab's own ensemble on
real test images; a run as a Hugging Face / timm folder that timm loads back offline."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from transferlab import checkpoint, ensembles, evaluate, outputs, shipping, trainer
from transferlab.cli import main
from transferlab.config import UserError

from conftest import tiny_cfg

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def members(tmp_path_factory, folder_data, trained_run):
    """Three runs on the same data: two RGB at 24 px, one grayscale DCNN at 16 px."""
    root = tmp_path_factory.mktemp("ship")
    spec = f"folder:{folder_data}"
    trainer.fit(tiny_cfg(spec, seed=1, model="dcnn", channels=3), root / "rgb24", quiet=True)
    trainer.fit(
        tiny_cfg(spec, model="dcnn", channels=1, input_size=16), root / "gray16", quiet=True
    )
    return trained_run, root / "rgb24", root / "gray16"


@pytest.mark.parametrize("method", ["soft", "logit", "weighted", "stacking", "hard"])
def test_ensemble_onnx_matches_the_ensemble_where_the_resize_matches(members, tmp_path, method):
    import onnxruntime

    ensembles.build(members[:2], method, tmp_path / "ens", quiet=True)
    result = shipping.export_ensemble(tmp_path / "ens", None)
    check = result["check"]
    assert check["resize_matches"] and check["max_abs_prob_diff"] <= 1e-4, check
    assert result["path"] == str(tmp_path / "ens" / "export" / "ensemble.onnx")
    session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map["transferlab"]
    info = json.loads(meta)
    assert info["method"] == method and info["input"].startswith("uint8 (N, 24, 24, 3) NHWC RGB")
    assert "turned as its EXIF orientation says" in info["input"]  # as predict turns it
    images = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    (prob,) = session.run(None, {"image": images})  # any batch size
    assert prob.shape == (5, 4) and np.allclose(prob.sum(1), 1, atol=1e-5)


def test_an_ensemble_built_with_flip_tta_exports_its_mirrored_views(members, tmp_path, capsys):
    """The graph averages each member over the image and its mirror, as the ensemble predicts
    (checked against the ensemble's own test log-probs); ten-crop TTA is refused."""
    import onnxruntime

    from transferlab import decoding

    ensembles.build(members[:2], "soft", tmp_path / "ens", quiet=True, tta="flip")
    result = shipping.export_ensemble(tmp_path / "ens", None)
    assert result["check"]["max_abs_prob_diff"] <= 1e-4, result["check"]
    info = ensembles.read(tmp_path / "ens")
    split, _ = shipping._sample(info, checkpoint.read_meta(members[0]))
    how = checkpoint.read_meta(members[0])["preprocessing"]["interpolation"]
    images = decoding.decode(split, 24, 3, how, quiet=True)
    session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    (prob,) = session.run(None, {"image": images})
    own, _, _ = ensembles.evaluate_ensemble(tmp_path / "ens", None, "test")
    np.testing.assert_allclose(prob, np.exp(own[: len(prob)]), atol=1e-4)
    info["tta"] = "crops"  # ten-crop needs 96 px members: these are 24 px
    checkpoint.write_json(tmp_path / "ens" / ensembles.ENSEMBLE, info)
    (tmp_path / "ens").rename(tmp_path / "crops")
    assert main(["export", str(tmp_path / "crops"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "built with --tta crops" in err


def test_ensemble_of_other_sizes_and_grayscale_exports_and_says_how_close(members, tmp_path):
    ensembles.build([members[0], members[2]], "soft", tmp_path / "ens", quiet=True)
    check = shipping.export_ensemble(tmp_path / "ens", tmp_path / "e.onnx")["check"]
    assert not check["resize_matches"] and check["max_abs_graph_diff"] <= 1e-4  # ONNX = PyTorch
    assert check["max_abs_prob_diff"] < 0.5  # two resizes vs PIL's one: close, not exact


def test_a_fusion_ensemble_is_refused_in_one_line(members, tmp_path, capsys):
    """(A hard vote exports: `auto` picks it as DIR/best, 15-Scene's studies did.)"""
    for method in ("fusion",):
        ensembles.build(members[:2], method, tmp_path / method, quiet=True)
        assert main(["export", str(tmp_path / method), "--format", "onnx"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"a {method} ensemble does not export" in err
    ensembles.build(members[:2], "hard", tmp_path / "hard", quiet=True)
    assert main(["export", str(tmp_path / "hard"), "--format", "hf"]) == 2
    assert "an ensemble exports as one ONNX graph" in capsys.readouterr().err
    for size in ("-5", "0", "99999"):
        assert (
            main(["export", str(tmp_path / "hard"), "--format", "onnx", "--input-size", size]) == 2
        )
        assert "the graph's input is 8 to 4096 pixels square" in capsys.readouterr().err


def test_hf_folder_loads_back_in_timm_offline_with_labels_and_preprocessing(
    trained_run, tmp_path, monkeypatch
):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = shipping.export_hf(trained_run, tmp_path / "hf")["path"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    meta = checkpoint.read_meta(trained_run)
    assert config["label_names"] == meta["class_names"]
    assert (
        config["pretrained_cfg"]["input_size"] == [3, 24, 24]
        and "tag" not in config["pretrained_cfg"]
    )
    assert config["pretrained_cfg"]["pool_size"] == [1, 1]  # at 24 px: not 224 px's (7, 7)
    assert "turned as its EXIF orientation says" in config["input"]  # as the other formats say
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert list(model.pretrained_cfg["mean"]) == list(meta["preprocessing"]["mean"])
    x = torch.rand(2, 3, 24, 24)
    ours = evaluate.load_run_model(trained_run, meta).cpu().float().eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)
    with pytest.raises(UserError, match="holds an earlier export: pass --overwrite"):
        shipping.export_hf(trained_run, tmp_path / "hf")
    shipping.export_hf(trained_run, tmp_path / "hf", overwrite=True)
    for name in ("model.safetensors", "weights.BIN", "m.onnx"):  # pass 51 (F4): a folder so named
        with pytest.raises(UserError, match=f"--out \\S+{name} is named as a model file, and --format hf writes a folder"):  # fmt: skip
            shipping.export_hf(trained_run, tmp_path / "x" / name)
        assert not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files \\(notes.txt\\)"):
        shipping.export_hf(trained_run, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    (tmp_path / "theirs").mkdir()  # a model of the user's: "an earlier export" was replaced
    (tmp_path / "theirs" / "config.json").write_text('{"architecture": "resnet50"}')
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds config.json that transferlab did not write"):
            shipping.export_hf(trained_run, tmp_path / "theirs", overwrite=overwrite)
    assert "resnet50" in (tmp_path / "theirs" / "config.json").read_text()
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # shipped: readable as the umask says
        assert (tmp_path / "hf" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(UserError, match="is inside the run .*leave it out"):
        shipping.export_hf(trained_run, trained_run / "export")


def test_an_hf_export_killed_midway_leaves_nothing_that_blocks_the_next(trained_run, tmp_path):
    """kill -9 inside an hf export left its .hf-* temp folder, and every later export into the
    folder was refused ("holds other files"), --overwrite too; the default folder was replaced
    without --overwrite."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".transferlab.lock", "export"))
    shipping.export_hf(run, None)
    hf = run / "export" / "hf"
    with pytest.raises(UserError, match="holds an earlier export: pass --overwrite"):
        shipping.export_hf(run, None)
    old, new = hf / ".hf-killed", hf / ".hf-writing"  # left an hour ago; another export's now
    for left in (old, new):
        left.mkdir()
        shutil.copy(hf / "config.json", left)
    os.utime(old, (time.time() - 3600,) * 2)
    assert outputs._foreign(run) == []  # train --overwrite may replace the run
    shipping.export_hf(run, None, overwrite=True)
    assert not old.exists() and new.is_dir()
    assert sorted(p.name for p in hf.iterdir() if p != new) == ["config.json", "model.safetensors"]
    mine = tmp_path / "mine" / ".hf-notes"  # a user's folder of that name, an hour old: deleted
    mine.mkdir(parents=True)
    (mine / "diary.txt").write_text("mine")
    os.utime(mine, (time.time() - 3600,) * 2)
    with pytest.raises(UserError, match=r"holds other files \(.hf-notes\)"):
        shipping.export_hf(run, mine.parent, overwrite=True)
    assert (mine / "diary.txt").read_text() == "mine"


def test_hf_export_of_a_model_timm_cannot_build_is_refused(members, tmp_path):
    with pytest.raises(UserError, match="writes a plain timm model; .* is dcnn"):
        shipping.export_hf(members[1], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_ensemble_graph_below_its_largest_members_size_says_it_is_not_the_ensemble(
    members, tmp_path, capsys
):
    """`export ENS --input-size 8` (members at 24 and 16 px) wrote a graph whose probabilities
    were far from the ensemble's, said only as a number, and exited 0."""
    ensembles.build([members[0], members[2]], "soft", tmp_path / "ens", quiet=True)
    argv = ["export", str(tmp_path / "ens"), "--format", "onnx", "--out"]
    assert main([*argv, str(tmp_path / "a.onnx")]) == 0
    assert "note: the graph's top-1" not in capsys.readouterr().err  # its own size: no note
    assert main([*argv, str(tmp_path / "b.onnx"), "--input-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "note: the graph's top-1 agrees with the ensemble's on " in err
    assert "its input, 8 px, is below the largest member's 24 px" in err


def test_an_hf_export_into_a_folder_another_export_is_writing_is_refused(trained_run, tmp_path):
    """Two exports into one folder at once both passed the folder's check, then replaced each
    other's files one by one: a config.json of one run beside the weights of another."""
    import fcntl

    out = tmp_path / "hf"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # what the other export holds while it writes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"another export is writing into {out} now"):
            shipping.export_hf(trained_run, out)
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    shipping.export_hf(trained_run, out)  # its lock gone: the export is made
    assert (out / "config.json").is_file()
