import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from transferlab import data, decoding
from transferlab.config import UnreadableImages, UserError

from conftest import make_folder, make_image


def test_digits_splits_are_fixed_stratified_and_disjoint():
    ds = data.load("digits")
    n = {k: len(v) for k, v in ds.splits.items()}
    assert sum(n.values()) == 1797
    assert n["test"] / 1797 >= 0.2
    assert ds.native_size == 8 and ds.native_channels == 1 and ds.classes[0] == "0"
    again = data.load("digits", val_fraction=0.1)
    for split in ds.splits:
        np.testing.assert_array_equal(ds.splits[split].arrays, again.splits[split].arrays)
    # every class appears in every split (stratified)
    assert all(len(np.unique(s.labels)) == 10 for s in ds.splits.values())


def test_val_is_carved_from_train_never_from_test(folder_data):
    ds = data.load(f"folder:{folder_data}")
    train, val, test = (set(ds.splits[s].paths) for s in ("train", "val", "test"))
    assert not (train & val) and not (val & test) and not (train & test)
    assert all("/train/" in p for p in val)
    assert len(test) == 40 and len(train) + len(val) == 120


def test_folder_without_subsets_gets_seeded_split_and_hidden_dirs_are_not_classes(tmp_path):
    make_folder(tmp_path, ["cat", "dog"], 10, subsets=("",))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    make_image(0, 0).save(tmp_path / ".ipynb_checkpoints" / "x.png")
    ds = data.load(f"folder:{tmp_path}")
    assert ds.classes == ["cat", "dog"]
    assert len(ds.splits["test"]) == 4
    assert data.load(f"folder:{tmp_path}").splits["test"].paths == ds.splits["test"].paths
    for i, ext in enumerate(("jfif", "JPE")):  # JPEG's other names (pass 62: "not images")
        make_image(0, 90 + i).save(tmp_path / "cat" / f"x{i}.{ext}", format="JPEG")
    ds = data.load(f"folder:{tmp_path}", val_fraction=0.0)
    assert sum(len(split) for split in ds.splits.values()) == 22


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'nope'}")
    make_folder(tmp_path / "d", ["a", "b"], 3)
    (tmp_path / "d" / "test" / "b").rename(tmp_path / "d" / "test" / "zebra")
    with pytest.raises(UserError, match="zebra"):
        data.load(f"folder:{tmp_path / 'd'}")
    (tmp_path / "e" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        data.load(f"folder:{tmp_path / 'e'}")
    with pytest.raises(UserError, match="unknown dataset kind 'imagenet'.*synthetic\\)$"):
        data.load("imagenet:/x")
    (tmp_path / "labels.CSV").write_text("path,label\n")  # hostile pass 40 (F3): a bare path
    (tmp_path / "e" / "wnids.txt").write_text("n01\n")
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "dataset_dict.json").write_text("{}")
    (tmp_path / "w").mkdir()  # pass 41 (F6): `data shard`'s folder
    (tmp_path / "w" / "shards.json").write_text("{}")
    bare = ((tmp_path / "w", "wds"), (tmp_path / "d", "folder"), (tmp_path / "labels.CSV", "csv"), (tmp_path / "e", "tiny-imagenet"), (tmp_path / "h", "hf"))  # fmt: skip
    for spec, meant in bare:
        with pytest.raises(UserError, match=f"known: .*\\): did you mean {meant}:{spec}\\?$"):
            data.load(str(spec))
    (tmp_path / "loose").mkdir()  # stop 54: images with no class folders got "folder:"
    (tmp_path / "loose" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"\): \S+loose holds no class folders \(folder:PATH .* predict RUN \S+loose\)$"):  # fmt: skip
        data.load(str(tmp_path / "loose"))
    with pytest.raises(
        UserError, match=r"synthetic\): and no file or folder \S+nowhere exists$"
    ):  # pass 45
        data.load(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")  # (a file that is there: no hint)
    with pytest.raises(UserError, match=r"synthetic\)$"):
        data.load(str(tmp_path / "notes.txt"))


def test_synthetic_data_takes_a_count_and_a_size_it_can_make():
    """Hostile pass 48 (F2): synthetic:0, -5, 20x0 ended in numpy's or torch's traceback, and
    synthetic:x was read as the default."""
    for arg in ("0", "-5", "20x-3", "20x0", "x", "100x7", "1e3", "100x", "x8"):
        with pytest.raises(UserError, match=f"^synthetic data is synthetic:N or synthetic:NxSIZE, N >= 1 images \\(of 10 classes\\) of SIZE >= 8 px, got '{arg}'$"):  # fmt: skip
            data.load(f"synthetic:{arg}")
    ds = data.load("synthetic:10x8")
    assert sum(map(len, ds.splits.values())) == 10 and ds.splits["train"].arrays.shape[1:] == (8, 8, 3)  # fmt: skip
    assert data.load("synthetic:").native_size == 64 == data.load("synthetic:20x64").native_size
    for arg, gib in (("99999999999999999999", "1.14e+15"), ("10x99999", "279")):  # pass 49 (F4)
        with pytest.raises(UserError, match=rf"^synthetic:{arg} would hold {re.escape(gib)} GiB of pixels in memory: at most 4 \(N x SIZE x SIZE x 3 bytes\)$"):  # fmt: skip
            data.load(f"synthetic:{arg}")


def test_a_mistyped_data_spec_is_told_what_it_may_have_meant(tmp_path, monkeypatch):
    """Hostile pass 46 (F4): a kind in another case or one letter off, a relative path that
    is not there and a .tar shard got the bare list of kinds."""
    monkeypatch.chdir(tmp_path)
    meant = {
        "Digits": r"did you mean digits\?",
        "Folder:img3": r"did you mean folder:img3\?",
        "folde:/x": r"did you mean folder:/x\?",
        "digts": r"did you mean digits\?",
        "mydata": "and no file or folder mydata exists",
        "s.tar": "wds:PATH takes the folder transferlab data shard wrote .*, not one .tar",
        "CSV:l.csv": r"did you mean csv:l.csv\?",
        "imagenet:/x": "",  # (not ImageNet's tiny one: no hint)
    }
    (tmp_path / "s.tar").write_bytes(b"")
    for spec, hint in meant.items():
        with pytest.raises(UserError, match=f"known: [^)]*\\){': ' * bool(hint)}{hint}$"):
            data.load(spec)
    make_folder(tmp_path / "Digits", ["a", "b"], 3, subsets=("",))  # a folder of that name
    with pytest.raises(UserError, match=r"known: .*\): did you mean folder:Digits\?$"):
        data.load("Digits")
    with pytest.raises(UserError, match=r"^unknown dataset kind 'mydata' \(known"):  # once
        data.load("mydata")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")  # pass 48 (F6): "no file"
    with pytest.raises(UserError, match=rf"^broken is a broken link to {tmp_path / 'nowhere'}: mend it, or give --data a folder or file that is there$"):  # fmt: skip
        data.load("broken")
    assert not any("folder:digits" in n for n in data.load("digits").notes)
    make_folder(tmp_path / "digits", ["a", "b"], 3, subsets=("",))  # (F7): unsaid
    assert "--data digits is scikit-learn's bundled 8x8 digits; for the folder digits/ here: --data folder:digits" in data.load("digits").notes  # fmt: skip
    (tmp_path / "flat" / ".ipynb_checkpoints").mkdir(parents=True)  # pass 47 (F1): a hidden
    make_image(0, 0).save(tmp_path / "flat" / "x.png")  # folder is no class: folder:flat failed
    (tmp_path / "empty").mkdir()  # (F2): predict RUN empty failed too
    for spec, hint in (("flat", r"per class; to classify images: transferlab predict RUN flat"), ("empty", "per class, and it holds no images either")):  # fmt: skip
        with pytest.raises(UserError, match=rf"\): {spec} holds no class folders \(folder:PATH takes a folder of one folder {hint}\)$"):  # fmt: skip
            data.load(spec)


def make_tiny_imagenet(root, wnids=("n01", "n02", "n03"), per_class=6):
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(
        "".join(f"{w}\tthing {w}, other\n" for w in wnids) + "n99\tunused\n"
    )
    lines = []
    (root / "val" / "images").mkdir(parents=True)
    for c, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            mode = "L" if i == 0 else "RGB"  # some grayscale images, like the real data
            make_image(c, i, 64, mode).save(d / f"{w}_{i}.JPEG")
        for i in range(2):
            name = f"val_{c * 2 + i}.JPEG"
            make_image(c, 50 + i, 64).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tin")
    ds = data.load(f"tiny-imagenet:{root}")
    assert ds.classes == ["n01", "n02", "n03"]
    assert ds.names[1] == "thing n02, other"
    assert len(ds.splits["test"]) == 6
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 18
    arr = decoding.decode(ds.splits["train"], 64, 3)
    assert arr.shape == (len(ds.splits["train"]), 64, 64, 3)


@pytest.mark.shared_data
def test_shared_tiny_imagenet_counts(shared_data):
    ds = data.load(f"tiny-imagenet:{shared_data / 'tiny-imagenet-200'}")
    assert len(ds.classes) == 200
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 20_000
    assert len(ds.splits["test"]) == 10_000
    assert np.bincount(ds.splits["test"].labels).tolist() == [50] * 200
    assert ds.names[ds.classes.index("n01443537")].startswith("goldfish")


@pytest.mark.shared_data
def test_shared_15_scene_counts(shared_data):
    ds = data.load(f"folder:{shared_data / '15-scene'}")
    assert len(ds.classes) == 15 and "bedroom" in ds.classes
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 1500
    assert len(ds.splits["test"]) == 2985


# ----------------------------------------------------------------------------- splits as given


def test_folder_splits_are_used_as_given_and_missing_ones_are_carved_and_said(tmp_path):
    full = make_folder(tmp_path / "full", ["a", "b"], 6, subsets=("train", "val", "test"))
    ds = data.load(f"folder:{full}", val_fraction=0.5)
    assert [len(ds.splits[k]) for k in ("train", "val", "test")] == [12, 12, 12]  # nothing carved
    assert all("/val/" in p for p in ds.splits["val"].paths)
    assert "val 12 (given)" in ds.notes[0] and "test 12 (given)" in ds.notes[0]
    (full / "val").rename(full / "validation")  # the Hugging Face name for it
    ds = data.load(f"folder:{full}")
    assert all("/validation/" in p for p in ds.splits["val"].paths)
    part = make_folder(tmp_path / "part", ["a", "b"], 10, subsets=("train", "val"))
    ds = data.load(f"folder:{part}")
    assert all("/val/" in p for p in ds.splits["val"].paths) and len(ds.splits["val"]) == 20
    assert all("/train/" in p for p in ds.splits["test"].paths)  # held out of train, not val
    assert "test 4 (20% of train held out)" in ds.notes[0], ds.notes
    (part / "validation" / "a").mkdir(parents=True)  # (a split folder holds class folders)
    with pytest.raises(UserError, match="both val/ and validation/ hold the val split"):
        data.load(f"folder:{part}")
    shutil.rmtree(part / "validation")
    (part / "train").rename(part / "training")  # read as datasets reads it: train
    assert all("/training/" in p for p in data.load(f"folder:{part}").splits["train"].paths)
    (part / "training").rename(part / "images")
    with pytest.raises(UserError, match="has val/ but no train/"):
        data.load(f"folder:{part}")
    # pass 29: classes named dev, eval, Test (images inside, no class folders) are classes
    named = make_folder(tmp_path / "named", ["dev", "eval", "Test", "cat"], 4, subsets=())
    assert data.load(f"folder:{named}").classes == ["Test", "cat", "dev", "eval"]
    # beside train/, such a dev/ of images (no class folders) is left out: said with why
    beside = make_folder(tmp_path / "beside", ["cat", "dog"], 4, subsets=("train",))
    shutil.copytree(beside / "train" / "cat", beside / "dev")
    (beside / "notes").mkdir()
    said = f"ignored folder(s) beside train/ in {beside}: dev, notes (dev/ holds images, not a folder per class as a split does)"  # fmt: skip
    assert said in data.load(f"folder:{beside}").notes


def _csv_data(tmp_path, rows: list[str], header: str = "file_name,label,split"):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(24):
        make_image(i % 3, i).save(tmp_path / "img" / f"{i}.png")
    path = tmp_path / "metadata.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_data_reads_file_name_label_and_split_relative_to_the_file(tmp_path):
    rows = [f"img/{i}.png,{(i % 3) * 5},{'train' if i < 15 else 'validation' if i < 18 else 'test'}"
            for i in range(24)]  # fmt: skip
    path = _csv_data(tmp_path, rows)
    ds = data.load(f"csv:{path}")
    assert ds.classes == ["0", "5", "10"]  # numbers in numeric order, below 0 too
    assert data.label_order(["10", "b", "2", "-1", "a"]) == ["-1", "2", "10", "a", "b"]
    assert data.label_order(["1.0", "2.0", "1e1"]) == ["1.0", "1e1", "2.0"]  # whole: names
    assert [len(ds.splits[k]) for k in ("train", "val", "test")] == [15, 3, 6]
    assert ds.splits["test"].paths[0] == str(tmp_path / "img" / "18.png")
    assert ds.splits["test"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.native_size == 24 and ds.spec == f"csv:{path.resolve()}"
    capital = _csv_data(tmp_path, [r.replace("validation", "Valid") for r in rows], "File_Name,LABEL,Split")  # fmt: skip
    assert [len(data.load(f"csv:{capital}").splits[k]) for k in ("train", "val", "test")] == [15, 3, 6]  # fmt: skip
    dev = [r.replace("validation", "dev").replace("test", "Eval") for r in rows]  # as hf: reads
    assert [len(data.load(f"csv:{_csv_data(tmp_path, dev)}").splits[k]) for k in ("train", "val", "test")] == [15, 3, 6]  # fmt: skip
    no_split = _csv_data(tmp_path, [f"img/{i}.png,{i % 3}" for i in range(24)], "file_name,label")
    ds = data.load(f"csv:{no_split}")
    assert len(ds.splits["test"]) == 5 and "test 5 (20% of train held out)" in ds.notes[0]
    six = _csv_data(tmp_path, [f"img/{i}.png,{i % 6}" for i in range(12)], "file_name,label")
    assert "test 6 (20% of train held out, raised to 50% for one image of each class)" in str(data.load(f"csv:{six}").notes)  # fmt: skip


@pytest.mark.parametrize(
    "header, rows, message",
    [
        ("file,label", ["img/0.png,a"], "no file_name column \\(found file, label\\)"),
        ("file_name,label,split", ["img/0.png,a,train", "img/1.png,b,holdout"], "line 3: split 'holdout' is not one of train, training, val"),
        ("file_name,label", ["img/0.png,a", "img/99.png,b"], "line 3: img/99.png not found"),
        ("file_name,label", ["img/0.png,a", "img,b"], "line 3: img is a folder, not an image"),
        ("file_name,label,split", ["img/0.png,a,train", "img/1.png,b,train", "img/2.png,c,test"],
         "line 4: label 'c' of a test row has no train rows"),
        ("file_name,label", ["img/0.png,a", "img/1.png,"], "line 3: empty file_name or label"),
        ("file_name,label,split", ["img/0.png,a,test"], "no train rows"),
        ("file_name,label,split", ["img/0.png,a,train", "img/1.png,a,train", "img/../img/0.png,b,test"],
         "line 4: img/../img/0.png is on line 2 too"),  # the image in train and in test
        ("file_name,label", ["img/0.png,a", "img/1.png,a,x"], "line 3: more fields than the header's 2 \\('x'\\)"),
        # a blank line counted (it said line 4: the editor's line is 5)
        ("file_name,label", ["img/0.png,a", "", "img/1.png,b", "img/0.png,c"], "line 5: img/0.png is on line 2 too"),
        ("file_name,label,label", ["img/0.png,a,b"], "column label appears twice \\(columns 2 and 3\\)"),
        ("file_name,label,split,Split", ["img/0.png,a,train,test"], "column split appears twice \\(columns 3 and 4\\)"),
        ("file_name;label", ["img/0.png;a"], "separate the columns with commas"),
        ("file_name\tlabel", ["img/0.png\ta"], "separate the columns with commas"),  # (pass 63)
        # a blank split is train, spaces too (pass 63: "split '' is not one of")
        ("file_name,label,split", ["img/0.png,a, ", "img/1.png,b,test"], "line 3: label 'b' of a test row has no train rows"),
        ("file_name,label", ["img/0.png,a", " img/99.png,b"], "not found \\(spaces around a name are ignored\\)"),
        ("file_name,label", ["img/0.png,a", "img\\1.png,b"], "not found; separate folders with /"),
    ],
)  # fmt: skip
def test_every_csv_mistake_is_one_line_naming_the_row(tmp_path, header, rows, message):
    path = _csv_data(tmp_path, rows, header)
    with pytest.raises(UserError, match=message):
        data.load(f"csv:{path}")
    with pytest.raises(UserError, match="CSV file not found"):
        data.load(f"csv:{tmp_path / 'nope.csv'}")
    with pytest.raises(UserError, match="img is a folder, not a CSV file"):
        data.load(f"csv:{tmp_path / 'img'}")


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_csv_image_listed_again_through_a_link_is_refused(tmp_path, link):
    """A link to a train image, listed as test, passed the duplicate check (paths compared as
    written; a hard link, after that, as resolved): the same image scored as a test image."""
    path = _csv_data(tmp_path, ["img/0.png,a,train", "img/1.png,b,train", "link.png,a,test"],
                     "file_name,label,split")  # fmt: skip
    (os.symlink if link == "symbolic" else os.link)(
        tmp_path / "img" / "0.png", tmp_path / "link.png"
    )
    with pytest.raises(UserError, match="line 4: link.png is on line 2 too"):
        data.load(f"csv:{path}")


# ----------------------------------------------------------------------------- Hugging Face


def _hf_dataset(tmp_path, with_test_labels=True):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"img": datasets.Image(), "fine": datasets.ClassLabel(names=["ant", "bee", "cat"])}
    )

    def part(n, offset, labelled=True):
        images = [make_image(i % 3, i + offset, size=20 + i % 5) for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": images, "fine": [i % 3 if labelled else -1 for i in range(n)]}, features
        )

    return datasets.DatasetDict(
        {"train": part(24, 0), "validation": part(6, 100), "test": part(9, 200, with_test_labels)}
    )


