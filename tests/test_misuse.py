"""What real users do by mistake (RELIABILITY.md scenarios 26-38): nothing a user owns is lost,
nothing is silently ignored, results stay tied to their inputs, every bad value is one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from transferlab import checkpoint, data, decoding, outputs, recipe
from transferlab.cli import main
from transferlab.config import UserError

from conftest import make_folder, make_image


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def fail(capsys, *argv, pattern: str = "") -> str:
    """Run the CLI; assert exit 2 with exactly one line on stderr (matching `pattern`)."""
    import re

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (what must not change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A finished run the test may change."""
    dst = tmp_path / "runs" / "a"
    shutil.copytree(trained_run, dst)
    return dst


TINY = ["--model", "test_resnet", "--input-size", "24", "--epochs", "1", "--batch-size", "16"]


# ----------------------------------------------------------------------------- 1. output paths


def test_S26_overwrite_never_deletes_a_users_folder_and_validates_first(capsys, tmp_path):
    mydocs = tmp_path / "mydocs"
    mydocs.mkdir()
    (mydocs / "notes.txt").write_text("my thesis")
    before = tree(mydocs)
    # the issue's example: a typo in --model next to --overwrite
    fail(capsys, "train", "--data", "digits", "--model", "dcnnn", "--out", mydocs, "--overwrite",
         pattern=r"not a transferlab run folder|unknown model")  # fmt: skip
    # a valid command: --overwrite still replaces only transferlab's own folders
    fail(capsys, "train", "--data", "digits", *TINY, "--out", mydocs, "--overwrite",
         pattern=rf"{mydocs.name} already exists and is not a transferlab run folder.*notes.txt")  # fmt: skip
    fail(capsys, "train", "--data", "digits", *TINY, "--out", mydocs, "--resume",
         pattern="not a transferlab run folder")  # fmt: skip
    assert tree(mydocs) == before


def test_S26_what_export_and_explain_wrote_into_a_run_is_its_own_for_overwrite(
    capsys, run_copy, folder_data
):
    pytest.importorskip("pytorch_grad_cam")
    from transferlab import explain, shipping

    explain.explain(run_copy, [str(next((folder_data / "test" / "a").iterdir()))])
    shipping.export_hf(run_copy, None)
    argv = ["--quiet", "train", "--data", f"folder:{folder_data}", *TINY, "--out", run_copy]
    assert main([str(a) for a in [*argv, "--overwrite"]]) == 0, capsys.readouterr().err
    assert not (run_copy / "explain").exists() and not (run_copy / "export").exists()


def test_S26_overwrite_refuses_a_run_holding_user_files_and_a_bad_model_keeps_the_run(
    capsys, run_copy, folder_data
):
    planted = {
        "notes.txt": "mine",
        ".my_secrets": "mine",
        ".git/config": "mine",
        "export/handmade.onnx": "mine",
        "state/my_note.txt": "mine",
        "confusion_analysis.xlsx": "mine",
        "report.md": "# my own report",
        "explain/my_drawing.png": "mine",
        "export/hf/notes.md": "mine",
        "train-photos-backup.tar": "mine",  # these five matched the globs of our own names
        "test-set-2023.tar": "mine",
        "logits/my_analysis.npz": "mine",
        "features/mine.npz": "mine",
        "confusion-mine.png": "mine",
    }
    argv = ["train", "--data", f"folder:{folder_data}", *TINY, "--out", run_copy, "--overwrite"]
    for name, text in planted.items():
        (run_copy / name).parent.mkdir(parents=True, exist_ok=True)
        (run_copy / name).write_text(text)
        before = tree(run_copy)
        fail(capsys, *argv, pattern=rf"would delete files transferlab did not write.*{name}")
        assert tree(run_copy) == before
        (run_copy / name).unlink()
    before = tree(run_copy)
    fail(capsys, "train", "--data", f"folder:{folder_data}", "--model", "resnet-50",
         "--out", run_copy, "--overwrite", pattern="unknown model")  # fmt: skip
    assert tree(run_copy) == before  # validated before anything was deleted
    assert cli(*argv, "--quiet") == 0  # a clean run folder is replaced
    assert checkpoint.is_run(run_copy)


def test_S27_commands_never_write_into_their_own_input(capsys, run_copy, folder_data, tmp_path):
    other = tmp_path / "runs" / "b"
    shutil.copytree(run_copy, other)
    before = {p: tree(p) for p in (run_copy, other)}
    for flags in ([], ["--resume"], ["--overwrite"]):  # it said "already exists", and with
        fail(capsys, "finetune", "--from", run_copy, "--out", run_copy, "--epochs", "1", *flags,
             pattern="overlaps the run it starts from")  # --resume "pass --overwrite" # fmt: skip
    fail(capsys, "finetune", "--from", run_copy, "--out", run_copy / "ft", "--epochs", "1",
         pattern="overlaps the run it starts from")  # fmt: skip
    fail(capsys, "ensemble", run_copy, other, "--out", run_copy, pattern="overlaps member")
    fail(capsys, "ensemble", run_copy, other, "--out", other / "ens", pattern="overlaps member")
    fail(capsys, "export", run_copy, "--format", "safetensors", "--out",
         run_copy / "model.safetensors", pattern="inside the run folder")  # fmt: skip
    fail(capsys, "export", other, "--format", "safetensors", "--out",
         run_copy / "logits" / "x.safetensors", pattern="inside the run folder")  # fmt: skip
    fail(capsys, "export", other, "--format", "torchscript", "--out", tmp_path / "m.onnx",
         pattern="extension of another format")  # fmt: skip
    for name in ("m.txt", "m", "m.onnx.bak"):  # written as onnx without a word
        fail(capsys, "export", other, "--format", "onnx", "--out", tmp_path / name, pattern=f"{name} does not end in .onnx: name it")  # fmt: skip
    fail(capsys, "soup", run_copy, run_copy, "--out", tmp_path / "soup", pattern="listed twice")
    fail(capsys, "train", "--data", f"folder:{folder_data}", *TINY,
         "--out", folder_data / "train" / "newrun", pattern="overlaps the data folder")  # fmt: skip
    for command in ("ensemble", "soup"):  # scored on that data, written among its photos
        fail(capsys, command, run_copy, other, "--out", folder_data / "train" / "a" / command,
             pattern="overlaps the data folder")  # fmt: skip
    for command in (["train", *TINY], ["auto", "--budget", "1m"]):  # its cache too
        fail(capsys, *command, "--data", f"folder:{folder_data}", "--out", tmp_path / "new",
             "--cache-dir", folder_data / "cache", pattern="--cache-dir .* overlaps the data")  # fmt: skip
    assert not (folder_data / "cache").exists()
    fail(capsys, "train", "--data", f"folder:{folder_data}", *TINY, "--out", tmp_path / "new",
         "--log-json", run_copy / "meta.json", pattern="inside the transferlab run folder")  # fmt: skip
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    fail(capsys, "train", "--data", f"folder:{folder_data}", *TINY, "--out", tmp_path / "new",
         "--log-json", tmp_path / "results.csv", pattern="not a transferlab event log")  # fmt: skip
    assert (tmp_path / "results.csv").read_text() == "a,b\n1,2\n"
    fail(capsys, "train", "--data", f"folder:{folder_data}", *TINY, "--out", tmp_path / "new",
         "--log-json", folder_data / "train" / "log.jsonl", pattern="--log-json .* overlaps the data")  # fmt: skip
    recipe = tmp_path / "r.yaml"  # its marker and recipe.yaml were left in the data, as a class
    recipe.write_text(
        f"data: folder:{folder_data}\nout: {folder_data}/runs\nsteps: [{{train: a}}]\n"
    )
    fail(capsys, "run", recipe, pattern=f"--out {folder_data}/runs overlaps the data folder")
    fail(
        capsys,
        "run",
        recipe,
        "--out",
        folder_data / "train" / "a" / "r",
        pattern="overlaps the data",
    )
    recipe.write_text(f"data: folder:{folder_data}\ndefaults: {{cache_dir: {folder_data}/c}}\nsteps: [{{train: a}}]\n")  # fmt: skip
    fail(capsys, "run", recipe, "--out", tmp_path / "new", pattern="cache_dir .* overlaps the data")
    fail(capsys, "train", "--data", "digits", *TINY, "--out", tmp_path / "new", "--log-json",
         tmp_path / "new", pattern="names --out")  # ("Is a directory", the folder left) # fmt: skip
    assert {p: tree(p) for p in (run_copy, other)} == before
    assert not (folder_data / "train" / "newrun").exists() and not (tmp_path / "new").exists()
    assert (
        not (folder_data / "runs").exists() and not (folder_data / "train" / "log.jsonl").exists()
    )
    assert sorted(p.name for p in (folder_data / "train").iterdir()) == ["a", "b", "c", "d"]
    assert not list((folder_data / "train" / "a").glob("*/"))
    fail(capsys, "report", run_copy / "state", pattern="inside the run folder")
    assert not (run_copy / "state" / "report.md").exists()
    # report over a user's own report.md
    (tmp_path / "runs" / "report.md").write_text("my notes, not a transferlab report\n")
    fail(capsys, "report", tmp_path / "runs", pattern="was not written by transferlab report")
    assert (tmp_path / "runs" / "report.md").read_text().startswith("my notes")
    # a recipe whose --out holds the recipe file itself as recipe.yaml
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "recipe.yaml").write_text("data: digits\nsteps:\n  - train: a\n    model: dcnn\n")
    text = (exp / "recipe.yaml").read_bytes()
    fail(
        capsys,
        "run",
        exp / "recipe.yaml",
        "--out",
        exp,
        pattern="overwrite the recipe|not a transferlab",
    )
    assert (exp / "recipe.yaml").read_bytes() == text and sorted(os.listdir(exp)) == ["recipe.yaml"]


