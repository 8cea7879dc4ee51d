import shutil

import numpy as np
import pytest

from transferlab import checkpoint, combiners, ensembles, evaluate, models, report, trainer
from transferlab.config import UserError, make_config

from conftest import make_folder, tiny_cfg


@pytest.mark.parametrize("method", ["soft", "logit", "hard"])
def test_identical_members_equal_one_member(trained_run, tmp_path, method):
    twin = shutil.copytree(trained_run, tmp_path / "twin")  # one run twice is refused
    info = ensembles.build([trained_run, twin], method, tmp_path / "e", quiet=True)
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
    with pytest.raises(UserError, match=r"different classes: .*tiny.*only in .*tiny: d;") as err:
        ensembles.build([hetero_runs / "dcnn", trained_run], "soft", tmp_path / "x", quiet=True)
    assert "[" not in str(err.value)  # names, not a Python list
    from transferlab import members  # pass 56 (F3): ten classes read as five, no count

    digits, abc = {"classes": [str(i) for i in range(10)]}, {"classes": ["a", "b", "c"]}
    with pytest.raises(UserError, match=r"\(only in d: 0, 1, 2, 3, 4 \(\+5 more\); only in l: a, b, c\)$"):  # fmt: skip
        members.check_classes([abc, digits], ["l", "d"])


def test_members_trained_on_other_data_are_noted(trained_run, folder_data, tmp_path, capsys):
    """Scored on the first member's test split, a member trained on other images may have
    trained on some of them: said as evaluate says it of one run (it was silent)."""
    import shutil

    shutil.copytree(folder_data, tmp_path / "more")
    other = tmp_path / "other"
    trainer.fit(tiny_cfg(f"folder:{tmp_path / 'more'}", epochs=1), other, quiet=True)
    ensembles.build([trained_run, other], "soft", tmp_path / "ens")
    out = capsys.readouterr().err
    assert (
        f"note: scored on folder:{folder_data.resolve()}; member(s) trained on folder:{(tmp_path / 'more').resolve()}"
        in out
    )
    fresh = make_folder(tmp_path / "fresh", ["a", "b", "c", "d"], 6, size=28)  # no image shared:
    alone = tmp_path / "alone"  # counted, none found, said as evaluate says it (no "may be")
    trainer.fit(tiny_cfg(f"folder:{fresh}", epochs=1), alone, quiet=True)
    ensembles.build([trained_run, alone], "soft", tmp_path / "ens2", quiet=True)
    said = [line for line in capsys.readouterr().err.splitlines() if "trained on" in line]
    assert said == [f"note: scored on folder:{folder_data.resolve()}; member(s) trained on folder:{fresh.resolve()}"]  # fmt: skip
    twin = shutil.copytree(trained_run, tmp_path / "twin")
    ensembles.build([trained_run, twin], "soft", tmp_path / "same")
    assert "member(s) trained on" not in capsys.readouterr().err


def test_unknown_method_is_refused(trained_run, tmp_path):
    with pytest.raises(UserError, match="unknown ensemble method 'avg'"):
        ensembles.build([trained_run, trained_run], "avg", tmp_path / "x")


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


def test_flip_tta_makes_predictions_mirror_invariant(trained_run):
    meta = checkpoint.read_meta(trained_run)
    model = evaluate.load_run_model(trained_run, meta)
    images = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
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


