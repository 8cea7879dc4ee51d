import numpy as np
import pytest

from transferlab import data, decoding
from transferlab.config import UserError

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
    with pytest.raises(UserError, match="unknown dataset kind 'imagenet'"):
        data.load("imagenet:/x")


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