def test_out_never_lands_in_a_folder_the_images_lie_in_and_a_tilde_the_shell_left_is_home(
    capsys, folder_data, tmp_path, monkeypatch
):
    """The data folder's check missed the folders its images lie in outside it: a linked class
    folder's target, the folders a CSV lists; `--out=~/x` (no shell expansion after =) made
    a folder named ~ here."""
    linked = tmp_path / "linked"
    (linked / "train").mkdir(parents=True)
    for c in "abcd":
        (linked / "train" / c).symlink_to(folder_data / "train" / c)
    shutil.copytree(folder_data / "test", linked / "test")
    fail(capsys, "train", "--data", f"folder:{linked}", *TINY, "--out",
         folder_data / "train" / "b" / "run", pattern="a folder the images of .* lie in")  # fmt: skip
    files = tmp_path / "files"  # a tree of linked files (over a photo library): the same
    for p in (folder_data / "train").glob("*/*.png"):
        (files / "train" / p.parent.name).mkdir(parents=True, exist_ok=True)
        (files / "train" / p.parent.name / p.name).symlink_to(p)
    shutil.copytree(folder_data / "test", files / "test")
    fail(capsys, "train", "--data", f"folder:{files}", *TINY, "--out",
         folder_data / "train" / "a" / "run", pattern="a folder the images of .* lie in")  # fmt: skip
    rows = [f"{p},{p.parent.name}" for p in sorted((folder_data / "train").glob("*/*.png"))]
    (tmp_path / "l.csv").write_text("file_name,label\n" + "\n".join(rows) + "\n")
    for command in (["train", *TINY], ["auto", "--budget", "1m"], ["data", "shard", "--quiet"]):
        data_flag = ["--data"] if command[0] != "data" else []
        fail(capsys, *command, *data_flag, f"csv:{tmp_path / 'l.csv'}", "--out",
             folder_data / "train" / "c" / "run", pattern="a folder the images of .* lie in")  # fmt: skip
    (tmp_path / "r.yaml").write_text(f"data: csv:{tmp_path / 'l.csv'}\nsteps: [{{train: a}}]\n")
    fail(capsys, "run", tmp_path / "r.yaml", "--out", folder_data / "train" / "d" / "run",
         pattern="a folder the images of .* lie in")  # (its recipe.yaml was left there) # fmt: skip
    assert sorted(p.name for p in (folder_data / "train").iterdir()) == ["a", "b", "c", "d"]
    assert not list((folder_data / "train").glob("*/run"))

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert (
        main(["train", "--data=digits", *TINY, "--limit", "60", "--out=~/runs/x", "--quiet"]) == 0
    )
    assert checkpoint.is_run(tmp_path / "home" / "runs" / "x") and not (tmp_path / "~").exists()


def test_a_transferlab_folder_among_class_folders_is_not_a_class(tmp_path):
    """A run written beside the class folders (--out for CSV data whose images live there)
    became a class of its plots, read by every later run on that folder."""
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 3, subsets=("",))
    run = photos / "csvrun"
    run.mkdir()
    (run / ".transferlab").write_text('{"kind": "run"}')
    (run / "curves.png").write_bytes((photos / "cat" / "0.png").read_bytes())
    ds = data.load(f"folder:{photos}")
    assert (
        ds.classes == ["cat", "dog"]
        and len(ds.splits["train"]) + len(ds.splits["val"]) + len(ds.splits["test"]) == 6
    )
    assert any("skipped transferlab output folder(s)" in n and "csvrun" in n for n in ds.notes)
    (photos / "dog" / ".transferlab").write_text("my notes")  # a user's file: dog stays a class
    assert data.load(f"folder:{photos}").classes == ["cat", "dog"]


def test_a_run_stopped_by_an_unreadable_image_leaves_no_folder_and_the_retry_runs(tmp_path, capsys):
    """The folder claimed before decoding stayed, and the same command once the image was fixed
    said "already exists: pass --resume or --overwrite"."""
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 4, subsets=("",))
    bad = photos / "dog" / "bad.png"
    bad.write_text("not an image")
    (tmp_path / "mine").mkdir()  # an empty folder the user made stays
    args = ["train", "--data", f"folder:{photos}", "--model", "dcnn", "--input-size", "16",
            "--epochs", "1", "--quiet"]  # fmt: skip
    for out in (tmp_path / "runs" / "a" / "b", tmp_path / "mine"):
        err = fail(capsys, *args, "--out", out, pattern="unreadable image")
        assert "bad.png (not an image Pillow reads" in err and "Error" not in err  # (no class
        # name, no path twice: "(UnidentifiedImageError: cannot identify image file '...')")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "photos"]
    assert not list((tmp_path / "mine").iterdir())
    bad.unlink()
    run = tmp_path / "runs" / "a" / "b"
    assert main([*args, "--out", str(run)]) == 0
    before = tree(run)  # --overwrite with an unreadable image: the old run stays (it was
    bad.write_text("not an image")  # emptied to its marker before the image was read)
    fail(capsys, *args, "--out", run, "--overwrite", pattern="unreadable image")
    assert tree(run) == before


def test_a_study_on_too_few_images_to_fold_is_refused_before_its_folder_exists(capsys, tmp_path):
    """(It timed five candidates for 15 s and left its folder before saying so.)"""
    fail(capsys, "auto", "--data", "synthetic:3", "--budget", "1m", "--out", tmp_path / "s",
         pattern="too few images .* for 5 cross-validation folds")  # fmt: skip
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/x", "a/b", "..", ".", "", "a b"])
def test_S28_recipe_step_names_are_plain_and_stay_inside_out(capsys, tmp_path, name):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"data": "digits", "steps": [{"train": name, "model": "dcnn"}]}))
    fail(capsys, "run", r, "--out", tmp_path / "out", pattern="needs a plain name")
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]  # nothing made, inside or outside


def test_a_recipe_mistake_knowable_from_the_recipe_fails_before_any_step_and_leaves_no_folder(
    capsys, tmp_path, monkeypatch
):
    """weights: naming a step failed as "file not found" after that step had trained; a soup
    of a fine-tune and its parent failed after every step before it; a recipe that failed as
    its first step began left its --out behind (mark, lock and recipe.yaml)."""
    monkeypatch.chdir(tmp_path)
    step = {"model": "dcnn", "epochs": 1}
    recipes = {
        "weights: a names a step of this recipe; to start from its run, make this step "
        "'- finetune: NAME' with 'from: a'": [{"train": "a", **step}, {"train": "b", **step, "weights": "a"}],
        "weights: nope.safetensors does not exist": [{"train": "a", **step, "weights": "nope.safetensors"}],
        r"its members start from different weights \(c is a fine-tune of a\)": [
            {"train": "a", **step}, {"finetune": "c", "from": "a"},
            {"soup": "s", "members": ["a", "c"]}],
        "no finished run or ensemble under": ["report"],
    }  # fmt: skip
    for i, (said, steps) in enumerate(recipes.items()):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump({"data": "digits", "steps": steps}))
        fail(capsys, "run", f"{i}.yaml", "--out", f"deep/out{i}", pattern=said)
        assert not (tmp_path / "deep").exists(), said  # (nor the folder above it)
    (tmp_path / "mine").mkdir()  # an empty folder the user made: kept, as it was
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"data": "digits", "steps": ["report"]}))
    fail(capsys, "run", "r.yaml", "--out", "mine", pattern="no finished run")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_S29_one_process_per_output_folder_and_a_crash_does_not_leave_it_locked(capsys, tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from transferlab import outputs\n"
         f"with outputs.lock(__import__('pathlib').Path({str(out)!r})):\n"
         "    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        fail(capsys, "train", "--data", "digits", *TINY, "--out", out,
             pattern="in use by another transferlab process")  # fmt: skip
        with pytest.raises(UserError, match="in use"):
            with outputs.lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        holder.wait()
    with outputs.lock(out):  # taken at once after the crash
        pass


# ----------------------------------------------------------------------------- 2. nothing ignored