def test_quiet_silences_the_hugging_face_datasets_bars(tmp_path):
    """`--quiet` printed datasets' "Generating train split" bar for hf:FILE.parquet."""
    _hf_dataset(tmp_path)["train"].to_parquet(str(tmp_path / "hf.parquet"))
    argv = ["train", "--data", f"hf:{tmp_path / 'hf.parquet'}", "--model", "dcnn", "--epochs",
            "1", "--input-size", "16", "--out"]  # fmt: skip
    env = os.environ | {"TRANSFERLAB_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "transferlab", "--quiet", *argv, str(tmp_path / "r")]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "Generating" not in done.stderr, done.stderr[-500:]


def test_hf_datasets_from_disk_and_parquet_keep_their_splits_and_class_names(tmp_path):
    dd = _hf_dataset(tmp_path)
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = data.load(f"hf:{tmp_path / 'saved'}")
    assert ds.classes == ["ant", "bee", "cat"] and ds.spec == f"hf:{tmp_path / 'saved'}"
    assert [len(ds.splits[k]) for k in ("train", "val", "test")] == [24, 6, 9]
    assert ds.splits["test"].labels.tolist() == [0, 1, 2] * 3
    images = decoding.decode(ds.splits["val"], 16, 3, cache=None)  # the rows' own images
    first = np.asarray(decoding.resize(dd["validation"][0]["img"].convert("RGB"), 16, "bilinear"))
    assert np.array_equal(images[0], first)
    again = data.load(f"hf:{tmp_path / 'saved'}")
    assert (
        again.fingerprint == ds.fingerprint
        and again.splits["train"].paths == ds.splits["train"].paths
    )
    for split in dd:
        dd[split].to_parquet(str(tmp_path / "pq" / f"{split}.parquet"))
    pq = data.load(f"hf:{tmp_path / 'pq'}")
    assert [len(pq.splits[k]) for k in ("train", "val", "test")] == [24, 6, 9]
    gap = dd["train"].to_dict()  # a row with no image: unreadable, not a traceback
    gap["img"][0] = None
    features = dd["train"].features
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(gap, features).save_to_disk(str(tmp_path / "gap"))
    with pytest.raises(UnreadableImages) as said:  # named as the user knows it: its row
        for split in data.load(f"hf:{tmp_path / 'gap'}").splits.values():
            decoding.decode(split, 16, 3, cache=None)
    assert f"fix those rows in the dataset or pass --skip-bad-images: {tmp_path / 'gap'} train row 0 (" in str(said.value)  # fmt: skip
    garbage = dd["train"].to_dict()  # bytes that are no image: the same
    garbage["img"][3] = {"bytes": b"notapng", "path": None}
    datasets.Dataset.from_dict(garbage, features).save_to_disk(str(tmp_path / "garbage"))
    with pytest.raises(UnreadableImages, match="garbage train row 3 \\(not an image Pillow"):
        for split in data.load(f"hf:{tmp_path / 'garbage'}").splits.values():
            decoding.decode(split, 16, 3, cache=None)


def test_hf_unlabelled_test_split_is_replaced_and_ambiguous_columns_are_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    _hf_dataset(tmp_path, with_test_labels=False).save_to_disk(str(tmp_path / "nolabels"))
    ds = data.load(f"hf:{tmp_path / 'nolabels'}")
    assert any("test split has no labels" in n for n in ds.notes)
    assert all("/train/" in p for p in ds.splits["test"].paths)  # held out of train
    dd = _hf_dataset(tmp_path)  # the Hub's "no label" (-1) in validation: val carved from train
    dd["validation"] = dd["validation"].map(lambda row: {"fine": -1})
    dd.save_to_disk(str(tmp_path / "noval"))
    ds = data.load(f"hf:{tmp_path / 'noval'}")
    assert any("val split has no labels: a val split is carved from train" in n for n in ds.notes)
    assert all("/train/" in p for p in ds.splits["val"].paths)
    for spec, message in ((",label=img", "column 'img' holds images, not labels"),
                          (",label=fine,label=img", "label= is given twice (fine, img)")):  # fmt: skip
        with pytest.raises(UserError, match=re.escape(message)):
            data.load(f"hf:{tmp_path / 'noval'}{spec}")
    two = datasets.Dataset.from_dict({"a": [1, 2], "b": [0, 1]})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(UserError, match="cannot tell the image and label columns apart"):
        data.load(f"hf:{tmp_path / 'two'}")
    with pytest.raises(UserError, match="neither a save_to_disk folder nor parquet"):
        data.load(f"hf:{tmp_path}")


def test_hf_each_split_is_read_through_its_own_labels_and_split_names_as_datasets_reads_them(
    tmp_path,
):
    """A split encoded apart from train (its own ClassLabel, or plain names) was read with
    train's indices: right answers scored 50%, tracebacks, or a labelled test split dropped."""
    datasets = pytest.importorskip("datasets")
    dd = _hf_dataset(tmp_path)
    own = datasets.ClassLabel(names=["bee", "cat"])  # test without ant: bee=0, cat=1 in it
    dd["test"] = dd["test"].filter(lambda r: r["fine"] > 0).cast_column("fine", datasets.Value("int64"))  # fmt: skip
    dd["test"] = dd["test"].map(lambda r: {"fine": r["fine"] - 1}).cast_column("fine", own)
    names = dd["validation"].cast_column("fine", datasets.Value("string"))  # "0".."2" as text
    dd["validation"] = names.map(lambda r: {"fine": ["ant", "bee", "cat"][int(r["fine"])]})
    dd.save_to_disk(str(tmp_path / "apart"))
    ds = data.load(f"hf:{tmp_path / 'apart'}")
    assert ds.splits["test"].labels.tolist() == [1, 2] * 3  # bee, cat: not ant, bee
    assert ds.splits["val"].labels.tolist() == [0, 1, 2] * 2
    flipped = datasets.DatasetDict({"train": dd["validation"], "test": dd["test"]})  # names in
    flipped.save_to_disk(str(tmp_path / "flipped"))  # train, a ClassLabel in test: kept
    assert data.load(f"hf:{tmp_path / 'flipped'}").splits["test"].labels.tolist() == [1, 2] * 3
    for label, message in ((None, "train row 2 has no label"), ("Cat", "train row 2: label 'Cat' is not a class")):  # fmt: skip
        rows = dd["validation"].to_dict()
        rows["fine"][2] = label
        bad = datasets.Dataset.from_dict(rows, dd["validation"].features)
        datasets.DatasetDict({"train": dd["validation"], "test": bad}).save_to_disk(str(tmp_path / "bad"))  # fmt: skip
        with pytest.raises(UserError, match=message.replace("train", "test")):
            data.load(f"hf:{tmp_path / 'bad'}")
        shutil.rmtree(tmp_path / "bad")
    numbers = datasets.Dataset.from_dict({"img": dd["train"]["img"], "n": [i % 12 for i in range(24)]})  # fmt: skip
    numbers.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "numbers"))
    numbered = data.load(f"hf:{tmp_path / 'numbers'}")
    assert numbered.classes == [str(i) for i in range(12)]
    assert f"labels: column 'n' of {tmp_path / 'numbers'}, the one beside its images (12 classes)" in str(numbered.notes)  # fmt: skip
    twice = datasets.DatasetDict({"train": dd["train"], "val": dd["validation"], "validation": dd["validation"]})  # fmt: skip
    twice.save_to_disk(str(tmp_path / "twice"))  # one of them was dropped without a word
    with pytest.raises(UserError, match="has 2 val splits \\(val, validation\\): keep one"):
        data.load(f"hf:{tmp_path / 'twice'}")
    dd = _hf_dataset(tmp_path)
    for split, file in (("train", "train"), ("validation", "Dev"), ("test", "TEST_set")):
        dd[split].to_parquet(str(tmp_path / "pq" / f"{file}.parquet"))  # dev and Test: trained on
    assert {k: len(v) for k, v in data.load(f"hf:{tmp_path / 'pq'}").splits.items()} == {"train": 24, "val": 6, "test": 9}  # fmt: skip
    dd["test"].to_parquet(str(tmp_path / "pq" / "extra.parquet"))
    with pytest.raises(UserError, match="parquet file\\(s\\) extra.parquet name no split"):
        data.load(f"hf:{tmp_path / 'pq'}")
    (tmp_path / "pq" / "extra.parquet").rename(tmp_path / "pq" / "Eval.PARQUET")  # any case,
    (tmp_path / "hub").mkdir()  # and under data/, as a dataset repo downloads: Eval is test
    (tmp_path / "pq").rename(tmp_path / "hub" / "data")
    assert {k: len(v) for k, v in data.load(f"hf:{tmp_path / 'hub'}").splits.items()} == {"train": 24, "val": 6, "test": 18}  # fmt: skip
    named = datasets.DatasetDict({"train": dd["train"], "dev": dd["validation"], "Test": dd["test"]})  # fmt: skip
    named.save_to_disk(str(tmp_path / "named"))  # dev and Test were ignored splits
    assert {k: len(v) for k, v in data.load(f"hf:{tmp_path / 'named'}").splits.items()} == {"train": 24, "val": 6, "test": 9}  # fmt: skip
    plain = dd["train"].cast_column("fine", datasets.Value("float64")).to_dict()
    plain["fine"][3] = float("nan")  # a missing label as pandas writes it: was a class "nan"
    hub = datasets.Features({"img": datasets.Image(), "fine": datasets.Value("float64")})
    datasets.Dataset.from_dict(plain, hub).save_to_disk(str(tmp_path / "nan"))
    with pytest.raises(UserError, match="train row 3 has no label"):
        data.load(f"hf:{tmp_path / 'nan'}")
    floats = datasets.DatasetDict({"train": dd["train"].cast_column("fine", datasets.Value("int64")),
                                   "test": dd["test"].cast_column("fine", datasets.Value("float64"))})  # fmt: skip
    floats.save_to_disk(str(tmp_path / "floats"))  # 1.0 is the 1 of train (was refused)
    assert data.load(f"hf:{tmp_path / 'floats'}").splits["test"].labels.tolist() == [0, 1, 2] * 3
    nolabels = datasets.DatasetDict({"train": dd["train"], "test": dd["test"].cast_column("fine", datasets.Value("int64")).map(lambda r: {"fine": -1})})  # fmt: skip
    nolabels.save_to_disk(str(tmp_path / "nolabels"))  # plain -1s: the Hub's "no label" too
    assert any("test split has no labels" in n for n in data.load(f"hf:{tmp_path / 'nolabels'}").notes)  # fmt: skip
    several = datasets.Features({"img": datasets.Image(), "labels": datasets.Sequence(datasets.Value("int64"))})  # fmt: skip
    datasets.Dataset.from_dict({"img": dd["train"]["img"][:4], "labels": [[0, 1], [0], [1], [2]]}, several).save_to_disk(str(tmp_path / "several"))  # fmt: skip
    with pytest.raises(UserError, match="column 'labels' holds .* values, several labels an image"):
        data.load(f"hf:{tmp_path / 'several'}")
    empty = datasets.DatasetDict({"train": dd["train"], "test": dd["train"].select([])})
    empty.save_to_disk(str(tmp_path / "empty"))  # datasets cannot load it back: IndexError
    with pytest.raises(UserError, match="test split holds no rows, which datasets cannot load"):
        data.load(f"hf:{tmp_path / 'empty'}")


