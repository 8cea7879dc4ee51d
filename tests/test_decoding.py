"""decoding: odd modes, corrupt files, resizing, the decode-once cache."""

import numpy as np
import pytest
from PIL import Image

from transferlab import data, decoding
from transferlab.config import UserError

from conftest import make_folder, make_image


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


def test_a_thin_strip_is_resized_only_where_it_is_kept(monkeypatch):
    """A 114-byte 10000x1 PNG was resized whole to 2,240,000 x 224 before its centre crop (2 GB
    in predict and serve): now only the kept square is resized, the same picture to within a
    grey level or so, and a usual aspect ratio is resized as before, bit for bit."""
    asked = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, size, *a, **k: asked.append(size) or real(im, size, *a, **k))  # fmt: skip
    rng = np.random.default_rng(0)
    for w, h in ((2000, 20), (20, 2000), (100_000, 1)):
        strip = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = decoding.resize(strip, 32, "bilinear")
        assert out.size == (32, 32) and max(x * y for x, y in asked) <= 16 * 32 * 32, (w, h)
        asked.clear()
        nw, nh = (max(32, round(v * 32 / min(w, h))) for v in (w, h))
        whole = real(strip, (nw, nh), Image.BILINEAR)
        whole = np.asarray(whole.crop(((nw - 32) // 2, (nh - 32) // 2, (nw + 32) // 2, (nh + 32) // 2)), int)  # fmt: skip
        assert np.abs(np.asarray(out, int) - whole).mean() < 1, (w, h)
    usual = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    expected = real(usual, (48, 32), Image.BILINEAR).crop((8, 0, 40, 32))
    assert np.array_equal(np.asarray(decoding.resize(usual, 32, "bilinear")), np.asarray(expected))


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


def test_new_pixels_under_the_old_size_and_mtime_are_decoded_anew(tmp_path):
    """The key was path, size and mtime: `cp -p`, rsync -a or tar of a new version of the data
    keep the mtime, and a BMP's size never changes, so the old pixels were served (a run
    evaluated at 75% whose true score was 37.5%)."""
    import os

    for label, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "d" / label / f"{i}.bmp")
    ds = data.load(f"folder:{tmp_path / 'd'}", val_fraction=0.25)
    cache, first = tmp_path / "cache", ds.splits["train"].paths[0]
    before = decoding.decode(ds.splits["train"], 8, 3, cache=cache)[0].copy()
    st = os.stat(first)
    Image.new("RGB", (8, 8), (0, 200, 0)).save(first)  # the same size, as a BMP is
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p leaves it
    assert os.stat(first).st_size == st.st_size
    after = decoding.decode(ds.splits["train"], 8, 3, cache=cache)[0]
    assert not np.array_equal(after, before) and after[0, 0, 1] == 200


def test_a_full_disk_is_one_clear_error_before_decoding_not_a_bus_error(tmp_path, monkeypatch):
    import errno
    import os

    make_folder(tmp_path / "d", ["a", "b"], 4)
    ds = data.load(f"folder:{tmp_path / 'd'}", val_fraction=0.25)
    cache, decoded = tmp_path / "cache", []
    real_open = decoding.open_image
    monkeypatch.setattr(decoding, "open_image", lambda *a: decoded.append(1) or real_open(*a))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"decode cache needs .* GB in .* free.*--cache-dir off"):
        decoding.decode(ds.splits["train"], 16, 3, cache=cache)
    assert not decoded and not list(cache.iterdir())  # nothing decoded, no partial file left
    monkeypatch.delattr(os, "posix_fallocate")  # no fallocate here: room enough is checked
    assert len(decoding.decode(ds.splits["train"], 16, 3, cache=cache)) == 6


def test_cache_location_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "c"))
    assert decoding.resolve_cache(None) == tmp_path / "c"
    assert decoding.resolve_cache("off") is None
    assert decoding.resolve_cache(str(tmp_path / "x")) == tmp_path / "x"


def test_threaded_decoding_equals_one_thread_and_lists_bad_files_in_order(tmp_path, monkeypatch):
    """Decoding runs a thread per core: rows land where their files are, whatever finishes
    first, and the unreadable files are reported in file order."""
    make_folder(tmp_path, ["a", "b", "c"], 6)
    paths = sorted(str(p) for p in (tmp_path / "train").rglob("*.png"))
    for bad in (paths[3], paths[11]):
        with open(bad, "wb") as f:
            f.write(b"truncated")
    split = data.Split(np.zeros(len(paths), dtype=np.int64), paths=paths)
    results = []
    for n in (1, 4):
        monkeypatch.setattr(decoding, "cores", lambda n=n: n)
        results.append(decoding.decode_checked(split, 12, 3, skip_bad=True, quiet=True))
    (one, _, bad_one), (many, kept, bad_many) = results
    assert bad_one == bad_many and [b.split(" ")[0] for b in bad_many] == [paths[3], paths[11]]
    assert np.array_equal(one, many) and len(kept) == len(paths) - 2
    assert len({row.tobytes() for row in many}) == len(many)  # every row its own image
    last = decoding.resize(decoding.open_image(paths[-1], 3), 12, "bilinear")
    assert np.array_equal(many[-1], np.asarray(last))


def test_a_16_bit_image_reads_as_its_8_bit_copy_and_exif_orientation_is_applied(tmp_path):
    """A dark 16-bit picture was stretched to its brightest pixel (other top-1 than its 8-bit
    copy); a phone photo stored sideways with EXIF Orientation=6 was classified sideways."""
    from PIL import Image

    dark = (np.asarray(make_image(1, 0, 16).convert("L"), dtype=np.uint16) * 3 // 10).astype(
        np.uint8
    )
    Image.fromarray(dark).save(tmp_path / "dark8.png")
    Image.fromarray(dark.astype(np.uint16) * 257).save(tmp_path / "dark16.png")
    eight, sixteen = (
        np.asarray(decoding.open_image(str(tmp_path / f), 1)) for f in ("dark8.png", "dark16.png")
    )
    assert np.array_equal(eight, sixteen)
    upright = make_image(2, 0, 24).resize((24, 16))  # wide, as shown
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to show": stored turned the other way
    upright.rotate(90, expand=True).save(tmp_path / "phone.png", exif=exif)
    shown = decoding.open_image(str(tmp_path / "phone.png"), 3)
    assert np.array_equal(np.asarray(shown), np.asarray(upright.convert("RGB")))
