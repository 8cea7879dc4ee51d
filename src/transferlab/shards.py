"""Datasets bigger than the decode cache, as WebDataset shards.

`transferlab data shard SPEC --out DIR` writes a dataset's train/val/test splits as tar shards
in the webdataset library's layout (sample KEY = KEY.jpg|png|... with the file's own bytes +
KEY.cls, the class index; samples in a seeded shuffled order, so a shard holds every class) and
`shards.json` (classes, names, shards per split) last, which marks
the folder complete. `--data wds:DIR` reads them: each split's members are indexed by their
offsets in the tars (headers only), and images are read by offset and decoded only when a batch
needs them (`ShardImages`: in DataLoader workers with --num-workers, else a thread per core;
training on a GPU without workers: on the GPU, `ShardImages.tensor`), never into a cache, so
memory does not grow with the dataset. Training visits shards in an order that is a pure
function of (seed, epoch), shuffling within each shard (batching.EpochSampler's groups): reads
stay in one shard at a time, and a resumed run skips to its batch exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data, decoding, leaks, outputs
from .bars import bar
from .config import UnreadableImages, UserError
from .folds import own_val

INDEX = "shards.json"
FORMAT = "transferlab-shards/1"
SHARD_SIZE = 1000  # samples per shard: ~100 MB of JPEGs at ImageNet sizes
EXTENSIONS = {"jpeg": "jpg", "mpo": "jpg"}  # Pillow's format -> webdataset's key, where they differ


def write(
    spec: str,
    out: str | Path,
    shard_size: int = SHARD_SIZE,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    skip_bad: bool = False,
    quiet: bool = False,
) -> dict:
    """Shard every split of `spec` into `out`; every image is decoded once to check it."""
    import webdataset as wds

    out = Path(out).expanduser()
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if str(spec).startswith("wds:"):
        raise UserError(f"{spec} is already sharded: shard the original data to change the shards")
    if val_fraction != 0.1 and own_val(spec):  # (recorded in shards.json, carving nothing)
        raise UserError(f"--val-fraction has no effect here: {spec} has a val split of its own (a folder's val/, a CSV's split column); drop it")  # fmt: skip
    ds = data.load(spec, val_fraction)
    action = outputs.check_out(out, "shards", overwrite=overwrite)
    root = data.data_root(ds.spec)
    if root is not None:
        outputs.refuse_overlap(out, [root], "the data folder")
    outputs.refuse_image_folders(out, outputs.image_folders(ds.splits), root or ds.spec)
    keep, bad = {}, []
    for name, split in ds.splits.items():  # every image read before the disk changes
        keep[name], lines = _check(split, ds.native_channels, f"check {name}", quiet)
        bad += lines
    if bad and not skip_bad:
        raise UserError(
            f"{len(bad)} unreadable image(s), nothing was written: fix or remove them or pass "
            "--skip-bad-images: " + UnreadableImages.some(bad)
        )
    splits, kept = {}, dataclasses.replace(ds, splits={k: v.subset(np.array(keep[k], int)) for k, v in ds.splits.items()})  # fmt: skip
    with outputs.lock(out):
        outputs.claim(out, "shards", action)
        for name, split in ds.splits.items():
            with wds.ShardWriter(
                str(out / f"{name}-%06d.tar"), maxcount=shard_size, verbose=0
            ) as sink:
                order = np.random.default_rng(data.SPLIT_SEED).permutation(keep[name])
                for i in bar(order, f"shard {name}", disable=quiet, unit="img"):
                    label = int(split.labels[i])
                    sink.write({"__key__": f"{i:08d}", **_sample(split, i), "cls": label})
            names = sorted(p.name for p in out.glob(f"{name}-*.tar"))
            splits[name] = {"shards": names, "n": len(keep[name])}
        index = {
            "format": FORMAT, "source": ds.spec, "fingerprint": ds.fingerprint,
            "val_fraction": val_fraction,  # how val was carved (where the source has none)
            "classes": ds.classes, "names": ds.names, "native_size": ds.native_size,
            "native_channels": ds.native_channels, "splits": splits, "skipped": bad,
            # what only the source's files show, said again by every run on the shards
            "origin": next((n for n in ds.notes if n.startswith("splits: ")), "") + f", before {len(bad)} unreadable were left out" * bool(bad),  # fmt: skip
            "copies": {k: leaks.own_copies(kept, k) for k in ("val", "test")},  # (of what is in them)
            "notes": [n for n in ds.notes if not n.startswith("splits: ")],  # (data shard said none)
        }  # fmt: skip
        from .checkpoint import write_json

        write_json(out / INDEX, index)
    return index


def _check(split: data.Split, channels: int, desc: str, quiet: bool) -> tuple[list[int], list[str]]:
    """The indices of the split's readable images, and one line per unreadable one."""
    if split.paths is None:
        return list(range(len(split))), []
    scratch = _Discard()
    bad_idx, bad = decoding._decode_files(split.paths, scratch, 8, channels, "nearest", desc, quiet)
    return sorted(set(range(len(split))) - set(bad_idx)), bad


class _Discard:
    def __setitem__(self, i, value) -> None:
        pass