def test_hf_a_split_without_trains_columns_and_a_column_of_image_paths(tmp_path, monkeypatch):
    """Pass 63: a test split without the label column was a KeyError traceback; a column of
    file paths, named by image= as the refusal advised, was then refused as "no images"."""
    datasets = pytest.importorskip("datasets")
    dd = _hf_dataset(tmp_path)
    bare = datasets.DatasetDict({"train": dd["train"], "test": dd["test"].remove_columns("fine")})
    bare.save_to_disk(str(tmp_path / "bare"))  # (a Kaggle test split: no labels)
    ds = data.load(f"hf:{tmp_path / 'bare'}")
    assert any("test split has no labels: a test split is held out of train" in n for n in ds.notes)
    renamed = datasets.DatasetDict({"train": dd["train"], "test": dd["test"].rename_column("img", "photo")})  # fmt: skip
    renamed.save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(UserError, match="test split has no column 'img', train's images: name"):
        data.load(f"hf:{tmp_path / 'renamed'}")
    rows = dd["train"].cast_column("img", datasets.Image(decode=False))["img"]
    (tmp_path / "files").mkdir()
    for i, row in enumerate(rows):
        (tmp_path / "files" / f"{i}.png").write_bytes(row["bytes"])
    names = [f"../files/{i}.png" if i % 2 else str(tmp_path / "files" / f"{i}.png") for i in range(len(rows))]  # fmt: skip
    features = datasets.Features({"img": datasets.Value("string"), "fine": dd["train"].features["fine"]})  # fmt: skip
    datasets.Dataset.from_dict({"img": names, "fine": dd["train"]["fine"]}, features).save_to_disk(str(tmp_path / "paths"))  # fmt: skip
    with pytest.raises(UserError, match="name them: .* \\(a column of image file paths is read when named image=\\)"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'paths'}")
    ds = data.load(f"hf:{tmp_path / 'paths'},image=img")  # relative: to the dataset's folder
    read = sorted(Path(p).read_bytes() for split in ds.splits.values() for p in split.paths)
    assert read == sorted(row["bytes"] for row in rows)
    captions = datasets.Dataset.from_dict({"img": dd["train"]["img"], "caption": [f"photo {i}" for i in range(24)]})  # fmt: skip
    captions.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "captions"))
    with pytest.raises(UserError, match="column 'caption' holds another value in each of its 24 train rows, so not labels"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'captions'}")  # (pass 64: 24 classes of 1, unsaid)
    named = data.load(f"hf:{tmp_path / 'captions'},label=caption", val_fraction=0.0)
    assert len(named.classes) == 24  # named: trusted (pass 66: the advice named it again)
    monkeypatch.setenv("HOME", str(tmp_path))  # pass 64: ~ was not expanded; a missing file
    names[:4] = ["~/files/0.png", "nowhere.png", "https://example.com/x.png", "../files"]  # fmt: skip
    datasets.Dataset.from_dict({"img": names, "fine": dd["train"]["fine"]}, features).save_to_disk(str(tmp_path / "gone"))  # fmt: skip
    with pytest.raises(UserError) as said:  # was "no image in its row"
        data.load(f"hf:{tmp_path / 'gone'},image=img")
    assert str(said.value) == f"{tmp_path / 'gone'} train: 3 row(s) name no image file here: row 1 'nowhere.png' (not found); row 2 'https://example.com/x.png' (a URL: download the images first); row 3 '../files' (a folder) (a relative path is read from the dataset's folder, then the current one)"  # fmt: skip


