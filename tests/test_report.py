"""report.html rendered by a real browser (Debian's chromium, headless): no console errors,
the comparison table and the figures present, a screenshot taken."""

import csv
import html
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from transferlab import checkpoint, ensembles, report
from transferlab.config import UserError


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(trained_run, root / "tiny")
    shutil.copytree(trained_run, root / "tiny-copy")
    ensembles.build([root / "tiny", root / "tiny-copy"], "soft", root / "ens", quiet=True)
    report.write(root)
    return root


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    return exe


def browse(page, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", *flags, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_report_has_per_class_scores_and_confused_pairs_from_the_test_logits(report_dir):
    from transferlab import checkpoint, evaluate

    logits, targets = checkpoint.load_logits(report_dir / "tiny", "test")
    names = checkpoint.read_meta(report_dir / "tiny")["class_names"]
    want = evaluate.per_class(logits, targets, names)
    md = (report_dir / "report.md").read_text()
    assert "| test macro-F1 | test bal. acc |" in md.splitlines()[4]
    first = want["classes"][0]
    row = f"| {first['name']} | {first['precision']:.3f} | {first['recall']:.3f} | {first['f1']:.3f} |"
    assert (
        md.count("## Per class: ") == 1 and row in md and "Most confused (true → predicted)" in md
    )
    page = (report_dir / "report.html").read_text()
    assert page.count("per-class precision, recall, F1") == 3  # each run and the ensemble
    macro = evaluate.metrics(logits, targets)["macro_f1"]
    assert f"test macro-F1 {macro:.2%}" in page


def test_gradcam_of_the_most_confidently_wrong_images(report_dir):
    pytest.importorskip("pytorch_grad_cam")
    from transferlab import checkpoint, evaluate, htmlreport

    logits, targets = checkpoint.load_logits(report_dir / "tiny", "test")
    meta = checkpoint.read_meta(report_dir / "tiny")
    wrong = (targets + 1) % logits.shape[1]  # every answer wrong: the grid has twelve
    prob = np.exp(evaluate.log_softmax(logits))
    part = htmlreport._wrong_grid(meta["data"], meta, prob, wrong, meta["class_names"], "t",
                                  report_dir / "tiny")  # fmt: skip
    assert 'alt="confidently wrong"' in part
    assert 'alt="Grad-CAM of the confidently wrong images"' in part
    assert "Grad-CAM: its last feature map is 1x1 at 24 px" in part  # its maps: blank (pass 65)
    # it said "no wrong test images" of a model it did not name, and of a changed test split
    right = htmlreport._wrong_grid(meta["data"], meta, prob, prob.argmax(1), meta["class_names"], "t")  # fmt: skip
    assert "t, the best model on test, got every test image right" in right
    part = htmlreport._wrong_grid(meta["data"], meta, prob[:-1], wrong[:-1], meta["class_names"], "t")  # fmt: skip
    assert f"t: not shown, the files of its data changed since it was scored (its test split now holds {len(wrong)} images; it was scored on {len(wrong) - 1})" in part  # fmt: skip
    moved = meta | {"data_fingerprint": "another"}  # the same count of other images (pass 35:
    part = htmlreport._wrong_grid(meta["data"], moved, prob, wrong, meta["class_names"], "t")  # drawn)  # fmt: skip
    assert "t: not shown, the files of its data changed" in part and "<img" not in part


def test_report_html_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text()
    assert "http://" not in text and "https://" not in text  # no network
    assert text.count("data:image/png;base64,") >= 8


def test_report_renders_in_chromium_without_console_errors(report_dir):
    page = report_dir / "report.html"
    dom = browse(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", dom.stderr), dom.stderr[-2000:]
    table = re.search(r'<table class="sortable" id="comparison">(.*?)</table>', dom.stdout, re.S)
    assert table and table[1].count("<tr>") == 4  # header + two runs + the ensemble
    for alt in ("confusion matrix", "reliability diagram", "per-class accuracy",
                "training curves", "ens gain chart"):  # fmt: skip
        assert f'alt="{alt}"' in dom.stdout, alt
    shot = report_dir / "shot.png"
    result = browse(page, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    assert result.returncode == 0 and shot.stat().st_size > 20_000


def test_console_errors_are_detected_negative_control(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>undefinedFn()</script></body></html>")
    assert re.search(r"CONSOLE.*(Uncaught|Error)", browse(page, "--dump-dom").stderr)


def test_wrong_image_grid_title_fits_even_with_a_single_image():
    import matplotlib

    matplotlib.use("Agg")
    from transferlab import plots

    title = "lite2-320: the 12 most confidently wrong test images"
    fig = plots.wrong_grid_figure(np.zeros((1, 64, 64, 3), np.uint8), ["true a\npred b"], title)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # not clipped at either edge


def test_names_are_drawn_as_written_and_a_long_title_stays_inside_its_figure():
    """A class named "$5-$10" was drawn as math ("5 − 10"), "x $\\frac{ y $" stopped evaluate
    with a traceback, and a data path ran the confusion matrix's title off the picture."""
    from transferlab import plots

    names = ["$5-$10 range", "x $\\frac{ y $", "z $^$"]
    title = "run on folder:/home/someone/a/rather/long/path/to/the/images [test]: top-1 28.57%"
    fig = plots.confusion_figure(np.eye(3), names, title)
    fig.canvas.draw()
    drawn = [t for t in fig.findobj(plots.matplotlib.text.Text) if t.get_text()]
    assert {t._preprocess_math(t.get_text()) for t in drawn} >= {(n, False) for n in names}
    box = fig.axes[0].title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    plots.png(fig)


def test_names_in_report_md_are_text_and_in_results_csv_are_not_formulas(trained_run, tmp_path):
    """Hostile pass 28: a run named <img onerror=...> was live HTML in report.md (report.html
    escaped it), a run named "my run (v2)" had an image link CommonMark cannot read, and a run
    or class named =HYPERLINK(...) was a formula in results.csv and `predict --csv`. Pass 29:
    Markdown's own syntax ([x](javascript:...), a backtick, \\|) was live, or split a row."""
    import csv

    from transferlab import predict

    names = ["<img src=x onerror=alert(1)> & co", "my run (v2)", '=HYPERLINK("e.com","x")',
             "[x](javascript:alert(1))", "r\\|z `c` $5-$10", "_u_ ~~s~~ a_b"]  # fmt: skip
    for name in names:
        shutil.copytree(trained_run, tmp_path / name)
    report.write(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "<img" not in text and "| &lt;img src=x onerror=alert(1)&gt; &amp; co |" in text
    assert "![my run (v2) curves](my%20run%20%28v2%29/curves.png)" in text
    assert "| \\[x\\](javascript:alert(1)) |" in text and not re.search(r"(?<!\\)\]\(java", text)
    assert "| r\\\\\\|z \\`c\\` &#36;5-&#36;10 |" in text  # each character escaped
    assert "| \\_u\\_ &#126;&#126;s&#126;&#126; a_b |" in text  # pass 30: emphasis, strikethrough
    for table in (b.splitlines() for b in text.split("\n\n") if b.startswith("|")):  # rows whole
        cells = {len(re.findall(r"(?<!\\)(?:\\\\)*\|", row)) for row in table}
        assert cells == {table[0].count("|")}, table
    with open(tmp_path / "results.csv", newline="") as f:
        models = [row["model"] for row in csv.DictReader(f)]
    assert sorted(models) == sorted([names[0], names[1], "'" + names[2], *names[3:]])
    rows = [{"path": "@x.png", "predictions": [{"class": c, "name": c, "prob": 0.5}]}
            for c in ("-2+3", "-1", "+2.5", "a-b", "\tx", "-")]  # fmt: skip
    cells = [r[:4] for r in csv.reader(predict.csv_text(rows).splitlines()[1:])]
    assert [r[2] for r in cells] == ["'-2+3", "-1", "+2.5", "a-b", "'\tx", "-"]  # (- was '-)
    assert cells[0][0] == "'@x.png"


def test_runs_on_other_data_get_a_data_column_and_no_gain_line(report_dir, tmp_path):
    """Runs of two datasets in one folder were one table of numbers that do not compare."""
    import json

    from transferlab import folds

    assert "| data |" not in (report_dir / "report.md").read_text()  # one dataset: no column
    root = tmp_path / "mixed"
    shutil.copytree(report_dir / "ens", root / "ens")
    for name in ("tiny", "tiny-copy", "tiny-2"):
        shutil.copytree(report_dir / "tiny", root / name)
    meta = json.loads((root / "tiny-copy" / "meta.json").read_text())
    meta |= {"data": "digits"}  # and its fingerprint: not marked as data that changed since
    meta["data_fingerprint"] = folds.load_as_run(meta).fingerprint
    (root / "tiny-copy" / "meta.json").write_text(json.dumps(meta))
    ensembles.build(
        [root / "tiny", root / "tiny-2"], "soft", root / "ens", quiet=True, overwrite=True
    )
    path, table = report.write(root)
    assert table.splitlines()[0].startswith("| model | data | arch |")
    assert "| tiny-copy | digits |" in table
    assert (root / "results.csv").read_text().startswith("model,data,arch,")
    assert "<th>data</th>" in (root / "report.html").read_text()
    text = path.read_text()
    assert "Best single model" in text  # the ensemble against the run on its own data
    for name in ("tiny", "tiny-2"):
        (root / name / "meta.json").write_text(json.dumps(meta))
    assert "Best single model" not in report.write(root)[0].read_text()


def test_report_flags_runs_it_cannot_stand_behind(report_dir, tmp_path, capsys):
    """Runs with missing or corrupt weights were listed as usable; an incomplete meta.json
    was a traceback that stopped the whole report; an empty folder was an empty report."""
    import json

    from transferlab import checkpoint
    from transferlab.cli import main
    from transferlab.config import UserError

    root = tmp_path / "odd"
    for name in ("good", "gone", "cut", "half"):
        shutil.copytree(report_dir / "tiny", root / name)
    (root / "gone" / "model.safetensors").unlink()
    with open(root / "cut" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    (root / "half" / "meta.json").write_text(json.dumps({"data": "digits"}))
    for bad in ("{}", "[]", '{"data": "digits"}'):
        (root / "half" / "meta.json").write_text(bad)
        with pytest.raises(UserError, match="corrupt .*meta.json: no "):
            checkpoint.read_meta(root / "half")
        assert main(["evaluate", str(root / "half")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    path, table = report.write(root)
    assert "note: left out corrupt" in capsys.readouterr().err
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert sorted(rows) == [
        "cut (unusable: its weights are missing or corrupt; train it again)",
        "gone (unusable: its weights are missing or corrupt; train it again)",
        "good",
    ]
    assert "Left out: corrupt" in path.read_text()
    (tmp_path / "empty" / "r" / "state").mkdir(parents=True)
    with pytest.raises(
        UserError, match=r"is a run that has not finished \(still training, or stopped: finish it"
    ):
        checkpoint.read_meta(tmp_path / "empty" / "r")  # evaluate said "not a run folder"
    with pytest.raises(
        UserError, match="no finished run or ensemble under .*r: a run that has not finished"
    ):
        report.write(tmp_path / "empty")


def test_a_folder_another_command_holds_is_not_reported_into(trained_run, tmp_path):
    """A recipe running into OUT holds its lock; `transferlab report OUT` meanwhile would write
    report.md beside the recipe's own: refused like any second command, then written after."""
    from transferlab import outputs
    from transferlab.config import UserError

    out = tmp_path / "recipe-out"
    shutil.copytree(trained_run, out / "tiny")
    with outputs.lock(out), pytest.raises(UserError, match="in use by another transferlab"):
        report.write(out)
    assert not (out / "report.md").exists()
    path, _ = report.write(out)
    assert path == out / "report.md" and path.is_file()


def test_class_names_the_font_lacks_are_one_note_not_a_warning_per_glyph(tmp_path, monkeypatch):
    """Two CJK/emoji class names printed 16 'Glyph ... missing from font' lines per command."""
    from transferlab import plots

    monkeypatch.setattr(plots, "_NOTED", set())
    names = ["猫", "\U00013000"]  # (an Egyptian hieroglyph: in no font transferlab falls back to)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(2):
            plots.confusion(np.eye(2), names, tmp_path / f"c{i}.png", "猫 and \U00013000")
            plots.png(plots.per_class_figure(np.array([0.5, 1.0]), names))
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and "\U00013000" in said[0] and "empty boxes" in said[0], said
    assert (tmp_path / "c1.png").stat().st_size > 0


def test_a_run_that_has_not_finished_is_named_as_left_out_and_a_file_is_not_missing(
    trained_run, tmp_path, capsys
):
    """A run stopped by SIGTERM or Ctrl-C was left out of the table without a word; `report
    FILE` said "report folder not found"."""
    shutil.copytree(trained_run, tmp_path / "done")
    shutil.copytree(trained_run, tmp_path / "stopped")
    (tmp_path / "stopped" / "meta.json").unlink()  # (its state/ kept: resumable)
    report.write(tmp_path)
    said = (  # the whole command: report and run take no --resume
        "stopped: a run that has not finished (still training, or stopped: finish it with "
        f"transferlab train --out {tmp_path / 'stopped'} --resume)"
    )
    assert said in capsys.readouterr().err and said in (tmp_path / "report.md").read_text()
    assert f"Left out: {html.escape(str(tmp_path))}/{html.escape(said)}</p>" in (tmp_path / "report.html").read_text()  # fmt: skip
    assert "val is the data's own or carved from train" in (tmp_path / "report.md").read_text()
    from transferlab import outputs

    (tmp_path / "first-epoch").mkdir()  # before its first checkpoint: no state/, its mark
    outputs.mark(tmp_path / "first-epoch", "run")
    report.write(tmp_path)
    assert "first-epoch: a run that has not finished" in capsys.readouterr().err

    recipe_out = tmp_path / "recipe-out"  # a recipe's step: the recipe, run again, finishes it
    recipe_out.mkdir()
    outputs.mark(recipe_out, "recipe")
    shutil.copytree(tmp_path / "stopped", recipe_out / "a")
    with pytest.raises(UserError, match="stopped: run the recipe that made it again to finish"):
        checkpoint.read_meta(recipe_out / "a")
    study = recipe_out / "au"  # pass 43 (F4): an auto step's candidate the study skipped
    shutil.copytree(trained_run, study / "best")  # for its budget was "left out: finish it
    (study / "auto.json").write_text("{}")  # with transferlab auto --resume", which did not
    outputs.mark(study, "auto")
    shutil.copytree(tmp_path / "stopped", study / "candidates" / "dcnn-16" / "fold-1")
    capsys.readouterr()
    shutil.copytree(trained_run, study / "mine")  # pass 44 (F3): not the study's, put in it:
    shutil.copytree(study, study / "inner", ignore=shutil.ignore_patterns("inner", "mine"))  # in
    shutil.copytree(tmp_path / "stopped", study / "mine-stopped")  # the table or said left out
    report.write(recipe_out)
    said = capsys.readouterr().err
    assert "recipe-out/a: a run" in said and "dcnn-16" not in said and "transferlab auto" not in said, said  # fmt: skip
    assert "au/mine-stopped: a run" in said, said
    rows = [r.split(",")[0] for r in (recipe_out / "results.csv").read_text().splitlines()[1:]]
    assert sorted(rows) == ["au/best", "au/inner/best", "au/mine"], rows
    with pytest.raises(UserError, match="report.md is a file; report a folder of runs"):
        report.write(tmp_path / "report.md")


def test_a_run_named_with_a_pipe_or_made_with_a_newline_keeps_its_table_row_whole(
    trained_run, tmp_path
):
    """A newline in a run's name (made outside transferlab) split report.md's row in two; a |
    in it made an extra column."""
    root = tmp_path / "runs"
    for name in ("a|b", "c\nd"):
        shutil.copytree(trained_run, root / name, ignore=shutil.ignore_patterns("*.lock"))
    path, _ = report.write(root)
    table = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = table[0].count("|")
    rows = [line for line in table if "a\\|b" in line or "c\\\\nd" in line]  # (\\ escaped)
    assert len(rows) == 2 and all(re.sub(r"\\\|", "", row).count("|") == header for row in rows)


def test_a_report_a_user_wrote_into_is_never_written_over(trained_run, tmp_path):
    """report.md and results.csv with a user's notes added were replaced without a word (only
    their first line was read): each file's sha256 as written is kept, and a changed one is
    refused by report and by --overwrite of the run folder it is in, and left as it is."""
    from transferlab import trainer

    from conftest import tiny_cfg

    shutil.copytree(trained_run, tmp_path / "tiny")
    report.write(tmp_path)
    report.write(tmp_path)  # unchanged since: written again
    for name, line in (
        ("report.md", "\nmy conclusion: ship it\n"),
        ("results.csv", "x,,,MY NOTE\n"),
    ):
        path, was = tmp_path / name, (tmp_path / name).read_bytes()
        path.write_bytes(was + line.encode())
        with pytest.raises(UserError, match=f"{name} was changed since transferlab report wrote"):
            report.write(tmp_path)
        assert path.read_bytes() == was + line.encode()
        path.write_bytes(was)  # the notes taken out: its own again
    report.write(tmp_path)
    from transferlab import checkpoint  # pass 31: two failed writes in a row (disk full) and the

    atomic = checkpoint.atomic_path

    def full(path, exclusive=False):  # file there read as changed by the user, for good
        if Path(path).name.startswith("report"):  # (its record of shas is written)
            raise OSError(27, "File too large")
        return atomic(path, exclusive)

    for copy in ("c1", "c2"):  # each write its own text: a run more
        shutil.copytree(trained_run, tmp_path / copy, ignore=shutil.ignore_patterns("*.lock"))
        with pytest.MonkeyPatch.context() as m, pytest.raises((OSError, UserError)):
            m.setattr(checkpoint, "atomic_path", full)
            report.write(tmp_path)
    report.write(tmp_path)
    report.write(tmp_path / "tiny")  # a report inside a run folder, with notes added
    (tmp_path / "tiny" / "report.md").write_text(
        (tmp_path / "tiny" / "report.md").read_text() + "mine"
    )
    cfg = tiny_cfg("digits", epochs=1, limit=60)
    with pytest.raises(UserError, match="report.md"):
        trainer.fit(cfg, tmp_path / "tiny", overwrite=True, quiet=True)
    assert (tmp_path / "tiny" / "report.md").read_text().endswith("mine")
    moved = tmp_path / "moved"  # `mv runs/* moved/`: the * leaves .transferlab-report.json
    moved.mkdir()  # behind, and the notes went with the first report written there
    shutil.move(tmp_path / "tiny", moved / "tiny")
    (moved / "report.md").write_text((tmp_path / "report.md").read_text() + "my notes\n")
    with pytest.raises(UserError, match="report.md has no record of how transferlab report wrote it"):  # fmt: skip
        report.write(moved)
    assert (moved / "report.md").read_text().endswith("my notes\n")


def test_an_ensemble_of_fold_runs_names_their_candidate():
    """auto's best/ of a trained candidate listed its members as fold-1, ..., fold-5."""
    from pathlib import Path

    from transferlab import report

    assert report._member(Path("study/candidates/dcnn-24/fold-3")) == "dcnn-24/fold-3"
    assert report._member(Path("runs/fold-3b")) == "fold-3b"


def test_a_limited_run_s_test_score_is_marked_as_on_part_of_the_test_split(tmp_path, capsys):
    """Hostile pass 21: a --limit run's test score (on 5 of 8 test images) sat in report.md
    beside full-test scores unmarked (a --skip-bad-images partial test was marked)."""
    from transferlab import report, trainer

    from conftest import tiny_cfg

    trainer.fit(tiny_cfg("digits", epochs=1, limit=30), tmp_path / "lim")
    said = "test score on 30 of the 360 test images: --limit 30"
    assert said in capsys.readouterr().out  # with the splits (--quiet: an error stays one line)
    assert said in checkpoint.read_meta(tmp_path / "lim")["notes"]
    # and every score made of it says it (hostile pass 27: evaluate, a soup and an ensemble of
    # limited runs were bare): the same mark in the report, the note in evaluate's JSON
    from transferlab import api, ensembles

    runs = [tmp_path / "lim", tmp_path / "lim-2"]
    trainer.fit(tiny_cfg("digits", epochs=1, limit=30, lr=0.02), runs[1], quiet=True)
    api.soup(runs, "uniform", tmp_path / "soup")
    api.ensemble(runs, "soft", tmp_path / "ens")
    for made in ("lim", "soup", "ens"):
        assert said in ensembles.evaluate_path(tmp_path / made, None, "test")["notes"], made
    _, table = report.write(tmp_path)
    for made in ("lim", "soup", "ens"):
        assert f"| {made} (test score on 30 of the 360 test images) |" in table


def test_runs_linked_into_the_folder_are_reported_once(trained_run, tmp_path):
    """Hostile pass 21: runs gathered with ln -s for a comparison were left out (rglob does
    not follow linked folders): "no finished run", or a row missing without a word."""
    from transferlab import report

    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "linked").symlink_to(trained_run)
    (tmp_path / "cmp" / "loop").symlink_to(tmp_path / "cmp")  # a loop: read once
    _, table = report.write(tmp_path / "cmp")
    assert [r.split("|")[1].strip() for r in table.splitlines()[2:]] == ["linked"]
    shutil.copytree(trained_run, tmp_path / "cmp" / "real")  # pass 45 (F4): a link to it (here
    (tmp_path / "cmp" / "a-link").symlink_to(tmp_path / "cmp" / "real")  # first by name) named
    _, table = report.write(tmp_path / "cmp")  # its row, the notes the real folder
    assert sorted(r.split("|")[1].strip() for r in table.splitlines()[2:]) == ["linked", "real"]


def test_a_report_of_the_current_folder_is_titled_with_its_name(trained_run, tmp_path, monkeypatch):
    """`report .` wrote "# transferlab report: " and an empty <title> and <h1>."""
    shutil.copytree(trained_run, tmp_path / "study" / "a")
    monkeypatch.chdir(tmp_path / "study")
    report.write(Path("."))
    assert (
        (tmp_path / "study" / "report.md").read_text().startswith("# transferlab report: study\n")
    )
    page = (tmp_path / "study" / "report.html").read_text()
    assert "<title>transferlab report: study</title>" in page
    assert "<h1>transferlab report: study</h1>" in page
    monkeypatch.chdir(tmp_path / "study" / "a")  # hostile pass 41 (F8): a run's own folder,
    for root in (Path("."), tmp_path / "study" / "a"):  # its row named "."
        report.write(root)
        rows = (tmp_path / "study" / "a" / "results.csv").read_text().splitlines()
        assert len(rows) == 2 and rows[1].startswith("a,"), rows


def test_a_run_whose_data_changed_since_it_was_scored_is_marked_in_report_md_and_csv(tmp_path):
    """evaluate and report.html said a run's data files had changed since it was scored;
    report.md and results.csv showed its old numbers unmarked (hostile pass 35, F8)."""
    from transferlab import trainer

    from conftest import make_folder, tiny_cfg

    root = make_folder(tmp_path / "d", ["a", "b"], 6, subsets=("train", "val", "test"))
    trainer.fit(tiny_cfg(f"folder:{root}", epochs=1), tmp_path / "runs" / "r", quiet=True)
    shutil.copytree(tmp_path / "runs" / "r", tmp_path / "runs" / "r2")  # the same data: once
    ensembles.build([tmp_path / "runs" / "r", tmp_path / "runs" / "r2"], "soft", tmp_path / "runs" / "e", quiet=True)  # fmt: skip
    other = shutil.copytree(root, tmp_path / "other")  # an ensemble scored on other data (pass 39)
    ensembles.build([tmp_path / "runs" / "r", tmp_path / "runs" / "r2"], "soft", tmp_path / "runs" / "o", f"folder:{other}", quiet=True)  # fmt: skip
    said = "scored before its data's files changed (the old numbers: evaluate scores it on the files as they are)"
    assert said not in report.write(tmp_path / "runs")[1]
    shutil.copy(root / "test" / "a" / "0.png", root / "test" / "b" / "new.png")  # one more
    with warnings.catch_warnings():  # (the marked name titled the gain chart: "Tight layout
        warnings.simplefilter("error")  # not applied" was printed)
        table = report.write(tmp_path / "runs")[1]
    assert f"| r ({said}) |" in table and f"| r2 ({said}) |" in table
    assert f"| e ({said}) |" in table  # its members' old numbers combined (pass 38, F6)
    rows = list(csv.DictReader((tmp_path / "runs" / "results.csv").open()))
    assert sorted((r["model"], r["notes"]) for r in rows) == [
        ("e", said),
        ("o", ""),  # scored on other data, as they were
        ("r", said),
        ("r2", said),
    ]
    shutil.rmtree(root)  # gone: nothing to compare with, no mark (report.html says unreadable)
    assert said not in report.write(tmp_path / "runs")[1]
    shutil.copy(other / "test" / "a" / "0.png", other / "test" / "b" / "new.png")
    assert f"| o ({said}) |" in report.write(tmp_path / "runs")[1]


def test_a_top_5_of_5_classes_or_fewer_is_shown_as_none_for_runs_scored_before_that_rule(
    report_dir, tmp_path
):
    """Runs scored before top-5 was left out for 5 classes or fewer stored 100%, which
    report.md and results.csv still showed (hostile pass 37, F1)."""
    import json

    old = shutil.copytree(report_dir / "tiny", tmp_path / "old")
    meta = json.loads((old / "meta.json").read_text())
    assert len(meta["classes"]) <= 5 and meta["metrics"]["test"]["top5"] is None
    meta["metrics"]["test"]["top5"] = 1.0  # as it was recorded then
    (old / "meta.json").write_text(json.dumps(meta))
    report.write(tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["test top-5"] for r in rows] == ["-"]
