"""Snapshot ensembles and model soups: lineage, cyclic LR, BatchNorm recomputation."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import transferlab
from transferlab import checkpoint, ensembles, models, report, soups, strategies, trainer
from transferlab.cli import main
from transferlab.config import UserError, make_config

from conftest import tiny_cfg


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, folder_data):
    out = tmp_path_factory.mktemp("snap") / "snap"
    trainer.fit(tiny_cfg(f"folder:{folder_data}", epochs=4, snapshots=2), out, quiet=True)
    return out


def test_snapshots_leave_one_member_run_per_cosine_cycle(snapshot_run):
    snaps = sorted((snapshot_run / "snapshots").iterdir())
    assert [p.name for p in snaps] == ["snapshot-1", "snapshot-2"]
    metas = [checkpoint.read_meta(p) for p in snaps]
    assert [m["snapshot"]["epoch"] for m in metas] == [2, 4]
    assert metas[0]["weights_sha256"] != metas[1]["weights_sha256"]
    info = ensembles.build(snaps, "soft", snapshot_run / "ens", quiet=True)
    assert len(info["members"]) == 2


def test_snapshot_schedule_anneals_each_cycle_then_restarts():
    cfg = make_config({"epochs": 6, "snapshots": 3, "lr": 0.1, "warmup_epochs": 1})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = strategies.make_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)  # warm-up
    for end in (19, 39, 59):  # each cycle (2 epochs) ends near zero...
        assert lrs[end] < 0.01
    for start in (20, 40):  # ...and the next restarts at the peak
        assert lrs[start] == pytest.approx(0.1)


def test_snapshot_settings_are_checked():
    with pytest.raises(UserError, match=r"snapshots must be at least 2 and divide epochs \(4\)"):
        make_config({"epochs": 4, "snapshots": 3})
    with pytest.raises(UserError, match="not linear-probe"):
        make_config({"epochs": 4, "snapshots": 2, "strategy": "linear-probe"})


def test_average_known_answer():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    out = soups.average([a, b])
    assert out["w"].tolist() == [2.0, 4.0] and out["n"].item() == 5


def test_batchnorm_is_recomputed_from_the_images():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten())
    model[0].running_mean.fill_(100.0)
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    prep = models.Preprocessing.make(8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert soups.recompute_batchnorm(model, images, prep, batch_size=10)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(model[0].running_mean, x.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(model[0].running_var, x.var((0, 1, 2), ddof=1), rtol=1e-4)
    assert not model.training and model[0].momentum == 0.1


def test_soups_of_snapshots_from_one_start(snapshot_run, tmp_path):
    snaps = sorted((snapshot_run / "snapshots").iterdir())
    for method in soups.METHODS:
        meta = soups.make(snaps, method, tmp_path / method, quiet=True)
        assert meta["source"]["weights"] == "soup" and meta["strategy"] == "soup"
        assert 1 <= len(meta["source"]["ingredients"]) <= 2
        again = ensembles.evaluate_path(tmp_path / method, split="test")
        assert again["metrics"]["top1"] == pytest.approx(meta["metrics"]["test"]["top1"])
    assert len(checkpoint.read_meta(tmp_path / "uniform")["source"]["ingredients"]) == 2
    rows = report.write(tmp_path)[1].splitlines()  # a greedy soup's val chose its ingredients
    assert "% (chosen on it) |" in next(r for r in rows if r.startswith("| greedy "))
    assert "(chosen on it)" not in next(r for r in rows if r.startswith("| uniform "))
    chose = "the greedy soup chose its ingredients by its val score: not a held-out val score"
    assert chose in transferlab.load(tmp_path / "greedy").evaluate("val")["notes"]  # said too
    assert transferlab.load(tmp_path / "uniform").evaluate("val")["notes"] == []
    # hostile pass 31: train --out SOUP --resume found no state/, "started from scratch" and
    # trained over the soup; a finished run whose state/ was deleted was trained anew too
    before = checkpoint.sha256(checkpoint.weights_path(tmp_path / "uniform"))
    cfg = tiny_cfg(checkpoint.read_meta(snaps[0])["data"], epochs=1)
    with pytest.raises(UserError, match="uniform holds a soup, with no checkpoint to continue from: nothing to resume"):  # fmt: skip
        trainer.fit(cfg, tmp_path / "uniform", resume=True, quiet=True)
    assert checkpoint.sha256(checkpoint.weights_path(tmp_path / "uniform")) == before
    finished = shutil.copytree(snaps[0], tmp_path / "finished")
    shutil.rmtree(finished / "state", ignore_errors=True)
    with pytest.raises(UserError, match="holds a finished run whose state/ is gone"):
        trainer.fit(cfg, finished, resume=True, quiet=True)
    from transferlab import outputs, resume  # pass 32: finetune --out SOUP --resume asked for

    with pytest.raises(UserError, match="uniform holds a soup, with no checkpoint"):  # --from
        resume.finetune_config(None, {}, tmp_path / "uniform")
    with pytest.raises(UserError, match="finished already exists: pass --overwrite to replace it$"):  # fmt: skip
        outputs.check_out(finished, "run")  # ("pass --resume to continue it": then refused)
    # on other data (--data): its fingerprint and config are that data's, so evaluate finds
    # nothing changed (it said "the files changed" of files nobody touched)
    other = tmp_path / "other"
    shutil.copytree(Path(checkpoint.read_meta(snaps[0])["data"].partition(":")[2]), other)
    meta = soups.make(snaps, "uniform", tmp_path / "moved", f"folder:{other}", quiet=True)
    assert meta["config"]["data"] == meta["data"] == f"folder:{other}"
    said = ensembles.evaluate_path(tmp_path / "moved", split="test")
    assert not [n for n in said["notes"] if "changed" in n]


def test_runs_from_different_starts_are_refused(snapshot_run, trained_run, folder_data, tmp_path):
    other_seed = tmp_path / "seed1"
    trainer.fit(tiny_cfg(f"folder:{folder_data}", epochs=1, seed=1), other_seed, quiet=True)
    with pytest.raises(UserError, match="started from different weights"):
        soups.make([trained_run, other_seed], "uniform", tmp_path / "s", quiet=True)
    assert main(["--quiet", "finetune", "--from", str(trained_run), "--epochs", "1", "--out", str(tmp_path / "ft")]) == 0  # fmt: skip
    with pytest.raises(UserError, match=f"\\(.*ft was fine-tuned from {trained_run}: soup its fine-tunes with one another\\)"):  # fmt: skip
        soups.make([trained_run, tmp_path / "ft"], "uniform", tmp_path / "s", quiet=True)  # (65)
    code = main(
        ["soup", str(snapshot_run), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]
    )
    assert code == 2


def test_recipe_soup_step_and_report(snapshot_run, tmp_path):
    from transferlab import recipe

    snaps = sorted(str(p) for p in (snapshot_run / "snapshots").iterdir())
    path = tmp_path / "r.yaml"
    path.write_text(f"steps:\n  - soup: s\n    members: {snaps}\n    method: uniform\n  - report\n")
    out = recipe.run(path, tmp_path / "out", quiet=True)
    assert "uniform soup of snapshot-1, snapshot-2" in (out / "report.md").read_text()
    # train steps from scratch with two seeds: refused before step 1 (it failed after both)
    path.write_text("data: digits\ndefaults: {model: dcnn, epochs: 1, limit: 50}\nsteps:\n"
                    "  - train: a\n  - train: b\n    seed: 1\n  - soup: s\n    members: [a, b]\n")  # fmt: skip
    with pytest.raises(UserError, match="step 3 \\(soup s\\): its members start from diff"):
        recipe.run(path, tmp_path / "seeds", quiet=True)
    assert not (tmp_path / "seeds").exists()


def test_a_soup_stopped_before_it_finished_is_made_again(snapshot_run, tmp_path, monkeypatch):
    """A soup stopped by Ctrl-C or a full disk left a marked, empty folder; every rerun said
    "pass --resume to continue it or --overwrite", flags soup does not take."""
    snaps = sorted((snapshot_run / "snapshots").iterdir())
    monkeypatch.setattr(soups, "_cook", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        soups.make(snaps, "uniform", tmp_path / "s", quiet=True)
    assert not (tmp_path / "s" / checkpoint.META).exists()
    with pytest.raises(UserError, match="whose command stopped before it finished .*: run that"):
        checkpoint.read_meta(tmp_path / "s")  # evaluate, predict: "not a run folder"
    monkeypatch.undo()
    (tmp_path / "s" / "mine.txt").write_text("keep")  # a user's file: never replaced
    with pytest.raises(UserError, match="--overwrite would delete files transferlab did not"):
        soups.make(snaps, "uniform", tmp_path / "s", quiet=True)
    (tmp_path / "s" / "mine.txt").unlink()
    assert soups.make(snaps, "uniform", tmp_path / "s", quiet=True)["strategy"] == "soup"
    with pytest.raises(UserError, match="already holds a run"):  # a finished one stays
        soups.make(snaps, "uniform", tmp_path / "s", quiet=True)


def test_soup_overwrite_replaces_a_run_there_and_nothing_else(snapshot_run, tmp_path, capsys):
    """Hostile pass 47 (F7): a soup made again (another method, other runs) had to go to another
    --out, or into a folder deleted by hand: soup took no --overwrite."""
    snaps = [str(p) for p in sorted((snapshot_run / "snapshots").iterdir())]
    out = tmp_path / "s"
    assert main(["soup", *snaps, "--method", "uniform", "--out", str(out)]) == 0
    assert main(["soup", *snaps[:2], "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith("already holds a run: pass --overwrite to replace it, or choose another --out\n")  # fmt: skip
    assert main(["soup", *snaps[:2], "--out", str(out), "--overwrite"]) == 0
    assert checkpoint.read_meta(out)["source"]["candidates"] == sorted(snaps[:2])
    assert main(["soup", *snaps[:2], "--out", snaps[0], "--overwrite"]) == 2  # an ingredient
    assert "overlaps ingredient run" in capsys.readouterr().err
    assert transferlab.soup(snaps[:2], "uniform", out, overwrite=True).path == out


def test_no_soup_or_fine_tune_replaces_a_run_its_inputs_came_from(tmp_path, capsys):
    """Hostile pass 51 (F2): `soup F1 F2 --out R --overwrite`, R the run both were fine-tuned
    from, replaced R with the soup (refused only over an ingredient); so did a fine-tune of F1
    over R. R is read to count the soup's leaks, and a stopped fine-tune of R resumes from it."""
    tiny = ["--data", "digits", "--input-size", "16", "--limit", "40", "--no-flip", "--epochs", "1", "--quiet"]  # fmt: skip
    run = {name: str(tmp_path / name) for name in ("r0", "r1", "f1", "f2")}
    assert main(["train", "--model", "dcnn", *tiny, "--out", run["r0"]]) == 0
    assert main(["finetune", "--from", run["r0"], *tiny, "--out", run["r1"]]) == 0
    for name, seed in (("f1", "1"), ("f2", "2")):
        assert main(["finetune", "--from", run["r1"], *tiny, "--seed", seed, "--out", run[name]]) == 0  # fmt: skip
    kept = {name: checkpoint.sha256(checkpoint.weights_path(Path(path))) for name, path in run.items()}  # fmt: skip
    capsys.readouterr()
    for overwrite in ([], ["--overwrite"]):  # pass 54 (F1): "pass --overwrite", then refused
        assert main(["soup", run["f1"], run["f2"], "--out", run["f1"], *overwrite]) == 2
        assert f"overlaps ingredient run {run['f1']}: a command" in capsys.readouterr().err
        assert main(["soup", run["f1"], run["f2"], "--out", run["r1"], *overwrite]) == 2
        assert "overlaps an ancestor of the ingredients" in capsys.readouterr().err
    for parent in ("r1", "r0"):  # the parent, and its own
        assert main(["soup", run["f1"], run["f2"], "--out", run[parent], "--overwrite"]) == 2
        assert f"overlaps an ancestor of the ingredients, {run[parent]}: a command never writes into its own input" in capsys.readouterr().err  # fmt: skip
        assert main(["finetune", "--from", run["f1"], *tiny, "--out", run[parent], "--overwrite"]) == 2  # fmt: skip
        assert f"overlaps an ancestor of the run it starts from, {run[parent]}:" in capsys.readouterr().err  # fmt: skip
    weights = str(checkpoint.weights_path(Path(run["f1"])))  # pass 52 (F1): its weights file
    state = str(Path(run["f1"]) / "state")  # in the weights' run (pass 53: "an ancestor")
    for target, said in ((run["f1"], f"the run it starts from {weights}:"), (state, f"the run it starts from {run['f1']}:"), (run["r0"], f"an ancestor of the run it starts from, {run['r0']}:")):  # fmt: skip
        assert main(["train", "--model", "dcnn", "--weights", weights, *tiny, "--out", target, "--overwrite"]) == 2  # fmt: skip
        assert f"overlaps {said}" in capsys.readouterr().err
    assert kept == {name: checkpoint.sha256(checkpoint.weights_path(Path(path))) for name, path in run.items()}  # fmt: skip
    assert main(["soup", run["f1"], run["f2"], "--method", "uniform", "--out", str(tmp_path / "s")]) == 0  # fmt: skip