def test_S30_the_recipe_schema_is_strict(tmp_path):
    step = recipe.parse_step({"train": {"name": "a", "model": "dcnn", "epochs": 1}}, 0)
    assert step == ("train", "a", {"model": "dcnn", "epochs": 1})  # the mapping form works
    bad = {
        "steps: 5": "non-empty 'steps' list",
        "steps: [5]": "must be a mapping",
        "steps: [{train: [a]}]": "needs a plain name",
        "steps: [{train: {model: dcnn}}]": "needs a plain name",
        "steps: [{train: _a_b_}]": "starting with a letter or digit\\), got '_a_b_'",  # pass 30
        "steps: [{report: x}]": "report takes no name",
        "steps: [{train: a, finetune: b}]": "exactly one of",
        "steps: [{train: a}, {train: a}]": "used by an earlier step",
        "steps: [{train: a}, {ensemble: e, members: [a, ghost]}]": "'ghost' is neither an earlier step \\(a\\) nor a finished run folder \\(looked for in --out by name, else as a path from the current folder\\)$",  # fmt: skip
        "steps: [{finetune: f}]": "needs 'from: RUN'",
        "steps: [{train: a, lr: nan}]": "lr must be a finite number",
        "defaults: 5\nsteps: [report]": "'defaults' must be a mapping",
        "data: 5\nsteps: [report]": "'data' must be text",
        "stepz: [report]": r"unknown recipe key 'stepz' \(did you mean steps\?\)",
        "name: ../../esc\nsteps: [report]": "must be a plain name",
        "steps:\n  - train: a\n    model: dcnn\n    model: resnet50": "'model' is given twice",
        "steps: [{auto: s, budget: 1m, seed: abc}]": "seed must be a number",
        "defaults: {seed: -1}\nsteps: [{auto: s, budget: 1m}]": "seed must be >= 0",
        # found only when their step ran, after the steps before it had trained:
        "steps: [{train: a}, {train: b, model: resnet5}]": "unknown model 'resnet5'",
        "steps: [{train: a}, {train: b, data: 'folder:/nope'}]": "dataset path does not exist",
        "steps: [{train: a}, {train: b, data: 'digts'}]": "unknown dataset kind 'digts'",
        "steps: [{train: a}, {train: b}, {ensemble: e, members: [a, b], method: sotf}]": "unknown ensemble method 'sotf'",
        "steps: [{train: a}, {train: b}, {ensemble: e, members: [a, b], tta: flp}]": "unknown --tta 'flp'",
        "steps: [{train: a}, {train: b}, {soup: s, members: [a, b], method: greddy}]": "unknown soup method 'greddy'",
        "steps: [{train: a}, {train: b}, {ensemble: e, members: [a, b]}, "
        "{ensemble: f, members: [e, a]}]": "an ensemble step is not a run",
        "steps: [{auto: s, budget: 1m}, {train: a}, {ensemble: e, members: [s, a]}]": "an auto step is a study, not a run",
        "steps: [{auto: s, budget: 1m}, {finetune: f, from: s}]": "an auto step is a study",
        "steps: [{train: report.md}]": "'report.md' is a file of the recipe's folder",
        # an empty value was read as none given: the steps ran into runs/NAME, on other data
        "out: ''\nsteps: [report]": "recipe key 'out' is empty",
        "data: digits\nsteps: [{train: a, data: ' '}]": "step 1: 'data' is empty",
        "defaults: {model: ''}\nsteps: [report]": "defaults: model is empty",
    }
    for text, message in bad.items():
        path = tmp_path / "r.yaml"
        path.write_text(text + "\n")
        with pytest.raises(UserError, match=message):
            recipe.validate(recipe.load(path), tmp_path / "out")
    path.write_text("defaults: {model: dcnn}\nsteps: [{train: a}, {finetune: f, from: a}]\n")
    recipe.validate(recipe.load(path), tmp_path / "out")  # defaults' model is the train steps'
    path.write_text(
        "defaults: &d {model: dcnn, epochs: 1}\nsteps: [{train: a, <<: *d, epochs: 2}]\n"
    )
    assert recipe.load(path)["steps"][0] == {"train": "a", "model": "dcnn", "epochs": 2}  # (a
    # YAML merge key was "could not determine a constructor"; its keys give way to the step's)
    path.write_text("data: digits\nsteps: [{train: a}]\n")
    for pair, message in {
        "steps.9.epochs": "no step 9",
        "steps.x.epochs": "steps.N.KEY",
        "steps.0": "steps.N.KEY",
        "nope": "unknown config key 'nope'",
        # pass 54 (F6): "step 1", and the user fixed steps.1 (--set counts from 0)
        "steps.0.learning_rate": r"^unknown key 'learning_rate' in step 1 \(train a; --set steps.0.learning_rate\) \(did you mean lr\?\)$",  # fmt: skip
        "steps.0.epochs": r"^step 1 \(train a; --set steps\.0\.epochs\): epochs must be a number, got 'ten'$",  # fmt: skip
        "out": "^--set out is empty: give a value, or leave it out$",  # (pass 44: "recipe key")
        "lr": "--set lr is empty",
    }.items():
        with pytest.raises(UserError, match=message):
            given = {"out": "", "lr": "", "steps.0.epochs": "ten"}.get(pair, "1")
            recipe.run(path, tmp_path / "out", {pair: given}, quiet=True)
    assert not (tmp_path / "out").exists()

    def refused(text: str, cases: dict[str, tuple[str, str]]) -> None:
        """Each --set PAIR=GIVEN refused with MESSAGE, the recipe being TEXT."""
        path.write_text(text)
        for pair, (given, message) in cases.items():
            with pytest.raises(UserError, match=message):
                recipe.run(path, tmp_path / "out", {pair: given}, quiet=True)

    # pass 60: a value --set gave every step, or a step's other key, was said as the file's
    two = "data: digits\ndefaults: {model: dcnn}\nsteps: [{train: a, freeze: 2}, {finetune: b, from: a}"  # fmt: skip
    refused(two + "]\n", {
        "freeze": ("7", r"^step 1 \(train a; --set freeze\): freeze 7 would freeze everything"),
        "steps.0.strategy": (
            "gradual",
            r"^step 1 \(train a; --set steps\.0\.strategy\): freeze 2 does not combine",
        ),
        "steps.1.from": (
            "nope",
            r"^step 2 \(finetune b; --set steps\.1\.from\): 'nope' is neither",
        ),
        "lr": ("zz", r"^--set lr: lr must be a number or auto, got 'zz'$"),
        "data": ("folder:nowhere", r"^step 1 \(train a; --set data\): .* nowhere$"),
        "steps.1.lr": ("0", r"^step 2 \(finetune b; --set steps\.1\.lr\): lr must be"),
    })  # fmt: skip
    # pass 61: --set defaults.KEY (step a has its own freeze), a report step written as a mapping
    refused(two + ", {report: {}}]\n", {
        "defaults.lr": ("x", r"^--set defaults\.lr: lr must be a number or auto, got 'x'$"),
        "defaults.freeze": ("7", r"^step 2 \(finetune b; --set defaults\.freeze\): freeze 7"),
        "steps.2.epochs": ("1", r"^--set steps\.2\.epochs: steps\.2 is a report step, which"),
    })  # fmt: skip
    # pass 62: a step written as a mapping took --set steps.N.KEY beside its mapping, refused
    # as "give its keys either inside or beside"; a short step's name was an "unknown key
    # 'name'"; a --set budget or model was said as the file's
    refused("data: digits\ndefaults: {model: dcnn}\nsteps: [{train: {name: a, epochs: 1}}, {auto: c, budget: 1m}]\n", {
        "steps.0.lr": ("-1", r"^step 1 \(train a; --set steps\.0\.lr\): lr must be > 0"),
        "steps.1.budget": ("0", r"^step 2 \(auto c; --set steps\.1\.budget\): budget: must be a"),
        "steps.0.model": ("resnt50", r"^step 1 \(train a; --set steps\.0\.model\): unknown model"),
        "steps.1.name": ("a", r"^step 2: the name 'a' is used by an earlier step, step 1; --set"),
    })  # fmt: skip
    steps = recipe.apply_overrides(recipe.load(path), {"steps.0.lr": "0.1", "steps.1.name": "d"})["steps"]  # fmt: skip
    assert steps == [{"train": {"name": "a", "epochs": 1, "lr": 0.1}}, {"auto": "d", "budget": "1m"}]  # fmt: skip
    # pass 64: steps.0.train=zz replaced the mapping (its lr went, unsaid); another kind's key
    steps = recipe.apply_overrides(recipe.load(path), {"steps.0.train": "zz", "steps.1.auto": "y"})["steps"]  # fmt: skip
    assert steps == [{"train": {"name": "zz", "epochs": 1}}, {"auto": "y", "budget": "1m"}]
    with pytest.raises(UserError, match=r"^--set steps\.0\.finetune: steps\.0 is a train step; --set changes its keys, not its kind$"):  # fmt: skip
        recipe.apply_overrides(recipe.load(path), {"steps.0.finetune": "x"})
    with pytest.raises(UserError, match=r"^--set steps\.1\.train: steps\.1 is an auto step;"):
        recipe.apply_overrides(recipe.load(path), {"steps.1.train": "x"})  # (pass 66: "a auto")
    path.write_text("data: digits\nsteps: [{train: a, schedule: sgd}]\n")  # pass 61: the file's
    for pair in ("optimizer", "steps.0.optimizer"):  # value, blamed on a --set of that value
        with pytest.raises(UserError, match=r"^step 1 \(train a\): schedule must be one of .*, got 'sgd'$"):  # fmt: skip
            recipe.run(path, tmp_path / "out", {pair: "sgd"}, quiet=True)
    path.write_text("data: digits\ndefaults: {model: dcnn}\nsteps: [{train: a, freeze: 2}, {finetune: b, from: a}]\n")  # fmt: skip
    with pytest.raises(UserError, match=r"^step 1 \(train a; --set strategy\): freeze 2 does not combine"):  # fmt: skip
        recipe.run(path, tmp_path / "out", {"strategy": "gradual", "steps.1.lr": "0.1"}, quiet=True)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_S31_resume_refuses_a_changed_config_naming_the_keys(capsys, tmp_path, folder_data):
    out = tmp_path / "r"
    argv = ["train", "--data", f"folder:{folder_data}", *TINY, "--out", out, "--quiet"]
    assert cli(*argv) == 0
    fail(capsys, *argv, "--resume", "--lr", "0.5", pattern=r"config differs \(lr: 0\.001 -> 0\.5\)")
    fail(capsys, *argv, "--resume", "--overwrite", pattern="pass one of them")
    assert cli(*argv, "--resume", "--keep-last", "3", "--num-workers", "0") == 0  # safe keys


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--momentum", "0.5"], "momentum has no effect here: it needs optimizer sgd"),
        (["--crop", "rrc", "--crop-pad", "2"], "crop_pad has no effect here"),
        (["--probe-l2", "0.1"], "probe_l2 has no effect here"),
        (["--layer-decay", "0.5"], "layer_decay has no effect here"),
        (["--head-init", "match"], "head_init has no effect here"),
        (["--schedule", "plateau", "--warmup-epochs", "1"], "warmup_epochs has no effect here"),
        # a probe has no epochs to stop or find an LR for; a trained run no probe's features
        (["--strategy", "linear-probe", "--lr", "auto"], "lr has no effect here: .*L-BFGS"),
        (
            ["--strategy", "linear-probe", "--patience", "1"],
            "patience has no effect here: it needs epochs to stop \\(",
        ),
        # TINY's epochs and batch size, and these: a probe's head is fitted by L-BFGS (its
        # results were bit-identical with any of them)
        (
            ["--strategy", "linear-probe", "--crop", "rrc", "--label-smoothing", "0.1"],
            "epochs has no effect with strategy linear-probe: it fits its head by L-BFGS",
        ),
        (["--feature-engine", "torch"], "feature_engine has no effect here: it needs strategy"),
        (
            [
                "--strategy",
                "linear-probe",
                "--feature-engine",
                "onnxruntime",
                "--precision",
                "bf16",
            ],
            "feature_engine onnxruntime computes in fp32, not precision bf16",
        ),  # (it ran fp32)
    ],
)
def test_S31_an_option_that_would_have_no_effect_is_refused(capsys, tmp_path, extra, message):
    fail(
        capsys, "train", "--data", "digits", *TINY, *extra, "--out", tmp_path / "r", pattern=message
    )
    assert cli("--quiet", "train", "--data", "digits", "--model", "dcnn", "--stem", "default",
               "--epochs", "1", "--limit", "60", "--out", tmp_path / "ok") == 0  # a no-op default  # fmt: skip
    capsys.readouterr()  # (its notes: --flip on digits)
    fail(capsys, "train", "--data", "digits", "--model", "dcnn", "--stem", "small",
         "--out", tmp_path / "r", pattern="stem has no effect here")  # fmt: skip
    fail(capsys, "lr-find", "--data", "digits", "--model", "dcnn", "--epochs", "50",
         "--out", tmp_path / "r", pattern="unrecognized arguments: --epochs")  # fmt: skip


def test_a_val_fraction_for_data_that_bring_their_own_val_is_refused(capsys, tmp_path):
    """`--val-fraction 0.3` on a folder with val/ or on shards carved nothing, yet was recorded
    as the run's, and `evaluate --data SOURCE --split val` carved 30% by it: another val."""
    from conftest import make_folder

    root = make_folder(tmp_path / "d", ["a", "b"], 6, subsets=("train", "val", "test"))
    rows = [f"{p},{p.parent.name},{p.parent.parent.name}" for p in sorted(root.glob("*/*/*.png"))]
    (tmp_path / "l.csv").write_text("file_name,label,split\n" + "\n".join(rows) + "\n")
    assert cli("--quiet", "data", "shard", f"folder:{root}", "--out", tmp_path / "w") == 0
    for spec in (f"folder:{root}", f"csv:{tmp_path / 'l.csv'}", f"wds:{tmp_path / 'w'}"):
        fail(capsys, "train", "--data", spec, *TINY, "--val-fraction", "0.3", "--out",
             tmp_path / "r", pattern="val_fraction has no effect here: it needs data with no val split of their own, and [^;]* has one \\(")  # fmt: skip
        assert not (tmp_path / "r").exists()
    fail(capsys, "data", "shard", f"folder:{root}", "--val-fraction", "0.3", "--out",
         tmp_path / "w2", pattern="--val-fraction has no effect here: .*a val split of its own")  # fmt: skip
    # a fine-tune takes its parent's 0.3 (carved from data of no val), recorded: an ensemble
    # with a run of the default was refused "weighted" (split otherwise, val trained a member)
    flat = make_folder(tmp_path / "flat", ["a", "b"], 10, subsets=(), first=500)
    assert cli("--quiet", "train", "--data", f"folder:{flat}", *TINY, "--val-fraction", "0.3",
               "--out", tmp_path / "p") == 0  # fmt: skip
    for argv in (["finetune", "--from", tmp_path / "p", "--epochs", "1", "--out", tmp_path / "ft"],
                 ["train", *TINY, "--out", tmp_path / "t"]):  # fmt: skip
        assert cli("--quiet", *argv, "--data", f"folder:{root}") == 0
    ens = [tmp_path / "t", tmp_path / "ft", "--method", "weighted", "--out", tmp_path / "e"]
    assert cli("--quiet", "ensemble", *ens) == 0
    assert "split the data otherwise" not in capsys.readouterr().err
    shutil.rmtree(root / "val")  # none of its own: carved by it
    assert cli("--quiet", "train", "--data", f"folder:{root}", *TINY, "--val-fraction", "0.3",
               "--out", tmp_path / "r") == 0  # fmt: skip


