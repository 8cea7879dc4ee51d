"""Dataset sources, splits, decoding to uint8 arrays, batched augmentation and loaders.

Every source yields class ids in a fixed order, human-readable names, and three splits:
train, val (always carved from train, never from test) and test. Images are decoded once per
(split, input size, channels) into a uint8 array (N, H, W, C); augmentation then works on whole
batches of uint8 tensors, its randomness a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SPLIT_SEED = 0  # splits never depend on a run's seed, so every run of a dataset shares them
TEST_FRACTION = 0.2  # held-out share when a source has no test split of its own
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass
class Split:
    """One split: labels plus either image paths or an in-memory uint8 array (N, H, W, C)."""

    labels: np.ndarray  # (N,) int64
    paths: list[str] | None = None
    arrays: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        paths = [self.paths[i] for i in idx] if self.paths is not None else None
        arrays = self.arrays[idx] if self.arrays is not None else None
        return Split(self.labels[idx], paths, arrays)


@dataclass
class Dataset:
    spec: str  # the spec it was loaded from, e.g. "tiny-imagenet:/data/tiny-imagenet-200"
    classes: list[str]  # stable class ids (WordNet ids, folder names, digits)
    names: list[str]  # human-readable class names, same order
    splits: dict[str, Split]  # train, val, test
    native_size: int  # the images' own size (used for models trained from scratch)
    native_channels: int  # 1 for grayscale sources, else 3
    fingerprint: str = ""  # sha256 of every split's (relative path or pixels, label)
    notes: tuple[str, ...] = ()  # what loading skipped (folders, files), to be printed


# ----------------------------------------------------------------------------- sources


PATH_KINDS = ("tiny-imagenet", "folder")  # specs whose argument is a path


def canonical(spec: str) -> str:
    """The spec with its path made absolute, so a run's record of its data holds from any cwd."""
    kind, _, arg = str(spec).partition(":")
    if kind in PATH_KINDS and arg:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    return str(spec)


def load(spec: str, val_fraction: float = 0.1, limit: int | None = None) -> Dataset:
    """Load a dataset spec: `digits`, `tiny-imagenet:PATH` or `folder:PATH`."""
    kind, _, arg = str(spec).partition(":")
    if kind not in SOURCES:
        raise UserError(f"unknown dataset kind '{kind}' in '{spec}' (known: {', '.join(SOURCES)})")
    if kind in PATH_KINDS and not arg:
        raise UserError(f"dataset '{kind}' needs a path: {kind}:PATH")
    notes: list[str] = []
    classes, names, train, test, native_size, channels = SOURCES[kind](arg, notes)
    if len(classes) < 2:
        raise UserError(
            f"{spec} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least "
            "two: point --data at the folder that holds the class folders"
        )
    train, val = carve(train, val_fraction)
    splits = {"train": train, "val": val, "test": test}
    if limit:
        splits = {k: v.subset(stratified_head(v.labels, limit)) for k, v in splits.items()}
    for name in ("train", "val", "test"):
        absent = sorted(set(range(len(classes))) - set(splits[name].labels.tolist()))
        if absent:
            notes.append(
                f"{len(absent)} class(es) have no {name} image (too few images): "
                + ", ".join(classes[i] for i in absent[:5])
                + (" ..." if len(absent) > 5 else "")
            )
    root = Path(arg).expanduser() if kind in PATH_KINDS else None
    return Dataset(
        canonical(spec), classes, names, splits, native_size, channels,
        fingerprint(splits, root), tuple(notes),
    )  # fmt: skip


def fingerprint(splits: dict[str, Split], root: Path | None) -> str:
    """What the splits hold: file paths relative to the data root (so a moved dataset keeps
    its fingerprint) or in-memory pixels, with their labels. Cheap: no image is read."""
    h = hashlib.sha256()
    for name in sorted(splits):
        split = splits[name]
        h.update(f"{name}\0{len(split)}\0".encode())
        h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
        if split.paths is not None:
            for path in split.paths:
                rel = os.path.relpath(path, root) if root is not None else path
                h.update(rel.encode(errors="surrogateescape") + b"\n")
        else:
            h.update(np.ascontiguousarray(split.arrays).tobytes())
    return h.hexdigest()[:16]


