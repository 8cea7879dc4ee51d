"""The run folder on disk: atomic writes, weights checked by sha256, logits and feature caches
that refuse to be trusted when damaged or computed on other data. (Training-state checkpoints
and their recovery are the reliability scenarios S3-S7 in test_reliability.py.)"""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from transferlab import checkpoint, models
from transferlab.config import UserError


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "meta.json"
    checkpoint.write_json(path, {"a": np.int64(1), "p": tmp_path})  # numpy and Path made plain
    assert json.loads(path.read_text()) == {"a": 1, "p": str(tmp_path)}
    with pytest.raises(RuntimeError), checkpoint.atomic_path(path) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("the process dies mid-write")
    assert json.loads(path.read_text())["a"] == 1  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]  # no temp file left


def test_run_weights_are_checked_against_the_recorded_sha256(tmp_path):
    model = models.create("dcnn", 3, 1)
    checkpoint.save_weights(tmp_path, model, "dcnn", ["a", "b", "c"])
    meta = {"weights_sha256": checkpoint.sha256(checkpoint.weights_path(tmp_path))}
    state = checkpoint.load_run_weights(tmp_path, meta)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="does not match the sha256"):
        checkpoint.load_run_weights(tmp_path, {"weights_sha256": "0" * 64})


def test_read_meta_names_what_is_wrong_in_one_line(tmp_path):
    with pytest.raises(UserError, match="run folder not found"):
        checkpoint.read_meta(tmp_path / "nope")
    with pytest.raises(UserError, match="not a run folder"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.read_meta(tmp_path)


def test_logits_round_trip_and_a_damaged_file_means_predict_again(tmp_path):
    logits, targets = np.random.default_rng(0).normal(size=(5, 3)), np.arange(5) % 3
    checkpoint.save_logits(tmp_path, "val", logits, targets)
    got, t = checkpoint.load_logits(tmp_path, "val")
    assert got.dtype == np.float32 and np.allclose(got, logits) and (t == targets).all()
    assert checkpoint.load_logits(tmp_path, "test") is None
    (tmp_path / "logits" / "val.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="damaged"):
        assert checkpoint.load_logits(tmp_path, "val") is None


def test_cached_features_are_used_only_for_the_data_they_were_computed_on(tmp_path):
    feats = np.ones((4, 8), np.float32)
    key = checkpoint.features_key("folder:/data", 0.1, None, "none")
    checkpoint.save_features(tmp_path, "train-none", key, feats)
    assert np.array_equal(checkpoint.load_features(tmp_path, "train-none", key), feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another key is a miss, not damage
        other = checkpoint.features_key("folder:/data", 0.2, None, "none")
        assert checkpoint.load_features(tmp_path, "train-none", other) is None


def test_state_fingerprint_sees_every_name_and_bit_but_not_the_order():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert checkpoint.state_sha256(a) == checkpoint.state_sha256(dict(reversed(a.items())))
    last_bit = float(np.nextafter(np.float32(1), np.float32(2)))  # 1 + 2**-23
    flipped = {"w": torch.tensor([1.0, 1.0, last_bit]), "b": torch.zeros(2)}
    assert checkpoint.state_sha256(a) != checkpoint.state_sha256(flipped)
    assert checkpoint.state_sha256(a) != checkpoint.state_sha256({"v": a["w"], "b": a["b"]})


def test_written_files_get_the_usual_mode_and_a_replaced_one_keeps_its_own(tmp_path, monkeypatch):
    """Every file written through atomic_path had mkstemp's 0600: an exported model or a
    report.html that another user or a web server could not read."""
    umask = os.umask(0o022)
    os.umask(umask)
    assert checkpoint.UMASK == umask
    monkeypatch.setattr(checkpoint, "UMASK", 0o027)
    checkpoint.write_text(tmp_path / "new.txt", "a")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
    mine = tmp_path / "mine.onnx"
    mine.write_text("x")
    mine.chmod(0o604)
    checkpoint.write_text(mine, "y")
    assert mine.stat().st_mode & 0o777 == 0o604 and mine.read_text() == "y"


def test_the_same_weights_make_the_same_file_in_every_process(tmp_path):
    """A resumed run's weights equalled an uninterrupted one's, its file did not: safetensors
    wrote the metadata in an order of the process's hash seed (two sha256 for one model)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from transferlab import checkpoint; torch.manual_seed(0); "
        "checkpoint.save_weights(sys.argv[1], torch.nn.Linear(3, 2), 'lin', ['a', 'b'])"
    )
    for i in range(6):  # two metadata orders: all six alike by chance 1 in 32
        (tmp_path / str(i)).mkdir()
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], check=True,
                       env={**os.environ, "PYTHONHASHSEED": "random"})  # fmt: skip
    files = {(tmp_path / str(i) / "model.safetensors").read_bytes() for i in range(6)}
    assert len(files) == 1