def _sample(split: data.Split, i: int) -> dict[str, bytes]:
    """One image as webdataset fields: a file's own bytes under its format's extension (jpg,
    png, ...: what webdataset decoders key on), in-memory pixels as PNG."""
    if split.paths is not None:
        with Image.open(split.paths[i]) as im:  # the header only: the format, whatever the name
            ext = (im.format or "img").lower()
        return {EXTENSIONS.get(ext, ext): Path(split.paths[i]).read_bytes()}
    arr = split.arrays[i]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return {"png": buf.getvalue()}


# ----------------------------------------------------------------------------- reading


def _not_shards(root: Path) -> str:
    """Why `root` is no shard folder, and what to do: shard into it only where `data shard`
    would (it was told to shard into a .tar file or a folder of class folders; pass 48)."""
    from .classfolders import visible_dirs

    make = "make one with transferlab data shard SPEC --out"
    if not root.exists():
        return f"does not exist: {make} {root}"
    if not root.is_dir():
        near = f": did you mean wds:{root.parent}?" if (root.parent / INDEX).is_file() else ""
        return f"is a file; wds: takes the folder transferlab data shard wrote (its {INDEX} beside the .tar files){near}"  # fmt: skip
    if (outputs.read_mark(root) or {}).get("kind") == "shards":  # (a shard run that stopped)
        return f"has no {INDEX} (its data shard did not finish): {make} {root} --overwrite"
    if os.access(root, os.R_OK | os.X_OK) and visible_dirs(root):
        return f"has no {INDEX}: it holds folders, not shards (class folders: folder:{root}; to shard them: transferlab data shard folder:{root} --out A_NEW_FOLDER)"  # fmt: skip
    return f"has no {INDEX} (not a shard folder): {make} A_NEW_FOLDER"


def source(arg: str, notes: list[str]):
    """data.SOURCES["wds"]: the splits of a shard folder, each member found by its offset."""
    root = Path(arg).expanduser()
    index_path = root / INDEX
    if not index_path.is_file():
        raise UserError(f"wds:{arg} {_not_shards(root)}")
    try:
        index = json.loads(index_path.read_text())
        keys = {"classes", "names", "splits", "native_size", "native_channels", "skipped"}
        ours = isinstance(index, dict) and index.get("format") == FORMAT and keys <= set(index)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"{index_path} is not a transferlab shard index ({FORMAT})")
    if index["skipped"]:
        notes.append(f"{len(index['skipped'])} unreadable image(s) were left out when sharding")
    notes += [f"when sharded: {n}" for n in index.get("notes", []) if n.startswith("skipped ")]
    if index.get("origin"):  # (the line below says "given": by the shards, carved before them)
        notes.append(f"splits: as {index['source']} gave them when sharded: {index['origin'].removeprefix('splits: ')}")  # fmt: skip
    splits = {name: _index_split(root, s["shards"], len(index["classes"]))
              for name, s in index["splits"].items()}  # fmt: skip
    return index["classes"], index["names"], splits, index["native_size"], index["native_channels"]


def _index_split(root: Path, shards: list[str], classes: int) -> data.Split:
    """Members (shard, offset, size) and labels of a split, read from its tar headers."""
    members, labels = [], []
    for s, name in enumerate(shards):
        found: dict[str, dict] = {}
        try:
            with tarfile.open(root / name, "r:") as tar:  # uncompressed, as written
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    field = found.setdefault(key, {})
                    if ext == "cls":
                        field["cls"] = int(tar.extractfile(m).read())
                    elif m.isfile():
                        field["image"] = (s, m.offset_data, m.size)
        except (OSError, tarfile.TarError, ValueError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"cannot read shard {root / name}: {why} (damaged? write the folder again with "
                "transferlab data shard)"
            ) from None
        for key, field in found.items():
            if "image" not in field or not 0 <= field.get("cls", -1) < classes:
                raise UserError(f"shard {root / name}: sample {key} lacks an image or a class")
            members.append(field["image"])
            labels.append(field["cls"])
    paths = tuple(str(root / name) for name in shards)
    return data.Split(
        np.array(labels, np.int64), members=np.array(members, np.int64).reshape(-1, 3), shards=paths
    )


