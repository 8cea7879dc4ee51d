"""Feature engines (engines.py): ONNX Runtime's features equal PyTorch's and are cached apart;
`auto` times both only where the export can pay, takes the faster, and says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferlab import checkpoint, engines, evaluate, models, strategies, trainer
from transferlab.cli import main


def _probe(run, out, resume=False, **kw):
    cfg = strategies.finetune_config(run, {"strategy": "linear-probe", "probe_l2": 0.01, **kw})
    return trainer.fit(cfg, out, resume=resume, quiet=True)


def _features(run, split):
    meta = checkpoint.read_meta(run)
    key = checkpoint.features_key(meta["data"], meta["val_fraction"], meta["limit"], "none")
    return checkpoint.load_features(run, f"{split}-none", key)


@pytest.mark.slow
def test_onnxruntime_features_equal_torch_fp32_and_are_cached_apart(
    trained_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    a = _probe(trained_run, tmp_path / "torch", feature_engine="torch", precision="fp32")
    b = _probe(trained_run, tmp_path / "ort", feature_engine="onnxruntime", precision="fp32")
    for split in ("train", "val", "test"):
        fa, fb = _features(tmp_path / "torch", split), _features(tmp_path / "ort", split)
        np.testing.assert_allclose(fa, fb, atol=1e-4, rtol=1e-4)
    assert a["metrics"]["test"]["top1"] == pytest.approx(b["metrics"]["test"]["top1"], abs=0.02)
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 6  # 3 splits x 2
    assert len(list((tmp_path / "cache" / "engines").glob("*.onnx"))) == 1

    def no_work(*args, **kwargs):
        raise AssertionError("features were computed again: the cached ones were not found")

    monkeypatch.setattr(evaluate, "predict", no_work)
    monkeypatch.setattr(engines, "onnx_engine", no_work)
    again = _probe(trained_run, tmp_path / "auto", feature_engine="auto", precision="fp32")
    assert again["metrics"]["test"] == a["metrics"]["test"]  # auto found torch's, first key


def test_auto_times_onnxruntime_only_where_its_export_can_pay_and_takes_the_faster(monkeypatch):
    exports, log = [], []
    ort = engines.Engine("onnxruntime", "fp32", lambda x: x, 32)
    monkeypatch.setattr(engines, "onnx_available", lambda: True)
    monkeypatch.setattr(engines, "onnx_engine", lambda *a: exports.append(1) or ort)
    speed = {"torch": 0.02, "onnxruntime": 0.01}  # seconds per image
    monkeypatch.setattr(engines, "seconds_per_image", lambda e, *a, **k: speed[e.name])
    prep = models.Preprocessing.make(8, 3, [0.5] * 3, [0.5] * 3)
    sample = np.zeros((4, 8, 8, 3), np.uint8)

    def choose(n, setting="auto", precision="fp32"):
        model = torch.nn.Identity()
        return engines.choose(setting, model, prep, precision, sample, n, 2, log.append)

    assert choose(999).name == "torch" and not exports  # too few images to time anything
    # 1,000 images x 0.02 s = 20 s; even 3x faster saves 13 s < twice the ~25 s export
    assert choose(1000).name == "torch" and not exports
    assert choose(20_000).name == "onnxruntime" and len(exports) == 1
    assert "torch fp32 50 img/s, onnxruntime fp32 100 img/s" in log[-1]
    speed["onnxruntime"] = 0.03
    assert choose(20_000).name == "torch" and len(exports) == 2
    assert choose(20_000, "torch").name == "torch" and len(exports) == 2
    assert choose(10, "onnxruntime").name == "onnxruntime"  # as set, whatever the count
    # a bf16 run keeps torch, however fast ONNX Runtime's fp32 would be: its features must be
    # what evaluate, predict and serve compute from the run (bf16, folded)
    speed["onnxruntime"] = 0.001
    bf16 = choose(20_000, precision="bf16")
    assert (bf16.name, bf16.key) == ("torch", "bf16") and len(exports) == 3
    assert engines.keys("auto", "bf16") == ["bf16"]
    assert engines.keys("auto", "fp32") == ["fp32", "onnxruntime-fp32"]


def test_a_misspelt_feature_engine_is_one_line(capsys, folder_data, tmp_path):
    code = main(["train", "--data", f"folder:{folder_data}", "--feature-engine", "onxruntime",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "did you mean onnxruntime?" in err, err
    assert not (tmp_path / "r").exists()


def test_a_deadline_stops_a_probe_inside_its_feature_passes(trained_run, tmp_path, monkeypatch):
    """A probe's feature passes take minutes on real data: SIGTERM or `auto`'s deadline stop
    them between batches (not after every split), and a resumed run finishes the probe."""
    from transferlab import guards
    from transferlab.config import Preempted

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))  # no features cached yet
    with guards.deadline(0.0), pytest.raises(Preempted, match="during features train"):
        _probe(trained_run, tmp_path / "p", feature_engine="torch")
    meta = _probe(trained_run, tmp_path / "p", feature_engine="torch", resume=True)
    assert meta["metrics"]["test"]["top1"] > 0


def test_onnxruntime_named_without_its_packages_fails_before_any_work(monkeypatch):
    import importlib.util

    from transferlab.config import UserError, make_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(UserError, match=r"needs the onnx, onnxscript and onnxruntime packages"):
        make_config({"data": "digits", "feature_engine": "onnxruntime"})
    make_config({"data": "digits", "feature_engine": "auto"})  # auto falls back to torch