def _digits(_: str, notes: list[str]):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    arrays = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    everything = Split(bunch.target.astype(np.int64), arrays=arrays)
    train, test = carve(everything, TEST_FRACTION)
    classes = [str(c) for c in bunch.target_names]
    return classes, classes, train, test, 8, 1


def _synthetic(arg: str, notes: list[str]):
    """`synthetic:N` or `synthetic:NxSIZE`: N random RGB images whose class is the colour of
    a central square (10 classes), made in memory; for benchmarks and smoke tests."""
    count, _, size = arg.partition("x")
    try:
        n, size = int(count or 2000), int(size or 64)
    except ValueError:
        raise UserError(f"synthetic data is synthetic:N or synthetic:NxSIZE, got '{arg}'") from None
    rng = np.random.default_rng(SPLIT_SEED)
    labels = np.arange(n) % 10
    arrays = rng.integers(0, 80, (n, size, size, 3), dtype=np.uint8)
    colours = rng.integers(60, 255, (10, 3), dtype=np.uint8)
    q = size // 4
    arrays[:, q : size - q, q : size - q] = colours[labels][:, None, None, :]
    train, test = carve(Split(labels.astype(np.int64), arrays=arrays), TEST_FRACTION)
    classes = [f"class{i}" for i in range(10)]
    return classes, classes, train, test, size, 3


def _tiny_imagenet(root: str, notes: list[str]):
    root_path = _existing_dir(root)
    wnids_file = root_path / "wnids.txt"
    if not wnids_file.is_file():
        raise UserError(f"not a Tiny ImageNet folder (no wnids.txt): {root}")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    words = {}
    if (root_path / "words.txt").is_file():
        for line in (root_path / "words.txt").read_text().splitlines():
            wnid, _, name = line.partition("\t")
            words[wnid] = name.strip()
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for wnid in wnids:
        files = _image_files(root_path / "train" / wnid / "images")
        if not files:
            raise UserError(f"class {wnid} has no training images in {root_path / 'train' / wnid}")
        paths += files
        labels += [index[wnid]] * len(files)
    ann = root_path / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"missing {ann}")
    test_paths, test_labels = [], []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise UserError(f"{ann}: class {parts[1]} is not in wnids.txt")
        test_paths.append(str(root_path / "val" / "images" / parts[0]))
        test_labels.append(index[parts[1]])
    names = [words.get(w, w) for w in wnids]
    train = Split(np.array(labels, dtype=np.int64), paths=paths)
    test = Split(np.array(test_labels, dtype=np.int64), paths=test_paths)
    return wnids, names, train, test, 64, 3


def _folder(root: str, notes: list[str]):
    root_path = _existing_dir(root)
    subdirs = {d.name for d in _visible_dirs(root_path)}
    if "train" in subdirs:
        classes = _class_dirs(root_path / "train", notes)
        train = _folder_split(root_path / "train", classes, notes)
        held_out = "test" if "test" in subdirs else "val" if "val" in subdirs else None
        if held_out:
            test = _folder_split(root_path / held_out, classes, notes)
        else:
            train, test = carve(train, TEST_FRACTION)
    else:
        classes = _class_dirs(root_path, notes)
        train, test = carve(_folder_split(root_path, classes, notes), TEST_FRACTION)
    return classes, classes, train, test, native_size(train.paths), 3


SOURCES = {
    "digits": _digits,
    "tiny-imagenet": _tiny_imagenet,
    "folder": _folder,
    "synthetic": _synthetic,
}


def _existing_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"dataset path does not exist: {path}")
    if not p.is_dir():
        raise UserError(f"dataset path is not a folder: {path}")
    return p


def _visible_dirs(path: Path, notes: list[str] | None = None) -> list[Path]:
    """Sub-folders, skipping hidden ones such as .ipynb_checkpoints (never classes); what is
    skipped is added to `notes`, never dropped in silence."""
    dirs = sorted(d for d in path.iterdir() if d.is_dir())
    hidden = [d.name for d in dirs if d.name.startswith((".", "_"))]
    if hidden and notes is not None:
        notes.append(f"skipped hidden folder(s) in {path}: {', '.join(hidden)}")
    return [d for d in dirs if not d.name.startswith((".", "_"))]