def test_a_fine_tune_refuses_architecture_options_its_parent_fixes(capsys, run_copy, tmp_path):
    """`finetune --pool-stages 2` (or `--stem small`) was accepted and recorded in its config,
    while the run kept its parent's architecture: an option that did nothing, without a word."""
    for flag, value in (("--pool-stages", "2"), ("--stem", "small")):
        fail(capsys, "finetune", "--from", run_copy, flag, value, "--out", tmp_path / "ft",
             pattern=f"{flag} {value} does not match the run .*whose weights fix")  # fmt: skip
        assert not (tmp_path / "ft").exists()


def test_S31_a_finetune_step_cannot_swap_its_parent_weights(run_copy, tmp_path):
    from transferlab import strategies

    for key, value in (("weights", "imagenet"), ("model", "resnet18")):
        with pytest.raises(UserError, match=f"{key} does not apply to a fine-tune"):
            strategies.finetune_config(run_copy, {key: value})
    r = tmp_path / "r.yaml"
    r.write_text(f"steps:\n  - finetune: f\n    from: {run_copy}\n    weights: {run_copy}\n")
    with pytest.raises(UserError, match="weights does not apply to a fine-tune"):
        recipe.run(r, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_S31_a_finished_recipe_step_with_other_options_is_refused(capsys, tmp_path, folder_data):
    r = tmp_path / "r.yaml"
    r.write_text(
        f"data: folder:{folder_data}\ndefaults: {{model: test_resnet, input_size: 24, "
        "epochs: 1, batch_size: 16}\nsteps:\n  - train: a\n"
    )
    assert cli("--quiet", "run", r, "--out", tmp_path / "out") == 0
    capsys.readouterr()
    fail(capsys, "run", r, "--out", tmp_path / "out", "--set", "epochs=2",
         pattern=r"a is finished but was made with other options \(epochs: 1 -> 2\)")  # fmt: skip


def test_S31_options_that_do_not_apply_are_refused(capsys, run_copy, tmp_path):
    other = tmp_path / "runs" / "b"
    shutil.copytree(run_copy, other)
    assert cli("--quiet", "ensemble", run_copy, other, "--out", tmp_path / "ens") == 0
    capsys.readouterr()
    fail(capsys, "evaluate", tmp_path / "ens", "--tta", "flip", pattern="--tta flip does not apply")
    image = tmp_path / "x.png"
    make_image(0, 0).save(image)
    fail(capsys, "predict", tmp_path / "ens", image, "--tta", "flip", pattern="does not apply")
    assert cli("--quiet", "predict", tmp_path / "ens", image, "--tta", "none") == 0  # as built
    capsys.readouterr()
    fail(capsys, "ensemble", run_copy, other, "--out", tmp_path / "ens",
         pattern="already exists: pass --overwrite")  # fmt: skip
    assert (
        cli("--quiet", "ensemble", run_copy, other, "--out", tmp_path / "ens", "--overwrite") == 0
    )


# ----------------------------------------------------------------------------- 3. tied to inputs


def test_S32_an_ensemble_refuses_a_member_that_changed(capsys, run_copy, trained_run, tmp_path):
    other = tmp_path / "runs" / "b"
    shutil.copytree(run_copy, other)
    ens = tmp_path / "ens"
    assert cli("--quiet", "ensemble", run_copy, other, "--out", ens) == 0
    info = json.loads((ens / "ensemble.json").read_text())
    assert all(m["weights_sha256"] for m in info["members"])
    # member b is retrained: new weights, and a meta.json that records them
    from safetensors.torch import load_file, save_file

    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(other / "model.safetensors").items()}  # fmt: skip
    save_file(
        state, str(other / "model.safetensors"), metadata={"arch": "test_resnet", "classes": "[]"}
    )
    meta = checkpoint.read_meta(other)
    meta["weights_sha256"] = checkpoint.sha256(other / "model.safetensors")
    checkpoint.write_json(other / "meta.json", meta)
    capsys.readouterr()
    fail(capsys, "evaluate", ens, pattern=r"member .*b changed since ensemble .*ens was built")
    image = tmp_path / "x.png"
    make_image(0, 0).save(image)
    fail(capsys, "predict", ens, image, pattern="changed since ensemble")
    assert cli("report", tmp_path) == 0  # the report marks it, and does not call it the best
    assert "ens (stale: a member changed; rebuild it)" in (tmp_path / "report.md").read_text()
    assert "best ensemble" not in (tmp_path / "report.md").read_text()
    shutil.rmtree(other)  # a member gone altogether: still a stale row, not an error
    assert cli("report", tmp_path) == 0  # (pass 46: said as "changed", which it had not)
    assert "ens (stale: a member is gone; put it back or rebuild it)" in (tmp_path / "report.md").read_text()  # fmt: skip


def test_S33_a_run_records_its_data_absolutely_and_evaluate_says_when_data_differ(
    capsys, tmp_path, monkeypatch
):
    data_dir = make_folder(tmp_path / "d", ["a", "b"], 12)
    monkeypatch.chdir(tmp_path)
    assert cli("--quiet", "train", "--data", "folder:d", *TINY, "--out", "r") == 0
    meta = checkpoint.read_meta(tmp_path / "r")
    assert meta["data"] == f"folder:{data_dir.resolve()}" and len(meta["data_fingerprint"]) == 16
    monkeypatch.chdir(tmp_path / "r")  # another working folder: the run still finds its data
    capsys.readouterr()
    assert cli("evaluate", ".") == 0
    assert "note:" not in capsys.readouterr().err  # notes go to stderr (`--json | tail -1`)
    other = make_folder(tmp_path / "d2", ["a", "b"], 12)
    assert cli("evaluate", ".", "--data", f"folder:{other}") == 0
    assert f"note: scored on folder:{other}; the run was trained on folder:{data_dir}" in (
        capsys.readouterr().err
    )
    (data_dir / "test" / "a" / "0.png").unlink()
    assert cli("evaluate", ".") == 0
    assert "changed since the run was trained" in capsys.readouterr().err


def test_an_ensemble_of_runs_whose_data_files_changed_says_so_and_fits_nothing_on_them(
    capsys, tmp_path, monkeypatch
):
    """Images added to a folder without a test split after its members trained: the test and
    val splits are carved again and held images they trained on (4 of 10), and ensemble,
    evaluate of the ensemble and report said nothing (evaluate of one member did)."""
    make_folder(tmp_path / "d", ["a", "b"], 12, subsets=())
    monkeypatch.chdir(tmp_path)
    for run, seed in (("r1", "0"), ("r2", "1")):
        assert (
            cli("--quiet", "train", "--data", "folder:d", *TINY, "--seed", seed, "--out", run) == 0
        )
    make_folder(tmp_path / "more", ["a", "b"], 4, subsets=(), first=12)
    for c in ("a", "b"):  # the user adds 4 images to each class
        for i in range(4):
            shutil.copy(tmp_path / "more" / c / f"{i}.png", tmp_path / "d" / c / f"new{i}.png")
    capsys.readouterr()
    assert cli("ensemble", "r1", "r2", "--method", "soft", "--out", "e") == 0
    said = "changed since r1, r2 were trained"
    assert said in capsys.readouterr().err
    assert any(
        said in n for n in json.loads((tmp_path / "e" / "ensemble.json").read_text())["notes"]
    )
    assert cli("evaluate", "e") == 0 and said in capsys.readouterr().err
    assert cli("--quiet", "report", ".") == 0
    assert "e (its data's files changed since training)" in (tmp_path / "report.md").read_text()
    assert cli("ensemble", "r1", "r2", "--method", "weighted", "--out", "w") == 2
    assert said in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_overwrite_removes_only_files_whose_content_is_transferlabs(tmp_path, monkeypatch):
    """A user's notes saved as export/model.onnx and a photo named confusion.png were deleted
    by train --overwrite (matched by name), where export --overwrite checks the content."""
    from PIL import Image

    make_folder(tmp_path / "d", ["a", "b"], 12)
    monkeypatch.chdir(tmp_path)
    train = ["--quiet", "train", "--data", "folder:d", *TINY, "--out", "r"]
    assert cli(*train) == 0
    assert cli("--quiet", "export", "r", "--format", "torchscript") == 0
    assert cli(*train, "--overwrite") == 0  # its own export and pictures: replaced
    assert not (tmp_path / "r" / "export").exists()
    for mine in ("export/model.onnx", "confusion.png"):
        (tmp_path / "r" / "export").mkdir(exist_ok=True)
        if mine.endswith(".png"):
            Image.new("RGB", (8, 8), "red").save(tmp_path / "r" / mine)
        else:
            (tmp_path / "r" / mine).write_text("my notes")
        assert cli(*train, "--overwrite") == 2
        assert (tmp_path / "r" / mine).exists()
        (tmp_path / "r" / mine).unlink()


def test_a_torchscript_export_given_as_weights_is_one_line_naming_what_to_give(
    tmp_path, monkeypatch, capsys
):
    """It printed torch's warning and its advice to set weights_only=False (no flag does)."""
    make_folder(tmp_path / "d", ["a", "b"], 12)
    monkeypatch.chdir(tmp_path)
    assert cli("--quiet", "train", "--data", "folder:d", *TINY, "--out", "r") == 0
    assert cli("--quiet", "export", "r", "--format", "torchscript") == 0
    capsys.readouterr()
    for trust in ([], ["--trust-pickle"]):
        argv = ["train", "--data", "folder:d", *TINY, "--weights", "r/export/model.pt", *trust]
        assert cli(*argv, "--out", "w") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "r/export/model.pt is a TorchScript program" in err
        assert "weights_only" not in err and not (tmp_path / "w").exists()