def test_a_greedy_soup_of_runs_that_split_the_data_otherwise_is_refused(
    trained_run, folder_data, tmp_path, capsys
):
    """Hostile pass 15: a greedy soup chose on a val split one ingredient trained on (its
    --val-fraction differed), and recorded that val score, where `ensemble` refuses it."""
    cfg = tiny_cfg(f"folder:{folder_data}", weights=str(trained_run), epochs=1)
    trainer.fit(cfg, tmp_path / "a", quiet=True)
    trainer.fit(make_config({"val_fraction": 0.3}, cfg), tmp_path / "b", quiet=True)
    runs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(UserError, match="split the data otherwise .* make a uniform soup"):
        soups.make(runs, "greedy", tmp_path / "g", quiet=True)
    assert not (tmp_path / "g").exists()
    soups.make(runs, "uniform", tmp_path / "u", quiet=True)
    assert "the soup's val score holds images an ingredient trained on" in capsys.readouterr().err
    # recorded and marked in the report's val column, as an ensemble's (hostile pass 21)
    assert any("val score holds images" in n for n in checkpoint.read_meta(tmp_path / "u")["notes"])
    table = report.write(tmp_path)[0].read_text()
    assert "% (ingredients trained on it) |" in next(
        r for r in table.splitlines() if r.startswith("| u ")
    )


