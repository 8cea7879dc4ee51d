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
    said = "note: the file holds fp32 weights; the run's scores" in capsys.readouterr().err  # (47)
    assert said == evaluate.bf16_supported()  # where bf16 is emulated every score here is fp32
    assert main(["export", str(trained_run), "--format", "safetensors",
                 "--out", str(tmp_path / "w32.st")]) == 0  # fmt: skip
    assert "note:" not in capsys.readouterr().err  # an fp32 run: the same numbers
    ens = tmp_path / "ens"
    assert main(["ensemble", str(probed), str(trained_run), "--out", str(ens), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(ens), "--format", "onnx", "--out", str(tmp_path / "e.onnx")]) == 0
    said = "note: the file computes in fp32; the ensemble's scores" in capsys.readouterr().err
    assert said == evaluate.bf16_supported()


def test_log_probabilities_rank_classes_as_their_logits_do():
    """evaluate scored a bf16 run's near-tie (0.00299999 vs 0.003, the target last) as a tie:
    log-softmax in float32 rounded both to -1.0966163, the first class won, and its recorded
    80% read 60% (hostile pass 36, F4)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    near = np.array([[0.00299999, -0.003, 0.003]], np.float32)
    assert evaluate.metrics(evaluate.log_softmax(near), np.array([2]))["top1"] == 1.0
    finite = st.floats(-30, 30, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-6)  # a
    # network's logits as runs record them (float32; 1e-32 apart is past what any float holds)

    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    @given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 7)), elements=finite),
           st.integers(0, 6), st.integers(0, 6))  # fmt: skip
    def ranks_alike(logits, i, j):
        i, j = i % logits.shape[1], j % logits.shape[1]  # column j one float32 step above i's
        up = np.nextafter(logits[:, i], np.float32(np.inf))  # (where that stays a logit's size)
        logits[:, j] = np.where((i != j) & (np.abs(logits[:, i]) >= 1e-6), up, logits[:, j])
        logp = evaluate.log_softmax(logits)
        assert (np.argsort(-logp, 1, kind="stable") == np.argsort(-logits, 1, kind="stable")).all()

    ranks_alike()


def test_native_bf16_is_read_from_the_cpu_flags_not_from_onednn_alone():
    """oneDNN says bf16 on any AVX-512 x86 CPU, where it emulates it: an Ice Lake Xeon ran
    --precision auto in bf16 at 0.92x fp32's speed."""
    ice_lake = "flags\t\t: fpu sse avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bitalg"
    assert not evaluate.native_bf16(ice_lake, "x86_64", onednn=True)
    assert evaluate.native_bf16(ice_lake + " avx512_bf16", "x86_64", onednn=True)
    assert evaluate.native_bf16(ice_lake + " amx_bf16 amx_tile", "x86_64", onednn=True)
    assert not evaluate.native_bf16(ice_lake + " avx512_bf16", "x86_64", onednn=False)
    assert evaluate.native_bf16("", "x86_64", onednn=True)  # no /proc/cpuinfo: oneDNN's word
    assert evaluate.native_bf16("Features\t: fp asimd bf16", "aarch64", onednn=True)
