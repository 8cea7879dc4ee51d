"""transferlab predict: files and folders, any image mode, bad files skipped, runs and ensembles."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from transferlab import checkpoint, combiners, ensembles, evaluate, predict
from transferlab.cli import main
from transferlab.config import UserError

from conftest import make_image


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    make_image(0, 1, 24).save(root / "a.png")
    make_image(1, 2, 40).convert("L").save(root / "sub" / "gray.jpg")
    make_image(2, 3, 30).convert("RGBA").save(root / "sub" / "alpha.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")
    return root


def test_predict_a_run_on_a_folder_skips_unreadable_files(trained_run, images, capsys):
    os.mkfifo(images / "pipe.png")  # its read blocked forever
    (images / "album.jpg").mkdir()  # was a skipped image, IsADirectoryError
    (images / "gone.jpg").symlink_to(images / "nowhere.jpg")  # was left out without a word
    rows, bad = predict.predict(trained_run, [str(images)], top_k=3, quiet=True)
    assert sorted(r["path"].split("photos/")[1] for r in rows) == [
        "a.png",
        "sub/alpha.png",
        "sub/gray.jpg",
    ]
    assert len(bad) == 2 and "broken.jpg" in bad[0] and "gone.jpg" in bad[1]
    assert bad[1].endswith(f"gone.jpg (a broken link to {images / 'nowhere.jpg'})")  # in words:
    (images / "cut.png").write_bytes((images / "a.png").read_bytes()[:-60])  # no class names
    _, bad = predict.predict(
        trained_run, [str(images / "a.png"), str(images / "cut.png")], quiet=True
    )
    assert bad == [f"{images / 'cut.png'} (truncated: the file ends early, as an interrupted copy or download leaves it)"]  # fmt: skip
    (images / "cut.png").unlink()
    (images / ".ipynb_checkpoints").mkdir()  # a notebook's copy: not a photo, as in --data
    shutil.copy(images / "a.png", images / ".ipynb_checkpoints" / "a-checkpoint.png")
    (images / "more").symlink_to(images / "sub")  # a linked folder: searched (it was not)
    (images / "sub" / "loop").symlink_to(images)  # a link loop: each real folder once
    found = predict.image_files([str(images)])
    assert [f.split("photos/")[1] for f in found if "gone" not in f and "broken" not in f] == [
        "a.png", "sub/alpha.png", "sub/gray.jpg"
    ]  # fmt: skip
    assert predict.image_files([str(images / "more")])[0].endswith("more/alpha.png")
    (images / "sub" / "loop").unlink()
    (images / "more").unlink()
    (images / "gone.jpg").unlink()
    (images / "link.png").symlink_to(images / "sub" / "alpha.png")  # the same file, linked
    twice = [str(images / "sub" / "alpha.png"), str(images / "sub"), f"{images}/sub/../sub/alpha.png", str(images / "link.png")]  # fmt: skip
    pil = Image.open(twice[0])  # given as files one at a time: each was kept (pass 37, F4)
    assert predict.items([twice[0], twice[0]]) == [twice[0]]  # (one str object, twice)
    capsys.readouterr()
    predict.items([twice[3], twice[0], twice[3], twice[3]])  # a repeat said once (pass 64)
    assert f"(3 repeat(s) left out: {twice[0]} (as {twice[3]}), {twice[3]}) are" in capsys.readouterr().err  # fmt: skip
    assert predict.items([*twice, pil, pil]) == [twice[0], str(images / "sub" / "gray.jpg"), pil, pil]  # fmt: skip
    # pass 58: one file given four times was "3 image(s) given more than once"; pass 62: the
    # paths left out went unnamed (a link's row was missing from the CSV without a word)
    assert f"note: 1 image(s) given more than once (3 repeat(s) left out: {images}/sub/alpha.png, {images}/sub/../sub/alpha.png, {images}/link.png (as {twice[0]})) are predicted once, by the first name given" in capsys.readouterr().err  # fmt: skip
    once, _ = predict.predict(trained_run, twice, quiet=True)
    assert [r["path"] for r in once] == [twice[0], str(images / "sub" / "gray.jpg")]
    (images / "link.png").unlink()
    classes = checkpoint.read_meta(trained_run)["classes"]
    for row in rows:
        probs = [p["prob"] for p in row["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {p["class"] for p in row["predictions"]} <= set(classes)


def test_predict_an_ensemble_of_different_input_sizes(hetero_ensemble, images):
    rows, bad = predict.predict(hetero_ensemble, [str(images / "a.png")], top_k=2, quiet=True)
    assert len(rows) == 1 and not bad
    assert 0 < sum(p["prob"] for p in rows[0]["predictions"]) <= 1 + 1e-6
    # every member, each at its own input size (24 and 32 px), feeds the fused head
    info = ensembles.read(hetero_ensemble)
    parts = [
        predict._member(
            evaluate.load_run_model(m["run"], meta), meta, [str(images / "a.png")], "none", True
        )
        for m in info["members"]
        for meta in [checkpoint.read_meta(m["run"])]
    ]
    assert [p[1].shape[1] for p in parts] and {m["input_size"] for m in info["members"]} == {24, 32}
    logp = np.stack([p[0] for p in parts])
    params = ensembles.read_params(hetero_ensemble, info)
    expected = np.exp(combiners.combine("fusion", logp, params, np.hstack([p[1] for p in parts])))[
        0
    ]
    for p in rows[0]["predictions"]:
        assert p["prob"] == pytest.approx(expected[info["classes"].index(p["class"])], abs=1e-6)


@pytest.fixture(scope="module")
def hetero_ensemble(tmp_path_factory, trained_run):
    from transferlab import trainer

    from conftest import tiny_cfg

    root = tmp_path_factory.mktemp("pred-ens")
    meta = checkpoint.read_meta(trained_run)
    trainer.fit(tiny_cfg(meta["data"], input_size=32, epochs=1), root / "r32", quiet=True)
    ensembles.build([trained_run, root / "r32"], "fusion", root / "ens", quiet=True)
    return root / "ens"


def test_cli_formats(trained_run, images, capsys):
    assert main(["--quiet", "predict", str(trained_run), str(images), "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["file", "top-1", "top-2"] and "broken.jpg" in err
    assert main(["--quiet", "predict", str(trained_run), str(images / "a.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["prob"] > 0
    assert main(["--quiet", "predict", str(trained_run), str(images / "a.png"), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "path,rank,class,name,prob"
    rows = [
        {"path": p, "predictions": [{"name": "a", "prob": 0.5}]} for p in ("数字.png", "ab.png", "🐶é.png", "e\u0301.png")
    ]  # fmt: skip
    lines = predict.table(rows).splitlines()  # wide characters take two columns: aligned
    at = [predict.width(line[: line.index("a 0.500")]) for line in lines[1:]]  # columns
    assert at == [10, 10, 10, 10] and lines[0].index("top-1") == 10
    assert predict.width("🐶é.png") == 7 and predict.width("e\u0301.png") == 5  # (pass 62)
    rows = [{"path": "new\nline.png", "predictions": [{"name": "a", "prob": 0.5}]}]
    assert predict.table(rows).splitlines()[1].split() == ["new\\nline.png", "a", "0.500"]


def test_json_names_a_file_not_named_in_utf8_so_strict_readers_take_it(trained_run, images, tmp_path, capsys):  # fmt: skip
    """predict --json wrote `\\udcff` for byte 0xff of a file name: a lone surrogate, which
    strict JSON readers (not Python's) refuse, and with it the whole list."""
    import os
    import shutil

    (tmp_path / "in").mkdir()
    shutil.copy(images / "a.png", os.path.join(os.fsencode(tmp_path / "in"), b"caf\xe9.png"))
    assert main(["--quiet", "predict", str(trained_run), str(tmp_path / "in"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "\\udc" not in out and json.loads(out)[0]["path"].endswith("caf\\xe9.png")
    # pass 54 (F4): said, as a name of its own, caf\\xe9.png, reads alike
    assert err == f"note: 1 file name(s) hold bytes that are not UTF-8, each such byte written as \\xNN: {tmp_path / 'in' / 'caf'}\\xe9.png\n"  # fmt: skip
    assert main(["--quiet", "predict", str(trained_run), str(tmp_path / "in")]) == 0  # the table
    assert "caf\\xe9.png  " in capsys.readouterr().out  # (it said caf\\udce9.png)
    with open(os.path.join(os.fsencode(tmp_path / "in"), b"bad\xff.png"), "wb") as f:
        f.write(b"junk")  # pass 52 (F4, F5): the CSV held byte 0xe9 (pandas refused it), and
    assert main(["--quiet", "predict", str(trained_run), str(tmp_path / "in"), "--csv"]) == 0
    out, err = capsys.readouterr()  # a skipped file was named bad\\udcff.png
    assert ",caf\\xe9.png,1," in out.replace(str(tmp_path / "in") + os.sep, ",") and out.encode().decode("utf-8")  # fmt: skip
    assert err.startswith("skipped: " + str(tmp_path / "in" / "bad\\xff.png") + " (not an image Pillow reads: another format, or damaged)\nnote: 1 file name(s)")  # fmt: skip
    shutil.copy(images / "a.png", tmp_path / "in" / "caf\\xe9.png")  # a name of its own, alike
    assert main(["--quiet", "predict", str(trained_run), str(tmp_path / "in"), "--csv"]) == 0
    said = f"{tmp_path / 'in' / 'caf'}\\xe9.png is also the name of another file, so their rows read alike: rename one\n"  # fmt: skip
    assert capsys.readouterr().err.endswith(said)  # (pass 56, 57: ambiguous rows, unsaid)


def test_cli_errors_are_one_line(trained_run, images, tmp_path, capsys):
    for argv, pattern in (
        ([str(trained_run), str(tmp_path / "nope.jpg")], "no such file or folder"),
        ([str(trained_run), str(images / "broken.jpg")], "no readable images"),
        ([str(trained_run), str(images), "--top-k", "0"], "at least 1"),
        ([str(trained_run), str(tmp_path / "empty")], "no such file"),
    ):
        assert main(["--quiet", "predict", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and pattern in err[0], err


def test_a_run_among_the_inputs_is_not_taken_for_photos(trained_run, folder_data, tmp_path, capsys):
    """`predict RUN OTHER_RUN` classified the other run's curves.png and confusion.png, rc 0."""
    import shutil

    with pytest.raises(UserError, match="tiny is a transferlab run folder, not images: predict "
                       "takes one run or ensemble"):  # fmt: skip
        predict.predict(trained_run, [str(trained_run)], quiet=True)
    mixed = tmp_path / "mixed"
    shutil.copytree(trained_run, mixed / "run", ignore=shutil.ignore_patterns("*.lock"))
    shutil.copy(next((folder_data / "test" / "a").iterdir()), mixed / "photo.png")
    rows, _ = predict.predict(trained_run, [str(mixed)], quiet=True)
    assert [r["path"] for r in rows] == [str(mixed / "photo.png")]
    assert re.search(
        r"skipped \d+ image\(s\) in transferlab output folders under", capsys.readouterr().err
    )


def test_the_table_keeps_a_row_on_one_line_whatever_a_class_is_called():
    """A class folder named with a newline (accepted by train) broke predict's table: the file
    name was escaped, the class name printed raw."""
    from transferlab import predict

    rows = [{"path": "a\nb.png", "predictions": [{"name": "ca\nt", "prob": 0.9}]}]
    lines = predict.table(rows).splitlines()
    assert len(lines) == 2 and "ca\\nt 0.900" in lines[1] and "a\\nb.png" in lines[1]