def test_a_fine_tune_of_a_snapshot_run_does_not_take_its_snapshots(snapshot_run):
    """Hostile pass 21: finetune --from a --snapshots 2 run --epochs 1 failed "snapshots must
    divide epochs (1), got 2", an option the user never gave (and without --epochs it made
    snapshots again, unasked)."""
    assert strategies.finetune_config(str(snapshot_run), {"epochs": 1}).snapshots == 0
    asked = strategies.finetune_config(str(snapshot_run), {"epochs": 4, "snapshots": 2})
    assert asked.snapshots == 2


def test_a_soup_of_the_same_weights_twice_says_so(snapshot_run, tmp_path, capsys):
    """Hostile pass 21: a run and its last snapshot (the same weights) averaged as two, without
    the note ensemble gives."""
    snaps = sorted((snapshot_run / "snapshots").iterdir())
    soups.make([snapshot_run, *snaps], "uniform", tmp_path / "s", quiet=True)
    err = capsys.readouterr().err
    assert "snapshot-2 has the same weights as" in err and "counts twice in the soup" in err


def test_a_soup_on_other_data_needs_its_runs_classes_in_their_order(
    snapshot_run, folder_data, tmp_path
):
    """Hostile pass 21: soup --data OTHER compared OTHER's labels with the model's outputs by
    index (a soup right on every image recorded val 0%, and greedy chose on that); a class the
    runs lack was an IndexError traceback after --out was claimed."""
    snaps = sorted((snapshot_run / "snapshots").iterdir())
    for name, classes in (("fewer", ("a", "b")), ("more", ("a", "b", "c", "d", "e"))):
        for c in classes:
            for split in ("train", "test"):
                src = folder_data / split / (c if c != "e" else "d")
                shutil.copytree(src, tmp_path / name / split / c)
    with pytest.raises(UserError, match="soup is scored on data with its runs' 4 classes in their order; .* holds 2 of them"):  # fmt: skip
        soups.make(snaps, "greedy", tmp_path / "s1", f"folder:{tmp_path / 'fewer'}", quiet=True)
    for method in ("uniform", "greedy"):  # pass 52 (F9): greedy first said its val held images
        with pytest.raises(UserError, match="does not know class\\(es\\) e of this dataset"):
            soups.make(snaps, method, tmp_path / "s2", f"folder:{tmp_path / 'more'}", quiet=True)
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_a_soup_of_linear_probes_keeps_their_batchnorm_and_scores_as_they_do(folder_data, tmp_path):
    """Hostile pass 25: two identical probes souped scored test 62.5% (loss 14.9) against their
    100%: the soup recomputed BatchNorm statistics on train, so the frozen features their
    heads were fitted on moved."""
    probes = []
    for i in (0, 1):  # on a random backbone, as the hostile user had it
        cfg = tiny_cfg(f"folder:{folder_data}", strategy="linear-probe")
        probes.append(trainer.fit(cfg, tmp_path / f"p{i}", quiet=True))
    meta = soups.make([tmp_path / "p0", tmp_path / "p1"], "uniform", tmp_path / "s", quiet=True)
    assert meta["source"]["batchnorm"] == "kept: the same in every ingredient"
    for split in ("val", "test"):
        best = max(p["metrics"][split]["loss"] for p in probes)  # (convex in the head)
        assert meta["metrics"][split]["loss"] <= best + 1e-6, split