def test_a_moved_tree_of_runs_and_ensemble_predicts_the_same(hetero_runs, tmp_path, capsys):
    import shutil

    from transferlab import predict

    tree = tmp_path / "tree"
    for run in ("dcnn", "resnet"):
        shutil.copytree(hetero_runs / run, tree / run)
    ensembles.build([tree / "dcnn", tree / "resnet"], "stacking", tree / "ens", quiet=True)
    fitted = "the ensemble's combiner was fitted on its val split: not a held-out val score"
    assert ensembles.evaluate_path(tree / "ens", split="val")["notes"] == [fitted]  # as the
    assert ensembles.evaluate_path(tree / "ens", split="test")["notes"] == []  # report marks it
    images = [str(p) for p in sorted((hetero_runs / "data" / "test" / "b").iterdir())[:4]]
    before, _ = predict.predict(tree / "ens", images, top_k=3, quiet=True)
    shutil.move(tree, tmp_path / "moved")  # the whole tree: members found beside the ensemble
    after, _ = predict.predict(tmp_path / "moved" / "ens", images, top_k=3, quiet=True)
    assert after == before
    assert ensembles.read(tmp_path / "moved" / "ens")["members"][0]["run"] == str(
        tmp_path / "moved" / "ens" / ".." / "dcnn"
    )
    shutil.move(tmp_path / "moved" / "ens", tmp_path / "ens-alone")  # beside nothing: gone too
    with pytest.raises(UserError, match="member dcnn of ensemble .* is not at .* nor at .*tree"):
        predict.predict(tmp_path / "ens-alone", images, quiet=True)
    shutil.copytree(tmp_path / "moved" / "dcnn", tree / "dcnn")  # back where it was built
    shutil.copytree(tmp_path / "moved" / "resnet", tree / "resnet")
    capsys.readouterr()
    alone, _ = predict.predict(tmp_path / "ens-alone", images, top_k=3, quiet=True)
    assert alone == before
    from transferlab.cli import main  # pass 43 (F7): unsaid, the copy leaned on its original

    alone = tmp_path / "ens-alone"
    code = main(["evaluate", str(alone), "--tta", "crops"])  # pass 44 (F4): a refusal is its
    said = capsys.readouterr().err.splitlines()  # line alone, without the notes before it
    assert code == 2 and len(said) == 1 and "error: --tta crops" in said[0], said
    code = main(["evaluate", str(alone)])  # said once each, after every refusal
    said = capsys.readouterr().err.splitlines()
    assert code == 0 and said[-2:] == [f"note: member ../{m} of ensemble {alone} is not beside it ({alone / '..' / m}): using the run it was built from, {tree / m}" for m in ("dcnn", "resnet")], said  # fmt: skip


def test_the_same_run_twice_is_not_an_ensemble(trained_run, tmp_path):
    """`ensemble r1 r1` (or r1 and a link to it) made a "two-model" ensemble of one model."""
    (tmp_path / "link").symlink_to(trained_run)
    for runs in ([trained_run, trained_run], [trained_run, tmp_path / "link"]):
        with pytest.raises(UserError, match="a run is listed twice among the ensemble's members"):
            ensembles.build(runs, "soft", tmp_path / "e", quiet=True)
    assert not (tmp_path / "e").exists()


def test_a_fold_run_is_scored_on_its_fold_and_members_split_apart_are_not_fitted_on_val(
    folder_data, tmp_path, capsys
):
    """`evaluate --split val` of a --fold run scored the 10% carve (mostly images it trained on)
    and said the files had changed; a weighted ensemble of members split otherwise fitted its
    weights on images one of them trained on; a copied member counted twice without a word."""
    spec = f"folder:{folder_data}"
    runs = [tmp_path / "f1", tmp_path / "f2"]
    for fold, run in zip(("1/5", "2/5"), runs, strict=True):
        trainer.fit(tiny_cfg(spec, fold=fold, epochs=1), run, quiet=True)
    recorded = checkpoint.read_meta(runs[0])["metrics"]["val"]
    logp, y, _, _, notes = evaluate.score_run(runs[0], None, "val")
    assert notes == [] and len(y) == recorded["n"] == 24  # its fold of the 120 train+val images
    assert (logp.argmax(1) == y).mean() == pytest.approx(recorded["top1"])
    with pytest.raises(UserError, match="f2 as --val-fraction 0.1 --fold 2/5 split the data "
                       "otherwise than .*f1 .*weighted is fitted on val"):  # fmt: skip
        ensembles.build(runs, "weighted", tmp_path / "e", quiet=True)
    assert not (tmp_path / "e").exists()
    ensembles.build(runs, "soft", tmp_path / "e", quiet=True)
    assert "the ensemble's val scores count images a member trained on" in capsys.readouterr().err
    # said again wherever that val score is shown (auto's best/ of fold runs said it nowhere)
    seen = "f2 as --val-fraction 0.1 --fold 2/5 split the data otherwise"
    assert any(seen in n for n in ensembles.read(tmp_path / "e")["notes"])
    assert any(seen in n for n in ensembles.evaluate_path(tmp_path / "e", split="val")["notes"])
    assert ensembles.evaluate_path(tmp_path / "e", split="test")["notes"] == []
    assert "% (members trained on it) |" in report.write(tmp_path)[0].read_text()
    copy = shutil.copytree(runs[0], tmp_path / "copy", ignore=shutil.ignore_patterns("*.lock"))
    ensembles.build([runs[0], copy], "soft", tmp_path / "e2", quiet=True)
    assert "copy has the same weights as" in capsys.readouterr().err
    with pytest.raises(UserError, match="val_fraction has no effect here: it needs fold none"):
        tiny_cfg(spec, fold="1/5", val_fraction=0.3)


