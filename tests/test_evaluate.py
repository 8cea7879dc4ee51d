"""evaluate: metrics (golden values), test-time augmentation views."""

import re
import shutil

import numpy as np
import pytest
import torch

from transferlab import checkpoint, evaluate
from transferlab.config import UserError


def test_ece_known_answer():
    # two bins: confidence 0.9 with 50% right, confidence 0.6 with 100% right
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    assert evaluate.ece(conf, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_metrics_known_answer():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    m = evaluate.metrics(logits, np.array([0, 1]))
    assert m["top1"] == 0.5 and m["top5"] is None and m["n"] == 2  # 3 classes: none (F11)
    assert evaluate.points(-1e-9) == evaluate.points(0.0) == "+0.00" and evaluate.points(-0.0125) == "-1.25"  # fmt: skip
    assert evaluate.top5_text(m) == "" and evaluate.top5_text({"top5": 0.5}) == "top-5 50.00%"
    six = np.log(np.full((2, 6), 0.1) + np.eye(6)[[0, 5]])  # 6 classes: the 6th is out of 5
    assert evaluate.metrics(six, np.array([5, 0]))["top5"] == 0.5
    assert evaluate.metrics(six[:, :5], np.array([4, 0]))["top5"] is None  # 5: always 100%
    assert m["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2)


def test_tta_views_flip_and_ten_crops():

    x = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).reshape(2, 3, 128, 128)
    flip = list(evaluate.views(x, "flip"))
    assert len(flip) == 2 and torch.equal(flip[0], x) and torch.equal(flip[1], x.flip(-1))
    crops = list(evaluate.views(x, "crops"))
    assert len(crops) == 10 and all(v.shape == x.shape for v in crops)
    assert not torch.equal(crops[0], crops[2])  # different corners


def test_class_metrics_match_hand_computed_values_and_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, classification_report

    targets, pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(4)[pred] * 5.0  # class 3: neither a target nor predicted
    m = evaluate.metrics(logits, targets)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # over the classes seen
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    report = evaluate.per_class(logits, targets, ["ant", "bee", "cat", "dog"])
    got = [
        v for c in report["classes"] for v in (c["precision"], c["recall"], c["f1"], c["support"])
    ]
    assert got == pytest.approx([v for row in [(1, 2 / 3, 0.8, 3), (0.5, 0.5, 0.5, 2), (0.5, 1, 2 / 3, 1),
                                 (0, 0, 0, 0)] for v in row])  # fmt: skip
    assert [(c["true"], c["predicted"], c["count"]) for c in report["most_confused"]] == [
        ("ant", "bee", 1), ("bee", "cat", 1)]  # fmt: skip
    rng = np.random.default_rng(0)  # and scikit-learn's own numbers on a larger random case
    targets, logits = rng.integers(0, 7, 500), rng.normal(size=(500, 7))
    logits[np.arange(500), targets] += rng.normal(1.0, 1.0, 500)
    ref = classification_report(targets, logits.argmax(1), output_dict=True, zero_division=0)
    m, report = (
        evaluate.metrics(logits, targets),
        evaluate.per_class(logits, targets, list("abcdefg")),
    )
    assert m["macro_f1"] == pytest.approx(ref["macro avg"]["f1-score"])
    assert m["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(targets, logits.argmax(1))
    )
    for i, c in enumerate(report["classes"]):
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (ref[str(i)]["precision"], ref[str(i)]["recall"], ref[str(i)]["f1-score"],
             ref[str(i)]["support"]))  # fmt: skip
    pairs = report["most_confused"]
    assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)