def test_hf_columns_named_in_the_spec_override_detection_and_mistakes_are_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [make_image(i % 2, i) for i in range(8)]
    features = datasets.Features({"photo": datasets.Image(), "sketch": datasets.Image(),
                                  "coarse": datasets.ClassLabel(names=["x", "y"]),
                                  "species": datasets.Value("string")})  # fmt: skip
    table = {"photo": images, "sketch": [make_image(i % 2, i + 50) for i in range(8)], "coarse": [i % 2 for i in range(8)],
             "species": ["owl", "emu", "yak", "owl"] * 2}  # fmt: skip
    datasets.Dataset.from_dict(table, features).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(UserError, match="cannot tell .* name them: hf:NAME,image=COLUMN"):
        data.load(f"hf:{tmp_path / 'two'}")
    spec = f"hf:{tmp_path / 'two'},image=sketch,label=species"
    ds = data.load(spec, val_fraction=0.0)
    assert ds.classes == ["emu", "owl", "yak"] and ds.spec == spec
    assert data.canonical(f"hf:{tmp_path / 'two'} ,label=species, image=sketch") == spec
    saved = datasets.load_from_disk(str(tmp_path / "two"))
    own = {c: {x["bytes"] for x in saved.cast_column(c, datasets.Image(decode=False))[c]}
           for c in ("photo", "sketch")}  # fmt: skip
    files = {Path(p).read_bytes() for p in ds.splits["train"].paths + ds.splits["test"].paths}
    assert files <= own["sketch"] and not files & own["photo"]  # the named column's images
    with pytest.raises(UserError, match="has no column 'kind' \\(label=\\); its columns: photo"):
        data.load(f"hf:{tmp_path / 'two'},image=photo,label=kind")
    with pytest.raises(UserError, match="column 'coarse' holds no images"):
        data.load(f"hf:{tmp_path / 'two'},image=coarse,label=coarse")
    with pytest.raises(UserError, match="option 'lable=x' is not image=COLUMN or label=COLUMN"):
        data.load(f"hf:{tmp_path / 'two'},lable=x")
    # one image column and one other: that one holds the labels (it had to be named)
    plain = datasets.Features({"img": datasets.Image(), "cls": datasets.Value("string")})
    table = {"img": images, "cls": ["owl", "emu"] * 4}
    datasets.Dataset.from_dict(table, plain).save_to_disk(str(tmp_path / "plain"))
    assert data.load(f"hf:{tmp_path / 'plain'}", val_fraction=0.0).classes == ["emu", "owl"]