def test_a_soup_s_report_shows_each_ingredient_s_seed_and_lr(snapshot_run, tmp_path):
    """report.html showed a soup's first ingredient's seed and LR as its own, and "0 / 0"
    epochs (hostile pass 34, F12)."""
    import json

    from transferlab import htmlreport

    first, second = sorted((snapshot_run / "snapshots").iterdir())
    other = shutil.copytree(second, tmp_path / "seed7")  # the same start, another seed and LR
    meta = json.loads((other / "meta.json").read_text())
    meta["seed"], meta["config"]["lr"] = 7, 0.5
    (other / "meta.json").write_text(json.dumps(meta))
    soup = soups.make([first, other], "uniform", tmp_path / "soup", quiet=True)
    rows = dict(htmlreport._run_meta(soup))
    seed = checkpoint.read_meta(first)["seed"]
    assert rows["seeds of its ingredients"] == f"{seed}, 7" and "seed" not in rows
    assert rows["lrs of its ingredients"].endswith(", 0.5") and "lr, batch" not in rows
    assert rows["strategy"] == "uniform soup of snapshot-1, seed7"
    assert "epochs run / best" not in rows


def test_a_soup_of_runs_that_skipped_unreadable_images_leaves_them_out_too(folder_data, tmp_path, capsys):  # fmt: skip
    """Hostile pass 53 (F6): the soup decoded every image, refused the unreadable ones with
    "pass --skip-bad-images", a flag soup lacks, and left its half-made folder behind."""
    shutil.copytree(folder_data, tmp_path / "d")
    for name in ("a/junk.png", "b/junk.png"):
        (tmp_path / "d" / "train" / name).write_text("junk")
    tiny = ["--data", f"folder:{tmp_path / 'd'}", "--input-size", "16", "--epochs", "1", "--quiet", "--skip-bad-images"]  # fmt: skip
    assert main(["train", "--model", "dcnn", *tiny, "--out", str(tmp_path / "r")]) == 0
    for seed in ("1", "2"):
        assert main(["finetune", "--from", str(tmp_path / "r"), *tiny, "--seed", seed, "--out", str(tmp_path / seed)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["soup", str(tmp_path / "1"), str(tmp_path / "2"), "--method", "uniform", "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    assert capsys.readouterr().err.count("image(s), as its runs did (--skip-bad-images): ") >= 1
    assert sum(note.count("junk.png") for note in checkpoint.read_meta(tmp_path / "s")["notes"]) == 2  # fmt: skip
    meta = checkpoint.read_meta(tmp_path / "1")  # a run that did not skip them: refused, no folder
    meta["config"]["skip_bad_images"] = False
    (tmp_path / "1" / "meta.json").write_text(__import__("json").dumps(meta))
    assert main(["soup", str(tmp_path / "1"), str(tmp_path / "2"), "--method", "uniform", "--out", str(tmp_path / "t")]) == 2  # fmt: skip
    assert "unreadable image(s) in the data the soup is scored on" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
