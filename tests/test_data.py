import numpy as np
import pytest
import torch
from PIL import Image

from transferlab import batching, data, decoding
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


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_odd_modes_become_sane_rgb(tmp_path, mode):
    im = make_image(1, 0, 16)
    if mode == "I;16":
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 200).astype(np.uint16)
        im = Image.fromarray(arr)
        assert im.mode.startswith("I")
        path = tmp_path / "x.png"
    else:
        im = im.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    out = np.asarray(decoding.open_image(str(path), 3))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert 0 < out.mean() < 250  # not all-white (convert('RGB') of I;16 is)


def test_corrupt_images_are_all_listed(tmp_path):
    make_folder(tmp_path, ["a", "b"], 4)
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"")
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"not an image at all")
    ds = data.load(f"folder:{tmp_path}", val_fraction=0.25)
    everything = data.Split(
        np.zeros(8, dtype=np.int64), paths=ds.splits["train"].paths + ds.splits["val"].paths
    )
    with pytest.raises(UserError, match=r"2 unreadable image\(s\).*0\.png.*1\.png|1\.png.*0\.png"):
        decoding.decode(everything, 16, 3)


def test_resize_keeps_aspect_by_centre_crop():
    """The shorter side goes to the target size and the centre is cropped: a wide image loses
    its black left and right quarters (a squashing resize would keep them)."""
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the centre 20x20 is white
    for im in (Image.fromarray(wide), Image.fromarray(wide.transpose(1, 0, 2).copy())):
        out = decoding.resize(im, 16, "bilinear")
        assert out.size == (16, 16)
        assert np.asarray(out)[:, 1:-1].min() >= 200 and np.asarray(out)[1:-1].min() >= 200


@pytest.mark.parametrize("crop", ["pad", "rrc"])
def test_augmentation_is_a_pure_function_of_seed_epoch_index(crop):
    aug = batching.Augment(crop=crop, pad=2, flip=True)
    x = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    a, b, c = (aug.params(10, 8, seed=1, epoch=e) for e in (2, 2, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    idx = torch.tensor([3, 7, 0, 9])
    out = aug(x, {k: v[idx] for k, v in a.items()})
    assert out.shape == x.shape and out.dtype == torch.uint8
    # the same index gets the same crop whatever batch it lands in
    one = aug(x[1:2], {k: v[idx[1:2]] for k, v in a.items()})
    assert torch.equal(one[0], out[1])


def test_no_crop_no_flip_is_identity_and_full_box_rrc_is_identity():
    x = torch.randint(0, 255, (3, 8, 8, 1), dtype=torch.uint8)
    plain = batching.Augment(crop="none", flip=False)
    assert torch.equal(plain(x, plain.params(3, 8, 0, 1)), x)
    rrc = batching.Augment(crop="rrc", flip=False)
    full = {"flip": torch.zeros(3, dtype=torch.bool), "box": torch.tensor([[0.0, 0, 8, 8]] * 3)}
    assert torch.equal(rrc(x, full), x)


def test_rrc_boxes_stay_inside_the_image():
    box = batching.Augment(crop="rrc").params(1000, 64, 0, 1)["box"]
    assert (box[:, :2] >= 0).all() and (box[:, 2:] <= 64 + 1e-4).all()
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / 64**2
    assert 0.3 < area.min() and area.max() <= 1.0 + 1e-4


def test_sampler_order_depends_on_seed_and_epoch_and_never_yields_a_batch_of_one():
    s = batching.EpochSampler(33, 8, seed=0, epoch=1, shuffle=True)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(33))
    assert min(len(b) for b in batches) > 1
    assert batches == list(batching.EpochSampler(33, 8, seed=0, epoch=1, shuffle=True))
    assert batches != list(batching.EpochSampler(33, 8, seed=0, epoch=2, shuffle=True))
    assert list(batching.EpochSampler(33, 8, 0, 1, True, start=2)) == batches[2:]
    ordered = list(batching.EpochSampler(33, 8, 0, 1, shuffle=False))
    assert sum(len(b) for b in ordered) == 33  # evaluation counts every image


def test_loader_yields_every_index_with_workers():
    images = np.zeros((20, 4, 4, 1), np.uint8)
    labels = np.arange(20)
    for workers in (0, 2):
        seen = [
            i
            for _, _, idx in batching.loader(images, labels, 6, 0, 1, True, workers)
            for i in idx.tolist()
        ]
        assert sorted(seen) == list(range(20))


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


def test_decode_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    import os

    make_folder(tmp_path / "d", ["a", "b"], 4)
    ds = data.load(f"folder:{tmp_path / 'd'}", val_fraction=0.25)
    cache = tmp_path / "cache"
    first = decoding.decode(ds.splits["train"], 16, 3, cache=cache)
    assert isinstance(first, np.memmap) and len(list(cache.glob("*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    with monkeypatch.context() as m:
        m.setattr(decoding, "open_image", no_decoding)
        again = decoding.decode(ds.splits["train"], 16, 3, cache=cache)  # reused: nothing decoded
    np.testing.assert_array_equal(first, again)
    changed = ds.splits["train"].paths[0]
    make_image(1, 99).save(changed)  # new content, new mtime
    os.utime(changed, ns=(1, 1))
    rebuilt = decoding.decode(ds.splits["train"], 16, 3, cache=cache)
    assert len(list(cache.glob("*.npy"))) == 2
    assert not np.array_equal(rebuilt[0], first[0])
    np.testing.assert_array_equal(rebuilt, decoding.decode(ds.splits["train"], 16, 3))  # = uncached
    decoding.decode(ds.splits["train"], 24, 3, cache=cache)  # another size: another file
    assert len(list(cache.glob("*.npy"))) == 3


def test_cache_location_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "c"))
    assert decoding.resolve_cache(None) == tmp_path / "c"
    assert decoding.resolve_cache("off") is None
    assert decoding.resolve_cache(str(tmp_path / "x")) == tmp_path / "x"