class _Member(io.BytesIO):
    """An image's bytes, named after its shard and offset in error messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__  # PIL names the file by repr in its errors


class ShardImages:
    """A sharded split's images as a lazy uint8 array (N, size, size, C).

    A slice or an index array gives another lazy view; an int index or np.asarray reads those
    members from their shards by offset and decodes them (a thread per core). It pickles small,
    so DataLoader workers decode their own batches. `groups` (each image's shard) lets the
    sampler shuffle shard by shard.
    """

    def __init__(
        self, split: data.Split, size: int, channels: int, interpolation: str, device=None
    ):
        self.split, self.size = split, size
        self.channels, self.interpolation = channels, interpolation
        self.device = device  # set (a CUDA device): batches decode there (`tensor`)
        self.shape = (len(split), size, size, channels)
        self.dtype = np.dtype(np.uint8)
        self.nbytes = int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.split)

    @property
    def groups(self) -> np.ndarray:
        return self.split.members[:, 0]

    @property
    def fingerprint(self) -> str:
        """A digest of which members, decoded how (what a feature cache keys on)."""
        h = hashlib.sha256(json.dumps([self.split.shards, self.shape, self.interpolation]).encode())
        h.update(np.ascontiguousarray(self.split.members).data)
        return h.hexdigest()

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return np.asarray(self[[idx]])[0]
        rows = np.arange(len(self))[idx]
        sub = self.split.subset(rows)
        return ShardImages(sub, self.size, self.channels, self.interpolation, self.device)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._decode(self._read())
        return out if dtype is None else out.astype(dtype)

    def _decode(self, files: list[_Member]) -> np.ndarray:
        """Read members decoded by Pillow (a thread per core); a damaged one is named."""
        out = np.empty((len(files), self.size, self.size, self.channels), np.uint8)
        _, bad = decoding._decode_files(files, out, self.size, self.channels, self.interpolation,
                                        "decode", True)  # fmt: skip
        if bad:
            fix = "write the shards again from the source with transferlab data shard"
            raise UnreadableImages(
                f"{len(bad)} unreadable image(s) in the shards (damaged since they were written: "
                f"{fix}): " + UnreadableImages.some(bad),
                bad,
                fix,
            )
        return out

    def _read(self) -> list[_Member]:
        """The members' bytes, read shard by shard with positioned reads."""
        members, shards = self.split.members, self.split.shards
        files: list = [None] * len(members)
        for s in np.unique(members[:, 0]):
            rows = np.flatnonzero(members[:, 0] == s)
            try:
                fd = os.open(shards[s], os.O_RDONLY)
            except OSError as err:
                raise UserError(f"cannot read shard {shards[s]}: {err.strerror}") from None
            try:
                for i in rows:
                    _, offset, size = members[i]
                    name = f"{shards[s]}@{offset}"
                    files[i] = _Member(os.pread(fd, int(size), int(offset)), name)
            finally:
                os.close(fd)
        return files

    def tensor(self) -> torch.Tensor:
        """The images as a uint8 tensor (N, size, size, C) on `self.device`: JPEGs decoded there
        by torchvision (nvJPEG on a GPU, a batch at a time), resized and centre-cropped as
        decoding.resize does (antialiased; within a few levels of Pillow's pixels). Other
        formats, a JPEG its EXIF turns (nvJPEG would not: a phone's sideways photo trained as
        shot, predicted upright), and any batch torchvision refuses (a damaged JPEG), take the
        CPU path, which names a damaged member."""
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(self.device or "cpu")
        files = self._read()
        jpeg = [i for i, f in enumerate(files) if f.getbuffer()[:3] == b"\xff\xd8\xff" and _upright(f)]  # fmt: skip
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        if jpeg:
            mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
            raw = [
                torch.frombuffer(bytearray(files[i].getbuffer()), dtype=torch.uint8) for i in jpeg
            ]
            try:
                with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec, whose
                    warnings.simplefilter("ignore", DeprecationWarning)  # builds pin one torch
                    decoded = decode_jpeg(raw, mode=mode, device=device)
            except RuntimeError:  # one bad member fails the batch: the CPU path names it
                jpeg, decoded = [], []
            for i, im in zip(jpeg, decoded, strict=True):
                out[i] = _resize_crop(im, self.size, self.interpolation).permute(1, 2, 0)
        rest = sorted(set(range(len(files))) - set(jpeg))
        if rest:  # the bytes already read, decoded by Pillow
            out[rest] = torch.from_numpy(self._decode([files[i] for i in rest])).to(device)
        return out


def _upright(f: _Member) -> bool:
    """Whether a JPEG's EXIF leaves it as stored (no orientation, or 1), as `decoding` shows it."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            return im.getexif().get(0x0112, 1) == 1
    except Exception:  # unreadable: the CPU path names it
        return False
    finally:
        f.seek(0)


def _resize_crop(im: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """decoding.resize on a uint8 (C, H, W) tensor: the shorter side to `size`, centre crop."""
    _, h, w = im.shape
    if (h, w) != (size, size):
        scale = size / min(w, h)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        mode = "nearest" if interpolation == "nearest" else interpolation
        x = torch.nn.functional.interpolate(
            im[None].float(), (nh, nw), mode=mode, antialias=mode != "nearest"
        )
        top, left = (nh - size) // 2, (nw - size) // 2
        im = x[0, :, top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)
    return im


def recorded_copies(spec: str, split: str, n: int) -> list[str]:
    """leaks.own_copies of the data a shard folder was written from, as `data shard` found them
    (the shards hold no files to compare: a run on them said nothing of copies its source's
    run noted), for a score on `n` of the split's images (--limit: on part of them, which may
    or may not hold those copies; the whole split's count was said as this score's)."""
    try:
        index = json.loads((Path(spec.partition(":")[2]) / INDEX).read_text())
        notes, whole = list(index.get("copies", {}).get(split, [])), index["splits"][split]["n"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []
    if n == whole:
        return notes
    return [
        f"{note.split(':')[0]} when sharded: this score on {n} of them may count some"
        for note in notes
    ]
