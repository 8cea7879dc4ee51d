"""Dataset sources, splits, decoding to uint8 arrays, batched augmentation and loaders.

Every source yields class ids in a fixed order, human-readable names, and three splits:
train, val (always carved from train, never from test) and test. Images are decoded once per
(split, input size, channels) into a uint8 array (N, H, W, C); augmentation then works on whole
batches of uint8 tensors, its randomness a pure function of (seed, epoch, index).
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- sources


def load(spec: str, val_fraction: float = 0.1, limit: int | None = None) -> Dataset:
    """Load a dataset spec: `digits`, `tiny-imagenet:PATH` or `folder:PATH`."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES:
        raise UserError(f"unknown dataset kind '{kind}' in '{spec}' (known: {', '.join(SOURCES)})")
    if kind != "digits" and not arg:
        raise UserError(f"dataset '{kind}' needs a path: {kind}:PATH")
    classes, names, train, test, native_size, channels = SOURCES[kind](arg)
    train, val = carve(train, val_fraction)
    splits = {"train": train, "val": val, "test": test}
    if limit:
        splits = {k: v.subset(stratified_head(v.labels, limit)) for k, v in splits.items()}
    return Dataset(spec, classes, names, splits, native_size, channels)


def _digits(_: str):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    arrays = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    everything = Split(bunch.target.astype(np.int64), arrays=arrays)
    train, test = carve(everything, TEST_FRACTION)
    classes = [str(c) for c in bunch.target_names]
    return classes, classes, train, test, 8, 1


def _tiny_imagenet(root: str):
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


def _folder(root: str):
    root_path = _existing_dir(root)
    subdirs = {d.name for d in _visible_dirs(root_path)}
    if "train" in subdirs:
        classes = _class_dirs(root_path / "train")
        train = _folder_split(root_path / "train", classes)
        held_out = "test" if "test" in subdirs else "val" if "val" in subdirs else None
        if held_out:
            test = _folder_split(root_path / held_out, classes)
        else:
            train, test = carve(train, TEST_FRACTION)
    else:
        classes = _class_dirs(root_path)
        train, test = carve(_folder_split(root_path, classes), TEST_FRACTION)
    size = _probe_size(train.paths[0])
    return classes, classes, train, test, size, 3


SOURCES = {"digits": _digits, "tiny-imagenet": _tiny_imagenet, "folder": _folder}


def _existing_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"dataset path does not exist: {path}")
    if not p.is_dir():
        raise UserError(f"dataset path is not a folder: {path}")
    return p


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-folders, skipping hidden ones such as .ipynb_checkpoints (never classes)."""
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))


def _image_files(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(
        str(f)
        for f in path.iterdir()
        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
    )


def _class_dirs(root: Path) -> list[str]:
    classes = [d.name for d in _visible_dirs(root)]
    if not classes:
        raise UserError(f"no class folders in {root}")
    return classes


def _folder_split(root: Path, classes: list[str]) -> Split:
    found = [d.name for d in _visible_dirs(root)]
    if set(found) != set(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise UserError(
            f"{root} has different classes from train: extra {extra or '[]'}, missing {missing or '[]'}"
        )
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = _image_files(root / name)
        if not files:
            raise UserError(f"class folder has no images: {root / name}")
        paths += files
        labels += [i] * len(files)
    return Split(np.array(labels, dtype=np.int64), paths=paths)


def _probe_size(path: str) -> int:
    try:
        with Image.open(path) as im:
            return int(min(im.size))
    except Exception:
        return 224


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
) -> np.ndarray:
    """Decode and resize a split once into a uint8 array (N, size, size, channels).

    Unreadable images (corrupt, truncated, decompression bombs) stop it, every one listed.
    """
    return decode_checked(split, size, channels, interpolation, False, desc, quiet)[0]


def decode_checked(
    split: Split,
    size: int,
    channels: int,
    interpolation: str = "bilinear",
    skip_bad: bool = False,
    desc: str = "decode",
    quiet: bool = False,
) -> tuple[np.ndarray, Split, list[str]]:
    """Like decode(); with skip_bad, unreadable images are dropped and reported instead.

    Returns (images, the split without the dropped images, one line per dropped image).
    """
    out = np.empty((len(split), size, size, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    if split.arrays is not None:
        for i, arr in enumerate(split.arrays):
            im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert(mode)
            out[i] = _to_array(resize(im, size, interpolation), channels)
        return out, split, []
    bad, bad_idx = [], []
    show = not quiet and len(split) >= 500
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, path in enumerate(
            tqdm(split.paths, desc=desc, disable=not show, leave=False, unit="img")
        ):
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
    if bad and not skip_bad:
        raise UserError(
            f"{len(bad)} unreadable image(s), fix or remove them or pass "
            f"--skip-bad-images: " + "; ".join(bad)
        )
    if not bad:
        return out, split, []
    keep = np.setdiff1d(np.arange(len(split)), bad_idx)
    return out[keep], split.subset(keep), bad


def _to_array(im: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


# ----------------------------------------------------------------------------- batches


def augment_params(n: int, seed: int, epoch: int, pad: int) -> tuple[torch.Tensor, ...]:
    """Per-index flip and crop offsets for one epoch: a pure function of (seed, epoch, index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    flips = torch.rand(n, generator=g) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    return flips, offsets[0], offsets[1]


def augment(
    x: torch.Tensor, flips: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, flip: bool
) -> torch.Tensor:
    """Random crop (reflect padding) and horizontal flip of a uint8 batch (B, H, W, C)."""
    b, h, w, _ = x.shape
    if pad > 0:
        x = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="reflect")
        x = x.permute(0, 2, 3, 1).to(torch.uint8)  # (B, H+2p, W+2p, C)
        rows = dy[:, None] + torch.arange(h)  # (B, H)
        cols = dx[:, None] + torch.arange(w)  # (B, W)
        x = x[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        x = torch.where(flips[:, None, None, None], x.flip(2), x)
    return x


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in channels_last memory, normalised."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


class EpochSampler(torch.utils.data.Sampler):
    """Yields batches of indices whose order is a pure function of (seed, epoch).

    `start` skips the first batches (mid-epoch resume). A last batch of one sample is merged
    into the previous batch, since BatchNorm cannot train on a single sample.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, epoch: int, shuffle: bool, start: int = 0
    ):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.shuffle, self.start = shuffle, start

    def batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        out = list(order.split(self.batch_size))
        if self.shuffle and len(out) > 1 and len(out[-1]) == 1:
            out[-2] = torch.cat(out[-2:])
            out.pop()
        return out

    def __iter__(self):
        yield from (b.tolist() for b in self.batches()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start)


class ArrayDataset(torch.utils.data.Dataset):
    """Indexable by a list of indices: returns (uint8 images, labels, indices) for a batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(images if images.flags.writeable else images.copy())
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]):
        i = torch.as_tensor(idx)
        return self.images[i], self.labels[i], i


def loader(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    num_workers: int = 0,
    start: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a decoded split, with its own generator (no global RNG use)."""
    sampler = EpochSampler(len(labels), batch_size, seed, epoch, shuffle, start)
    return torch.utils.data.DataLoader(
        ArrayDataset(images, labels),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERLAB_CACHE", Path.home() / ".cache" / "transferlab"))