def test_S34_a_folders_native_size_is_not_decided_by_one_odd_file(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"], 10, size=40)
    Image.new("RGB", (1, 1)).save(root / "train" / "a" / "!first.png")  # sorts first
    Image.new("RGB", (4000, 3000)).save(root / "train" / "b" / "!huge.png")
    assert data.load(f"folder:{root}").native_size == 40


def test_S34_one_class_is_refused_and_classes_missing_from_a_split_are_listed(tmp_path):
    root = make_folder(tmp_path / "one", ["cat"], 10)
    with pytest.raises(UserError, match="1 class \\(cat\\); a classifier needs at least two"):
        data.load(f"folder:{root}")
    # scoring on it (evaluate --data) was refused by that training rule; now the reason is its
    # own: restricted to the data's one class, every image would be right
    with pytest.raises(UserError, match="holds one class \\(cat\\): .* every image would be right; .*: transferlab predict RUN "):  # fmt: skip
        data.load(f"folder:{root}", scoring=True)
    root = make_folder(tmp_path / "few", ["cat", "dog"], 10, subsets=("",))
    (root / "wolf").mkdir()
    make_image(2, 0).save(root / "wolf" / "0.png")
    ds = data.load(f"folder:{root}")
    assert any("have no" in n and "wolf" in n for n in ds.notes), ds.notes
    twins = make_folder(tmp_path / "twins", ["Cat", "cat", "dog"], 5, subsets=("",))
    assert "class names that differ only in case are separate classes: Cat, cat" in data.load(f"folder:{twins}").notes  # fmt: skip
    notes = data.load("digits", limit=5).notes  # (it blamed "too few images")
    assert "5 class(es) have no train image (--limit 5, under the 10 classes): " in " ".join(notes)
    # class folders a level too deep: said as such ("class folder has no images" said neither)
    deep = make_folder(tmp_path / "deep" / "photos", ["cat", "dog"], 5, subsets=("",)).parent
    with pytest.raises(UserError, match=f"holds one folder, photos, which holds folders \\(cat, dog\\): if they are the class folders, point --data at {deep / 'photos'}$"):  # fmt: skip
        data.load(f"folder:{deep}")
    below = make_folder(tmp_path / "below", ["cat/imgs", "dog/imgs"], 5, subsets=("",))
    with pytest.raises(UserError, match="cat has no images, only folders \\(imgs\\): .* not below; move them up"):  # fmt: skip
        data.load(f"folder:{below}")


def test_S34_skipped_class_folders_and_files_are_listed(capsys, tmp_path):
    root = make_folder(tmp_path / "d", ["_background", "a", "b"], 10, subsets=("",))
    for hidden in ("__MACOSX", ".ipynb_checkpoints"):  # never classes; _background is one
        (root / hidden).mkdir()
        make_image(0, 0).save(root / hidden / "x.png")
    (root / "a" / "readme.txt").write_text("not an image")
    make_image(0, 0).save(root / "a" / "._0.png")  # macOS's resource fork: hidden, not "no image"
    (root / "b" / "more").mkdir()  # its images were left out without a word
    make_image(0, 0).save(root / "b" / "more" / "y.png")
    ds = data.load(f"folder:{root}")
    assert ds.classes == ["_background", "a", "b"]
    assert any("__MACOSX" in n and ".ipynb_checkpoints" in n for n in ds.notes), ds.notes
    assert any("readme.txt" in n and "not images" in n for n in ds.notes), ds.notes
    assert any("a/._0.png" in n and "hidden" in n for n in ds.notes), ds.notes
    assert any("1 folder(s)" in n and "b/more" in n and "inside class" in n for n in ds.notes)
    assert cli("train", "--data", f"folder:{root}", *TINY, "--out", tmp_path / "r") == 0
    assert "skipped hidden folder(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 4. bad values


BAD_VALUES = [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "1e309"), ("--lr", "1e39"),
    ("--label-smoothing", "1.5"), ("--label-smoothing", "-0.1"), ("--batch-size", "1"),
    ("--batch-size", "0"), ("--eval-batch-size", "0"), ("--epochs", "0"), ("--epochs", "1e309"),
    ("--crop-pad", "100"), ("--crop-pad", "-5"), ("--num-workers", "-3"), ("--patience", "-1"),
    ("--limit", "0"), ("--val-fraction", "1"), ("--val-fraction", "nan"), ("--warmup-epochs", "99"),
    ("--momentum", "5"), ("--layer-decay", "0"), ("--seed", "-1"), ("--weight-decay", "-1"),
    ("--probe-l2", "0"), ("--keep-last", "0"), ("--input-size", "4"), ("--snapshots", "-2"),
    ("--checkpoint-every", "-1"), ("--input-size", "2.5"), ("--channels", "2"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_S35_every_bad_numeric_value_is_one_line_and_exit_2(capsys, tmp_path, flag, value):
    argv = ["train", "--data", "digits", "--model", "dcnn", "--input-size", "24", flag, value]
    fail(capsys, *argv, "--out", tmp_path / "r", pattern=flag[2:].replace("-", "_"))
    assert not (tmp_path / "r").exists()


def test_data_that_leaves_one_training_image_or_gives_digits_a_path_is_one_line(capsys, tmp_path):
    """Hostile pass 42: `--limit 1` ended in BatchNorm's traceback and a half-made folder (F4);
    `--data digits:~/mnist` trained on the bundled 8x8 digits without a word (F2)."""
    tiny = ["--model", "dcnn", "--input-size", "16", "--no-flip", "--out", tmp_path / "r"]
    fail(capsys, "train", "--data", "digits", "--limit", "1", *tiny, pattern="^transferlab train: error: the training split holds 1 image: a model needs at least 2 to train on")  # fmt: skip
    fail(capsys, "train", "--data", "digits:/data/mnist", *tiny, pattern="^transferlab train: error: 'digits:/data/mnist': digits is scikit-learn's bundled 8x8 digits and takes no path")  # fmt: skip
    fail(capsys, "train", "--data", "digits:", *tiny, pattern="^transferlab train: error: 'digits:': digits is scikit-learn's bundled 8x8 digits and takes no path")  # fmt: skip
    assert not (tmp_path / "r").exists()  # pass 47 (F5): digits: was recorded as other data
    from transferlab import data

    assert data.load("synthetic:", limit=20).spec == "synthetic" == data.load("synthetic", limit=20).spec  # fmt: skip


def test_a_run_refused_after_its_data_loaded_says_one_line(capsys, tmp_path):
    """Hostile pass 47 (F8): the data's notes and the run's splits and header lines were said,
    then --weights imagenet of dcnn, or an --out inside the data, refused."""
    make_folder(tmp_path / "d", ["a", "b"], 6, subsets=("",))
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir()  # (a note: skipped hidden folder)
    tiny = ["--data", f"folder:{tmp_path / 'd'}", "--model", "dcnn", "--input-size", "16"]
    for more in (["--weights", "imagenet", "--out", tmp_path / "r"], ["--out", tmp_path / "d" / "a" / "r"]):  # fmt: skip
        for command in ("train", "lr-find"):
            fail(capsys, command, *tiny, *more, pattern=r"^transferlab [a-z-]+: error: (dcnn has no ImageNet|--out \S+ overlaps the data)")  # fmt: skip
    shutil.copytree(tmp_path / "d", tmp_path / "e")  # pass 48 (F3): an unreadable image too
    for i in range(6):  # (some in train, which lr-find decodes alone)
        (tmp_path / "e" / "ab"[i % 2] / f"bad{i}.png").write_text("not a png")
    for command in ("train", "lr-find"):
        fail(capsys, command, *tiny[2:], "--data", f"folder:{tmp_path / 'e'}", "--out", tmp_path / "r", pattern=r"error: \d unreadable image")  # fmt: skip
    for path in (tmp_path / "e").rglob("*.png"):  # pass 52 (F3): --skip-bad-images left no
        path.write_text("not a png")  # image: a ZeroDivisionError, a half-made folder
    for command in ("train", "lr-find"):
        fail(capsys, command, *tiny[2:], "--data", f"folder:{tmp_path / 'e'}", "--skip-bad-images", "--out", tmp_path / "none", pattern=r"error: too few images are readable once --skip-bad-images left out the others \((train 0, val 0, test 0; train needs 2, val and test 1|train 0; train needs 2)\)")  # fmt: skip
        assert not (tmp_path / "none").exists()
    code = main(["train", *map(str, tiny), "--epochs", "1", "--out", str(tmp_path / "ok")])
    out, err = capsys.readouterr()  # (said once it is not refused)
    assert code == 0 and "skipped hidden folder(s)" in err and "[ok] dcnn on folder:" in out, (out, err)  # fmt: skip


def test_resume_with_no_whole_checkpoint_is_refused_before_the_run_says_a_line(capsys, tmp_path):  # fmt: skip
    """Hostile pass 48 (F5): five progress lines and a warning came before the refusal."""
    argv = ["train", "--data", "digits", "--model", "dcnn", "--input-size", "8", "--epochs", "1", "--limit", "40", "--no-flip", "--quiet", "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 0
    for f in (tmp_path / "r" / "state").iterdir():
        f.write_text("junk")
    capsys.readouterr()
    assert main([a for a in argv if a != "--quiet"] + ["--resume"]) == 2
    out, err = capsys.readouterr()  # (no progress line, no warning)
    assert out == "" and re.fullmatch(rf"transferlab train: error: --resume: no valid checkpoint to resume from: \S+last.pt does not match its sha256 manifest \(corrupt\); the run finished: score it with transferlab evaluate {tmp_path / 'r'}\n", err), (out, err)  # fmt: skip
    (tmp_path / "r" / "meta.json").unlink()  # pass 49 (F3, F6): a stopped run's, no advice;
    fail(capsys, *argv, "--resume", pattern=r"\(corrupt\); to train it anew, pass --overwrite instead of --resume$")  # fmt: skip
    from transferlab import checkpoint  # report advised the --resume refused

    assert checkpoint.unfinished(tmp_path / "r") == f"stopped, and no checkpoint of it is whole: train it anew with transferlab train --out {tmp_path / 'r'} --overwrite and its settings"  # fmt: skip
    assert main([*argv, "--overwrite"]) == 0  # (the advice, followed)


def test_S35_unwritable_paths_are_refused_up_front(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    argv = ["train", "--data", "digits", *TINY]
    fail(capsys, *argv, "--out", tmp_path / "file", pattern="is a file")
    fail(capsys, *argv, "--out", tmp_path / "file" / "r", pattern="is a file")
    fail(capsys, *argv, "--out", "/proc/x", pattern="cannot (create|write)")
    fail(capsys, *argv, "--out", tmp_path / "r", "--log-json", tmp_path / "missing" / "log.jsonl",
         pattern="folder .*missing does not exist")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_S36_a_corrupt_cache_entry_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"], 6, subsets=("",))
    split = data.load(f"folder:{root}").splits["train"]
    cache = tmp_path / "cache"
    first = np.array(decoding.decode(split, 16, 3, cache=cache))
    (entry,) = cache.glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match="damaged: rebuilding"):
        again = np.array(decoding.decode(split, 16, 3, cache=cache))
    np.testing.assert_array_equal(first, again)
    np.save(entry, np.zeros((3, 16, 16, 3), np.uint8))  # whole, but not what was decoded
    with pytest.warns(UserWarning, match="damaged: rebuilding"):
        np.testing.assert_array_equal(first, np.array(decoding.decode(split, 16, 3, cache=cache)))
    (info,) = cache.glob("*.json")
    info.write_text("{not json")
    with pytest.warns(UserWarning, match="damaged"):
        np.testing.assert_array_equal(first, np.array(decoding.decode(split, 16, 3, cache=cache)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [1]\n" + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                                  for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "steps: [*i]\n",
         "expands to more than"),
        ("steps: &s [report, *s]\n", "refers to itself|expands to more than"),
        ("name: caf\xe9\nsteps: [report]\n", "not UTF-8"),
        ("steps: [report\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_S37_a_hostile_recipe_file_is_refused_fast(capsys, tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode("latin-1"))
    t0 = time.time()
    fail(capsys, "run", path, "--out", tmp_path / "out", pattern=message)
    assert time.time() - t0 < 5 and not (tmp_path / "out").exists()


def test_S37_a_huge_recipe_is_refused_before_reading(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: [report]\n# " + "x" * recipe.MAX_BYTES)
    fail(capsys, "run", path, pattern="a recipe is at most")


def test_S38_the_python_api_raises_user_error_with_the_same_messages(tmp_path):
    import transferlab

    with pytest.raises(UserError, match="lr must be a finite number"):
        transferlab.train(tmp_path / "r", data="digits", model="dcnn", lr=float("nan"))
    with pytest.raises(UserError, match="batch_size must be >= 2"):
        transferlab.train(tmp_path / "r", data="digits", model="dcnn", batch_size=1)
    with pytest.raises(UserError, match="unknown ensemble method"):
        transferlab.ensemble([tmp_path / "a", tmp_path / "b"], method="avg", out=tmp_path / "e")
    assert not (tmp_path / "r").exists()


def test_a_cache_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    """A study timed its candidates and failed each one ("cannot create the decode cache"),
    leaving its folder behind; a run claimed its folder first."""
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 4, subsets=("",))
    train = ["train", "--model", "dcnn", "--input-size", "16", "--epochs", "1"]
    for argv in (["auto", "--budget", "5m"], train):
        out = tmp_path / argv[0]
        args = [*argv, "--data", f"folder:{photos}", "--cache-dir", str(note), "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"--cache-dir {note} is a file" in err and len(err.splitlines()) == 1
        assert not out.exists()
    assert note.read_text() == "keep me"


def test_a_cache_dir_in_the_run_or_in_another_run_is_refused_before_anything_is_made(
    tmp_path, capsys, folder_data
):
    """--cache-dir = --out (or inside it) left a folder of cache files that every retry,
    --overwrite too, refused as "not a run folder"; --cache-dir in another run wrote into it,
    and that run's --overwrite was refused from then on."""
    train = ["train", "--data", f"folder:{folder_data}", "--model", "dcnn", "--input-size", "16",
             "--epochs", "1", "--limit", "20", "--quiet"]  # fmt: skip
    assert main([*train, "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "base").iterdir())
    for cache, out, says in (
        ("new", "new", "is inside --out"),
        ("new/cache", "new", "is inside --out"),
        ("base", "new", "is inside the transferlab run folder"),
        ("base/cache", "new", "is inside the transferlab run folder"),
    ):
        assert (
            main([*train, "--cache-dir", str(tmp_path / cache), "--out", str(tmp_path / out)]) == 2
        )
        err = capsys.readouterr().err
        assert says in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == before


def test_a_cache_named_by_the_environment_or_a_recipe_is_checked_before_anything_runs(
    tmp_path, capsys, monkeypatch
):
    """$TRANSFERLAB_CACHE a file: a run claimed its folder and a study spent 24 s of its budget
    before failing; a recipe's cache_dir a file failed at its step, after the steps before it."""
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 4, subsets=("",))
    train = ["train", "--model", "dcnn", "--input-size", "16", "--epochs", "1"]
    with monkeypatch.context() as env:
        env.setenv("TRANSFERLAB_CACHE", str(note / "cache"))
        for argv in (["auto", "--budget", "5m"], train):
            out = tmp_path / argv[0]
            assert main([*argv, "--data", f"folder:{photos}", "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert f"$TRANSFERLAB_CACHE {note / 'cache'}: {note} is a file" in err
            assert len(err.splitlines()) == 1 and not out.exists()
        env.setenv("TRANSFERLAB_CACHE", str(photos / "cat"))  # (6 .npy/.json files among the
        for argv in (["auto", "--budget", "5m"], train):  # cat images, read as not images)
            out = tmp_path / argv[0]
            assert main([*argv, "--data", f"folder:{photos}", "--out", str(out)]) == 2
            assert "$TRANSFERLAB_CACHE" in capsys.readouterr().err and not out.exists()
        assert sorted(p.suffix for p in (photos / "cat").iterdir()) == [".png"] * 4
        env.setenv("TRANSFERLAB_CACHE", "off")  # no cache: nothing to check
        assert main([*train, "--data", "digits", "--out", str(tmp_path / "off")]) == 0
    for kind, keys in (("auto", "budget: 5m"), ("train", "model: dcnn")):
        recipe = tmp_path / f"{kind}.yaml"
        recipe.write_text(
            f"data: folder:{photos}\nsteps:\n  - train: first\n    model: dcnn\n"
            f"  - {kind}: second\n    {keys}\n    cache_dir: {note}\n"
        )
        assert main(["run", str(recipe), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"the cache_dir of step 2 ({kind} second) {note} is a file" in err
        assert not (tmp_path / "r").exists()
    assert note.read_text() == "keep me"


def test_a_cache_setting_that_names_no_folder_is_refused_and_off_is_any_case(
    tmp_path, capsys, monkeypatch
):
    """`--cache-dir ''` read as the current folder beside the data and as the default cache
    elsewhere; ' ' and OFF made folders of those names; evaluate, ensemble and soup used a bad
    $TRANSFERLAB_CACHE raw ("File exists", after an ensemble or soup had claimed its folder)."""
    monkeypatch.chdir(tmp_path)
    train = ["train", "--data", "digits", "--model", "dcnn", "--input-size", "16", "--epochs",
             "1", "--limit", "60", "--quiet"]  # fmt: skip
    for blank in ("", " "):
        fail(capsys, *train, "--out", "r", "--cache-dir", blank, pattern="--cache-dir is empty")
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"data: digits\nsteps:\n  - train: a\n    cache_dir: '{blank}'\n")
        fail(
            capsys,
            "run",
            recipe,
            "--out",
            "rr",
            pattern=r"cache_dir of step 1 \(train a\) is empty",
        )
    for i, word in enumerate(("OFF", "None", " off ")):
        assert main([*train, "--out", f"r{i}", "--cache-dir", word]) == 0
    capsys.readouterr()  # (their notes: --flip on digits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "r0", "r1", "r2"]
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setenv("TRANSFERLAB_CACHE", "afile")
    for argv in (["evaluate", "r0"], ["ensemble", "r0", "r1", "--out", "e"],
                 ["soup", "r0", "r1", "--out", "s"]):  # fmt: skip
        fail(capsys, *argv, pattern=r"\$TRANSFERLAB_CACHE afile is a file, not a folder")
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_a_broken_link_on_the_way_to_out_and_an_empty_log_name_are_named(tmp_path, capsys):
    """`--out dang/x` under a broken link said "cannot create dang/x: File exists";
    `--log-json ''` trained without a log and without a word."""
    (tmp_path / "dang").symlink_to(tmp_path / "nowhere")
    train = ["train", "--data", "digits", "--model", "dcnn", "--input-size", "16"]
    fail(capsys, *train, "--out", tmp_path / "dang" / "x", pattern=r"dang is a broken link \(to ")
    fail(capsys, *train, "--out", tmp_path / "r", "--log-json", "", pattern="--log-json is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dang"]


def test_a_blank_value_is_refused_before_anything_is_made(capsys, run_copy, tmp_path, monkeypatch):
    """`--out "$DIR"` with DIR unset: pathlib's "" is the current folder, and an empty one became
    the run; `--out ' '` made a folder named " "."""
    (work := tmp_path / "w").mkdir()
    monkeypatch.chdir(work)
    train = ["train", "--data", "digits", *TINY]
    for argv, said in (([*train, "--out", ""], "--out is empty"),
                       ([*train, "--out= "], "--out is empty"),
                       (["train", "--data", "", *TINY, "--out", "r"], "--data is empty"),
                       (["ensemble", run_copy, "", "--out", "e"], "an argument is empty"),
                       (["models", "--offline", ""], "error: an argument is empty"),  # pass 45: "--offline"
                       (["soup", run_copy, run_copy, "--out", "  "], "--out is empty"),
                       (["data", "shard", "digits", "--out", ""], "--out is empty"),
                       (["evaluate", run_copy, "--tta", ""], r"--tta is empty \(''\): give it a value \(see --help\)$")):  # fmt: skip
        fail(capsys, *argv, pattern=said)
    assert list(work.iterdir()) == []


def test_a_recipe_s_defaults_model_is_the_train_steps_and_its_out_expands_home(
    tmp_path, monkeypatch
):
    """`defaults: {model: ...}` (or --set model=) refused every finetune step, which sets no
    model; `out: ~/x` made a folder named ~ in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(
        "data: digits\nout: ~/x\ndefaults: {model: dcnn, epochs: 1, limit: 60}\n"
        "steps: [{train: a}, {finetune: f, from: a}]\n"
    )
    assert recipe.run(path, quiet=True) == tmp_path / "home" / "x"
    assert checkpoint.is_run(tmp_path / "home" / "x" / "f") and not (tmp_path / "~").exists()


def test_a_recipe_reuses_a_fine_tune_whose_parent_moved_when_its_weights_are_the_same(tmp_path):
    """Hostile pass 32: a finished fine-tune step whose outside parent moved (the recipe's
    `from:` edited to the new place) was "made with other options (weights: 'P' -> 'Q')"."""
    head = "data: digits\ndefaults: {model: dcnn, epochs: 1, limit: 60, input_size: 16}\nsteps:\n"
    (tmp_path / "p.yaml").write_text(head + "  - {train: p}\n")
    parent = recipe.run(tmp_path / "p.yaml", tmp_path / "a", quiet=True) / "p"
    (tmp_path / "f.yaml").write_text(head + f"  - {{finetune: ft, from: {parent}}}\n")
    ft = recipe.run(tmp_path / "f.yaml", tmp_path / "b", quiet=True) / "ft" / "model.safetensors"
    made = ft.stat().st_mtime_ns
    parent.rename(tmp_path / "moved")
    (tmp_path / "f.yaml").write_text(head + f"  - {{finetune: ft, from: {tmp_path / 'moved'}}}\n")
    recipe.run(tmp_path / "f.yaml", tmp_path / "b", quiet=True)  # the same weights: skipped
    assert ft.stat().st_mtime_ns == made


def test_a_fine_tune_of_a_run_retrained_outside_the_recipe_says_its_parent_changed(tmp_path):
    """A recipe's fine-tune of a run folder retrained since with another --seed was refused as
    "made with other options (seed: 0 -> 7)", options the user never changed in the recipe
    (it inherits them from its parent); the cause is the parent (hostile pass 36, F3)."""
    from transferlab import trainer

    from conftest import tiny_cfg

    parent = tmp_path / "p"
    trainer.fit(tiny_cfg("digits", limit=60, epochs=1), parent, quiet=True)
    path = tmp_path / "r.yaml"
    path.write_text(f"data: digits\ndefaults: {{limit: 60}}\nsteps:\n  - {{finetune: ft, from: {parent}, epochs: 1}}\n")  # fmt: skip
    out = recipe.run(path, tmp_path / "out", quiet=True)
    trainer.fit(tiny_cfg("digits", limit=60, epochs=1, seed=7), parent, quiet=True, overwrite=True)
    with pytest.raises(UserError, match=f"ft is finished but was made from {parent} as it was before \\(other weights now\\)"):  # fmt: skip
        recipe.run(path, out, quiet=True)
    arch = checkpoint.read_meta(out / "ft")["arch"]  # pass 37, F9: replaced by another model
    trainer.fit(tiny_cfg("digits", limit=60, epochs=1, model="dcnn", input_size=16), parent, quiet=True, overwrite=True)  # fmt: skip
    with pytest.raises(UserError, match=f"as it was before \\(other weights now, of dcnn where it is {arch}\\)"):  # fmt: skip
        recipe.run(path, out, quiet=True)


def test_a_recipe_reuses_a_fine_tune_or_soup_only_if_made_from_its_runs_as_they_are(
    tmp_path, capsys
):
    """A parent step changed (and, as told, deleted) was trained anew while its fine-tune,
    made from the old one, was skipped and reported "from a"; a changed fine-tune step was
    refused only after the steps before it had trained. Both are refused before step 1."""
    path = tmp_path / "r.yaml"
    text = (
        "data: digits\ndefaults: {model: dcnn, epochs: 1, limit: 60, input_size: 16}\nsteps:\n"
        "  - {train: a, lr: 0.003}\n  - {finetune: ft, from: a, lr: 0.0003}\n"
        "  - {finetune: ft2, from: a, lr: 0.0001}\n"
        "  - {soup: s, members: [ft, ft2], method: uniform}\n"
    )
    path.write_text(text)
    out = recipe.run(path, tmp_path / "out", quiet=True)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    path.write_text(text.replace("lr: 0.0003", "lr: 0.0005"))  # the fine-tune step changed
    with pytest.raises(UserError, match="ft is finished but was made with other options"):
        recipe.run(path, out, quiet=True)
    path.write_text(text.replace("lr: 0.003", "lr: 0.01"))  # the parent changed, and deleted
    shutil.rmtree(out / "a")
    with pytest.raises(UserError, match="ft is finished, but a, which it is made from, will be made anew"):  # fmt: skip
        recipe.run(path, out, quiet=True)
    assert not (out / "a").exists()  # refused before step 1 (a was trained first)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == {
        p: t for p, t in stamps.items() if p.parent.name != "a"
    }
    was = checkpoint.read_meta(out / "ft2")["source"]["parent_sha256"]  # the old a's weights
    with pytest.raises(UserError, match="ft2 is finished but was made from .* as it was before"):
        recipe._refuse_stale(out / "ft2", [was], [out / "s"])  # (a parent replaced by hand)
    shutil.rmtree(out / "ft"), shutil.rmtree(out / "ft2")
    with pytest.raises(UserError, match="s is finished, but ft, ft2, which it is made from"):
        recipe.run(path, out, quiet=True)
    other = tmp_path / "other.yaml"  # its recipe.yaml was replaced, the report mixed both
    other.write_text("name: other\n" + text)
    with pytest.raises(
        UserError, match="holds the steps of recipe None .*: run recipe 'other' into"
    ):
        recipe.run(other, out, quiet=True)
    was = yaml.safe_load((out / "recipe.yaml").read_text())
    assert "name" not in was and was["out"] == str(out)  # where it ran (the file has no out:)
    path.write_text(text.replace("lr: 0.003", "lr: 0.01").replace("  - {soup: s, members: [ft, ft2], method: uniform}\n", ""))  # fmt: skip
    recipe.run(path, out, quiet=True)  # a step removed: its run is said, as the report lists it
    assert (
        f"note: {out} also holds s, which no step of this recipe makes" in capsys.readouterr().err
    )
    renamed = recipe.apply_overrides(recipe.load(path), {"steps.0.name": "a2"})  # pass 64: its
    recipe._refuse_another_recipe(renamed, out)  # fine-tunes read the old a, only the run said
    assert capsys.readouterr().err == f"note: {out} also holds a, s, which no step of this recipe makes (renamed or removed?): its report lists them too; finetune ft reads a from there; finetune ft2 reads a from there\n"  # fmt: skip


def test_a_recipe_s_errors_do_not_ask_for_flags_run_does_not_take(tmp_path):
    """A note in a recipe's ensemble folder failed every rerun with "--overwrite would delete
    ..."; run takes no --overwrite (nor --resume: it resumes steps by itself)."""
    path = tmp_path / "r.yaml"
    path.write_text(
        "data: digits\ndefaults: {model: dcnn, epochs: 1, limit: 60}\n"
        "steps: [{train: a}, {train: b, seed: 1}, {ensemble: e, members: [a, b]}]\n"
    )
    recipe.run(path, tmp_path / "out", quiet=True)
    (tmp_path / "out" / "e" / "NOTES.md").write_text("mine")
    recipe.run(path, tmp_path / "out", quiet=True)  # made as asked: skipped, the note kept
    path.write_text(path.read_text().replace("members: [a, b]}", "members: [a, b], method: logit}"))
    with pytest.raises(UserError) as err:  # asked otherwise: rebuilt, which would delete it
        recipe.run(path, tmp_path / "out", quiet=True)
    assert "rebuilding it would delete files transferlab did not write" in str(err.value)
    assert "(NOTES.md); delete" in str(err.value) and "--overwrite" not in str(err.value)
    assert (tmp_path / "out" / "e" / "NOTES.md").read_text() == "mine"


def test_a_run_whose_classes_were_edited_by_hand_is_refused_by_every_command(
    capsys, run_copy, folder_data, tmp_path
):
    """A third class in meta.json: predict crashed (IndexError), evaluate scored and export
    labelled a 4-output head with 5 names; classes as a string, or repeated, likewise."""
    meta = json.loads((run_copy / "meta.json").read_text())
    image = next((folder_data / "test" / "a").iterdir())
    edits = [{"classes": c} for c in (meta["classes"] + ["eel"], "a", [meta["classes"][0]] * meta["num_classes"])]  # fmt: skip
    edits += [{"num_classes": 0, "classes": [], "class_names": []}, {"num_classes": True}]
    for edit in edits:  # (no classes at all: a state_dict traceback; True: "True names")
        (run_copy / "meta.json").write_text(json.dumps({**meta, **edit}))
        for argv in (
            ["predict", run_copy, image],
            ["evaluate", run_copy],
            ["export", run_copy, "--format", "onnx", "--out", tmp_path / "m.onnx"],
            ["finetune", "--from", run_copy, "--epochs", "1", "--out", tmp_path / "ft"],
        ):
            fail(
                capsys,
                *argv,
                pattern="corrupt .*meta.json: its num_classes, classes and class_names",
            )
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "ft").exists()
    prep = meta["preprocessing"]  # each was a traceback (int('x'), a state_dict, KeyError)
    for edit in ({"input_size": "x"}, {"input_size": 0}, {"channels": 7}, {"std": [0, 1, 1]},
                 {"mean": None}, {"interpolation": "cubicc"}):  # fmt: skip
        (run_copy / "meta.json").write_text(json.dumps({**meta, "preprocessing": prep | edit}))
        for argv in (["predict", run_copy, image], ["evaluate", run_copy],
                     ["export", run_copy, "--format", "onnx", "--out", tmp_path / "m.onnx"]):  # fmt: skip
            fail(capsys, *argv, pattern="corrupt .*meta.json: its preprocessing must hold")
    (run_copy / "meta.json").write_text("garbage")
    fail(capsys, "evaluate", run_copy, pattern=r"corrupt .*meta.json: not valid JSON \(")


def test_an_ensemble_json_edited_by_hand_is_one_line_everywhere_and_report_leaves_it_out(
    capsys, run_copy, folder_data, tmp_path
):
    """ensemble.json was read unchecked: a missing key was a KeyError (IndexError, TypeError)
    traceback in report, evaluate, predict and export, and a report of the parent folder died
    on it (or refused everything) instead of leaving that folder out, as it does a broken run."""
    other = run_copy.parent / "b"
    shutil.copytree(run_copy, other)
    ens = run_copy.parent / "ens"
    assert main(["ensemble", str(run_copy), str(other), "--out", str(ens), "--quiet"]) == 0
    capsys.readouterr()  # (its note: the same weights twice)
    info = json.loads((ens / "ensemble.json").read_text())
    image = next((folder_data / "test" / "a").iterdir())
    edits = [{k: v for k, v in info.items() if k != key} for key in ("members", "data", "metrics", "classes")]  # fmt: skip
    edits += [info | {"members": []}, info | {"members": [{"run": "../a"}]}, info | {"method": ["soft"]}]  # fmt: skip
    for edit in [*edits, [1]]:
        (ens / "ensemble.json").write_text(json.dumps(edit))
        for argv in (["predict", ens, image], ["evaluate", ens],
                     ["export", ens, "--format", "onnx", "--out", tmp_path / "m.onnx"]):  # fmt: skip
            fail(capsys, *argv, pattern=r"corrupt .*ensemble.json: no ")
        assert main(["report", str(run_copy.parent), "--quiet"]) == 0
        assert "note: left out corrupt" in capsys.readouterr().err
        assert "| ens" not in (run_copy.parent / "report.md").read_text()
    (ens / "ensemble.json").write_text("oops")
    fail(capsys, "evaluate", ens, pattern=r"corrupt .*ensemble.json: not valid JSON \(")
    assert not (tmp_path / "m.onnx").exists()


def test_a_path_for_a_user_this_machine_lacks_is_one_line(capsys, tmp_path):
    """~nosuchuser/x as --out or --cache-dir was a RuntimeError traceback (exit 1)."""
    for flag, out in (("--out", "~nosuchuser/x"), ("--cache-dir", "~nosuchuser/x")):
        args = ["--out", str(tmp_path / "r"), flag, out] if flag != "--out" else [flag, out]
        fail(
            capsys,
            "train",
            "--data",
            "digits",
            "--model",
            "dcnn",
            *args,
            pattern="~NAME for a user",
        )
    assert not (tmp_path / "r").exists()


def test_a_name_with_a_control_character_is_refused_before_anything_is_made(
    capsys, run_copy, tmp_path
):
    """`--out $'runs/nl\\nx'` trained, and report.md's table row split in two."""
    said, twin, work = "would make a name with a control character", tmp_path / "b", tmp_path / "w"
    shutil.copytree(run_copy, twin)
    work.mkdir()
    for bad in ("nl\nx", "t\tb/c"):
        fail(capsys, "train", "--data", "digits", *TINY, "--out", work / bad, pattern=said)
        fail(capsys, "ensemble", run_copy, twin, "--out", work / bad, pattern=said)
        fail(capsys, "export", run_copy, "--format", "onnx", "--out", work / f"{bad}.onnx",
             pattern=said)  # fmt: skip
        fail(capsys, "train", "--data", "digits", *TINY, "--out", work / "r", "--log-json",
             work / bad, pattern=said)  # fmt: skip
    latin1 = Path(os.fsdecode(os.fsencode(work) + b"/r\xe9"))  # (pass 29: said as a control
    fail(capsys, "train", "--data", "digits", *TINY, "--out", latin1, pattern="would make a name that is not UTF-8")  # fmt: skip
    image = next(Path(run_copy).parent.rglob("*.png"))  # (pass 30: explain made it)
    fail(capsys, "explain", run_copy, image, "--out", latin1, pattern="would make a name that is not UTF-8")  # fmt: skip
    assert list(work.iterdir()) == []


def test_a_fine_tune_from_an_ensemble_says_it_is_an_ensemble(capsys, run_copy, tmp_path):
    other = tmp_path / "b"
    shutil.copytree(run_copy, other)
    assert main(["ensemble", str(run_copy), str(other), "--out", str(tmp_path / "ens")]) == 0
    capsys.readouterr()
    fail(capsys, "finetune", "--from", tmp_path / "ens", "--out", tmp_path / "ft",
         pattern="is an ensemble, not a run folder: name one of its members")  # fmt: skip
    fail(capsys, "ensemble", tmp_path / "ens", "--out", tmp_path / "e2",  # pass 46 (F1): "needs two"
         pattern="is an ensemble, not a run folder: name one of its members")  # fmt: skip
    fail(capsys, "ensemble", tmp_path / "nope", "--out", tmp_path / "e2", pattern="run folder not found")  # fmt: skip
    fail(capsys, "ensemble", run_copy, "--out", tmp_path / "e2", pattern="needs at least two runs$")  # fmt: skip


def test_a_run_on_hf_data_is_counted_as_one_on_files_is(tmp_path, capsys):
    """Pass 63: a run trained on hf: data was never compared: its score on a folder of the same
    images read as held out, and a fitted ensemble took it (the other way round: counted)."""
    datasets = pytest.importorskip("datasets")
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 3)
    files = sorted(photos.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})  # fmt: skip
    labels = [int(p.parent.name == "dog") for p in files]
    datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": labels}, features).save_to_disk(str(tmp_path / "hf"))  # fmt: skip
    small = ["--model", "dcnn", "--input-size", "16", "--epochs", "1", "--quiet"]
    assert main(["train", "--data", f"hf:{tmp_path / 'hf'}", *small, "--out", str(tmp_path / "h")]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "h"), "--data", f"folder:{photos}"]) == 0
    assert re.search(r"[1-6] of the 6 test images were among its training or validation images", capsys.readouterr().err)  # fmt: skip


def test_a_run_whose_data_moved_is_told_how_to_score_it_where_they_lie(tmp_path, capsys):
    """Pass 62: evaluate said only "dataset path does not exist", the message of a typo."""
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 3)
    small = ["--model", "dcnn", "--input-size", "16", "--epochs", "1", "--quiet"]
    for name, seed in (("a", "0"), ("b", "1")):
        assert main(["train", "--data", f"folder:{photos}", *small, "--seed", seed, "--out", str(tmp_path / name)]) == 0  # fmt: skip
    assert main(["ensemble", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "e"), "--quiet"]) == 0  # fmt: skip
    for name, seed in (("f", "0"), ("g", "1")):  # a soup's ingredients
        assert main(["finetune", "--from", str(tmp_path / "a"), "--epochs", "1", "--seed", seed, "--quiet", "--out", str(tmp_path / name)]) == 0  # fmt: skip
    photos.rename(tmp_path / "moved")
    said = f"dataset path does not exist: {photos}, where the run was trained: if the data moved, give --data folder:WHERE_THEY_ARE_NOW"  # fmt: skip
    for argv in (["evaluate", tmp_path / "a"], ["evaluate", tmp_path / "e"],
                 ["ensemble", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "e2"],
                 ["soup", tmp_path / "f", tmp_path / "g", "--out", tmp_path / "s"]):  # fmt: skip
        fail(capsys, *argv, pattern=re.escape(said))
        followed = main([*map(str, argv), "--data", f"folder:{tmp_path / 'moved'}", "--quiet"])
        assert followed == 0 or "does not exist" not in capsys.readouterr().err
        capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "a"), "--data", f"folder:{tmp_path / 'moved'}"]) == 0
    datasets = pytest.importorskip("datasets")  # pass 66: a CSV's or an hf: folder's run (the
    files = sorted((tmp_path / "moved").rglob("*.png"))  # Hub was asked for the absolute path)
    rows = [f"{p.relative_to(tmp_path / 'moved')},{p.parent.name}" for p in files]
    (tmp_path / "moved" / "labels.csv").write_text("file_name,label\n" + "\n".join(rows) + "\n")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})  # fmt: skip
    datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": [int(p.parent.name == "dog") for p in files]}, features).save_to_disk(str(tmp_path / "hf"))  # fmt: skip
    for kind, where in (("csv", tmp_path / "moved" / "labels.csv"), ("hf", tmp_path / "hf")):
        assert main(["train", "--data", f"{kind}:{where}", *small, "--out", str(tmp_path / f"run-{kind}")]) == 0  # fmt: skip
    (tmp_path / "moved").rename(tmp_path / "again"), (tmp_path / "hf").rename(tmp_path / "hf2")
    capsys.readouterr()
    for kind, said in (("csv", f"CSV file not found: {tmp_path / 'moved' / 'labels.csv'}"), ("hf", f"dataset path does not exist: {tmp_path / 'hf'}")):  # fmt: skip
        fail(capsys, "evaluate", tmp_path / f"run-{kind}", pattern=re.escape(f"{said}, where the run was trained: if the data moved, give --data {kind}:WHERE_THEY_ARE_NOW"))  # fmt: skip
    assert main(["evaluate", str(tmp_path / "run-hf"), "--data", f"hf:{tmp_path / 'hf2'}", "--quiet"]) == 0  # fmt: skip


