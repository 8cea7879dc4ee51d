import numpy as np
import pytest

from transferlab import checkpoint, combiners, ensembles, evaluate, trainer
from transferlab.config import UserError, make_config

from conftest import make_folder, tiny_cfg


def logp(rows):
    """Member log-probs (M, N, K) from probability rows."""
    return np.log(np.array(rows, dtype=np.float64))


def test_soft_is_the_mean_probability():
    lp = logp([[[0.6, 0.4]], [[0.2, 0.8]]])
    np.testing.assert_allclose(np.exp(combiners.combine_soft(lp)), [[0.4, 0.6]])


def test_logit_is_the_renormalised_geometric_mean():
    lp = logp([[[0.9, 0.1]], [[0.1, 0.9]]])
    np.testing.assert_allclose(np.exp(combiners.combine_logit(lp)), [[0.5, 0.5]])


def test_hard_votes_and_breaks_ties_by_summed_probability():
    lp = logp([[[0.6, 0.3, 0.1]], [[0.1, 0.5, 0.4]], [[0.55, 0.4499, 0.0001]]])
    assert combiners.combine_hard(lp).argmax(1).tolist() == [0]  # two votes for class 0
    tie = logp([[[0.51, 0.49]], [[0.02, 0.98]]])  # one vote each; class 1 has more mass
    assert combiners.combine_hard(tie).argmax(1).tolist() == [1]
    np.testing.assert_allclose(np.exp(combiners.combine_hard(lp)).sum(1), 1.0)


def test_weighted_fits_weights_that_prefer_the_good_member_and_never_on_test():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.1)
    good[np.arange(200), targets] = 0.8
    bad = rng.dirichlet(np.ones(3), 200)
    lp = np.log(np.stack([bad, good]))
    w = combiners.fit_weights(lp, targets, "val")
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w[1] > 0.9
    with pytest.raises(ValueError, match="test split"):
        combiners.fit_weights(lp, targets, "test")


