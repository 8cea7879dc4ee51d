"""Decoding images once: any file mode to sane 8-bit RGB or L, resized (shorter side, centre
crop) into one uint8 array (N, H, W, C) per split and size, kept in a memory-mapped cache that
later runs and models of the same size reuse. Unreadable images are listed, never skipped in
silence."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from . import outputs
from .bars import bar
from .config import UnreadableImages, UserError

if TYPE_CHECKING:
    from .data import Split

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
# what Pillow raises for a file it cannot decode (the warning: where warnings are errors)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)  # fmt: skip


def open_image(path: str, channels: int) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return sane(im, channels)


def sane(im: Image.Image, channels: int) -> Image.Image:
    """Any image mode as sane 8-bit RGB or L (16-bit and palette modes included), turned as
    its EXIF orientation says (as every viewer shows a phone's photo); a file's or one in
    memory (`predict`'s PIL images and arrays) alike. `im` itself is left as it was."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # by bit depth, as its 8-bit copy
        arr = np.asarray(im, dtype=np.float64)  # (not stretched to its brightest pixel)
        im = Image.fromarray((arr.clip(0, 65535) / 257).round().astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        im = Image.fromarray(((arr - lo) / ((hi - lo) or 1) * 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA", "RGBA", "LA"):  # transparency flattened onto white
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("L" if channels == 1 else "RGB")


def resize(im: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop to a square."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh > 16 * size * size:  # a thin strip (a 114-byte 10000x1 PNG grew to 2 GB at 224
        sx, sy = nw / w, nh / h  # px): only the square kept is resized, from its source box
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        return im.resize((size, size), INTERPOLATIONS[interpolation], box=box)
    im = im.resize((nw, nh), INTERPOLATIONS[interpolation])
    return im.crop((left, top, left + size, top + size))


def decode(
    split: Split,
    size: int,
    channels: int,
    interpolation: str = "bilinear",
    desc: str = "decode",
    quiet: bool = False,
    cache: Path | None = None,
    lazy: bool = False,
) -> np.ndarray:
    """Decode and resize a split once into a uint8 array (N, size, size, channels).

    Unreadable images (corrupt, truncated, decompression bombs) stop it, every one listed.
    """
    return decode_checked(split, size, channels, interpolation, False, desc, quiet, cache, lazy)[0]


def decode_checked(
    split: Split,
    size: int,
    channels: int,
    interpolation: str = "bilinear",
    skip_bad: bool = False,
    desc: str = "decode",
    quiet: bool = False,
    cache: Path | None = None,
    lazy: bool = False,
) -> tuple[np.ndarray, Split, list[str]]:
    """Like decode(); with skip_bad, unreadable images are dropped and reported instead.

    With `cache`, the decoded array lives in a memory-mapped .npy file there, keyed by the file
    list, sizes, mtimes and target size: later runs and models of the same size reuse it. A
    split of WebDataset shards is never cached: `lazy` returns it as shards.ShardImages (each
    batch read and decoded when indexed), else decoded into memory.
    Returns (images, the split without the dropped images, one line per dropped image).
    """
    if split.arrays is not None:
        return _decode_arrays(split.arrays, size, channels, interpolation), split, []
    if split.members is not None:
        from .shards import ShardImages

        images = ShardImages(split, size, channels, interpolation)
        return (images if lazy else np.asarray(images)), split, []
    if cache is not None:
        out, bad_idx, bad = _cached_decode(split, size, channels, interpolation, desc, quiet, cache)
    else:
        out = np.empty((len(split), size, size, channels), dtype=np.uint8)
        bad_idx, bad = _decode_files(split.paths, out, size, channels, interpolation, desc, quiet)
    if bad and not skip_bad:
        raise unreadable(bad)
    if not bad:
        return out, split, []
    keep = np.setdiff1d(np.arange(len(split)), bad_idx)
    return out[keep], split.subset(keep), bad


def _decode_arrays(arrays: np.ndarray, size: int, channels: int, interpolation: str) -> np.ndarray:
    out = np.empty((len(arrays), size, size, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, arr in enumerate(arrays):
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert(mode)
        out[i] = _to_array(resize(im, size, interpolation), channels)
    return out


def _decode_files(
    paths: list[str],
    out: np.ndarray,
    size: int,
    channels: int,
    interpolation: str,
    desc: str,
    quiet: bool,
) -> tuple[list[int], list[str]]:
    """Decode image files into `out` (an array or memmap); returns the unreadable ones.

    One thread per core: Pillow releases the GIL while it decodes and resizes, so decoding
    scales with the cores (each thread writes its own rows; the result does not depend on the
    number of threads).
    """

    def one(i: int) -> str | None:
        try:
            out[i] = _to_array(
                resize(open_image(paths[i], channels), size, interpolation), channels
            )
        except UNREADABLE as err:
            from .hfdata import named  # a dataset's row, not our copy of it

            return f"{named(paths[i])} ({UnreadableImages.why(err, paths[i])})"
        return None

    show = not quiet and len(paths) >= 500
    pool = ThreadPoolExecutor(max(1, min(cores(), len(paths))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # threads share it
            done = pool.map(one, range(len(paths)))
            errors = list(bar(done, desc, len(paths), disable=not show, unit="img"))
    finally:  # an interrupt stops at the images being decoded, not after all of them
        pool.shutdown(cancel_futures=True)
    bad_idx = [i for i, e in enumerate(errors) if e is not None]
    return bad_idx, [errors[i] for i in bad_idx]


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CACHE_VERSION = 2  # bumped when decoding changes (2: EXIF orientation, 16-bit bit depth)


def resolve_cache(setting: str | None) -> Path | None:
    """None: $TRANSFERLAB_CACHE or ~/.cache/transferlab; "off" (any case): no cache; else that
    folder."""
    named = (setting or os.environ.get("TRANSFERLAB_CACHE") or "").strip()
    if named.lower() in ("off", "none", "false", "0"):
        return None
    return Path(named).expanduser() if named else Path.home() / ".cache" / "transferlab"


def named_cache(setting: str | None, what: str = "--cache-dir") -> tuple[Path, str] | None:
    """The cache `setting` names (`resolve_cache`) when the user named one (--cache-dir, a
    recipe's cache_dir: `what`; else $TRANSFERLAB_CACHE), with how they named it; None for the
    default or none."""
    if setting is not None and not setting.strip():  # (Path: the current folder)
        raise UserError(f"{what} is empty: name a folder, or off for no cache")
    path = resolve_cache(setting)
    if path is None or not (setting or os.environ.get("TRANSFERLAB_CACHE")):
        return None
    return path, what if setting else "$TRANSFERLAB_CACHE"


def check_cache(setting: str | None, what: str = "--cache-dir", out: Path | None = None) -> None:
    """The cache the user named can be made a folder here, lies neither in `out` (the folder the
    command writes) nor in a run or ensemble, and is no folder transferlab made (its files lay
    among a run's, which every retry then refused); checked before a command claims a folder."""
    if not (named := named_cache(setting, what)):
        return
    (place, flag), mark = named, outputs.read_mark(named[0])
    outputs.check_creatable(place, flag)
    if out is not None and outputs.inside(place, out):
        raise UserError(f"{flag} {place} is inside --out {out}: its files would lie among the run's; choose another {flag}")  # fmt: skip
    if found := outputs.enclosing(place) or (mark and (place, mark.get("kind"))):
        raise UserError(f"{flag} {place} is inside the transferlab {found[1]} folder {found[0]}: choose another {flag}")  # fmt: skip


def cache_key(paths: list[str], size: int, channels: int, interpolation: str) -> str:
    """A digest of what the decoded array depends on: files (path, size, mtime, ctime) and
    target. The ctime, which no copy or os.utime can set: `cp -p`, rsync -a and tar keep the
    mtime, and a BMP's size never changes, so new pixels were served from the old array."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, size, channels, interpolation]).encode())
    stamp(h, paths, ctime=True)
    return h.hexdigest()[:32]


def stamp(h, paths: list[str], root: Path | None = None, ctime: bool = False) -> None:
    """Feed each file's path (relative to `root` if given), size and modification time (and
    `ctime`, its inode's change time) to the hash `h` (no file is read). A path that cannot be
    stat'ed (gone, a dangling link, a link loop) counts by its error: decoding it names it as
    unreadable, and --skip-bad-images leaves it out (it stopped every command here instead)."""
    for path in paths:
        name = os.path.relpath(path, root) if root is not None else path
        try:
            st = os.stat(path)
        except OSError as err:
            h.update(f"{name}\0unreadable {err.errno}\n".encode(errors="surrogateescape"))
            continue
        changed = f"\0{st.st_ctime_ns}" if ctime else ""
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}{changed}\n".encode(errors="surrogateescape"))  # fmt: skip


def _cached_decode(
    split: Split, size: int, channels: int, interpolation: str, desc: str, quiet: bool, cache: Path
) -> tuple[np.ndarray, list[int], list[str]]:
    key = cache_key(split.paths, size, channels, interpolation)
    array_path, info_path = cache / f"{key}.npy", cache / f"{key}.json"
    found = _read_cached(array_path, info_path, (len(split), size, size, channels))
    from .distributed import current

    d = current()  # under torchrun the ranks build a missing entry together, each its share
    if d.world > 1 and d.any(found is None):
        together = _decode_together(
            split, key, size, channels, interpolation, desc, quiet, cache, d
        )
        if together is not None:
            return together
    if found is not None:
        return found
    _make_folder(cache)
    tmp = cache / f".{key}.{os.getpid()}.npy.tmp"
    try:
        out = _new_array(tmp, (len(split), size, size, channels), desc)
        bad_idx, bad = _decode_files(split.paths, out, size, channels, interpolation, desc, quiet)
        out.flush()
        del out
        os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    return _publish(array_path, info_path, split, size, channels, bad_idx, bad)


def _decode_together(
    split: Split, key: str, size: int, channels: int, interpolation: str, desc: str,
    quiet: bool, cache: Path, d,
) -> tuple[np.ndarray, list[int], list[str]] | None:  # fmt: skip
    """One decode per cluster: rank 0 allocates the entry, every rank decodes its contiguous
    block of the files into it (positioned writes, so nodes sharing the cache over NFS never
    write the same bytes), rank 0 publishes it, and every rank reads it. None when some rank
    cannot see rank 0's file (a cache folder local to each node): each then decodes alone."""
    shape = (len(split), size, size, channels)
    name, error = f".{key}.{socket.gethostname()}-{os.getpid()}.npy.tmp", None
    if d.main:
        try:
            _make_folder(cache)
            _new_array(cache / name, shape, desc)
        except UserError as err:
            error = str(err)
    name, error = d.broadcast((name, error))
    if error is not None:
        raise UserError(error)
    tmp = cache / name  # each rank's own cache folder: the same one only if it is shared
    if d.any(not tmp.is_file()):
        if d.main:
            tmp.unlink(missing_ok=True)
        return None
    try:
        bounds = np.linspace(0, len(split), d.world + 1).astype(int).tolist()
        lo, hi = bounds[d.rank], bounds[d.rank + 1]
        header = np.load(tmp, mmap_mode="r").offset
        with _RowWriter(tmp, header + lo * int(np.prod(shape[1:])), shape[1:]) as rows:
            part = f"{desc} (rank {d.rank}: {hi - lo} of {len(split)})"
            bad_idx, bad = _decode_files(
                split.paths[lo:hi], rows, size, channels, interpolation, part, quiet or not d.main
            )
        every = d.all_objects(([lo + i for i in bad_idx], bad))
        bad_idx = [i for idx, _ in every for i in idx]
        bad = [line for _, lines in every for line in lines]
        d.barrier()  # every block written and synced
        if d.main:
            os.replace(tmp, cache / f"{key}.npy")
            _publish(
                cache / f"{key}.npy", cache / f"{key}.json", split, size, channels, bad_idx, bad
            )
        d.barrier()
    finally:
        if d.main:
            tmp.unlink(missing_ok=True)
    return np.load(cache / f"{key}.npy", mmap_mode="r"), bad_idx, bad


class _RowWriter:
    """`rows[i] = image` writes image i of a block at its place in a file (os.pwrite: threads
    and processes may write their own rows of one file at once)."""

    def __init__(self, path: Path, start: int, row_shape: tuple):
        self.path, self.start, self.row_bytes = path, start, int(np.prod(row_shape))

    def __enter__(self):
        self.fd = os.open(self.path, os.O_WRONLY)
        return self

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        os.pwrite(
            self.fd, np.ascontiguousarray(row, np.uint8).tobytes(), self.start + i * self.row_bytes
        )

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _make_folder(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the decode cache {cache}: {err.strerror}") from None


def _new_array(tmp: Path, shape: tuple, desc: str) -> np.memmap:
    """A new .npy file of `shape` uint8 with its blocks allocated, open as a memory map."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    _reserve(tmp, out.offset + out.nbytes, desc)
    return out


def _publish(array_path, info_path, split, size, channels, bad_idx, bad) -> tuple:
    info = {"n": len(split), "size": size, "channels": channels, "bad_idx": bad_idx, "bad": bad}
    from .checkpoint import write_json  # atomic: a crash leaves the old entry or none

    write_json(info_path, info)
    return np.load(array_path, mmap_mode="r"), bad_idx, bad


def _reserve(path: Path, nbytes: int, desc: str) -> None:
    """Allocate a new cache file's blocks before decoding into it: a full disk is then one clear
    error here, not a bus error (SIGBUS, no message) when a page of the sparse memory map is
    first written, minutes later."""
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        return
    except (AttributeError, OSError) as err:
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    free = shutil.disk_usage(path.parent).free
    if not full and free >= nbytes:
        return  # no posix_fallocate here, or not on this file system, but room enough
    raise UserError(f"{desc}: the decode cache needs {nbytes / 1e9:.1f} GB in {path.parent} and {free / 1e9:.1f} GB is free: free some space, or set TRANSFERLAB_CACHE (or --cache-dir) to a disk with room, or --cache-dir off to decode in memory")  # fmt: skip


def _read_cached(array_path: Path, info_path: Path, shape: tuple) -> tuple | None:
    """A cache entry if it is whole (the shape it should have, readable info); else None, so
    a corrupt or truncated entry is rebuilt rather than trusted."""
    if not (array_path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
        array = np.load(array_path, mmap_mode="r")
        if array.shape == shape and array.dtype == np.uint8 and info["n"] == shape[0]:
            return array, list(info["bad_idx"]), list(info["bad"])
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        pass
    warnings.warn(f"decode cache entry {array_path.name} is damaged: rebuilding it", stacklevel=3)
    return None


def _to_array(im: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def unreadable(bad: list[str]) -> UnreadableImages:
    from .hfdata import fix_for  # (a dataset's rows are mended in the dataset)

    return UnreadableImages.listed(bad, fix_for(bad))


def decode_splits(ds, prep, cfg, name, log, quiet, splits=("train", "val", "test")) -> tuple[dict, dict, list]:  # fmt: skip
    """Decode every split at the model's size; bad images stop the run (all splits' named at once:
    fixed split by split, they took a run each) or, if asked, are dropped, in the lines returned."""
    cache, train = resolve_cache(cfg.cache_dir), ds.splits["train"]
    if cache and train.paths is not None:
        log(f"[{name}] decoded-image cache: {cache}")
    if train.members is not None:
        log(f"[{name}] images read from {len(train.shards)} train shard(s) and decoded per batch "
            f"({'--num-workers ' + str(cfg.num_workers) if cfg.num_workers else 'a thread per core'}; no cache)")  # fmt: skip
    images, labels, unread, skipped = {}, {}, [], []
    for split in splits:
        try:
            arr, kept, bad = decode_checked(
                ds.splits[split],
                prep.input_size,
                prep.channels,
                prep.interpolation,
                cfg.skip_bad_images,
                f"decode {split}",
                quiet,
                cache,
                lazy=True,
            )
        except UnreadableImages as err:
            unread += err.bad
            continue
        skipped += [f"skipped {len(bad)} unreadable {split} image(s) (--skip-bad-images): " + "; ".join(bad)] * bool(bad)  # fmt: skip
        images[split], labels[split] = arr, kept.labels
    if unread:
        raise unreadable(unread)
    if few := [f"{s} {len(v)}" for s, v in labels.items() if len(v) < 1 + (s == "train")]:  # fmt: skip
        raise UserError(f"too few images are readable once --skip-bad-images left out the others ({', '.join(few)}; train needs 2{', val and test 1' * (len(labels) > 1)}): fix or replace the unreadable ones")  # fmt: skip
    for line in skipped:  # (said once nothing refuses: a refusal stays one line)
        log(f"[{name}] {line}", note=True)
    log(f"[{name}] {', '.join(f'{k} {len(v)}' for k, v in labels.items())} images")
    return images, labels, skipped