def test_a_member_whose_parent_trained_on_the_val_split_is_not_fitted_on_it(
    trained_run, folder_data, tmp_path, capsys
):
    """A fine-tune split as the first member splits the data, from a parent that split it
    otherwise (--val-fraction 0.05): the combiner was fitted on val images its parent trained
    on."""
    spec = f"folder:{folder_data}"
    parent = tmp_path / "parent"
    trainer.fit(tiny_cfg(spec, val_fraction=0.05, epochs=1), parent, quiet=True)
    child = tmp_path / "child"  # split as trained_run is (--val-fraction 0.1)
    trainer.fit(tiny_cfg(spec, weights=str(parent), epochs=1), child, quiet=True)
    runs = [trained_run, child]
    with pytest.raises(UserError, match=r"of the 12 val images trained the runs .*child's "
                       "weights came from: weighted is fitted on val"):  # fmt: skip
        ensembles.build(runs, "weighted", tmp_path / "e", quiet=True)
    ensembles.build(runs, "soft", tmp_path / "e", quiet=True)  # a vote: said, not refused
    assert "val images trained the runs" in capsys.readouterr().err


def test_tta_that_mirrors_a_run_trained_without_mirrors_is_noted(tmp_path, capsys):
    """Hostile pass 40 (F5): `evaluate --tta flip` of a digits run trained with --no-flip lost
    10 points without a word, and an ensemble of two such runs said "+1.94 points"."""
    from transferlab.cli import main

    tiny = ["--data", "digits", "--model", "dcnn", "--input-size", "16", "--epochs", "1", "--limit", "40", "--quiet"]  # fmt: skip
    assert main(["train", *tiny, "--no-flip", "--out", str(tmp_path / "nf")]) == 0
    assert main(["train", *tiny, "--flip", "--out", str(tmp_path / "f")]) == 0
    capsys.readouterr()
    image = str(next((tmp_path / "nf").glob("*.png")))  # (any image will do)
    said = "averages each image with its mirror, and {} was trained with --no-flip: a mirrored digit or letter may read as another class to it (leave out --tta)"  # fmt: skip
    for argv, noted in (
        (["evaluate", tmp_path / "nf", "--tta", "flip"], True),
        (["evaluate", tmp_path / "nf"], False),
        (["evaluate", tmp_path / "f", "--tta", "flip"], False),
        (
            ["ensemble", tmp_path / "nf", tmp_path / "f", "--tta", "flip", "--out", tmp_path / "e"],
            True,
        ),  # fmt: skip
        (["predict", tmp_path / "nf", image, "--tta", "flip"], True),
        (["predict", tmp_path / "nf", image], False),
        (["evaluate", tmp_path / "e"], True),  # pass 41 (F4): named "e/../nf"; and predict
        (["predict", tmp_path / "e", image], True),  # with the ensemble's own TTA said nothing
    ):
        assert main([str(a) for a in argv]) == 0
        err = capsys.readouterr().err
        assert (f"note: --tta flip {said.format(tmp_path / 'nf')}" in err) == noted, (argv, err)
        assert err.count("--no-flip") == noted, (argv, err)
    assert "\n" not in said and "mirrors, and" in evaluate.mirror_notes("crops", ["a", "b"], [{"config": {"flip": False}}] * 2)[0]  # fmt: skip