def test_a_parquet_pyarrow_wrote_reads_its_image_rows_and_a_damaged_one_is_one_line(tmp_path, capfd):  # fmt: skip
    """Hostile pass 50: images stored as `datasets` stores them ({bytes, path}) in a parquet
    that pyarrow wrote were "cannot tell the columns apart: name them", then, named, "holds no
    images"; a damaged parquet printed datasets' own error line before ours."""
    pytest.importorskip("datasets")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()

    rows = [{"bytes": png(make_image(i % 2, i)), "path": None} for i in range(12)]
    pq.write_table(pa.table({"image": rows, "label": [i % 2 for i in range(12)]}), tmp_path / "p.parquet")  # fmt: skip
    (tmp_path / "raw").mkdir()  # pass 51 (F5): or the bytes alone, the way most writers keep them
    pq.write_table(pa.table({"image": [r["bytes"] for r in rows], "label": [i % 2 for i in range(12)]}), tmp_path / "raw" / "train.parquet")  # fmt: skip
    for where in ("p.parquet", "raw"):
        for spec in (f"hf:{tmp_path / where}", f"hf:{tmp_path / where},image=image,label=label"):
            capfd.readouterr()
            ds = data.load(spec, val_fraction=0.0)
            assert capfd.readouterr().err == ""  # pass 51 (F6): "Generating train split" bars
            every = [s for split in ds.splits.values() for s in zip(split.paths, split.labels.tolist(), strict=True)]  # fmt: skip
            assert ds.classes == ["0", "1"] and sorted(label for _, label in every) == [0] * 6 + [1] * 6  # fmt: skip
            files = {Path(p).read_bytes() for p, _ in every}
            assert files == {r["bytes"] for r in rows}
    (tmp_path / "two").mkdir()  # pass 52 (F7): beside a thumbnail, the column named image
    thumbs = [png(make_image(i % 2, i, size=8)) for i in range(12)]
    pq.write_table(pa.table({"thumb": thumbs, "image": [r["bytes"] for r in rows], "label": [i % 2 for i in range(12)]}), tmp_path / "two" / "train.parquet")  # fmt: skip
    ds = data.load(f"hf:{tmp_path / 'two'}")
    assert {Path(p).read_bytes() for split in ds.splits.values() for p in split.paths} == {r["bytes"] for r in rows}  # fmt: skip
    pq.write_table(pa.table({"a": thumbs, "b": thumbs, "label": [0] * 12}), tmp_path / "two" / "train.parquet")  # fmt: skip
    with pytest.raises(UserError, match="cannot tell the image and label columns apart \\(columns: a \\(binary\\), b \\(binary\\), label \\(int64\\)\\)"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'two'}")
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}).slice(0, 0), tmp_path / "raw" / "test.parquet")  # fmt: skip
    with pytest.raises(UserError, match="raw: parquet file\\(s\\) test.parquet hold no rows, which datasets cannot load: remove them"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'raw'}")
    (tmp_path / "bad.parquet").write_bytes(b"junk")
    capfd.readouterr()
    with pytest.raises(UserError, match="could not load Hugging Face dataset .*bad.parquet: Parquet file size is 4 bytes"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'bad.parquet'}")
    assert capfd.readouterr().err == ""


