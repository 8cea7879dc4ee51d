"""The README's Python API example and DESIGN's onnxruntime one, executed as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(marker: str, where: Path = README) -> str:
    text = where.read_text()
    return re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)[1]


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(example("api-example"), "README api-example", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and "'predictions'" in out[2] and "max_abs_logit_diff" in out[3]
    assert (tmp_path / "runs" / "api-ens" / "ensemble.json").is_file()


def test_readme_onnx_example_runs(trained_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    import numpy as np
    from PIL import Image

    import transferlab
    from transferlab import export

    from conftest import make_image

    export.export(trained_run, "onnx", tmp_path / "runs" / "lite0" / "export" / "model.onnx")
    monkeypatch.chdir(tmp_path)
    photo = make_image(2, 0, 50)  # wide: squashed to a square, it predicted other numbers
    wide = photo.resize((90, 50))
    wide.paste(photo.rotate(90).crop((0, 0, 40, 50)), (50, 0))
    wide.save("photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turned 90 degrees, as phones save photos
    wide.save("turned.jpg", exif=exif, quality=95)
    gray = np.asarray(wide.convert("L"), np.uint16) * 257  # 16-bit, the full range
    Image.fromarray(gray).save("deep.png")
    see_through = wide.convert("RGBA")
    see_through.putalpha(Image.linear_gradient("L").resize(wide.size))
    see_through.save("glass.png")
    design = README.parent / "docs" / "DESIGN.md"
    model = transferlab.load(trained_run)
    for name in ("photo.png", "turned.jpg", "deep.png", "glass.png"):
        ns = {}
        exec(compile(example("onnx-example", design).replace("photo.jpg", name),
                     "DESIGN onnx-example", "exec"), ns)  # fmt: skip
        assert capsys.readouterr().out.strip() in {"a", "b", "c", "d"}
        want = model.predict(name, top_k=4)[0]["predictions"]
        got = np.exp(ns["logits"] - ns["logits"].max())
        got = got / got.sum()  # as transferlab predicts: the same crop, resampling and numbers
        assert [
            round(float(got[ns["meta"]["class_names"].index(p["class"])]), 3) for p in want
        ] == [round(p["prob"], 3) for p in want], name


def test_api_takes_what_people_hold(trained_run, folder_data, tmp_path):
    """finetune() exists, train() needs data, predict() takes paths, PIL images and arrays,
    and a PIL image predicts exactly as the same image saved to a file."""
    import numpy as np
    from PIL import Image

    import transferlab
    from transferlab.config import UserError

    with pytest.raises(UserError, match="train\\(\\) needs data="):
        transferlab.train(tmp_path / "nodata", model="dcnn")
    assert not (tmp_path / "nodata").exists()
    run = transferlab.load(trained_run)
    file = next((folder_data / "test").rglob("*.png"))
    image = Image.open(file).convert("RGB")
    arr = np.asarray(image)
    rows = run.predict([str(file), image, arr, arr / 255.0, np.stack([arr, arr])], top_k=2)
    assert len(rows) == 6 and rows[0]["path"] == str(file) and rows[1]["path"] == "<image 1>"
    probs = [[p["prob"] for p in r["predictions"]] for r in rows]
    assert all(np.allclose(p, probs[0], atol=1e-6) for p in probs), probs
    assert run.predict(image)[0]["predictions"] == run.predict(file)[0]["predictions"]
    # as a file is read: transparency onto white (it was dropped), 2 channels are gray + alpha
    # (an (H, W, 2) array was H images of W x 2 pixels)
    glass = image.convert("RGBA")
    glass.putalpha(Image.linear_gradient("L").resize(image.size))
    glass.save(tmp_path / "glass.png")
    assert run.predict(glass)[0]["predictions"] == run.predict(tmp_path / "glass.png")[0]["predictions"]  # fmt: skip
    la = np.asarray(glass.convert("LA"))
    Image.fromarray(la).save(tmp_path / "la.png")
    assert len(run.predict(la)) == 1
    assert run.predict(la)[0]["predictions"] == run.predict(tmp_path / "la.png")[0]["predictions"]
    with pytest.raises(transferlab.UserError, match="split must be train, val or test, not 'x'"):
        run.evaluate("x")  # (a KeyError)
    for bad, message in ((arr * 2.0, "float image arrays"), (arr.astype(np.int64), "uint8 or float"),
                         (object(), "cannot predict a object"), ([], "nothing to predict"),
                         (arr.transpose(2, 0, 1), "ambiguous \\(one channels-first image"),
                         (arr.transpose(2, 0, 1)[:2], "ambiguous \\(one channels-first image")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            run.predict(bad)
    cut = tmp_path / "cut.jpg"  # Pillow's own exceptions, one line each (they were raw): a batch
    image.save(cut)  # as torch holds it, 5 channels, a closed, truncated or empty image
    cut.write_bytes(cut.read_bytes()[:-100])
    closed = Image.open(file)
    closed.close()
    for bad, message in ((np.stack([arr, arr]).transpose(0, 3, 1, 2), "looks channels-first \\(N, C, H, W\\)"),
                         (np.zeros((2, 6, 6, 5), np.uint8), "with 1-4 channels, got shape \\(6, 6, 5\\)"),
                         (closed, "image 0 of those given cannot be read: Operation on closed image"),
                         ([image, Image.open(cut)], "image 1 of those given cannot be read: image file is truncated"),
                         (Image.new("RGB", (0, 0)), "cannot be read: it is 0x0 pixels")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            run.predict(bad)
    assert len(run.predict(image, top_k=np.int64(2))[0]["predictions"]) == 2
    with pytest.raises(UserError, match="^top_k must be at least 1, got 0$"):  # (it said --top-k)
        run.predict(image, top_k=0)
    ft = transferlab.finetune(run, tmp_path / "ft", epochs=1)
    assert ft.info["source"]["parent"] == str(trained_run) and ft.metrics["test"]["n"] > 0


@pytest.mark.slow
def test_readme_own_data_walkthrough_runs_as_written_from_a_folder_and_a_csv(
    tmp_path, monkeypatch, capsys
):
    import shlex

    from transferlab.cli import main

    from conftest import make_folder

    block = re.search(r"<!-- own-data -->\n```bash\n(.*?)```", README.read_text(), re.S)[1]
    lines = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert len(lines) == 5 and all(line.startswith("transferlab ") for line in lines)
    make_folder(tmp_path / "photos", ["cat", "dog", "fox"], 12, size=48, subsets=("",))
    make_folder(tmp_path / "new_photos", ["any"], 2, size=48, subsets=("",))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/photos
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert main(["--quiet", *shlex.split(line)[1:]]) == 0, (line, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "new_photos/any/0.png" in out and (tmp_path / "runs/photos/report.md").is_file()
    assert (tmp_path / "runs/photos/lite0/export/model.onnx").is_file()
    # the same first line from a CSV that lists the photos
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted((tmp_path / "photos").rglob("*.png"))]  # fmt: skip
    (tmp_path / "labels.csv").write_text("file_name,label\n" + "\n".join(rows) + "\n")
    first = lines[0].replace("folder:~/photos", "csv:labels.csv").replace("/lite0", "/csv")
    assert main(["--quiet", *shlex.split(first)[1:]]) == 0, capsys.readouterr().err
    assert (tmp_path / "runs/photos/csv/meta.json").is_file()


def test_the_api_exports_and_refuses_as_the_cli_does(trained_run, tmp_path):
    """Model.export called export.export: an ensemble's ONNX graph was refused ("name one of
    its members") and `hf` was unknown; None for a folder was a bare TypeError, a str for a list
    of runs "a run is listed twice", top_k="3" a TypeError."""
    import shutil

    import transferlab
    from transferlab.config import UserError

    other = shutil.copytree(trained_run, tmp_path / "b", ignore=shutil.ignore_patterns("*.lock"))
    ens = transferlab.ensemble([trained_run, other], out=tmp_path / "ens")
    assert ens.export("onnx", tmp_path / "e.ONNX")["check"]["n"] > 0  # (pass 29: refused)
    assert (tmp_path / "e.ONNX").is_file()
    run = transferlab.load(other)
    assert Path(run.export("hf")["path"], "config.json").is_file()
    with pytest.raises(UserError, match="an ensemble exports as one ONNX graph, not torchscript"):
        ens.export("torchscript")
    for call, message in (
        (lambda: transferlab.load(None), "load\\(\\) takes the path of a run or ensemble folder"),
        (lambda: transferlab.train(None, data="digits"), "train\\(\\) needs out="),
        (lambda: transferlab.finetune(None, tmp_path / "f"), "finetune\\(\\) starts from"),
        (lambda: transferlab.soup([trained_run, other], out=None), "soup\\(\\) needs out="),
        (lambda: transferlab.ensemble(str(other), out=tmp_path / "e2"), "takes a list of run"),
        (lambda: transferlab.ensemble([other, None], out=tmp_path / "e2"), "each run of"),
        (lambda: run.predict(str(trained_run), top_k="3"), "top_k must be a whole number"),
        (lambda: run.export("HF"), r"known: onnx, torchscript, safetensors, hf\)"),
        (
            lambda: ens.export("onnx", tmp_path / "e.ONNX", overwrite="no"),
            "True or False, not 'no'",
        ),
        (lambda: run.export("onnx", 123), "out is the path of the file to write, not 123"),
        (lambda: ens.export("onnx", tmp_path / "e.ONNX"), "pass overwrite=True to replace it$"),
        (lambda: run.export("onnx", input_size=7), "^input_size applies to an ensemble"),  # pass 32
        (lambda: run.export("onnx", input_size=0), "^input_size applies to an ensemble"),  # pass 43
        (lambda: run.export(["onnx"]), "format is one of onnx, .*, not \\['onnx'\\]"),  # pass 30
        (
            lambda: ens.export("onnx", input_size=16.7),
            "input_size is a whole number of pixels, not 16.7",
        ),
    ):
        with pytest.raises(UserError, match=message):
            call()


def test_train_takes_overwrite_and_log_json_and_says_its_own_keywords(tmp_path):
    """train() over an existing run said "pass --resume ... or --overwrite", options the API
    did not have (overwrite= was "unknown config key"; log_json= too)."""
    import json

    import transferlab
    from transferlab.config import UserError

    kw = {"data": "digits", "model": "dcnn", "epochs": 1, "limit": 40}
    transferlab.train(tmp_path / "r", **kw)
    with pytest.raises(UserError, match="pass resume=True to continue it or overwrite=True to"):
        transferlab.train(tmp_path / "r", **kw)
    run = transferlab.train(tmp_path / "r", overwrite=True, log_json=tmp_path / "log.jsonl", **kw)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows and run.metrics["test"]["n"] > 0
    transferlab.finetune(run, tmp_path / "ft", epochs=1)
    with pytest.raises(UserError, match="pass resume=True to continue it or overwrite=True to"):
        transferlab.finetune(run, tmp_path / "ft", epochs=1)
    transferlab.finetune(run, tmp_path / "ft", epochs=1, overwrite=True)
    kept = (tmp_path / "ft" / "meta.json").read_bytes()  # pass 52 (F8): resumed, the run's own
    for call in (  # options stand where none is given, as `train --out R --resume` (the API
        lambda: transferlab.train(tmp_path / "ft", resume=True, **kw),  # refused "its config
        lambda: transferlab.train(tmp_path / "ft", resume=True),  # differs (lr: ...; weights:
        lambda: transferlab.finetune(run, tmp_path / "ft", resume=True),  # 'r' -> None)")
    ):
        assert call().path == tmp_path / "ft" and (tmp_path / "ft" / "meta.json").read_bytes() == kept  # fmt: skip
    transferlab.finetune(run, tmp_path / "ft2", epochs=2, lr=0.01)  # (not the parent's, nor /10)
    assert transferlab.finetune(run, tmp_path / "ft2", resume=True).info["config"]["epochs"] == 2
    with pytest.raises(UserError, match="config differs \\(lr: "):  # (an option given: compared)
        transferlab.train(tmp_path / "ft", resume=True, lr=0.5)
    with pytest.raises(UserError, match="^resume=True: \\S+nope does not exist, so nothing in it can be resumed"):  # fmt: skip
        transferlab.train(tmp_path / "nope", resume=True)  # pass 53 (F2): "train() needs data="
    # hostile pass 38: overwrite="no" (a true string) emptied and rebuilt the folder there
    ens = transferlab.ensemble([tmp_path / "r", tmp_path / "ft"], out=tmp_path / "e")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for call, word in (
        (lambda v: transferlab.train(tmp_path / "r", overwrite=v, **kw), "overwrite"),
        (lambda v: transferlab.train(tmp_path / "r", resume=v, **kw), "resume"),
        (lambda v: transferlab.finetune(run, tmp_path / "ft", epochs=1, overwrite=v), "overwrite"),
        (lambda v: transferlab.finetune(run, tmp_path / "ft", quiet=v), "quiet"),
        (lambda v: transferlab.ensemble([run, tmp_path / "ft"], out=ens, overwrite=v), "overwrite"),
        (lambda v: ens.predict(tmp_path / "r", quiet=v), "quiet"),
    ):
        with pytest.raises(UserError, match=f"^{word} is True or False, not 'no'$"):
            call("no")
    # hostile pass 40: bare TypeErrors (F2), and soup()'s "choose another --out" (F3)
    for call, words in (
        (
            lambda: transferlab.train(tmp_path / "n", log_json=123, **kw),
            "^log_json is a file to write, not 123$",
        ),  # fmt: skip
        (
            lambda: transferlab.finetune(run, tmp_path / "n", log_json=1.5),
            "^log_json is a file to write, not 1.5$",
        ),  # fmt: skip
        (
            lambda: transferlab.Model(None),
            "^Model\\(\\) takes the path of a run or ensemble folder, not None$",
        ),  # fmt: skip
        (
            lambda: transferlab.soup([run, tmp_path / "ft"], out=tmp_path / "r"),
            "choose another out$",
        ),  # fmt: skip
    ):
        with pytest.raises(UserError, match=words):
            call()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "n").exists()


def test_a_model_is_the_run_it_was_loaded_as_after_the_notebook_changes_folder(
    trained_run, tmp_path, monkeypatch
):
    """A Model kept its path as typed: after os.chdir, "r" was another run's folder (its data,
    its numbers, its predictions) or "run folder not found"."""
    import shutil

    import transferlab

    shutil.copytree(trained_run, tmp_path / "a" / "r")
    monkeypatch.chdir(tmp_path / "a")
    run = transferlab.load("r")
    n = run.metrics["test"]["n"]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert run.path == tmp_path / "a" / "r" and run.metrics["test"]["n"] == n
    trained = transferlab.train("t", data="digits", model="dcnn", epochs=1, limit=40)
    monkeypatch.chdir(tmp_path)
    assert trained.path == tmp_path / "b" / "t" and trained.info["data"] == "digits"
    monkeypatch.setenv("HOME", str(tmp_path / "b"))  # "~/u" was a folder named ~ here, and the
    home = transferlab.train("~/u", data="digits", model="dcnn", epochs=1, limit=40)  # Model ~'s
    assert home.path == tmp_path / "b" / "u" and not (tmp_path / "~").exists()
    assert transferlab.load("~/t").path == trained.path  # (load refused it: "not found")