def _image_files(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(
        str(f)
        for f in path.iterdir()
        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
    )


def _class_dirs(root: Path, notes: list[str]) -> list[str]:
    classes = [d.name for d in _visible_dirs(root)]
    if not classes:
        raise UserError(f"no class folders in {root}")
    return classes


def _folder_split(root: Path, classes: list[str], notes: list[str]) -> Split:
    found = [d.name for d in _visible_dirs(root, notes)]
    if set(found) != set(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise UserError(
            f"{root} has different classes from train: extra {extra or '[]'}, missing {missing or '[]'}"
        )
    paths, labels = [], []
    others = []
    for i, name in enumerate(classes):
        files = _image_files(root / name)
        if not files:
            raise UserError(f"class folder has no images: {root / name}")
        paths += files
        labels += [i] * len(files)
        others += [f.name for f in (root / name).iterdir() if f.is_file() and str(f) not in files]
    if others:
        notes.append(
            f"skipped {len(others)} file(s) in {root} that are not images (by extension, one of "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}): {', '.join(sorted(others)[:5])}"
            + (" ..." if len(others) > 5 else "")
        )
    return Split(np.array(labels, dtype=np.int64), paths=paths)


NATIVE_SAMPLE = 64  # files whose sizes decide a folder's native size


def native_size(paths: list[str]) -> int:
    """The median shorter side of up to NATIVE_SAMPLE files spread over the list: one odd file
    (a 1x1 thumbnail, a 4000 px photo) does not decide it. Unreadable files are skipped here
    (decoding reports them); with none readable, 224."""
    picks = np.unique(np.linspace(0, len(paths) - 1, min(NATIVE_SAMPLE, len(paths))).astype(int))
    sides = []
    for i in picks:
        try:
            with Image.open(paths[i]) as im:
                sides.append(min(im.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return int(np.clip(np.median(sides), 8, 1024)) if sides else 224


# ----------------------------------------------------------------------------- splits


def carve(split: Split, fraction: float) -> tuple[Split, Split]:
    """Seeded stratified split of `split` into (rest, held-out fraction)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(split))
    counts = np.bincount(split.labels)
    n_classes = int((counts > 0).sum())
    n_held = max(1, int(np.ceil(fraction * len(idx))))
    stratify = None
    if counts[counts > 0].min() >= 2:  # stratify, with at least one held-out image per class
        n_held, stratify = max(n_held, n_classes), split.labels
    if len(idx) - n_held < 1:
        raise UserError(f"too few images ({len(idx)}) to hold out {fraction:.0%} of them")
    rest, held = train_test_split(idx, test_size=n_held, random_state=SPLIT_SEED, stratify=stratify)
    return split.subset(np.sort(rest)), split.subset(np.sort(held))


def stratified_head(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` samples, spread evenly over classes, seeded."""
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    perm = rng.permutation(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in perm:  # rank of each sample within its class, in permuted order
        rank[i] = seen.get(labels[i], 0)
        seen[labels[i]] = rank[i] + 1
    order = perm[np.argsort(rank[perm], kind="stable")]
    return np.sort(order[:limit])


# ----------------------------------------------------------------------------- decoding


def open_image(path: str, channels: int) -> Image.Image:
    """Open any image mode as sane 8-bit RGB or L (16-bit and palette modes included)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() or 1.0
            im = Image.fromarray((arr * (255.0 / hi)).round().astype(np.uint8), "L")
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = arr.min(), arr.max()
            im = Image.fromarray(((arr - lo) / ((hi - lo) or 1) * 255).astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA"):  # flatten transparency onto white
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im.convert("RGBA"))
        return im.convert("L" if channels == 1 else "RGB")


def resize(im: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop to a square."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), INTERPOLATIONS[interpolation])
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode(
    split: Split,
    size: int,
    channels: int,
    interpolation: str = "bilinear",
    desc: str = "decode",
    quiet: bool = False,
    cache: Path | None = None,
) -> np.ndarray:
    """Decode and resize a split once into a uint8 array (N, size, size, channels).

    Unreadable images (corrupt, truncated, decompression bombs) stop it, every one listed.
    """
    return decode_checked(split, size, channels, interpolation, False, desc, quiet, cache)[0]


def decode_checked(
    split: Split,
    size: int,
    channels: int,
    interpolation: str = "bilinear",
    skip_bad: bool = False,
    desc: str = "decode",
    quiet: bool = False,
    cache: Path | None = None,
) -> tuple[np.ndarray, Split, list[str]]:
    """Like decode(); with skip_bad, unreadable images are dropped and reported instead.

    With `cache`, the decoded array lives in a memory-mapped .npy file there, keyed by the file
    list, sizes, mtimes and target size: later runs and models of the same size reuse it.
    Returns (images, the split without the dropped images, one line per dropped image).
    """
    if split.arrays is not None:
        return _decode_arrays(split.arrays, size, channels, interpolation), split, []
    if cache is not None:
        out, bad_idx, bad = _cached_decode(split, size, channels, interpolation, desc, quiet, cache)
    else:
        out = np.empty((len(split), size, size, channels), dtype=np.uint8)
        bad_idx, bad = _decode_files(split.paths, out, size, channels, interpolation, desc, quiet)
    if bad and not skip_bad:
        raise UserError(
            f"{len(bad)} unreadable image(s), fix or remove them or pass "
            f"--skip-bad-images: " + "; ".join(bad)
        )
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
    """Decode image files into `out` (an array or memmap); returns the unreadable ones."""
    bad, bad_idx = [], []
    show = not quiet and len(paths) >= 500
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, path in enumerate(tqdm(paths, desc=desc, disable=not show, leave=False, unit="img")):
            try:
                out[i] = _to_array(
                    resize(open_image(path, channels), size, interpolation), channels
                )
            except (
                OSError,
                ValueError,
                SyntaxError,
                Image.DecompressionBombError,
                Image.DecompressionBombWarning,
            ) as err:
                bad.append(f"{path} ({type(err).__name__}: {err})")
                bad_idx.append(i)
    return bad_idx, bad


CACHE_VERSION = 1  # bump when decoding changes, so old cache files are not reused


def resolve_cache(setting: str | None) -> Path | None:
    """None: $TRANSFERLAB_CACHE or ~/.cache/transferlab; "off": no cache; else that folder."""
    if setting in ("off", "none", "false", "0"):
        return None
    if setting:
        return Path(setting).expanduser()
    env = os.environ.get("TRANSFERLAB_CACHE")
    if env in ("off", "none", "false", "0"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transferlab"


def cache_key(paths: list[str], size: int, channels: int, interpolation: str) -> str:
    """A digest of what the decoded array depends on: files (path, size, mtime) and target."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, size, channels, interpolation]).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _cached_decode(
    split: Split, size: int, channels: int, interpolation: str, desc: str, quiet: bool, cache: Path
) -> tuple[np.ndarray, list[int], list[str]]:
    try:
        key = cache_key(split.paths, size, channels, interpolation)
    except OSError as err:  # a file vanished: report it like any unreadable image
        raise UserError(f"cannot read {err.filename}: {err.strerror}") from None
    array_path, info_path = cache / f"{key}.npy", cache / f"{key}.json"
    shape = (len(split), size, size, channels)
    found = _read_cached(array_path, info_path, shape)
    if found is not None:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the decode cache {cache}: {err.strerror}") from None
    tmp = cache / f".{key}.{os.getpid()}.npy.tmp"
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(split), size, size, channels)
        )
        bad_idx, bad = _decode_files(split.paths, out, size, channels, interpolation, desc, quiet)
        out.flush()
        del out
        os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    info = {"n": len(split), "size": size, "channels": channels, "bad_idx": bad_idx, "bad": bad}
    from .checkpoint import write_json  # atomic: a crash leaves the old entry or none

    write_json(info_path, info)
    return np.load(array_path, mmap_mode="r"), bad_idx, bad


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


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Augment:
    """Batched training augmentation of uint8 images; randomness from (seed, epoch, index)."""

    crop: str = "pad"  # pad (random crop with reflect padding) | rrc (random-resized-crop) | none
    pad: int = 4  # padding in pixels for crop="pad"
    flip: bool = True  # random horizontal flip
    scale: tuple[float, float] = (0.35, 1.0)  # area fraction range for crop="rrc"
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range for crop="rrc"

    def params(self, n: int, size: int, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        """Per-index parameters for one epoch: index them with a batch's sample indices."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out = {"flip": torch.rand(n, generator=g) < 0.5}
        if self.crop == "pad":
            out["dy"], out["dx"] = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        elif self.crop == "rrc":
            area = size * size * torch.empty(n).uniform_(*self.scale, generator=g)
            log_r = torch.empty(n).uniform_(
                math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g
            )
            w = (area * log_r.exp()).sqrt().clamp(max=size)
            h = (area / log_r.exp()).sqrt().clamp(max=size)
            x0 = torch.rand(n, generator=g) * (size - w)
            y0 = torch.rand(n, generator=g) * (size - h)
            out["box"] = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)  # (N, 4) pixels
        return out

    def __call__(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment a uint8 batch (B, H, W, C) with its samples' parameters `p`."""
        b, h, w, _ = x.shape
        p = {k: v.to(x.device) for k, v in p.items()}
        if self.crop == "pad" and self.pad > 0:
            x = torch.nn.functional.pad(
                x.permute(0, 3, 1, 2).float(), (self.pad,) * 4, mode="reflect"
            )
            x = x.permute(0, 2, 3, 1).to(torch.uint8)  # (B, H+2p, W+2p, C)
            rows = p["dy"][:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = p["dx"][:, None] + torch.arange(w, device=x.device)  # (B, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = x[batch, rows[:, :, None], cols[:, None, :]]
        elif self.crop == "rrc":
            from torchvision.ops import roi_align

            index = torch.arange(b, dtype=torch.float32, device=x.device)[:, None]
            boxes = torch.cat([index, p["box"]], dim=1)
            crops = roi_align(
                x.permute(0, 3, 1, 2).float(),
                boxes,
                output_size=(h, w),
                spatial_scale=1.0,
                sampling_ratio=1,
                aligned=True,
            )  # (B, C, H, W)
            x = crops.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        if self.flip:
            x = torch.where(p["flip"][:, None, None, None], x.flip(2), x)
        return x.contiguous()


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in channels_last memory, normalised."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


class EpochSampler(torch.utils.data.Sampler):
    """Yields batches of indices whose order is a pure function of (seed, epoch).

    `start` skips the first batches (mid-epoch resume). A last batch of one sample is merged
    into the previous batch, since BatchNorm cannot train on a single sample. Under
    DistributedDataParallel, rank r of `world` takes the r-th stride of every global batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.shuffle, self.start, self.rank, self.world = shuffle, start, rank, world

    def batches(self) -> list[torch.Tensor]:
        """The global batches of this epoch (every rank's samples)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        out = list(order.split(self.batch_size))
        if self.shuffle and len(out) > 1 and len(out[-1]) <= self.world:
            out[-2] = torch.cat(out[-2:])
            out.pop()
        return out

    def __iter__(self):
        yield from (b[self.rank :: self.world].tolist() for b in self.batches()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start)


class ArrayDataset(torch.utils.data.Dataset):
    """Indexable by a list of indices: returns (uint8 images, labels, indices) for a batch.

    `images` may be a read-only memmap of the decode cache: only the batch is read into memory.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, torch.from_numpy(np.asarray(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]):
        i = np.asarray(idx, dtype=np.int64)
        if isinstance(self.images, torch.Tensor):  # resident on the GPU: index it there
            batch = self.images[torch.from_numpy(i).to(self.images.device)]
        else:
            batch = torch.from_numpy(self.images[i])
        return batch, self.labels[i], torch.from_numpy(i)


def loader(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    num_workers: int = 0,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a decoded split, with its own generator (no global RNG use)."""
    sampler = EpochSampler(len(labels), batch_size, seed, epoch, shuffle, start, rank, world)
    return torch.utils.data.DataLoader(
        ArrayDataset(images, labels),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
