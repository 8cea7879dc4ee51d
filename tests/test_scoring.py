"""One forward scores a run everywhere: the numbers a run records when it is trained (a
fine-tune's predictions, a probe's features) are what evaluate and predict compute from its
folder, in bf16 too, where a folded and an unfolded network round differently."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab import checkpoint, data, evaluate, strategies, trainer
from transferlab.predict import Predictor

from conftest import tiny_cfg


def _recorded(run):
    logits, targets = checkpoint.load_logits(run, "test")
    return evaluate.log_softmax(logits), targets


def _rescored(run):
    logp, targets, *_ = evaluate.score_run(run, None, "test")
    return logp, targets


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_evaluate_and_predict_score_what_a_run_recorded(
    folder_data, tmp_path, monkeypatch, precision
):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    tuned = tmp_path / "tuned"
    trainer.fit(tiny_cfg(f"folder:{folder_data}", precision=precision), tuned, quiet=True)
    probed = tmp_path / "probed"
    cfg = strategies.finetune_config(
        tuned, {"strategy": "linear-probe", "probe_l2": 0.01, "feature_engine": "torch"}
    )
    trainer.fit(cfg, probed, quiet=True)
    for run in (tuned, probed):
        assert checkpoint.read_meta(run)["precision"] == precision
        (recorded, y), (again, y2) = _recorded(run), _rescored(run)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_allclose(again, recorded, atol=1e-5, err_msg=str(run))
    files = data.load(f"folder:{folder_data}").splits["test"].paths
    logp, kept, _ = Predictor(probed).log_probs(files)
    assert kept == files
    np.testing.assert_allclose(logp, _recorded(probed)[0], atol=1e-5)


def test_exporting_a_bf16_run_says_the_file_computes_in_fp32(trained_run, tmp_path, capsys):
    from transferlab.cli import main

    probed = tmp_path / "probed"
    cfg = strategies.finetune_config(
        trained_run, {"strategy": "linear-probe", "probe_l2": 0.01, "precision": "bf16"}
    )
    trainer.fit(cfg, probed, quiet=True)
    w = tmp_path / "w.safetensors"
    assert main(["export", str(probed), "--format", "safetensors", "--out", str(w)]) == 0
    assert "note: the file computes in fp32; the run's scores" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--format", "safetensors",
                 "--out", str(tmp_path / "w32.st")]) == 0  # fmt: skip
    assert "note:" not in capsys.readouterr().err  # an fp32 run: the same numbers
    ens = tmp_path / "ens"
    assert main(["ensemble", str(probed), str(trained_run), "--out", str(ens), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(ens), "--format", "onnx", "--out", str(tmp_path / "e.onnx")]) == 0
    assert "note: the file computes in fp32; the ensemble's scores" in capsys.readouterr().err