def test_an_empty_hf_spec_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.canonical("hf:") == "hf:"
    with pytest.raises(UserError, match="hf data is hf:NAME"):
        data.load("hf:")


def test_a_mistyped_hf_folder_offline_is_one_line_from_the_cache(tmp_path, monkeypatch, capfd):
    """Offline, a mistyped hf: path went to the hub: 11 lines of retries, 30 s, then "Couldn't
    reach 'nope' on the Hub", never saying no such folder exists here."""
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as when the hub is unreachable (checked in 5 s)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"nope: no such folder here, and the Hugging Face cache does not hold it \(HF_HUB_OFFLINE is set\)"):  # fmt: skip
        data.load("hf:nope")
    assert "Retrying" not in capfd.readouterr().err  # the hub was never asked


def test_csv_classes_are_in_one_order_whatever_the_hash_seed(tmp_path):
    """Labels "01" and "1" sorted as equal numbers: their order (and so the split, and which
    images a test score was taken on) followed the process's hash seed; "²" crashed int()."""
    path = _csv_data(tmp_path, [f"img/{i}.png,{['01', '1', '2', '²'][i % 4]}" for i in range(24)])
    code = f"from transferlab import data; print(data.load('csv:{path}').classes)"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | {"PYTHONHASHSEED": str(seed)},
        ).stdout  # fmt: skip
        for seed in range(4)
    }
    assert seen == {"['01', '1', '2', '²']\n"}