def test_members_trained_on_the_test_images_are_counted_not_guessed(tmp_path, capsys):
    """An ensemble of a run on a folder and a run on a CSV holding every image of it scored
    "100%" on the folder's test split with a "may be" note; evaluate said only the spec."""
    photos = make_folder(tmp_path / "photos", ["cat", "dog"], 3)
    rows = []  # hard links to its images (a symlink or the path itself: counted alike)
    for p in sorted(photos.rglob("*.png")):
        link = tmp_path / "links" / f"{p.parent.name}-{p.parent.parent.name}-{p.name}"
        link.parent.mkdir(exist_ok=True)
        os.link(p, link)
        rows.append(f"{link.relative_to(tmp_path)},{p.parent.name},train")
    (tmp_path / "all.csv").write_text("file_name,label,split\n" + "\n".join(rows) + "\n")
    small = ["--model", "dcnn", "--input-size", "16", "--epochs", "1", "--quiet"]
    for name, spec in (("a", f"folder:{photos}"), ("b", f"csv:{tmp_path / 'all.csv'}")):
        assert main(["train", "--data", spec, *small, "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert (
        main(["ensemble", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "e")])
        == 0
    )
    said = capsys.readouterr().err  # (the CSV's run carved a test split of its own from them)
    assert re.search(rf"[1-6] of the 6 test images trained {tmp_path / 'b'}: the ensemble's", said)
    e2 = ["ensemble", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "e2")]
    assert main(["--quiet", *e2]) == 0  # a note on the data, not progress: --quiet hid it
    assert re.search(r"[1-6] of the 6 test images trained", capsys.readouterr().err)
    assert main(["evaluate", str(tmp_path / "b"), "--data", f"folder:{photos}"]) == 0
    assert re.search(
        r"[1-6] of the 6 test images were among its training or validation images",
        capsys.readouterr().err,
    )
    assert main(["evaluate", str(tmp_path / "b"), "--data", f"folder:{photos}", "--split", "train"]) == 0  # fmt: skip
    assert "so this is not a held-out train score" in capsys.readouterr().err  # (it said "test")
    # recorded where the score is: ensemble.json, evaluate --json, report.md (it was said once)
    assert (
        "not a test score" in json.loads((tmp_path / "e" / "ensemble.json").read_text())["notes"][0]
    )
    assert main(["evaluate", str(tmp_path / "e"), "--json"]) == 0
    said = capsys.readouterr()
    assert "not a test score" in json.loads(said.out.splitlines()[-1])["notes"][0]
    assert "not a test score" in said.err
    from transferlab import report

    path, _ = report.write(tmp_path)
    assert (
        "e (not a test score: its test images include ones a member trained on)" in path.read_text()
    )