def test_an_unreadable_image_when_scoring_does_not_ask_for_a_flag_evaluate_lacks(
    trained_run, folder_data, tmp_path, capsys
):
    """evaluate and ensemble said "pass --skip-bad-images", which neither takes."""
    import shutil

    from transferlab.cli import main

    shutil.copytree(folder_data, tmp_path / "d")
    broken = sorted((tmp_path / "d" / "test").rglob("*.png"))[0]
    broken.write_bytes(b"")
    sorted((tmp_path / "d" / "train").rglob("*.png"))[0].write_bytes(b"")  # never scored here
    argv = ["evaluate", str(trained_run), "--data", f"folder:{tmp_path / 'd'}", "--split", "test"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"1 unreadable image(s) in the test split run {trained_run} is scored on" in err
    assert broken.name in err and "--skip-bad-images" not in err and len(err.splitlines()) == 1
    assert "carved" not in err  # a given test split: train's images never come into it
    shutil.copytree(folder_data / "train", tmp_path / "flat")  # pass 62: removing those named
    damaged = sorted((tmp_path / "flat").rglob("*.png"))[::10]  # carved others in, a round each
    for path in damaged:
        path.write_bytes(b"")
    assert main(["evaluate", str(trained_run), "--data", f"folder:{tmp_path / 'flat'}"]) == 2
    err = capsys.readouterr().err
    counts = re.search(r"(\d+) unreadable image\(s\) in the test split .* scored on, and (\d+) in the splits it is carved with \(removing files carves them anew\)", err)  # fmt: skip
    assert counts and int(counts[1]) + int(counts[2]) == len(damaged) and int(counts[2]) > 0, err
    assert all(str(path) in err for path in damaged[:20]) and len(err.splitlines()) == 1, err
    assert main(["evaluate", str(trained_run), "--data", f"folder:{tmp_path / 'flat'}", "--split", "train"]) == 2  # fmt: skip
    counts = re.search(r"(\d+) unreadable image\(s\) in the train split .*, and (\d+) in the splits it is carved with", capsys.readouterr().err)  # fmt: skip
    assert counts and int(counts[1]) + int(counts[2]) == len(damaged)  # (pass 66: train's alone)


def test_a_fine_tune_scored_on_images_its_parent_trained_on_says_so(
    trained_run, folder_data, tmp_path, capsys
):
    """A fine-tune whose test images were its parent's training images reported a test score
    without a word, at training and in evaluate."""
    from transferlab import trainer

    from conftest import tiny_cfg

    child_data = tmp_path / "child"
    for c in ("a", "b", "c", "d"):
        for subset, ids in (("train", range(0, 15)), ("test", range(15, 20))):
            (child_data / subset / c).mkdir(parents=True)
            for i in ids:  # links to the parent's own training images
                (child_data / subset / c / f"{i}.png").symlink_to(
                    folder_data / "train" / c / f"{i}.png"
                )
    spec = f"folder:{child_data}"
    trainer.fit(tiny_cfg(spec, weights=str(trained_run), epochs=1), tmp_path / "ft")
    said = "20 of the 20 test images were training or validation images of the run its weights came from (tiny)"
    assert said in capsys.readouterr().err
    *_, notes = evaluate.score_run(tmp_path / "ft", None, "test")
    assert any(said in note and "not a held-out test score" in note for note in notes)
    *_, notes = evaluate.score_run(trained_run, None, "test")  # its own test: nothing to say
    assert notes == []
    # recorded where the score is: meta.json, and report.md's row (said once on a terminal before)
    assert any(said in note for note in checkpoint.read_meta(tmp_path / "ft")["notes"])
    assert checkpoint.read_meta(trained_run)["notes"] == []
    from transferlab import report

    (tmp_path / "both").mkdir()
    for run in (trained_run, tmp_path / "ft"):
        shutil.copytree(run, tmp_path / "both" / run.name)
    _, table = report.write(tmp_path / "both")
    row = next(line for line in table.splitlines() if line.startswith("| ft"))
    assert "not a test score: its test images include ones its weights were trained on" in row
    assert "not a test score" not in next(r for r in table.splitlines() if r.startswith("| tiny"))


def test_a_fine_tune_s_leak_is_said_from_any_folder_and_after_its_parent_moved(
    trained_run, folder_data, tmp_path, monkeypatch, capsys
):
    """Hostile pass 21: the parent was recorded as typed (relative), so from another folder,
    or once the parent had moved, evaluate and ensemble counted nothing and said nothing: the
    score read as held out."""
    from transferlab import ensembles, trainer

    from conftest import tiny_cfg

    shutil.copytree(trained_run, tmp_path / "p", ignore=shutil.ignore_patterns("*.lock"))
    child = tmp_path / "child"  # the parent's training images as the child's test split
    for c in ("a", "b", "c", "d"):
        for subset, ids in (("train", range(0, 15)), ("test", range(15, 20))):
            (child / subset / c).mkdir(parents=True)
            for i in ids:
                shutil.copy(folder_data / "train" / c / f"{i}.png", child / subset / c)
    monkeypatch.chdir(tmp_path)
    trainer.fit(tiny_cfg(f"folder:{child}", weights="p", epochs=1), tmp_path / "ft", quiet=True)
    said = "20 of the 20 test images were training or validation images of the run its weights came from"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    *_, notes = evaluate.score_run(tmp_path / "ft", None, "test")
    assert any(said in n and "not a held-out test score" in n for n in notes), notes
    assert not any("counted when it trained" in n for n in notes)  # counted now, from anywhere
    (tmp_path / "p").rename(tmp_path / "p_moved")
    *_, notes = evaluate.score_run(tmp_path / "ft", None, "test")
    assert any(said in n and "counted when it trained" in n for n in notes), notes
    info = ensembles.build([tmp_path / "ft", tmp_path / "p_moved"], "soft", tmp_path / "e", quiet=True)  # fmt: skip
    assert any("20 of the 20 test images trained the runs" in n for n in info["notes"])


def test_a_leak_is_counted_through_copies_ensemble_members_soup_ingredients_and_shards(
    trained_run, folder_data, tmp_path, capsys
):
    """Hostile pass 15: a fine-tune on a copied folder (not links), an ensemble with it as a
    member, a soup with it as an ingredient, and a fine-tune of a run trained on shards of the
    same images each reported its score as a clean test score."""
    from transferlab import ensembles, report, shards, soups, trainer

    from conftest import tiny_cfg

    child = tmp_path / "child"  # the parent's training images, copied, as its test split
    for c in ("a", "b", "c", "d"):
        for subset, ids in (("train", range(0, 15)), ("test", range(15, 20))):
            (child / subset / c).mkdir(parents=True)
            for i in ids:
                shutil.copy(folder_data / "train" / c / f"{i}.png", child / subset / c)
    spec = f"folder:{child}"
    said = "20 of the 20 test images were training or validation images of the run its weights came from"
    for name in ("ft", "ft2"):
        trainer.fit(tiny_cfg(spec, weights=str(trained_run), epochs=1), tmp_path / name)
        assert said in capsys.readouterr().err  # a copy is the same image
    weights_file = str(checkpoint.weights_path(trained_run))  # the run's own file: its lineage
    trainer.fit(tiny_cfg(spec, weights=weights_file, epochs=1), tmp_path / "ff", quiet=True)
    assert said in capsys.readouterr().err
    assert checkpoint.read_meta(tmp_path / "ff")["source"]["parent"] == str(trained_run)
    trainer.fit(tiny_cfg(spec, epochs=1), tmp_path / "scratch", quiet=True)

    info = ensembles.build([str(tmp_path / "ft"), str(tmp_path / "scratch")], "soft",
                           tmp_path / "ens", quiet=True)  # fmt: skip
    assert any("20 of the 20 test images trained the runs" in n for n in info.get("notes", []))
    assert report.leaked(ensembles.read(tmp_path / "ens")["notes"])

    meta = soups.make([str(tmp_path / "ft"), str(tmp_path / "ft2")], "uniform",
                      tmp_path / "soup", quiet=True)  # fmt: skip
    assert any("20 of the 20 test images" in n for n in meta["notes"])
    *_, notes = evaluate.score_run(tmp_path / "soup", None, "test")
    assert any("ft, ft2, tiny" in n and "not a held-out test score" in n for n in notes)

    shards.write(f"folder:{folder_data}", tmp_path / "shards", quiet=True)
    trainer.fit(tiny_cfg(f"wds:{tmp_path / 'shards'}", epochs=1), tmp_path / "w", quiet=True)
    trainer.fit(tiny_cfg(spec, weights=str(tmp_path / "w"), epochs=1), tmp_path / "ftw")
    assert "20 of the 20 test images were training or validation images of the run its weights came from (w)" in capsys.readouterr().err  # fmt: skip


def test_test_images_that_are_copies_of_its_own_training_images_are_counted(tmp_path, capsys):
    """Hostile pass 18: a test split holding byte copies of train images (a scraper's
    duplicates, a copy made by hand) was scored as held out, without a word."""
    from transferlab import report, trainer

    from conftest import make_folder, tiny_cfg

    root = make_folder(tmp_path / "d", ["a", "b", "c", "d"], 6)
    for c in ("a", "b"):  # 2 of the 24 test images: copies of training images
        shutil.copy(root / "train" / c / "0.png", root / "test" / c / "0.png")
    trainer.fit(tiny_cfg(f"folder:{root}", epochs=1), tmp_path / "runs" / "r", quiet=True)
    said = "2 of the 24 test images are byte copies of training images of the same data: each the same file or bytes as one of its train/val images; its test score counts them"  # fmt: skip
    assert said in capsys.readouterr().err
    assert said in checkpoint.read_meta(tmp_path / "runs" / "r")["notes"]
    *_, notes = evaluate.score_run(tmp_path / "runs" / "r", None, "test")
    assert said in notes
    report.write(tmp_path / "runs")
    mark = "| r (2 of the 24 test images are byte copies of training images of the same data) |"
    assert mark in (tmp_path / "runs" / "report.md").read_text()
    from transferlab import ensembles

    shutil.copytree(tmp_path / "runs" / "r", tmp_path / "runs" / "r2")  # an ensemble says it too
    ensembles.build(
        [tmp_path / "runs" / "r", tmp_path / "runs" / "r2"], "soft", tmp_path / "runs" / "e"
    )
    assert said in ensembles.read(tmp_path / "runs" / "e")["notes"]
    for split, shown in (("test", [said]), ("val", [])):  # a test note where test is scored
        assert ensembles.evaluate_path(tmp_path / "runs" / "e", split=split)["notes"] == shown


def test_a_score_on_data_with_fewer_classes_says_its_predictions_were_restricted(
    trained_run, folder_data, tmp_path
):
    """Hostile pass 21: a 10-class run scored on a folder of 2 of its classes read 60% (its
    other classes dropped from the softmax) where predict answered none right, without a word."""
    from transferlab import ensembles

    for c in ("a", "b"):
        shutil.copytree(folder_data / "test" / c, tmp_path / "two" / "test" / c)
        shutil.copytree(folder_data / "train" / c, tmp_path / "two" / "train" / c)
    spec = f"folder:{tmp_path / 'two'}"
    said = f"scored over the 2 of the run's 4 classes that {spec} holds"
    *_, notes = evaluate.score_run(trained_run, spec, "test")
    assert any(said in n for n in notes), notes
    *_, notes = evaluate.score_run(trained_run, None, "test")  # its own data: all its classes
    assert not any("scored over" in n for n in notes)
    other = shutil.copytree(trained_run, tmp_path / "b", ignore=shutil.ignore_patterns("*.lock"))
    ensembles.build([trained_run, other], "soft", tmp_path / "e", quiet=True)
    assert any(said in n for n in ensembles.evaluate_path(tmp_path / "e", spec)["notes"])
    shutil.rmtree(tmp_path / "two" / "test" / "b")  # one class: 100% by construction, refused
    shutil.rmtree(tmp_path / "two" / "train" / "b")  # with its reason, not the training rule's
    with pytest.raises(UserError, match="holds one class \\(a\\): .* every image would be right"):
        evaluate.score_run(trained_run, spec, "test")


def test_a_score_survives_a_folder_it_cannot_write_and_never_replaces_the_run_s_own_figure(
    trained_run, folder_data, tmp_path, monkeypatch, capsys
):
    """Hostile pass 21: evaluate of a read-only run printed no score, only "Read-only file
    system (RUN/confusion.png)"; evaluate --data OTHER replaced the run's own confusion.png."""
    import errno

    from transferlab import ensembles, plots
    from transferlab.cli import main

    run = shutil.copytree(trained_run, tmp_path / "r", ignore=shutil.ignore_patterns("*.lock"))
    ensembles.evaluate_path(run)  # its own test split's figure
    own = (run / "confusion.png").read_bytes()
    shutil.copytree(folder_data, tmp_path / "other")
    result = ensembles.evaluate_path(run, f"folder:{tmp_path / 'other'}")
    assert result["confusion"] == str(run / "confusion-other-data.png")
    assert (run / "confusion.png").read_bytes() == own

    def read_only(matrix, names, path, title):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(plots, "confusion", read_only)
    assert main(["evaluate", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "top-1" in out and "confusion matrix ->" not in out
    assert "the confusion matrix was not written (Read-only file system" in err
    monkeypatch.undo()  # a photo of the user's named confusion-val.png was drawn over (F5)
    shutil.copy(next(folder_data.glob("test/*/*.png")), run / "confusion-val.png")
    mine = (run / "confusion-val.png").read_bytes()
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    err = capsys.readouterr().err
    assert "the confusion matrix was not written (confusion-val.png there is not a figure transferlab drew (or one drawn before it marked its figures), and is kept: delete it to have it drawn" in err  # fmt: skip
    assert (run / "confusion-val.png").read_bytes() == mine
    import matplotlib.pyplot as plt  # pass 37: a plot of the user's, matplotlib's as ours are

    plt.plot([1, 2]), plt.savefig(run / "confusion-val.png"), plt.close()
    mine = (run / "confusion-val.png").read_bytes()
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert (run / "confusion-val.png").read_bytes() == mine and "not written" in capsys.readouterr().err  # fmt: skip
    (run / "confusion-val.png").unlink()
    (run / "confusion-val.png").symlink_to(tmp_path / "elsewhere.png")  # dangling: replaced
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert (run / "confusion-val.png").is_symlink() and "not written" in capsys.readouterr().err
    (run / "confusion-val.png").unlink()
    assert main(["evaluate", str(run), "--split", "val"]) == 0  # ours: drawn, and redrawn
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert "not written" not in capsys.readouterr().err