def test_a_csv_saved_in_another_encoding_is_one_line(tmp_path):
    path = _csv_data(tmp_path, ["img/0.png,a", "img/1.png,b"], "file_name,label")
    path.write_bytes(path.read_bytes() + "img/2.png,röd\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"metadata.csv is not UTF-8 text \(byte 0xf6 at \d+\)"):
        data.load(f"csv:{path}")


def test_split_folders_named_in_capitals_are_the_splits(tmp_path):
    """Train/ and Test/ (as many downloads name them): Test/ was ignored, noted, and a test
    split carved from Train/ instead."""
    make_folder(tmp_path, ["a", "b"], 6, subsets=("Train", "Test"))
    ds = data.load(f"folder:{tmp_path}")
    assert len(ds.splits["test"]) == 12 and "(given)" in ds.notes[0]
    assert not any("ignored" in n for n in ds.notes)


def test_csv_header_spaces_are_ignored_and_labels_differing_in_case_are_noted(tmp_path):
    rows = [f"img/{i}.png,{['red', 'RED', 'blue'][i % 3]}" for i in range(24)]
    ds = data.load(f"csv:{_csv_data(tmp_path, rows, 'file_name, label')}")
    assert ds.classes == ["RED", "blue", "red"]
    assert "class names that differ only in case are separate classes: RED, red" in ds.notes


def test_one_label_in_two_unicode_forms_is_one_class_and_two_such_folders_are_noted(tmp_path):
    """Hostile pass 18: café from macOS (NFD) and from elsewhere (NFC) made two classes that
    print alike, without a word."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    rows = [f"img/{i}.png,{[nfc, nfd, 'thé'][i % 3]}" for i in range(24)]
    ds = data.load(f"csv:{_csv_data(tmp_path, rows, 'file_name,label')}")
    assert ds.classes == [nfc, "thé"] and not any("Unicode" in n for n in ds.notes)
    root = make_folder(tmp_path / "f", [nfc, nfd, "eau"], 4)  # folders: the user's, kept apart
    said = [n for n in data.load(f"folder:{root}").notes if "differ only in" in n]
    assert said == [f"class names that differ only in Unicode form, width or case are separate classes: {ascii(nfd)}, {ascii(nfc)}"]  # fmt: skip
    for names, how in ((["=1", "\uff1d1", "b"], "width"), (["Cat", "cat", "b"], "case")):
        root = make_folder(tmp_path / how, names, 4)  # pass 29: =1, ＝1 said to differ in case
        said = [n for n in data.load(f"folder:{root}").notes if "differ only in" in n][0]
        assert said.startswith("class names that differ only in " + ("case are" if how == "case" else "Unicode form, width"))  # fmt: skip


def test_a_class_folder_not_named_in_utf8_is_refused_before_training(tmp_path):
    """Hostile pass 28: caf\xe9 (Latin-1, from an old archive) trained, then evaluate and report
    ended in tracebacks and serve answered every request with a 500."""
    root = make_folder(tmp_path / "f", ["ok", "other"], 4, subsets=())
    os.rename(os.fsencode(root / "other"), os.fsencode(root) + b"/caf\xe9")
    with pytest.raises(UserError, match=r"class folder caf\\xe9 is not named in UTF-8 .*convmv"):
        data.load(f"folder:{root}")
    os.rename(os.fsencode(root) + b"/caf\xe9", os.fsencode(root) + b"/ \t")  # an empty label
    with pytest.raises(UserError, match=r"class folder ' \\t' is named only with spaces"):
        data.load(f"folder:{root}")


def test_a_class_folder_that_is_a_broken_link_is_refused_not_dropped(tmp_path):
    """Hostile pass 34: class9 -> a drive not mounted was left out without a word (exit 0, a
    model of the other classes); a broken link to an image at the top stays ignored."""
    root = make_folder(tmp_path / "f", ["ant", "eel"], 4, subsets=())
    for name in ("notes.png", "README.md", ".cache"):  # named as a file is, or hidden: left
        (root / name).symlink_to(tmp_path / "gone")  # as they are (pass 35: refused as classes)
    assert data.load(f"folder:{root}").classes == ["ant", "eel"]
    (root / "class9").symlink_to("/mnt/transferlab-unmounted/class9")
    with pytest.raises(UserError, match="class9 is a broken link to /mnt/transferlab-unmounted/class9: a class folder that is not there"):  # fmt: skip
        data.load(f"folder:{root}")
    (root / "class9").unlink()
    (root / "class9").symlink_to("class9")  # a loop: no drive to mount
    with pytest.raises(UserError, match="class9 is a link loop: a class folder"):
        data.load(f"folder:{root}")
    split = make_folder(tmp_path / "s", ["ant", "eel"], 4, subsets=("train", "test"))
    (split / "latest").symlink_to("/transferlab-old/place")  # beside train/: no class, left
    assert data.load(f"folder:{split}").classes == ["ant", "eel"]
    (split / "test" / "eel").rename(split / "eel")
    (split / "test" / "eel").symlink_to("/mnt/transferlab-unmounted/eel")  # in a split: refused
    with pytest.raises(UserError, match="test/eel is a broken link to"):
        data.load(f"folder:{split}")


def test_a_split_with_other_classes_names_them_in_words(tmp_path):
    """It printed Python lists: "extra [], missing ['eel']"."""
    root = make_folder(tmp_path / "d", ["ant", "eel"], 2)
    shutil.rmtree(root / "test" / "eel")
    with pytest.raises(UserError, match=r"different classes from train: missing eel: add images of them, or move it out of the data \(the split is then carved from train\)$"):  # fmt: skip
        data.load(f"folder:{root}")  # (pass 62: "extra none;", and no way on)
    (root / "test" / "ant").rename(root / "test" / "ant ")  # pass 32: "extra ant ; missing ant"
    with pytest.raises(UserError, match=r"extra 'ant '; missing ant, eel: name its"):
        data.load(f"folder:{root}")
    (root / "test" / "ant ").rename(root / "test" / "Ant")
    with pytest.raises(UserError, match=r"extra Ant; missing ant, eel: name its"):
        data.load(f"folder:{root}")
    make_folder(root / "test", ["Eel"], 2, subsets=("",))
    with pytest.raises(UserError, match=r"extra Ant, Eel; missing ant, eel \(they differ only in case\): name"):  # fmt: skip
        data.load(f"folder:{root}")


def test_too_few_images_to_split_says_how_many_are_needed(tmp_path):
    """Hostile pass 15: one image per class gave "too few images (2) to hold out 20% of them",
    with no way on."""
    one = make_folder(tmp_path / "one", ["cat", "dog"], 1, subsets=("",))
    with pytest.raises(UserError, match="give each class 3 or more .* or folders of train/"):
        data.load(f"folder:{one}")
    three = make_folder(tmp_path / "three", ["cat", "dog"], 3, subsets=("",))
    assert all(len(s) for s in data.load(f"folder:{three}").splits.values())
    # a fraction in range that leaves fewer train images than classes: it was sklearn's
    # ValueError traceback (hostile pass 21)
    ten = make_folder(tmp_path / "ten", ["a", "b", "c"], 10, subsets=("",))
    with pytest.raises(UserError, match="too few images .* to hold out 89% .* a smaller fraction"):
        data.load(f"folder:{ten}", val_fraction=0.89)


def test_a_small_val_fraction_is_said_as_given():
    """Hostile pass 21: --val-fraction 0.001 was said "val 10 (0% of train ...)"; pass 27: and
    not that it was raised to one image of each class."""
    assert "val 10 (0.1% of train by --val-fraction, raised to 1% for one image of each class)" in data.load("digits", 0.001).notes[0]  # fmt: skip
    assert "val 144 (10% of train by --val-fraction)" in data.load("digits", 0.1).notes[0]
    said = data.load("digits", 0.1, limit=20).notes  # pass 47 (F7): counts --limit cut, unsaid
    assert "splits: train 20 (what remains; --limit 20), val 20 (10% of train by --val-fraction; --limit 20), test 20 (20% of train held out; --limit 20)" in said, said  # fmt: skip
    said = data.load("digits", 0.1, limit=200).notes  # (val's 144 images: not cut)
    assert "splits: train 200 (what remains; --limit 200), val 144 (10% of train by --val-fraction), test 200 (20% of train held out; --limit 200)" in said, said  # fmt: skip


def test_fractional_number_labels_are_refused_as_measurements_not_classes(tmp_path):
    """Hostile pass 53: a column of measurements (0.37, 1.52) became a class per value (20
    images, 19 classes) and trained without a word, from csv: and from hf: alike."""
    rows = [f"img/{i}.png,{i % 3}.{i + 10}" for i in range(24)]
    with pytest.raises(UserError, match=r"metadata.csv: its labels are numbers, some not whole \(0.10, 0.13, 0.16, ...; 24 distinct\): transferlab classifies images into classes"):  # fmt: skip
        data.load(f"csv:{_csv_data(tmp_path, rows)}")
    pytest.importorskip("datasets")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(i):
        buffer = io.BytesIO()
        make_image(i % 2, i).save(buffer, "PNG")
        return buffer.getvalue()

    (tmp_path / "pq").mkdir()
    table = {"image": [png(i) for i in range(12)], "label": [i % 2 + i / 100 for i in range(12)]}
    pq.write_table(pa.table(table), tmp_path / "pq" / "train.parquet")
    with pytest.raises(UserError, match="pq: its labels are numbers, some not whole \\(0.02, 0.04, 0.06, ...; 12 distinct\\)"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'pq'}")
    table["label"] = [float(i % 2) for i in range(12)]  # whole floats: pandas' 0 and 1
    pq.write_table(pa.table(table), tmp_path / "pq" / "train.parquet")
    assert data.load(f"hf:{tmp_path / 'pq'}").classes == ["0", "1"]
    table["label"] = [[float("inf"), 1.0, 2.0][i % 3] for i in range(12)]  # pass 56 (F8): a class
    pq.write_table(pa.table(table), tmp_path / "pq" / "train.parquet")
    with pytest.raises(UserError, match="pq: its labels are numbers, some not whole \\(inf; 3 distinct\\)"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'pq'}")
    table["label"] = [0] * 12  # pass 56 (F7): "point --data at the folder of class folders"
    pq.write_table(pa.table(table), tmp_path / "pq" / "train.parquet")
    with pytest.raises(UserError, match="has 1 class \\(0\\); a classifier needs at least two: its label column holds one value: name another with label=COLUMN"):  # fmt: skip
        data.load(f"hf:{tmp_path / 'pq'}")
    one = _csv_data(tmp_path, [f"img/{i}.png,cat" for i in range(24)])
    with pytest.raises(UserError, match="a classifier needs at least two: its label column holds one value: label the images of at least two classes$"):  # fmt: skip
        data.load(f"csv:{one}")
    rows = [f"img/{i}.png,{['1', '1.0', '2'][i % 3]}" for i in range(24)]  # pass 57 (F2)
    assert "class names that are one number written two ways are separate classes: 1, 1.0" in data.load(f"csv:{_csv_data(tmp_path, rows)}").notes  # fmt: skip


def test_an_image_cell_without_an_image_and_an_empty_file_are_said_as_such(tmp_path):
    """Hostile pass 54 (F3): a row whose image is null, and an empty file, were "not an image
    Pillow reads: another format, or damaged": the user looked for a file that was not there."""
    pytest.importorskip("datasets")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from transferlab import decoding

    def png(i):
        buffer = io.BytesIO()
        make_image(i % 2, i).save(buffer, "PNG")
        return buffer.getvalue()

    images = [None, b"", *(png(i) for i in range(2, 12))]
    pq.write_table(pa.table({"image": images, "label": [i % 2 for i in range(12)]}), tmp_path / "t.parquet")  # fmt: skip
    ds = data.load(f"hf:{tmp_path / 't.parquet'}", val_fraction=0.0)
    bad = [line for split in ds.splits.values() for line in decoding.decode_checked(split, 16, 3, skip_bad=True, quiet=True)[2]]  # fmt: skip
    assert sorted(bad) == [f"{tmp_path / 't.parquet'} train row {i} (no image in its row)" for i in (0, 1)]  # fmt: skip
    make_folder(tmp_path / "f", ["a", "b"], 3, subsets=())
    (tmp_path / "f" / "a" / "0.png").write_bytes(b"")
    splits = data.load(f"folder:{tmp_path / 'f'}").splits.values()
    bad = [line for split in splits for line in decoding.decode_checked(split, 16, 3, skip_bad=True, quiet=True)[2]]  # fmt: skip
    assert bad == [f"{tmp_path / 'f' / 'a' / '0.png'} (an empty file)"]