@pytest.mark.parametrize("members,words", [("[a, a]", "member 'a' is listed twice"),
                                           ("[a, e]", "member 'e' is this step itself")])  # fmt: skip
def test_a_recipe_ensemble_listing_a_member_twice_or_itself_says_so(
    tmp_path, capsys, members, words
):
    """Both said "needs 'members: [A, B, ...]' (two or more)", which they had."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: digits\ndefaults: {model: dcnn, epochs: 1}\nsteps:\n  - train: a\n"
        f"  - train: b\n  - ensemble: e\n    members: {members}\n"
    )
    fail(capsys, "run", recipe, "--out", tmp_path / "out", pattern=words)
    assert not (tmp_path / "out").exists()


def test_a_file_the_system_refuses_is_named_as_given_not_as_its_temp_file(run_copy, capsys):
    """/proc takes no new files (as root it passes the writable check): the error named
    "/proc/.nope.safetensors.l35jvv68.tmp", a file the user never asked for."""
    err = fail(
        capsys, "export", run_copy, "--format", "safetensors", "--out", "/proc/nope.safetensors"
    )
    assert "/proc/nope.safetensors" in err and ".tmp" not in err


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE for this process (writes past it fail with EFBIG, as on a full disk:
    Python ignores SIGXFSZ); put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_is_one_line_naming_the_file_and_nothing_is_left_half_written(
    run_copy, folder_data, tmp_path, capsys, file_size_limit
):
    """Out of space (here: a file-size limit), torchscript export aborted the process in C++
    (rc 134, its temp file left), safetensors and hf exports and train printed tracebacks
    (torch's "unexpected pos", "(os error 27)"), hf left an empty folder."""
    file_size_limit((run_copy / "model.safetensors").stat().st_size // 2)
    for fmt in ("torchscript", "safetensors", "onnx", "hf"):
        suffix = {"torchscript": ".pt", "safetensors": ".safetensors", "onnx": ".onnx"}.get(fmt, "")
        out = tmp_path / "ex" / f"m-{fmt}{suffix}"  # (hf: a folder)
        fail(capsys, "export", run_copy, "--format", fmt, "--out", out,
             pattern=rf"File too large \({re.escape(str(out))}\): free space there .* run it again$")  # fmt: skip
        assert not out.exists()  # (pass 31: "; a run continues with --resume", export has none)
    train = ["train", "--data", f"folder:{folder_data}", *TINY, "--cache-dir", "off", "--quiet"]
    fail(capsys, *train, "--out", tmp_path / "r", pattern=r"File too large \(.*last\.pt\).* run it again with --resume$")  # fmt: skip
    file_size_limit(resource.RLIM_INFINITY)
    assert main([*train, "--out", str(tmp_path / "r"), "--resume"]) == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