def _members(seed=0, n=300, k=3):
    """Targets and three members: a good one, a copy of it, and noise."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, n)
    good = np.full((n, k), 0.1)
    good[np.arange(n), targets] = 1 - 0.1 * (k - 1)
    bad = rng.dirichlet(np.ones(k), n)
    return targets, np.log(np.stack([bad, good, good]))


def test_select_picks_the_good_member_with_replacement_and_never_on_test():
    targets, lp = _members()
    w = combiners.fit_select(lp, targets, "val")
    assert w.sum() == pytest.approx(1.0) and w[0] == 0.0 and w[1] + w[2] == 1.0


def test_select_adds_a_member_only_when_it_lowers_the_nll():
    # member 0 is sure and right on the first half and wrong on the second, member 1 the
    # reverse: their mean has a lower NLL than either, so selection takes one of each
    targets = np.array([0, 0, 1, 1])
    p0 = np.array([[0.99, 0.01], [0.99, 0.01], [0.8, 0.2], [0.8, 0.2]])
    p1 = np.array([[0.2, 0.8], [0.2, 0.8], [0.01, 0.99], [0.01, 0.99]])
    w = combiners.fit_select(np.log(np.stack([p0, p1])), targets, "val")
    np.testing.assert_allclose(w, [0.5, 0.5])


def test_stacking_learns_to_undo_a_member_that_swaps_two_classes():
    """Known answer: a member whose columns 0 and 1 are swapped is useless to averaging, but
    a stacker reads it correctly and reaches its accuracy."""
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 600)
    p = np.full((600, 3), 0.05)
    p[np.arange(600), targets] = 0.9
    swapped = p[:, [1, 0, 2]]
    lp = np.log(np.stack([swapped, rng.dirichlet(np.ones(3), 600)]))
    params = combiners.fit_stacking(lp[:, :300], targets[:300], "val")
    stacked = combiners.combine_stacking(lp[:, 300:], params)
    assert (stacked.argmax(1) == targets[300:]).mean() == 1.0
    assert (combiners.combine_soft(lp[:, 300:]).argmax(1) == targets[300:]).mean() < 0.5
    np.testing.assert_allclose(np.exp(stacked).sum(1), 1.0)


@pytest.mark.parametrize("method", sorted(combiners.FITTED))
def test_nothing_is_ever_fitted_on_the_test_split(method):
    targets, lp = _members()
    with pytest.raises(ValueError, match="test split"):
        combiners.fit(method, lp, targets, "test")


def test_accounting_known_answer():
    targets = np.array([0, 1, 2, 0])
    pred = [[0, 1, 0, 1], [0, 2, 2, 1]]  # member top-1: 50%, 50%; oracle 75%
    lp = np.log(np.stack([np.eye(3)[p] * 0.97 + 0.01 for p in pred]))
    combined = np.log(np.eye(3)[[0, 1, 2, 1]] * 0.97 + 0.01)  # 75%
    acc = combiners.accounting(lp, combined, targets)
    assert acc["gain_over_best_member"] == pytest.approx(0.25)
    assert acc["gain_over_mean_member"] == pytest.approx(0.25)
    assert acc["oracle_top1"] == 0.75 and acc["disagreement"] == 0.5


def test_ece_known_answer():
    # two bins: confidence 0.9 with 50% right, confidence 0.6 with 100% right
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    assert evaluate.ece(conf, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


@pytest.mark.parametrize("method", ["soft", "logit", "hard"])
def test_identical_members_equal_one_member(trained_run, tmp_path, method):
    info = ensembles.build([trained_run, trained_run], method, tmp_path / "e", quiet=True)
    assert (
        info["metrics"]["test"]["top1"]
        == checkpoint.read_meta(trained_run)["metrics"]["test"]["top1"]
    )
    combined, _ = checkpoint.load_logits(tmp_path / "e", "test")
    member, _ = checkpoint.load_logits(trained_run, "test")
    if method == "hard":  # both members vote for the member's own top class
        assert (combined.argmax(1) == member.argmax(1)).all()
    else:  # the same probabilities as the member alone (a sum or a max would not be)
        np.testing.assert_allclose(combined, evaluate.log_softmax(member), atol=1e-5)


@pytest.fixture(scope="module")
def hetero_runs(tmp_path_factory):
    """A grayscale 28x28 DCNN and an RGB 64x64 ResNet on the same data."""
    root = tmp_path_factory.mktemp("hetero")
    make_folder(root / "data", ["a", "b", "c"], 16)
    spec = f"folder:{root / 'data'}"
    gray = make_config(
        {
            "model": "dcnn",
            "channels": 1,
            "input_size": 28,
            "epochs": 2,
            "batch_size": 16,
            "optimizer": "adam",
            "lr": 3e-3,
            "data": spec,
        }
    )
    trainer.fit(gray, root / "dcnn", quiet=True)
    trainer.fit(tiny_cfg(spec, input_size=64), root / "resnet", quiet=True)
    return root


def test_members_with_different_sizes_and_channels_ensemble(hetero_runs, tmp_path):
    runs = [hetero_runs / "dcnn", hetero_runs / "resnet"]
    for method in combiners.COMBINERS:
        info = ensembles.build(runs, method, tmp_path / method, quiet=True)
        assert {(m["input_size"], m["channels"]) for m in info["members"]} == {(28, 1), (64, 3)}
        fitted_on = "train" if method == "fusion" else "val" if method in combiners.FITTED else None
        assert info["fitted_on"] == fitted_on  # fusion's head is fitted on train, as it says
        # recomputing from the members' saved weights and raw images gives the same numbers
        again = ensembles.evaluate_path(tmp_path / method, split="test")
        assert again["metrics"]["top1"] == pytest.approx(info["metrics"]["test"]["top1"])


def test_members_with_other_classes_are_refused_naming_them(hetero_runs, trained_run, tmp_path):
    with pytest.raises(UserError, match=r"different classes: .*tiny.*only in .*\['d'\]"):
        ensembles.build([hetero_runs / "dcnn", trained_run], "soft", tmp_path / "x", quiet=True)


def test_unknown_method_is_refused(trained_run, tmp_path):
    with pytest.raises(UserError, match="unknown ensemble method 'avg'"):
        ensembles.build([trained_run, trained_run], "avg", tmp_path / "x")


def test_metrics_known_answer():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    m = evaluate.metrics(logits, np.array([0, 1]))
    assert m["top1"] == 0.5 and m["top5"] == 1.0 and m["n"] == 2
    assert m["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2)


def test_fusion_learns_from_the_concatenated_features_what_no_member_knows_alone():
    # class = 2*a + b; member one sees only bit a, member two only bit b
    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    y = 2 * a + b
    one = np.c_[a + 0.1 * rng.normal(size=n), rng.normal(size=(n, 3))]
    two = np.c_[b + 0.1 * rng.normal(size=n), rng.normal(size=(n, 3))]
    feats = np.c_[one, two].astype(np.float32)
    split = {"train": slice(0, 200), "val": slice(200, 300), "test": slice(300, n)}
    params = combiners.fit_fusion(
        {s: feats[split[s]] for s in ("train", "val")}, {s: y[split[s]] for s in ("train", "val")}
    )
    fused = combiners.combine_fusion(feats[split["test"]], params)
    assert (fused.argmax(1) == y[split["test"]]).mean() > 0.97
    np.testing.assert_allclose(np.exp(fused).sum(1), 1.0, rtol=1e-5)
    assert float(params["fusion_l2"]) in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def test_fusion_caches_member_features_once_per_split(hetero_runs, tmp_path, monkeypatch):
    runs = [hetero_runs / "dcnn", hetero_runs / "resnet"]
    first = ensembles.build(runs, "fusion", tmp_path / "f1", quiet=True)
    for run in runs:
        assert {p.name for p in (run / "features").iterdir()} >= {
            "train-none.npz",
            "val-none.npz",
            "test-none.npz",
        }
    assert "fitted on train features" in first["splits"]["combiner"]

    def no_forward(*a, **k):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(evaluate, "predict_split", no_forward)
    again = ensembles.build(runs, "fusion", tmp_path / "f2", quiet=True)
    assert again["metrics"]["test"] == first["metrics"]["test"]


def test_tta_views_flip_and_ten_crops():
    import torch

    x = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).reshape(2, 3, 128, 128)
    flip = list(evaluate.views(x, "flip"))
    assert len(flip) == 2 and torch.equal(flip[0], x) and torch.equal(flip[1], x.flip(-1))
    crops = list(evaluate.views(x, "crops"))
    assert len(crops) == 10 and all(v.shape == x.shape for v in crops)
    assert not torch.equal(crops[0], crops[2])  # different corners


def test_flip_tta_makes_predictions_mirror_invariant(trained_run):
    meta = checkpoint.read_meta(trained_run)
    model = evaluate.load_run_model(trained_run, meta)
    images = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    prep = meta["preprocessing"]
    a = evaluate.predict(model, images, prep, tta="flip")
    b = evaluate.predict(model, np.ascontiguousarray(images[:, :, ::-1]), prep, tta="flip")
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.allclose(a, evaluate.predict(model, images, prep), atol=1e-4)


def test_ensemble_with_tta_is_recorded_and_recomputed(hetero_runs, tmp_path):
    runs = [hetero_runs / "dcnn", hetero_runs / "resnet"]
    info = ensembles.build(runs, "soft", tmp_path / "tta", quiet=True, tta="flip")
    assert info["tta"] == "flip"
    again = ensembles.evaluate_path(tmp_path / "tta", split="test")
    assert again["metrics"]["top1"] == pytest.approx(info["metrics"]["test"]["top1"])
    with pytest.raises(UserError, match=r"--tta crops needs inputs of at least 96 px.*28 px"):
        ensembles.build(runs, "soft", tmp_path / "crops", quiet=True, tta="crops")
    with pytest.raises(UserError, match=r"unknown --tta 'mirror' \(known: none, flip, crops\)"):
        ensembles.build(runs, "soft", tmp_path / "bad", quiet=True, tta="mirror")
